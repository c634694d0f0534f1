"""Per-sample gradients held as factors, and what the engine needs from them.

A trainable parameter's per-sample gradient g_i is the sum over its *uses* (an operation call
that consumed it; several for a tied or re-used parameter) of one of:

* :class:`OuterFactors`  g_i = sum_t D_it (x) A_it, grouped: the parameter viewed as [G, O, I].
  ``ids`` replaces a dense D by one-hot rows (an embedding: D_it = e_{id_it}, never formed).
* :class:`ExplicitRows` g_i given as a [B, numel] matrix (biases, norm weights, generic fallback).
* :class:`~orthograd_fast.engine.conv_factors.ConvFactors` a convolution's input and output
  gradient.

:class:`~orthograd_fast.engine.gram.PerSampleGrads` gathers a tensor's uses. Every use answers three questions without a loop over samples:
``<g_i, g_j>`` (its share of the Gram), ``<g_i, U>`` (coefficients) and ``U -= sum_i c_i g_i``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import threads as _threads

# Chunks of intermediate tensors are kept under this many bytes (tile slabs, token Gram blocks).
CHUNK_BYTES = 256 << 20
# float64 copies of a parameter-sized tensor (coefficients) are made this many bytes at a time.
F64_SLAB_BYTES = 1 << 20


def _compute_dtype(*ts: Tensor) -> torch.dtype:
    """fp32 for half inputs (fp32 accumulation everywhere), otherwise the promoted dtype."""
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


@dataclass
class OuterFactors:
    """g_i = sum_t sum_g  D[i, t, g, :] (x) A[i, t, g, :]   (parameter viewed as [G, O, I]).

    A: [B, T, G, I]; D: [B, T, G, O] or None when ``ids`` [B, T] (long) gives one-hot rows of an
    O-sized identity (embedding lookups; then G == 1). ``transposed``: the parameter is stored
    [I, O] (GPT-2 style Conv1D) and viewed through its transpose.
    """

    A: Tensor
    D: Optional[Tensor]
    ids: Optional[Tensor]
    shape: tuple  # (G, O, I)
    transposed: bool = False

    @property
    def B(self) -> int:
        return self.A.shape[0]

    @property
    def a_shape(self) -> torch.Size:
        """A's shape [B, T, G, I] (known before A is formed where it is formed on first use)."""
        return self.A.shape

    @property
    def a_dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype products of A and D are formed in (:func:`_compute_dtype`)."""
        return _compute_dtype(self.A, self.D) if self.D is not None else _compute_dtype(self.A)

    @property
    def device(self) -> torch.device:
        return self.A.device

    @property
    def one_token(self) -> bool:
        """A dense use over one token and one group (a Linear on [B, I] inputs)."""
        return self.ids is None and self.a_shape[1] == 1 and self.a_shape[2] == 1

    def view(self, U: Tensor) -> Tensor:
        """The parameter-shaped tensor U seen as [G, O, I] (a view: writes go through)."""
        G, O, I = self.shape
        if self.transposed:
            return U.t().unsqueeze(0) if G == 1 else U.t().reshape(G, O, I)
        return U.reshape(G, O, I)

    def explicit(self) -> Tensor:
        """Materialize [B, numel] in fp64 (small tensors only): the rows are formed in the
        factors' compute dtype, like the tile route's, then widened (K, b and the update are then
        exact for those rows; a float64 GEMM over the tokens ran at a third of the float32 rate)."""
        G, O, I = self.shape
        if self.ids is None:
            # a few samples at a time, (sample, group)-major: the batched GEMM reads them
            # contiguously and they stay in cache (a depthwise conv's unfolded A is 49x its input)
            B, T = self.A.shape[:2]
            dt = _compute_dtype(self.A, self.D)
            g = torch.empty(B, G, O, I, dtype=torch.float64, device=self.A.device)
            step = max(1, 4 * F64_SLAB_BYTES // max(1, 8 * T * G * (I + O)))
            for b0 in range(0, B, step):
                b1 = min(B, b0 + step)
                if G == 1:  # transposed views: the GEMM reads them without a copy
                    part = torch.bmm(self.D[b0:b1, :, 0, :].to(dt).transpose(1, 2), self.A[b0:b1, :, 0, :].to(dt))
                    g[b0:b1, 0].copy_(part)
                else:
                    A = self.A[b0:b1].permute(0, 2, 1, 3).to(dt, memory_format=torch.contiguous_format)
                    D = self.D[b0:b1].permute(0, 2, 3, 1).to(dt, memory_format=torch.contiguous_format)
                    g[b0:b1].copy_(torch.matmul(D, A))
        else:
            A = self.A.double()
            B = self.ids.shape[0]
            # index_add per sample: flatten (b, id) into one row index of a [B*O, I] table.
            rows = (torch.arange(B, device=A.device)[:, None] * O + self.ids).reshape(-1)
            g = torch.zeros(B * O, I, dtype=torch.float64, device=A.device)
            g.index_add_(0, rows, A[:, :, 0, :].reshape(-1, I))
            g = g.reshape(B, 1, O, I)
        if self.transposed:
            g = g.transpose(-1, -2)
        return g.reshape(g.shape[0], -1)

    # --- coefficients and update -------------------------------------------------------------
    def coef(self, U: Tensor) -> Tensor:
        """b_i = <g_i, U>, accumulated in float64 [B].

        Float64 because K is exact for the captured factors (float64 Gram): b rounded in float32
        would not match it, and K^-1 amplifies that mismatch by the conditioning of the per-sample
        gradients (measured: 3e-3 relative error on nearly collinear rows, 3e-6 in float64)."""
        Uv = self.view(U)
        dt = torch.float64
        B, T, G, I = self.A.shape
        if self.ids is not None:  # gather the rows first: never a float64 copy of the whole table
            rows = Uv[0][self.ids].to(dt)  # [B, T, I]
            return (rows * self.A[:, :, 0, :].to(dt)).sum(dim=(1, 2))
        # D U accumulated over slabs of output rows: float64 copies of a slab of U and D at a time
        O = Uv.shape[1]
        step = max(1, F64_SLAB_BYTES // max(1, 8 * G * I + 8 * B * T * G))
        DU = None
        for o0 in range(0, O, step):
            o1 = min(O, o0 + step)
            if G == 1:  # a plain GEMM over all tokens: no permuted copies of the factors
                part = self.D.reshape(B * T, -1)[:, o0:o1].to(dt) @ Uv[0, o0:o1].to(dt)
            else:
                part = torch.einsum("btgo,goi->btgi", self.D[..., o0:o1].to(dt), Uv[:, o0:o1].to(dt))
            DU = part if DU is None else DU.add_(part)
        if G == 1:
            return (DU * self.A.reshape(B * T, I).to(dt)).sum(-1).reshape(B, T).sum(1)
        return (DU * self.A.to(dt)).sum(dim=(1, 2, 3))

    def apply_(self, U: Tensor, c: Tensor, scale: float = 1.0) -> None:
        """U <- scale * (U - sum_i c_i g_i), one GEMM over all tokens (c broadcast per sample)."""
        Uv = self.view(U)
        cA = self.A.to(U.dtype) * c.to(U.dtype)[:, None, None, None]
        if self.ids is None:
            B, T, G, I = self.A.shape
            if G == 1:  # U <- scale U - scale D^T (c * A): one addmm over all tokens (transposes are free)
                Uv[0].addmm_(self.D.reshape(B * T, -1).to(U.dtype).t(), cA.reshape(B * T, I), beta=scale, alpha=-scale)
                return
            Uv.sub_(torch.einsum("btgo,btgi->goi", self.D.to(U.dtype), cA))
        else:
            I = self.shape[2]
            Uv[0].index_add_(0, self.ids.reshape(-1), cA[:, :, 0, :].reshape(-1, I), alpha=-1.0)
        if scale != 1.0:
            U.mul_(scale)


def merge_tokens(uses: "list[OuterFactors]") -> OuterFactors:
    """Uses of one parameter of the same kind (all dense, or all one-hot) -> one use with their
    tokens concatenated: the per-sample gradient sums over tokens, so this is exact."""
    if len(uses) == 1:
        return uses[0]
    A = torch.cat([u.A for u in uses], dim=1)
    D = ids = None
    if uses[0].D is not None:
        dt = uses[0].D.dtype
        for u in uses[1:]:
            dt = torch.promote_types(dt, u.D.dtype)  # autocast can mix bf16 and fp32 calls
        D = torch.cat([u.D.to(dt) for u in uses], dim=1)
    else:
        ids = torch.cat([u.ids for u in uses], dim=1)
    return OuterFactors(A, D, ids, uses[0].shape, uses[0].transposed)


def explicit_rows(uses: list) -> Tensor:
    """sum over the uses of their [B, numel] float64 per-sample rows (any use kind)."""
    if len(uses) == 1 and isinstance(uses[0], ExplicitRows) and uses[0].G.dtype == torch.float64:
        return uses[0].G  # rows made by RetainSpan._small_as_rows: as they are
    G = uses[0].explicit()
    for u in uses[1:]:
        G = G + u.explicit()
    return G


def explicit_rows_many(uses_list: list) -> list:
    """[explicit_rows(us) for us in uses_list], with the entries that are one one-token dense use
    of the same shapes and dtypes formed together: per-sample rows D_i (x) A_i (A_i (x) D_i for a
    parameter stored transposed) by one broadcast product in the compute dtype, then widened: the
    same values as each entry's own bmm (a single product per entry), without a few ops per tensor
    (a stack of small layers has one such weight per block)."""
    if not uses_list:
        return []
    jobs: list = []  # (positions, members of a batch or None)
    batches: dict = {}
    for k, us in enumerate(uses_list):
        if len(us) == 1 and type(us[0]) is OuterFactors and us[0].one_token:
            f = us[0]
            X, Y = (f.A, f.D) if f.transposed else (f.D, f.A)
            batches.setdefault((X.shape, Y.shape, X.dtype, Y.dtype, X.device), []).append((k, X, Y))
        else:
            jobs.append(([k], None))
    for members in batches.values():
        jobs.append(([k for k, _, _ in members], members if len(members) > 1 else None))

    def run(job):
        ks, members = job
        if members is None:
            return [explicit_rows(uses_list[ks[0]])]
        dt = _compute_dtype(members[0][1], members[0][2])
        X = torch.stack([x[:, 0, 0, :] for _, x, _ in members]).to(dt)  # [m, B, rows of the stored tensor]
        Y = torch.stack([y[:, 0, 0, :] for _, _, y in members]).to(dt)  # [m, B, its columns]
        return list((X.unsqueeze(-1) * Y.unsqueeze(-2)).reshape(len(members), X.shape[1], -1).double().unbind(0))

    # the entries' convolutions and products side by side (small ops: a depthwise convolution's
    # rows, a stem's weight gradient per sample)
    cost = [sum(_rows_work(u) for k in ks for u in uses_list[k]) for ks, _ in jobs]
    out: list = [None] * len(uses_list)
    for (ks, _), rows in zip(jobs, _threads.side_by_side(run, jobs, cost, _device(uses_list[0][0]))):
        for k, g in zip(ks, rows):
            out[k] = g
    return out


def _device(u) -> torch.device:
    return (u.G if isinstance(u, ExplicitRows) else u.A).device


def _rows_work(u) -> int:
    """Rough multiply-adds of a use's float64 rows: B x numel per token (1: given rows)."""
    if isinstance(u, ExplicitRows):
        return u.G.numel()
    G, O, I = u.shape
    tokens = getattr(u, "tokens", None) or u.a_shape[1]  # ConvFactors: its positions
    return u.B * G * O * I * tokens


@dataclass
class ExplicitRows:
    """g_i given as rows of G [B, numel] (any float dtype).

    ``weight_D``: the output gradient D [B, 1, 1, O] of a one-token layer whose bias this is (then
    G = D's rows): the engine computes the Gram D D^T once for the weight and the bias."""

    G: Tensor
    weight_D: Optional[Tensor] = None

    @property
    def B(self) -> int:
        return self.G.shape[0]

    def explicit(self) -> Tensor:
        return self.G.double()

    def coef(self, U: Tensor) -> Tensor:
        return self.G.double() @ U.reshape(-1).double()

    def apply_(self, U: Tensor, c: Tensor) -> None:
        U.view(-1).sub_((c.double() @ self.G.double()).to(U.dtype))
