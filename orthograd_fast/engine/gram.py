"""Per-parameter Gram K = G G^T, coefficients b = G u and the update u - G^T c, from factors.

One :class:`ParamTerm` per trainable tensor gathers the uses captured for it and picks how to
evaluate them:

* **explicit** - every use materialized as [B, numel] in float64. Taken when the tensor is small
  (B * numel <= ``EXPLICIT_MAX``: biases, norm weights, small heads) or when uses of different
  kinds meet (a generic-fallback use of a tied parameter). Exact, and exactly the tensors whose
  Gram is worst conditioned (docs/math.md section 8).
* **tile** / **ghost** - one dense factored use (several uses of one tied tensor are concatenated
  along tokens); :func:`orthograd_fast.engine.route.choose_route` picks the order.
* **tokens** - uses that include embedding lookups (one-hot rows): the ghost order with the
  one-hot side evaluated by gathers and id equality, so the vocabulary is never materialized.
* **lookup** - the same uses when that is cheaper: per-sample rows of a slab of table rows at a
  time (index_add; per-sample tiles for a tied dense use), B^2 V d flops instead of the token
  route's (B T)^2 d, plus (B T)^2 V for a tied head's dense output gradients; little memory.

Precision: per-sample tiles are formed in the factors' dtype (fp32 for half factors) and reduced
to K in float64; token Grams (ghost) are formed in float64. So K is accurate to float64 rounding
and the solve can resolve directions far weaker than a float32 Gram could. On the CPU, tile, conv
and lookup terms whose float32 rows fit :data:`held_rows.MAX_BYTES` keep them instead: K from a float32
GEMM, refined by re-projection passes to the same result (:mod:`orthograd_fast.engine.held_rows`,
docs/math.md section 11); too ill-conditioned ones stay on float64. The Triton backend
accumulates in float32 instead: its terms are marked ``approx`` and the engine adds one
re-projection pass and a coarser rank tolerance (see :mod:`orthograd_fast.engine.solve`).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .conv_factors import ConvUse
from . import held_rows
from .factors import CHUNK_BYTES, ExplicitUse, OuterUse, _compute_dtype, explicit_rows, merge_tokens
from .route import GHOST, TILE, choose_route, choose_route_fused

# Tensors with B * numel at or below this many elements are materialized (fp64, exact).
EXPLICIT_MAX = 1 << 18
# Embedding tables take the lookup route (per-sample rows, a slab at a time) wherever it costs
# fewer flops than the token route; False forces the token route (tests).
LOOKUP_ROUTE = True
# Tile, conv and lookup routes: float64 per-sample rows are formed in slabs of about this size.
# Small enough to stay in cache between forming, widening and the Gram GEMM, and to add little to
# the peak memory (measured on 2 CPU cores: 4 MiB slabs 10-20% faster than 8 MiB, 2 MiB no faster).
TILE_SLAB_BYTES = 4 << 20
# Conv route: float32 per-sample tiles formed this many bytes per convolution call (each call
# unfolds its samples' input again; see ParamTerm._conv_gram_coef). Measured on 2 CPU cores against
# one call per float64 slab: conv Gram 25-30% faster (64 x 32 x 16 x 16 input, 64 channels: 32 ->
# 24 ms; 64 x 128 x 8 x 8, 128 channels: 154 -> 113 ms) at the same step peak memory. 8 MiB (4
# before): the small CNN's 64-channel layer at B = 64 (4.7 MB of tiles) in one channel slab instead
# of two, half the calls: project_ 40.8 -> 36.9 ms (interleaved A/B), step peak unchanged on the
# CNN and ResNet-18 at B = 32, 64. 16 MiB calls are ~2x faster still on the ResNet-18 shapes, but
# the grouped convolution's scratch grows with them: ResNet-18 B = 32 step peak 89 -> 195 MB.
CONV_TILE_BYTES = 8 << 20


class _SlabBuffer:
    """One scratch allocation reused by every slab of a term's loop: a fresh multi-MiB tensor per
    slab costs page faults (measured on 2 CPU cores: 20-35% of the tile route's Gram and
    coefficients for 2-8 MiB slabs). ``take`` returns a contiguous view of its first elements."""

    def __init__(self, n: int, device, dtype=torch.float64):
        self.flat = torch.empty(n, dtype=dtype, device=device)

    def take(self, *shape: int) -> Tensor:
        return self.flat[: math.prod(shape)].view(shape)


def update_amplification(K: Tensor, c: Tensor) -> Tensor:
    """sum_i |c_i| |g_i| / |sum_i c_i g_i| for K [..., B, B], c [..., B]: how much larger the
    update's terms are than the update. A GEMM in precision eps rounds the update by about eps
    times this, relative to its size (inf for cancelling terms with a zero update)."""
    g = K.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    size = (c * (K @ c.unsqueeze(-1)).squeeze(-1)).sum(-1).clamp_min(0).sqrt()
    total = (c.abs() * g).sum(-1)
    return torch.where(size > 0, total / size.clamp_min(1e-300), torch.where(total > 0, float("inf"), 0.0))


# Updates whose float32 rounding would exceed this, relative to the update, are formed in float64.
EXACT_UPDATE_TOL = 1e-5


def share_bias_grams(terms: List["ParamTerm"]) -> None:
    """Pair each one-token weight (ghost route, T = G = 1, on the torch path) with its bias, whose
    per-sample rows are the weight's D: the weight's job computes D D^T once for both and reads D
    from the bias's float64 rows (MLP, B = 64: 3 of 15 float64 B x B x 1024 products per step)."""
    weights = {}
    for t in terms:
        u = t.use
        if t.mode == GHOST and u is not None and u.D is not None and u.A.shape[1] == 1 and u.A.shape[2] == 1 and not t._on_triton():
            weights[id(u.D)] = t
    for t in terms:
        h = weights.get(id(t.weight_D)) if t.weight_D is not None else None
        if h is not None and t.mode == "explicit" and t.weight_D.shape[-1] == t.numel and t.B == h.B and h.shared_bias is None:
            h.shared_bias, t.gram_source = t, h


def hold_rows(terms: List["ParamTerm"], rtols: List[float]) -> None:
    """Ask the terms that can hold their float32 rows (orthograd_fast.engine.held_rows) to do so."""
    for t, rt in zip(terms, rtols):
        t.hold = 4 * t.B * t.numel <= held_rows.MAX_BYTES and t.can_hold()
        t.hold_rtol = rt


class ExplicitGroup:
    """Explicit terms (float64 rows G [B, n]) of one size, one dtype and one device, evaluated as one
    batch: K and b by one bmm each, the update by one bmm and one grouped copy back, instead of
    several small ops per tensor (a ViT has ~100 biases and norm weights; per-op host time would
    dominate). The same numbers as the per-term path, the update formed in float64."""

    def __init__(self, terms: List["ParamTerm"], ks: List[int], rows: Tensor, shape: Optional[torch.Size] = None):
        self.terms = terms
        self.ks = ks  # the members' positions in the projection's list of active tensors
        self.rows = rows  # the same as an index tensor
        self.shape = shape  # the members' common shape (None: shapes differ): stacked without reshapes
        self.B = terms[0].B
        self.numel = terms[0].numel
        self._G: Optional[Tensor] = None
        self._U: Optional[Tensor] = None

    @staticmethod
    def key(t: "ParamTerm") -> Optional[tuple]:
        """Terms with equal keys may share a group (None: not groupable)."""
        if t.mode != "explicit" or t.gram_source is not None:
            return None
        return (t.B, t.numel, t.param.dtype, t.param.device)

    def work(self) -> int:  # the members' ParamTerm.work(), summed
        return 2 * self.B * self.B * self.numel * len(self.terms)

    def update_work(self) -> int:
        return self.B * self.numel * len(self.terms)

    def gram_coef(self, Us: List[Tensor]) -> Tuple[Tensor, Tensor]:
        """(K [m, B, B], b [m, B]) float64 for the members' tensors ``Us`` (the engine keeps each
        member's K from the projection's stack)."""
        G = torch.stack([t.G for t in self.terms])
        U = torch.stack(Us) if self.shape is not None else torch.stack([u.reshape(-1) for u in Us])
        U = U.reshape(len(Us), -1).double()
        self._G, self._U = G, U
        K = torch.bmm(G, G.transpose(1, 2))
        b = torch.bmm(G, U.unsqueeze(-1)).squeeze(-1)
        return K, b

    def solve_columns(self, rtol: float) -> Tensor:
        """c [m, B] from the members' n x n column Grams (numel < B: see solve.solve_columns), from
        the rows and tensors gram_coef stacked."""
        from .solve import solve_columns_stacked

        return solve_columns_stacked(self._G, self._U, rtol)

    def apply_(self, Us: List[Tensor], c: Tensor, scale: float = 1.0) -> None:
        """Us[j] <- scale * (Us[j] - sum_i c[j, i] g_ji), from the float64 copy made by gram_coef
        (Us must be unchanged since)."""
        res = self._U - torch.bmm(c.double().unsqueeze(1), self._G).squeeze(1)
        if scale != 1.0:
            res.mul_(scale)
        res = res.to(Us[0].dtype)
        if self.shape is not None:
            torch._foreach_copy_(Us, res.view(len(Us), *self.shape).unbind(0))
        else:
            torch._foreach_copy_(Us, [r.view(u.shape) for r, u in zip(res.unbind(0), Us)])
        self._U = None


class ParamTerm:
    """Everything the solve needs about one trainable tensor's per-sample gradients."""

    def __init__(self, name: str, param: Tensor, uses: list, backend: str = "torch"):
        self.name = name
        self.param = param
        self.numel = param.numel()
        self.B = uses[0].B
        self.backend = backend
        self.approx = False  # True when K was accumulated in float32 (Triton)
        self._K: Optional[Tensor] = None
        self._r64: Optional[Tuple[Tensor, Tensor]] = None  # float64 rows of a one-token use (_rows64)
        # held float32 rows (orthograd_fast.engine.held_rows): ``hold`` is asked by the projection's
        # plan (hold_rows), ``rows`` is set by the Gram job and dropped by the update
        self.hold, self.hold_rtol = False, 0.0
        self.rows: Optional[held_rows.HeldRows] = None
        self._k32 = False  # K came from float32 rows
        # share_bias_grams: a one-token weight's bias (its rows are the weight's D) takes its Gram
        # D D^T from the weight's job: shared_bias on the weight, gram_source on the bias
        self.shared_bias: Optional["ParamTerm"] = None
        self.gram_source: Optional["ParamTerm"] = None
        self.weight_D = uses[0].weight_D if len(uses) == 1 and isinstance(uses[0], ExplicitUse) else None
        if len(uses) == 1 and type(uses[0]) is ExplicitUse:  # rows given (biases, norms, compacted): explicit
            self.mode, self._G, self._G_uses, self.use = "explicit", None, uses, None
            return
        convs = [u for u in uses if isinstance(u, ConvUse)]
        if convs and self.B * self.numel > EXPLICIT_MAX:
            same = len({(u.shape, u.groups) for u in convs}) == 1
            if len(convs) == len(uses) and same and backend != "triton" and self._conv_route(convs) == TILE:
                self.mode, self.uses, self.use, self._G = "conv", convs, None, None
                return
            # ghost route, Triton kernels, uses of other kinds: the token form
            uses = [u.outer() if isinstance(u, ConvUse) else u for u in uses]
        outer = [u for u in uses if isinstance(u, OuterUse)]
        explicit_only = len(outer) < len(uses)
        if explicit_only or self.B * self.numel <= EXPLICIT_MAX or self._mixed_orientation(outer):
            self.mode = "explicit"
            self._G, self._G_uses = None, uses  # float64 rows, formed on first use (in its job)
            self.use = None
        elif self._lookup_route_cheaper(outer):
            # the explicit route's flops, but rows formed slab by slab: never B x V x d at once
            self.mode, self.uses, self.use, self._G = "lookup", outer, None, None
        elif all(u.ids is None for u in outer) and len({u.shape for u in outer}) == 1:
            self.use = merge_tokens(outer)
            B, T, G, I = self.use.A.shape
            O = self.use.D.shape[-1]
            self.mode = choose_route(B, T, G, I, O)
            self._G = None
            if self._on_triton():  # the fused kernels' own costs (they recompute tiles)
                self.mode = choose_route_fused(B, T, G, I, O)
        else:
            self.mode = "tokens"
            self.uses = outer
            self.use = None
            self._G = None

    @property
    def G(self) -> Optional[Tensor]:
        """[B, numel] float64 rows (explicit mode; None otherwise), formed on first use: inside the
        term's own job, on its own thread (orthograd_fast.engine.threads)."""
        if self._G is None and self.mode == "explicit":
            self._G = explicit_rows(self._G_uses)
            self._G_uses = None
        return self._G

    def work(self, unlearn_coef: bool = False) -> int:
        """Rough multiply-adds of gram_coef, float64 ones counted twice (how the CPU spreads the
        terms over its threads: :func:`orthograd_fast.engine.threads.run_spread`; nothing else)."""
        B = self.B
        if self.mode == "explicit":
            return 2 * B * B * self.numel
        if self.mode == GHOST:
            _, T, G, I = self.use.A.shape
            O = self.use.shape[1]
            return 2 * B * B * T * T * G * (I + O) + (0 if unlearn_coef else 2 * B * T * G * O * I)
        gram = (1 if self.hold else 2) * B * B * self.numel  # float32 Gram when the rows are held
        if self.mode == TILE:
            T = self.use.A.shape[1]
            return B * T * self.numel + gram  # float32 tiles, float64 Gram
        if self.mode == "conv":
            return sum(u.tokens for u in self.uses) * B * self.numel + gram
        if self.mode == "lookup":
            return gram
        tokens = B * sum(u.A.shape[1] for u in self.uses)
        return 2 * tokens * tokens * self.uses[0].shape[2]  # tokens route

    def update_work(self) -> int:
        """Rough multiply-adds of apply_ (the update GEMM)."""
        if self.hold:  # GEMVs: the update and the passes
            return 2 * (held_rows.MAX_PASSES + 1) * self.B * self.numel
        if self.use is not None and self.use.D is not None:
            return self.use.A.shape[1] * self.B * self.numel
        if self.mode == "conv":
            return sum(u.tokens for u in self.uses) * self.B * self.numel
        return self.B * self.numel

    def spreadable(self) -> bool:
        """Whether its scratch memory is a few slabs (TILE_SLAB_BYTES, CONV_TILE_BYTES), so that it
        may run beside other terms; the token Grams (ghost over several tokens, tokens route) work
        in CHUNK_BYTES blocks and run alone."""
        if self.mode in ("explicit", TILE, "conv", "lookup"):
            return True
        return self.mode == GHOST and self.use.A.shape[1] == 1 and self.use.A.shape[2] == 1

    def _conv_route(self, convs: List[ConvUse]) -> str:
        G, O, I = convs[0].shape
        return choose_route(self.B, sum(u.tokens for u in convs), G, I, O)

    @property
    def factor_dtype(self) -> torch.dtype:
        """dtype of the captured factors (picks the default rank tolerance)."""
        if self.mode == "conv":
            return self.uses[0].x.dtype
        return self.param.dtype if self.use is None else self.use.A.dtype

    def _lookup_route_cheaper(self, outer: List[OuterUse]) -> bool:
        """Embedding lookups: per-sample rows B x V x d (index_add, then a B^2 V d Gram, formed in
        slabs of table rows by :meth:`_lookup_gram_coef`, so memory stays at a slab) against the
        token route, which pairs every token with every token: (B T)^2 d for the A products plus,
        for dense uses of the table (a tied head), (B T_dense)^2 V for their output gradients
        (one-hot sides are gathers). The head term decides for tied embeddings: GPT-2 shaped,
        V 2048, d 128, T 32, B 512: lookup 7e10 against 6e11 multiply-adds."""
        if not LOOKUP_ROUTE or all(u.ids is None for u in outer):
            return False
        _, O, I = outer[0].shape
        tokens = self.B * sum(u.A.shape[1] for u in outer)
        dense = self.B * sum(u.A.shape[1] for u in outer if u.ids is None)
        return self.B * self.B * self.numel <= tokens * tokens * I + dense * dense * O

    @staticmethod
    def _mixed_orientation(outer: List[OuterUse]) -> bool:
        return len({(u.shape, u.transposed) for u in outer}) > 1

    # ---------------------------------------------------------------------------------------
    def gram_coef(self, U: Tensor, b: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(K [B, B] fp64, b [B] fp64) for the tensor U (shaped like the parameter).

        ``b``: coefficients already known (:meth:`unlearn_coef`); only K is formed then."""
        if self._k32 and self.rows is None:  # a float32 K whose rows the update dropped: form again
            self._K, self._k32 = None, False
        if b is not None and self.mode == GHOST and not self._on_triton():
            if self._K is None:
                self._K = self._ghost_gram()
            self._r64 = None  # the Gram is kept; its float64 rows are not needed again
            return self._K, b
        if self._K is not None:
            return self._K, self.coef(U)
        held = self._held_gram_coef(U) if self.hold else None  # None: the float64 routes below
        if self.mode == "explicit":
            K, b = self.G @ self.G.t(), self.G @ U.reshape(-1).double()
        elif held is not None:
            K, b = held
        elif self.mode == "conv":
            K, b = self._conv_gram_coef(U)
        elif self.mode == "lookup":
            K, b = self._lookup_gram_coef(U)
        elif self._on_triton():
            K, b = self._triton_gram_coef(U)
        elif self.mode == TILE:
            K, b = self._tile_gram_coef(U)
        elif self.mode == GHOST:
            K, b = self._ghost_gram(), self.use.coef(U)
            self._r64 = None
        else:
            K, b = self._tokens_gram(), self.coef(U)
        self._K = K
        return K, b

    def coef(self, U: Tensor) -> Tensor:
        """b_i = <g_i, U> (float64 [B]), computed to match K: from the same float32 per-sample
        tiles on the tile and conv routes, accumulated in float64 elsewhere (K^-1 amplifies any
        mismatch between K and b by the conditioning of the rows)."""
        if self.mode == "explicit":
            return self.G @ U.reshape(-1).double()
        if self.rows is not None:
            return self.rows.coef(self._flat(U)[0])
        if self.mode == "conv":
            return self._conv_gram_coef(U, gram=False)[1]
        if self.mode == TILE and not self._on_triton():
            return self._tile_gram_coef(U, gram=False)[1]
        if self.use is not None:
            if self._on_triton():
                from . import triton_ops

                A, D = self.use.A[:, :, 0, :], self.use.D[:, :, 0, :]
                return triton_ops.coef(A, D, self.use.view(U)[0]).double()
            return self.use.coef(U)
        return sum(u.coef(U) for u in self.uses)

    def apply_(self, U: Tensor, c: Tensor, scale: float = 1.0, exact: bool = False) -> None:
        """U <- scale * (U - sum_i c_i g_i) in place (the scale rides in the GEMM where there is one).

        ``exact``: form the update in float64 (a float64 copy of U): for coefficients whose terms
        cancel (see :func:`update_amplification`), where a float32 GEMM would round the small
        result away."""
        if exact and U.dtype != torch.float64:
            U64 = U.double()
            self.apply_(U64, c, scale)
            U.copy_(U64)
            return
        if self.use is not None:
            self.use.apply_(U, c, scale)
            return
        if self.mode == "explicit":
            U.view(-1).sub_((c.double() @ self.G).to(U.dtype))
        else:
            for u in self.uses:
                u.apply_(U, c)
        if scale != 1.0:
            U.mul_(scale)

    # --- coefficients from the unlearn pass's factors (og.forget()) ------------------------------
    def unlearn_coef_cheaper(self, fuses: List[OuterUse]) -> bool:
        """Whether b_i = <g_i, u> is cheaper from the unlearn factors (u = sum_k D_uk^T A_uk) than
        from the GEMM D U: B T Bu Tu G (I + O) against B T G O I multiply-adds (T = 1 layers of an
        MLP or a classifier head: B_u (I + O) against O I)."""
        if self.mode != GHOST or self._on_triton() or not fuses:
            return False
        use = self.use
        if any(f.ids is not None or f.shape != use.shape or f.transposed != use.transposed for f in fuses):
            return False
        B, T, G, I = use.A.shape
        O = use.shape[1]
        tu = sum(f.A.shape[0] * f.A.shape[1] for f in fuses)
        return tu * (I + O) < O * I

    def unlearn_coef(self, fuses: List[OuterUse]) -> Tensor:
        """b_i = sum_k sum_{t,s} (a_it . a_ks)(d_it . d_ks) over the unlearn factors, fp64 [B]."""
        use = self.use
        B, T, G, I = use.A.shape
        dt = torch.float64  # like OuterUse.coef: b must be as exact as K (B x B_u products: cheap)
        if T == 1 and G == 1 and all(f.A.shape[1] == 1 for f in fuses):  # plain B x B_u products
            A, D = self._rows64()
            b = torch.zeros(B, dtype=torch.float64, device=A.device)
            for f in fuses:
                Bu = f.A.shape[0]
                prod = (A @ f.A.reshape(Bu, I).to(dt).t()) * (D @ f.D.reshape(Bu, -1).to(dt).t())
                b += prod.sum(1).double()
            return b
        A = use.A.permute(2, 0, 1, 3).reshape(G, B * T, I).to(dt)
        D = use.D.permute(2, 0, 1, 3).reshape(G, B * T, -1).to(dt)
        b = torch.zeros(B, dtype=torch.float64, device=A.device)
        for f in fuses:
            Bu, Tu = f.A.shape[:2]
            Au = f.A.permute(2, 0, 1, 3).reshape(G, Bu * Tu, I).to(dt)
            Du = f.D.permute(2, 0, 1, 3).reshape(G, Bu * Tu, -1).to(dt)
            step = max(1, CHUNK_BYTES // max(1, 2 * G * T * Bu * Tu * A.element_size()))
            for b0 in range(0, B, step):
                b1 = min(B, b0 + step)
                r = slice(b0 * T, b1 * T)
                prod = (A[:, r] @ Au.transpose(1, 2)) * (D[:, r] @ Du.transpose(1, 2))
                b[b0:b1] += prod.sum(dim=(0, 2)).double().reshape(b1 - b0, T).sum(1)
        return b

    def unlearn_rows_error(self, fuses: List[OuterUse], U: Tensor, rows: int, gen: torch.Generator) -> Tensor:
        """How far ``rows`` random rows of U (the [O, I] view) are from the same rows of
        sum_k D_uk^T A_uk, relative to sum_k |d_kj| |a_k| (the rounding scale of the backward's
        sum): a 0-d float64 tensor, small when the unlearn factors describe U (no host sync)."""
        Uv = self.use.view(U)[0]
        O, I = Uv.shape
        idx = torch.randint(0, O, (min(rows, O),), generator=gen).to(Uv.device)
        sub = Uv[idx].double()
        scale = torch.zeros(idx.numel(), dtype=torch.float64, device=Uv.device)
        for f in fuses:
            Bu = f.A.shape[0] * f.A.shape[1]
            A = f.A.reshape(Bu, I).double()
            D = f.D.reshape(Bu, -1)[:, idx].double()
            sub = sub - D.t() @ A
            scale += D.abs().t() @ torch.linalg.vector_norm(A, dim=1)
        return (torch.linalg.vector_norm(sub, dim=1) / (scale + 1e-30)).max()

    # --- held float32 rows (orthograd_fast.engine.held_rows) --------------------------------------
    def can_hold(self) -> bool:
        """Tile, conv and lookup terms of float32 factors on the CPU, off the Triton kernels."""
        if self.mode == TILE and self.use is not None and not self._on_triton():
            A, D = self.use.A, self.use.D
        elif self.mode == "conv":
            A, D = self.uses[0].x, self.uses[0].gy
        elif self.mode == "lookup":
            us = self.uses
            dense = all(u.D is None or _compute_dtype(u.A, u.D) == torch.float32 for u in us)
            return us[0].A.device.type == "cpu" and dense and all(u.A.dtype == torch.float32 for u in us)
        else:
            return False
        return A.device.type == "cpu" and _compute_dtype(A, D) == torch.float32

    def _flat(self, U: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """U as the flat float32 vector the held rows' columns index, and the view to copy it back
        into (None when the vector is that view itself)."""
        V = self.use.view(U) if self.mode == TILE else self.uses[0].view(U)[0] if self.mode == "lookup" else U
        if V.dtype == torch.float32 and V.is_contiguous():
            return V.view(-1), None
        return V.reshape(-1).to(torch.float32, copy=True), V

    def _held_rows(self, buf: Tensor) -> List[Tuple[int, Tensor]]:
        """Every per-sample row, float32, as column blocks (offset, [B, n_j]) in the order of
        :meth:`_flat`, each at most held_rows.BLOCK_BYTES, in ``buf`` (B * numel: block j from
        B * offset)."""
        B, blocks = self.B, []
        if self.mode == TILE:
            A, D = self.use.A.float(), self.use.D.float()
            _, T, G, I = A.shape
            O = D.shape[-1]
            rows = max(1, held_rows.BLOCK_BYTES // (4 * B * I))  # output rows per block
            for g in range(G):
                Dt = D[:, :, g, :].transpose(1, 2)  # [B, O, T], a view
                for o0 in range(0, O, rows):
                    o1 = min(O, o0 + rows)
                    off = (g * O + o0) * I
                    Y = buf[B * off : B * (off + (o1 - o0) * I)].view(B, (o1 - o0) * I)
                    torch.bmm(Dt[:, o0:o1], A[:, :, g, :], out=Y.view(B, o1 - o0, I))
                    blocks.append((off, Y))
            return blocks
        if self.mode == "lookup":  # slabs of table rows: index_add for lookups, tiles for dense uses
            _, O, I = self.uses[0].shape
            rows = max(1, held_rows.BLOCK_BYTES // (4 * B * I))
            flat = self._lookup_parts(rows)
            for k, o0 in enumerate(range(0, O, rows)):
                o1 = min(O, o0 + rows)
                r = o1 - o0
                Y = buf[B * o0 * I : B * o1 * I].view(B, r * I).zero_()
                for ids, sample, A, D, bounds in flat:
                    if ids is None:
                        Y.view(B, r, I).baddbmm_(D[:, :, o0:o1].to(A.dtype).transpose(1, 2), A)
                    else:
                        lo, hi = bounds[k], bounds[k + 1]
                        Y.view(B * r, I).index_add_(0, sample[lo:hi] * r + (ids[lo:hi] - o0), A[lo:hi])
                blocks.append((o0 * I, Y))
            return blocks
        u0 = self.uses[0]
        O, I = u0.out_channels, u0.row
        per_call = max(1, min(CONV_TILE_BYTES, held_rows.BLOCK_BYTES) // max(1, B * I * 4))  # channels per block
        if u0.groups > 1:
            per_call = -(-per_call // u0.channel_step) * u0.channel_step
        step = min(u.sample_chunk(TILE_SLAB_BYTES) for u in self.uses)
        for c0 in range(0, O, per_call):
            c1 = min(O, c0 + per_call)
            Y = buf[B * c0 * I : B * c1 * I].view(B, (c1 - c0) * I)
            for b0 in range(0, B, step):
                b1 = min(B, b0 + step)
                Y[b0:b1] = sum(u.tiles(c0, c1, b0, b1) for u in self.uses)
            blocks.append((c0 * I, Y))
        return blocks

    def _held_gram_coef(self, U: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        """K from the float32 rows, kept for the update; None (and ``hold`` off) where K is too
        ill-conditioned for the re-projection passes or the rank tolerance could act."""
        buf, slot = held_rows.scratch(self.B * self.numel, self.param.device)
        blocks = self._held_rows(buf)
        K = held_rows.HeldRows.gram(blocks)
        rows = held_rows.HeldRows.make(blocks, K, self.hold_rtol, slot)
        if rows is None:
            self.hold = False
            return None
        self.rows, self._k32 = rows, True
        return K, rows.coef(self._flat(U)[0])

    def project_held_(self, U: Tensor, b: Tensor, scale: float = 1.0, shift: float = 0.0) -> bool:
        """U <- scale * (P_perp U - shift * sum_i g_i) in place from the held rows (in the term's own
        job, right after :meth:`gram_coef`: c = K^-1 b, every direction above the rank cutoff);
        the rows are dropped. False when the re-projection passes did not converge: U is then
        partly updated (the caller works on a copy) and the term is set back to the float64 route
        (the next :meth:`gram_coef` forms its Gram again)."""
        rows = self.rows
        c = rows.Kinv @ b
        exact = bool(update_amplification(rows.K, c + shift) * held_rows.EPS32 > EXACT_UPDATE_TOL)
        r, back = self._flat(U)
        ok = rows.apply_(r, c, scale, exact, shift)
        if ok and back is not None:
            back.copy_(r.view(back.shape))
        self.drop_rows()
        if not ok:
            self.hold = False
        return ok

    def drop_rows(self) -> None:
        """Forget the held rows (their scratch goes back to the thread)."""
        if self.rows is not None:
            self.rows.close()
            self.rows = None

    def _on_triton(self) -> bool:
        # The kernels take one group of dense fp32/bf16/fp16 factors; grouped convolutions,
        # embeddings and float64 models stay on the torch path.
        u = self.use
        return (
            self.mode != "conv"
            and self.backend == "triton"
            and u is not None
            and u.shape[0] == 1
            and u.A.dtype != torch.float64
            and u.D.dtype != torch.float64
        )

    # --- routes ------------------------------------------------------------------------------
    def _conv_gram_coef(self, U: Tensor, gram: bool = True) -> Tuple[Optional[Tensor], Tensor]:
        """Tile route for ConvUse: per-sample tiles from grouped weight-gradient convolutions, in
        slabs of output channels, widened to float64 for K and b (like _tile_gram_coef).

        Every convolution call unfolds its samples' input again, whatever the number of output
        channels it produces, so the calls produce CONV_TILE_BYTES of float32 tiles each and only
        the float64 widening goes in TILE_SLAB_BYTES pieces (half as many calls as one call per
        float64 slab)."""
        u0 = self.uses[0]
        O, I = u0.out_channels, u0.row  # output channels, weight entries per output channel
        B = self.B
        dev = u0.x.device
        K = torch.zeros(B, B, dtype=torch.float64, device=dev)
        b = torch.zeros(B, dtype=torch.float64, device=dev)
        Uf = U.reshape(O, -1)
        rows = max(1, min(CHUNK_BYTES, TILE_SLAB_BYTES) // max(1, B * I * 8))  # float64 widening
        dt = u0._dt()  # the tiles' dtype: float32 (float64 for a float64 model)
        per_call = max(rows, CONV_TILE_BYTES // max(1, B * I * torch.finfo(dt).bits // 8))  # channels per call
        if u0.groups > 1:  # a call covers whole groups
            per_call = -(-per_call // u0.channel_step) * u0.channel_step
        # samples per convolution call: its unfolded input copy stays near the slab size
        step = min(u.sample_chunk(TILE_SLAB_BYTES) for u in self.uses)
        f64, u64 = _SlabBuffer(B * min(rows, O) * I, dev), _SlabBuffer(min(rows, O) * I, dev)
        for c0 in range(0, O, per_call):
            c1 = min(O, c0 + per_call)
            if step >= B:
                tiles32 = sum(u.tiles(c0, c1) for u in self.uses)
            else:
                tiles32 = torch.empty(B, (c1 - c0) * I, dtype=dt, device=dev)
                for b0 in range(0, B, step):
                    b1 = min(B, b0 + step)
                    tiles32[b0:b1] = sum(u.tiles(c0, c1, b0, b1) for u in self.uses)
            for o0 in range(c0, c1, rows):
                o1 = min(c1, o0 + rows)
                tiles = f64.take(B, (o1 - o0) * I).copy_(tiles32[:, (o0 - c0) * I : (o1 - c0) * I])
                if gram:
                    K.addmm_(tiles, tiles.t())
                b.addmv_(tiles, u64.take((o1 - o0) * I).copy_(Uf[o0:o1].reshape(-1)))
        return (K if gram else None), b

    def _lookup_parts(self, rows: int) -> list:
        """Per use, for slabs of ``rows`` table rows: (None, None, A, D, None) for a dense use (A in
        the tiles' dtype), (ids, sample, A, None, bounds) for lookups sorted by table row, where
        slab k's lookups are the range bounds[k]:bounds[k + 1]."""
        _, O, I = self.uses[0].shape
        B = self.B
        starts = torch.arange(0, O + rows, rows, device=self.uses[0].A.device).clamp_max(O)
        flat = []
        for u in self.uses:
            T = u.A.shape[1]
            if u.ids is None:
                dt = _compute_dtype(u.A, u.D)  # per-sample tiles in the factors' dtype, like the tile route
                flat.append((None, None, u.A[:, :, 0, :].to(dt), u.D[:, :, 0, :], None))
            else:
                # tokens sorted by table row once: each slab's lookups are one contiguous range,
                # and the ranges of all slabs come from one searchsorted (one host sync per use)
                ids, order = u.ids.reshape(-1).sort()
                sample = torch.div(order, T, rounding_mode="floor")
                A = u.A[:, :, 0, :].reshape(B * T, I)[order]
                flat.append((ids, sample, A, None, torch.searchsorted(ids, starts).tolist()))
        return flat

    def _lookup_gram_coef(self, U: Tensor) -> Tuple[Tensor, Tensor]:
        """Embedding tables (one-hot uses, possibly tied to dense ones of the same [V, d] view):
        the float64 per-sample rows of a slab of table rows at a time, by index_add for lookups
        and per-sample tiles for dense uses (formed in the factors' dtype and widened, like the
        tile route: GPT-2 shape B = 32, project_ 109.6 -> 103.9 ms against float64 tiles); K and b
        accumulated over slabs."""
        _, O, I = self.uses[0].shape
        B = self.B
        dev = self.uses[0].A.device
        K = torch.zeros(B, B, dtype=torch.float64, device=dev)
        b = torch.zeros(B, dtype=torch.float64, device=dev)
        Uv = self.uses[0].view(U)[0]  # [V, d]; every use has the same orientation here
        rows = max(1, TILE_SLAB_BYTES // max(1, B * I * 8))
        flat = self._lookup_parts(rows)
        n = min(rows, O) * I
        f64, u64 = _SlabBuffer(B * n, dev), _SlabBuffer(n, dev)
        t32 = {dt: _SlabBuffer(B * n, dev, dt) for dt in {A.dtype for ids, _, A, _, _ in flat if ids is None}}
        for k, o0 in enumerate(range(0, O, rows)):
            o1 = min(O, o0 + rows)
            r = o1 - o0
            slab = f64.take(B * r, I).zero_()
            for ids, sample, A, D, bounds in flat:
                if ids is None:  # a slab of per-sample tiles (a tied head's D is B x T x V), widened
                    slab += torch.bmm(D[:, :, o0:o1].to(A.dtype).transpose(1, 2), A, out=t32[A.dtype].take(B, r, I)).view(B * r, I)
                else:
                    lo, hi = bounds[k], bounds[k + 1]
                    slab.index_add_(0, sample[lo:hi] * r + (ids[lo:hi] - o0), A[lo:hi].double())
            S = slab.view(B, r * I)
            K.addmm_(S, S.t())
            b.addmv_(S, u64.take(r * I).copy_(Uv[o0:o1].reshape(-1)))
        return K, b

    def _tile_gram_coef(self, U: Tensor, gram: bool = True) -> Tuple[Optional[Tensor], Tensor]:
        """Per-sample tiles D_b^T A_b in slabs of output rows; K (unless ``gram`` is False) and b
        accumulated in fp64."""
        use = self.use
        dt = _compute_dtype(use.A, use.D)
        A, D = use.A.to(dt), use.D.to(dt)
        B, T, G, I = A.shape
        O = D.shape[-1]
        Uv = use.view(U)
        K = torch.zeros(B, B, dtype=torch.float64, device=A.device)
        b = torch.zeros(B, dtype=torch.float64, device=A.device)
        # slabs of TILE_SLAB_BYTES of float64 tiles (a fresh 30+ MiB buffer costs page faults)
        rows = max(1, min(CHUNK_BYTES, TILE_SLAB_BYTES) // max(1, B * G * I * 8))
        Dt = D[:, :, 0, :].transpose(1, 2) if G == 1 else None  # [B, O, T], a transposed view: no copy
        n = min(rows, O) * G * I
        f64, u64 = _SlabBuffer(B * n, A.device), _SlabBuffer(n, A.device)
        t32 = _SlabBuffer(B * n, A.device, dt) if G == 1 and dt != torch.float64 else None
        for o0 in range(0, O, rows):
            o1 = min(O, o0 + rows)
            r = o1 - o0
            tiles = f64.take(B, r * G * I)  # the same float64 values as .double() of the tiles
            if G == 1:
                if t32 is None:  # float64 factors: straight into the slab
                    torch.bmm(Dt[:, o0:o1], A[:, :, 0, :], out=tiles.view(B, r, I))
                else:
                    tiles.view(B, r, I).copy_(torch.bmm(Dt[:, o0:o1], A[:, :, 0, :], out=t32.take(B, r, I)))
            else:
                tiles.view(B, G, r, I).copy_(torch.einsum("btgo,btgi->bgoi", D[..., o0:o1], A))
            if gram:
                K.addmm_(tiles, tiles.t())
            b.addmv_(tiles, u64.take(r * G * I).view(G, r, I).copy_(Uv[:, o0:o1, :]).view(-1))
        return (K if gram else None), b

    def _rows64(self) -> Tuple[Tensor, Tensor]:
        """A [B, I] and D [B, O] in float64 of a one-token use (T = G = 1), converted once for the
        Gram and the og.forget() coefficients (D: the bias's float64 rows when it rides along)."""
        if self._r64 is None:
            B = self.B
            D = self.shared_bias.G if self.shared_bias is not None else self.use.D.reshape(B, -1).double()
            self._r64 = (self.use.A.reshape(B, -1).double(), D)
        return self._r64

    def _ghost_gram(self) -> Tensor:
        """sum over tokens of (A A^T) * (D D^T), float64, in blocks of samples."""
        use = self.use
        B, T, G, I = use.A.shape
        if T == 1 and G == 1:  # one token per sample (an MLP layer): two B x B products
            A, D = self._rows64()
            DD = D @ D.t()
            if self.shared_bias is not None:  # the bias's Gram: the same D D^T
                self.shared_bias._K = DD
            return (A @ A.t()) * DD
        A = use.A.permute(2, 0, 1, 3).reshape(G, B * T, -1).double()
        D = use.D.permute(2, 0, 1, 3).reshape(G, B * T, -1).double()
        K = torch.zeros(B, B, dtype=torch.float64, device=A.device)
        step = max(1, CHUNK_BYTES // max(1, 2 * G * T * B * T * 8))
        for b0 in range(0, B, step):
            b1 = min(B, b0 + step)
            rows = slice(b0 * T, b1 * T)
            prod = (A[:, rows] @ A.transpose(1, 2)) * (D[:, rows] @ D.transpose(1, 2))
            K[b0:b1] = prod.sum(0).reshape(b1 - b0, T, B, T).sum(dim=(1, 3))
        return K

    def _tokens_gram(self) -> Tensor:
        """Ghost order over uses that include one-hot (embedding) sides: for every ordered pair
        of uses, sum_{t,s} (a_bt . a_cs) * (d_bt . d_cs), where d . d' is a dot product (dense),
        a gather of a dense row at an id (dense x one-hot) or id equality (one-hot x one-hot)."""
        B = self.B
        flat = []
        for u in self.uses:
            T = u.A.shape[1]
            A = u.A[:, :, 0, :].reshape(B * T, -1).double()
            D = None if u.D is None else u.D[:, :, 0, :].reshape(B * T, -1).double()
            ids = None if u.ids is None else u.ids.reshape(-1)
            flat.append((T, A, D, ids))
        K = torch.zeros(B, B, dtype=torch.float64, device=flat[0][1].device)
        for Tu, Au, Du, iu in flat:
            for Tv, Av, Dv, iv in flat:
                step = max(1, CHUNK_BYTES // max(1, 2 * Tu * B * Tv * 8))
                for b0 in range(0, B, step):
                    b1 = min(B, b0 + step)
                    r = slice(b0 * Tu, b1 * Tu)
                    KA = Au[r] @ Av.t()
                    if Du is not None and Dv is not None:
                        KD = Du[r] @ Dv.t()
                    elif Du is not None:
                        KD = Du[r][:, iv]
                    elif Dv is not None:
                        KD = Dv[:, iu[r]].t()
                    else:
                        KD = (iu[r][:, None] == iv[None, :]).double()
                    K[b0:b1] += (KA * KD).reshape(b1 - b0, Tu, B, Tv).sum(dim=(1, 3))
        return K

    def _triton_gram_coef(self, U: Tensor) -> Tuple[Tensor, Tensor]:
        from . import triton_ops

        use = self.use
        A, D = use.A[:, :, 0, :], use.D[:, :, 0, :]
        if A.dtype != D.dtype:
            dt = _compute_dtype(A, D)
            A, D = A.to(dt), D.to(dt)
        Uv = use.view(U)[0]
        fn = triton_ops.tile_gram if self.mode == TILE else triton_ops.ghost_gram
        K, b = fn(A, D, Uv)  # the kernels read strided factors directly
        self.approx = True
        return K.double(), b.double()
