"""Per-parameter Gram K = G G^T, coefficients b = G u and the update u - G^T c, from factors.

One :class:`PerSampleGrads` per trainable tensor gathers the uses captured for it, picks the route
that evaluates them and delegates to it (one class each, :mod:`orthograd_fast.engine.routes`):

* **explicit** - every use materialized as [B, numel] in float64. Taken when the tensor is small
  (B * numel <= ``EXPLICIT_MAX``: biases, norm weights, small heads) or when uses of different
  kinds meet (a generic-fallback use of a tied parameter). Exact, and exactly the tensors whose
  Gram is worst conditioned (docs/math.md section 8).
* **tile** / **ghost** - one dense factored use (several uses of one tied tensor are concatenated
  along tokens); :func:`orthograd_fast.engine.route.choose_route` picks the order (the fused
  Triton kernels: :func:`orthograd_fast.engine.route.choose_route_fused`).
* **tokens** - uses that include embedding lookups (one-hot rows): the ghost order with the
  one-hot side evaluated by gathers and id equality, so the vocabulary is never materialized.
* **sparse** - a table used by lookups only (no tied dense head): K from the rows two samples
  both looked up, sums per (table row, sample) multiplied pair by pair: at most B M d flops for M
  <= B T (row, sample) pairs, instead of the lookup route's B^2 V d or the token route's (B T)^2 d.
* **lookup** - lookups with a tied dense use, when that is cheaper than the token route: per-sample
  rows of a slab of table rows at a time, B^2 V d flops (plus the head's tiles).
* **conv** - convolutions in the tile order: per-sample tiles from grouped convolutions.

Precision: per-sample tiles are formed in the factors' dtype (fp32 for half factors) and reduced
to K in float64; token Grams (ghost) are formed in float64. So K is accurate to float64 rounding
and the solve can resolve directions far weaker than a float32 Gram could. On the CPU, tile, conv
and lookup terms whose float32 rows fit :data:`held_rows.MAX_BYTES` keep them instead: K from a
float32 GEMM, refined by re-projection passes to the same result (:mod:`orthograd_fast.engine.held_rows`,
docs/math.md section 11); too ill-conditioned ones stay on float64. The Triton backend
accumulates in float32 instead: its terms are marked ``approx`` and the engine adds one
re-projection pass and a coarser rank tolerance (see :mod:`orthograd_fast.engine.solve`).
"""

from __future__ import annotations

import weakref

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import held_rows
from .conv_factors import ConvFactors, ConvOuter
from .factors import ExplicitRows, OuterFactors, merge_tokens
from .route import GHOST, TILE, choose_route, choose_route_fused
from .routes.base import EXACT_UPDATE_TOL, Route, update_amplification
from .routes.conv import ConvRoute
from .routes.explicit import ExplicitGroup, ExplicitRoute
from .routes.ghost import GhostRoute
from .routes.lookup import LookupRoute
from .routes.sparse_lookup import SparseLookupRoute
from .routes.tile import TileRoute
from .routes.tokens import TokensRoute
from .routes.triton import TritonGhostRoute, TritonTileRoute, kernels_take

__all__ = [
    "CONV_TILE_BYTES", "EXACT_UPDATE_TOL", "EXPLICIT_MAX", "GHOST", "LOOKUP_ROUTE", "SPARSE_LOOKUP", "TILE",
    "TILE_SLAB_BYTES", "ExplicitGroup", "PerSampleGrads", "hold_rows", "materialized", "share_bias_grams",
    "update_amplification",
]

# Tensors with B * numel at or below this many elements are materialized (fp64, exact).
EXPLICIT_MAX = 1 << 18


def materialized(B: int, numel: int) -> bool:
    """Whether a tensor of ``numel`` entries at ``B`` samples is small enough to take float64 rows
    (the explicit route; RetainSpan forms them on leaving retain(), or on the prefetch thread)."""
    return B * numel <= EXPLICIT_MAX


# Embedding tables take the lookup route (per-sample rows, a slab at a time) wherever it costs
# fewer flops than the token route; False forces the token route (tests).
LOOKUP_ROUTE = True
# Tables used by lookups only take the sparse lookup route; False: the lookup / token routes (tests)
SPARSE_LOOKUP = True
# Tile, conv and lookup routes: float64 per-sample rows formed in slabs of this size (cache-sized).
TILE_SLAB_BYTES = 4 << 20
# Conv route: float32 per-sample tiles per convolution call (each call unfolds its input again).
CONV_TILE_BYTES = 8 << 20


# Dense convolutions over at most this many output positions take their per-sample tiles from the
# unfolded input (one batched GEMM, the tile route) instead of the grouped weight-gradient
# convolution (one group per sample, slow in CPU kernels at few positions). Measured, B = 32, one
# thread: Whisper's 1-d 128 -> 128 k3 s2 over 50 positions 17 ms -> 4.1 ms; a 3 x 3 128 -> 128 conv
# on 8 x 8 maps 37 -> 14 ms; 100 positions even (4.5 ms both); 256 positions 10 -> 19 ms.
UNFOLD_TILE_TOKENS = 100


def _unfolded_tiles(convs: List[ConvFactors]) -> bool:
    """Whether the tile route's tiles of these convolutions (same shape) come from their unfolded
    input: groups = 1, not a 1 x 1 convolution without padding (ConvRoute forms those by one
    batched GEMM already), at most UNFOLD_TILE_TOKENS positions in all."""
    u = convs[0]
    pointwise = all(k == 1 for k in u.kernel) and not any(u.padding)
    return u.groups == 1 and not pointwise and sum(c.tokens for c in convs) <= UNFOLD_TILE_TOKENS


def share_bias_grams(terms: List["PerSampleGrads"]) -> None:
    """Pair each one-token weight (ghost route, T = G = 1, on the torch path) with its bias, whose
    per-sample rows are the weight's D: the weight's job computes D D^T once for both and reads D
    from the bias's float64 rows (MLP, B = 64: 3 of 15 float64 B x B x 1024 products per step)."""
    # biases first: only a dense rule's bias carries its weight's D (a convolution's token form,
    # unfolded on first use, never is one; reading its D here would unfold it on the caller's
    # thread: ResNet, B = 32, 3 stage-4 convolutions, ~5 ms per step at the retain exit)
    biases = {id(t.weight_D): t for t in terms if t.weight_D is not None and t.mode == "explicit"}
    if not biases:
        return
    for t in terms:
        u = t.use
        if t.mode == GHOST and u is not None and not isinstance(u, ConvOuter) and u.ids is None and u.a_shape[1] == 1 and u.a_shape[2] == 1 and not t._on_triton():
            b = biases.get(id(u.D))
            if b is not None and b.weight_D.shape[-1] == b.numel and b.B == t.B and t.shared_bias is None and b.gram_source is None:
                t.shared_bias, b.gram_source = b, t


def can_hold_rows(t: "PerSampleGrads") -> bool:
    """Whether the term may hold its float32 rows (orthograd_fast.engine.held_rows): they fit, the
    route can, and no earlier K of this span was refused."""
    return held_rows.fits(t.B, t.numel) and t.can_hold() and not t.route.hold_refused


def hold_rows(terms: List["PerSampleGrads"], rtols: List[float]) -> None:
    """Ask the terms that can hold their float32 rows (orthograd_fast.engine.held_rows) to do so."""
    for t, rt in zip(terms, rtols):
        t.hold = can_hold_rows(t)
        t.hold_rtol = rt


def _on_route(attr: str, doc: str, settable: bool = False) -> property:
    """A PerSampleGrads attribute kept by its route."""

    def get(self):
        return getattr(self.route, attr)

    def put(self, value):
        setattr(self.route, attr, value)

    return property(get, put if settable else None, doc=doc)


class PerSampleGrads:
    """Everything the solve needs about one trainable tensor's per-sample gradients: the route
    (``route``) chosen for its uses, which forms K, b and the update and answers for its cost."""

    # fixed with the route, copied from it at construction (plain attributes: the projection reads
    # them for every tensor, several times per step):
    # mode: the route's name: 'explicit', TILE, GHOST, 'tokens', 'sparse', 'lookup' or 'conv';
    # approx: True when K is accumulated in float32 (Triton); factor_dtype: dtype of the captured
    # factors (picks the default rank tolerance); use: the one dense factored use (tile and ghost
    # routes; None otherwise); uses: the uses evaluated one by one (tokens, lookup and conv routes)
    route: Route
    mode: str
    approx: bool
    factor_dtype: torch.dtype
    use: Optional[OuterFactors]
    uses: Optional[list]
    G = _on_route("G", "[B, numel] float64 rows (explicit route; None otherwise), formed on first use.")
    K = _on_route("K", "K once formed (the projection puts its view of the stacked Grams here).", True)
    # held float32 rows (orthograd_fast.engine.held_rows): ``hold`` is asked by the projection's
    # plan (hold_rows), ``rows`` is set by the Gram job and dropped by the update
    hold = _on_route("hold", "Whether the term keeps its float32 rows this projection.", True)
    hold_rtol = _on_route("hold_rtol", "The rank tolerance the held rows are checked against.", True)
    rows = _on_route("rows", "The held rows (held_rows.HeldRows) between the Gram and the update.")
    # share_bias_grams: a one-token weight's bias (its rows are the weight's D) takes its Gram
    # D D^T from the weight's job: shared_bias on the weight, gram_source on the bias
    shared_bias = _on_route("shared_bias", "The bias term whose Gram this weight's job forms.", True)

    def __init__(self, name: str, param: Tensor, uses: list, backend: str = "torch", hold_ok: bool = False):
        # hold_ok: the projection will let a tile, conv or lookup term hold float32 rows (CPU,
        # per-tensor scope, torch backend): the route choice then counts that Gram as float32
        self.hold_ok = hold_ok
        self.name = name
        self.param = param
        self.numel = param.numel()
        self.backend = backend
        self._gram_source = None  # weakref: the weight term refers to this one (shared_bias)
        u = uses[0]
        if len(uses) == 1 and type(u) is ExplicitRows:  # rows given (most tensors of a model): no choice
            self.B, self.weight_D = u.G.shape[0], u.weight_D
            r = self.route = ExplicitRoute(param, self.B, uses)
        else:  # (weight_D: only one given ExplicitRows carries one)
            self.B, self.weight_D = u.B, None
            r = self.route = self._choose(uses)
        self.mode, self.approx, self.factor_dtype, self.use, self.uses = r.name, r.approx, r.factor_dtype, r.use, r.uses

    @property
    def gram_source(self) -> Optional["PerSampleGrads"]:
        """The weight term whose job forms this bias's Gram (share_bias_grams), or None. Held
        weakly: the weight holds this term as its ``shared_bias``, and a cycle of terms would keep
        their factors until the garbage collector runs."""
        return self._gram_source() if self._gram_source is not None else None

    @gram_source.setter
    def gram_source(self, t: Optional["PerSampleGrads"]) -> None:
        self._gram_source = weakref.ref(t) if t is not None else None

    def _choose(self, uses: list) -> Route:
        p, B = self.param, self.B
        convs = [u for u in uses if isinstance(u, ConvFactors)]
        if convs and not materialized(B, self.numel):
            same = len({(u.shape, u.groups) for u in convs}) == 1
            tile = len(convs) == len(uses) and same and self.backend != "triton" and self._conv_route(convs) == TILE
            if tile and not _unfolded_tiles(convs):
                return ConvRoute(p, B, convs, TILE_SLAB_BYTES, CONV_TILE_BYTES)
            # ghost route, tiles from the unfolded input, Triton kernels, uses of other kinds: the
            # token form (unfolded in the term's job)
            uses = [u.outer_later() if isinstance(u, ConvFactors) else u for u in uses]
        outer = [u for u in uses if isinstance(u, OuterFactors)]
        if len(outer) < len(uses) or materialized(B, self.numel) or self._mixed_orientation(outer):
            return ExplicitRoute(p, B, uses)  # float64 rows, formed on first use (in its job)
        if SPARSE_LOOKUP and SparseLookupRoute.takes(outer):
            # lookups only: products of the rows two samples share (B M d), never B x V x d
            return SparseLookupRoute(p, B, outer)
        if self._lookup_route_cheaper(outer):
            # the explicit route's flops, but rows formed slab by slab: never B x V x d at once
            return LookupRoute(p, B, outer, TILE_SLAB_BYTES)
        if all(u.ids is None for u in outer) and len({u.shape for u in outer}) == 1:
            use = merge_tokens(outer)
            _, T, G, I = use.a_shape
            O = use.shape[1]
            if kernels_take(use, self.backend):  # the fused kernels' own costs (they recompute tiles)
                if choose_route_fused(B, T, G, I, O) == TILE:
                    return TritonTileRoute(p, B, use, TILE_SLAB_BYTES)
                return TritonGhostRoute(p, B, use)
            if choose_route(B, T, G, I, O) == TILE:
                return TileRoute(p, B, use, TILE_SLAB_BYTES)
            return GhostRoute(p, B, use)
        return TokensRoute(p, B, outer)

    def _conv_route(self, convs: List[ConvFactors]) -> str:
        G, O, I = convs[0].shape
        return choose_route(self.B, sum(u.tokens for u in convs), G, I, O)

    def _lookup_route_cheaper(self, outer: List[OuterFactors]) -> bool:
        """Embedding lookups: per-sample rows B x V x d (index_add, then a B^2 V d Gram, formed in
        slabs of table rows, so memory stays at a slab) against the token route, which pairs every
        token with every token: (B T)^2 d for the A products plus, for dense uses of the table (a
        tied head), (B T_dense)^2 V for their output gradients (one-hot sides are gathers). The
        head term decides for tied embeddings: GPT-2 shaped, V 2048, d 128, T 32, B 512: lookup
        7e10 against 6e11 multiply-adds."""
        if not LOOKUP_ROUTE or all(u.ids is None for u in outer):
            return False
        _, O, I = outer[0].shape
        tokens = self.B * sum(u.A.shape[1] for u in outer)
        dense = self.B * sum(u.A.shape[1] for u in outer if u.ids is None)
        # float64 multiply-adds count twice (as in work()); held rows make the lookup's Gram float32
        held = self.hold_ok and held_rows.fits(self.B, self.numel) and LookupRoute.holdable(outer)
        return (1 if held else 2) * self.B * self.B * self.numel <= 2 * (tokens * tokens * I + dense * dense * O)

    @staticmethod
    def _mixed_orientation(outer: List[OuterFactors]) -> bool:
        return len({(u.shape, u.transposed) for u in outer}) > 1

    def _on_triton(self) -> bool:
        """Whether the fused Triton kernels form K and b."""
        return self.route.on_triton

    # --- cost (how the CPU spreads the terms over its threads: orthograd_fast.engine.threads) ------
    def work(self, unlearn_coef: bool = False) -> int:
        """Rough multiply-adds of gram_coef, float64 ones counted twice."""
        if self.route.rows is not None:  # rows and K prepared (prefetch): b and the passes' GEMVs
            return 4 * self.B * self.numel
        return self.route.work(unlearn_coef)

    def update_work(self) -> int:
        """Rough multiply-adds of apply_ (the update GEMM)."""
        return self.route.update_work()

    def spreadable(self) -> bool:
        """Whether its scratch memory is a few slabs (TILE_SLAB_BYTES, CONV_TILE_BYTES), so that it
        may run beside other terms; the token Grams (ghost over several tokens, tokens route) work
        in CHUNK_BYTES blocks and run alone."""
        return self.route.spreadable()

    # --- Gram, coefficients, update ------------------------------------------------------------
    def gram_coef(self, U: Tensor, b: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(K [B, B] fp64, b [B] fp64) for the tensor U (shaped like the parameter).

        ``b``: coefficients already known (:meth:`unlearn_coef`); only K is formed then."""
        return self.route.gram_coef(U, b)

    def coef(self, U: Tensor) -> Tensor:
        """b_i = <g_i, U> (float64 [B]), computed to match K: from the same float32 per-sample
        tiles on the tile and conv routes, accumulated in float64 elsewhere (K^-1 amplifies any
        mismatch between K and b by the conditioning of the rows)."""
        return self.route.coef(U)

    def apply_(self, U: Tensor, c: Tensor, scale: float = 1.0, exact: bool = False) -> None:
        """U <- scale * (U - sum_i c_i g_i) in place (the scale rides in the GEMM where there is one).

        ``exact``: form the update in float64 (a float64 copy of U): for coefficients whose terms
        cancel (see :func:`update_amplification`), where a float32 GEMM would round the small
        result away."""
        if exact and U.dtype != torch.float64:
            U64 = U.double()
            self.route.apply_(U64, c, scale)
            U.copy_(U64)
            return
        self.route.apply_(U, c, scale)

    # --- coefficients from the unlearn pass's factors (og.forget(); ghost route) -----------------
    def unlearn_coef_cheaper(self, fuses: List[OuterFactors]) -> bool:
        """Whether b_i = <g_i, u> is cheaper from the unlearn factors than from the GEMM D U."""
        return self.route.unlearn_coef_cheaper(fuses)

    def unlearn_coef(self, fuses: List[OuterFactors]) -> Tensor:
        """b_i = <g_i, u> from the unlearn factors, fp64 [B] (only where unlearn_coef_cheaper)."""
        return self.route.unlearn_coef(fuses)

    # --- held float32 rows (orthograd_fast.engine.held_rows; tile, conv and lookup routes) ------
    def can_hold(self) -> bool:
        """Tile, conv and lookup terms of float32 factors on the CPU, off the Triton kernels."""
        return self.route.can_hold()

    def project_held_(self, U: Tensor, b: Tensor, scale: float = 1.0, shift: float = 0.0, source: Optional[Tensor] = None) -> bool:
        """U <- scale * (P_perp U - shift * sum_i g_i) in place from the held rows (in the term's own
        job, right after :meth:`gram_coef`); the rows are dropped. False when the re-projection
        passes did not converge: U is then partly updated (the caller works on a copy) and the
        term is set back to the float64 route (the next :meth:`gram_coef` forms its Gram again).
        ``source``: the tensor U is a copy of, when b came from it (its copy in the rows' layout,
        if b made one, serves again)."""
        return self.route.project_held_(U, b, scale, shift, source)

    def prepare_held(self, buf: Tensor) -> None:
        """Form the float32 rows into ``buf`` and K from them before u is known (the prefetch,
        orthograd_fast.engine.prefetch; ``hold`` and ``hold_rtol`` set by the caller)."""
        self.route.prepare_held(buf)

    def drop_rows(self) -> None:
        """Forget the held rows (their scratch goes back to the thread)."""
        self.route.drop_rows()
