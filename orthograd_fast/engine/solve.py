"""The small B x B solve c = K^+ b, in float64 with a rank tolerance.

``rtol`` is a cutoff on the singular values of G (the per-sample gradient rows): directions with
sigma_k <= rtol * sigma_max are treated as outside the span. On K = G G^T this keeps eigenvalues
lambda_k > rtol**2 * lambda_max. Defaults (:func:`default_rtol`), by the precision of the factors
and of the Gram:

==========================  =======  =========================================================
factors / Gram               rtol     why
==========================  =======  =========================================================
float64 factors              1e-8     K in float64 resolves sigma ratios down to ~1e-8
float32 factors              1e-6     the factors carry ~1e-7 relative rounding
bfloat16 / float16 factors   1e-3     the factors carry ~4e-3 / 5e-4 relative rounding
Gram accumulated in float32  1e-3     K's own rounding (~1e-7 lambda_max) sits at sigma ~3e-4
==========================  =======  =========================================================

The paper's code (torch.linalg.qr, no tolerance) agrees with this projector whenever G has full
row rank; on rank-deficient G (duplicated samples) QR's extra columns are arbitrary directions.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_DEFAULTS = {
    torch.float64: 1e-8,
    torch.float32: 1e-6,
    torch.bfloat16: 1e-3,
    torch.float16: 1e-3,
}
APPROX_GRAM_RTOL = 1e-3


def default_rtol(factor_dtype: torch.dtype, approx_gram: bool = False) -> float:
    """The documented default rank tolerance (see the module docstring)."""
    r = _DEFAULTS.get(factor_dtype, 1e-6)
    return max(r, APPROX_GRAM_RTOL) if approx_gram else r


def _eigh(K: Tensor):
    # torch, not numpy, on the CPU too: numpy's OpenBLAS keeps its own worker threads spinning
    # after each call, and on a small machine they steal the cores from torch's next GEMMs
    # (measured on 2 cores: the following forward/backward ran up to 2x slower).
    return torch.linalg.eigh(K)


def _well_conditioned_solve(K: Tensor, b: Tensor, r2):
    """Fast path: (c, ok) with c = K^{-1} b by Cholesky where it provably equals the eigh route.

    With K = L L^T, lambda_min >= 1 / ||L^{-1}||_F^2 and lambda_max <= trace(K); when
    ||L^{-1}||_F^2 trace(K) r2 < 1 (r2 = rtol^2, a float or one per matrix) every eigenvalue passes
    the cutoff, so K^+ = K^{-1} and the Cholesky solve gives the same c (8 x 64 x 64 on 2 CPU
    cores: 1.2 ms against 4 ms for eigh). ``ok`` [...] marks the matrices where that holds (NaN
    and inf fail the comparison); the others go to the eigh route.
    """
    L, info = torch.linalg.cholesky_ex(K)
    # a failed factorization (a singular K: fewer directions than samples) leaves garbage in its
    # own slot only; that matrix is marked not ok and goes to the eigh route
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)  # (broadcast over the batch)
    s = torch.linalg.solve_triangular(L, eye, upper=False).square().sum(dim=(-1, -2))
    s.mul_(K.diagonal(dim1=-2, dim2=-1).sum(-1)).mul_(r2)
    ok = (s < 1).logical_and_(info == 0)
    c = torch.cholesky_solve(b, L)  # (141 Grams of 32 x 32: 0.19 ms against 0.42 by L^-1 twice)
    return c, ok


# The batched solve keeps ~5 float64 copies of its B x B matrices alive (symmetrized K, L, L^-1, its
# square); batches are solved this many bytes of K at a time, so that part of the peak does not
# grow with the number of tensors (MLP, 8 tensors, B = 1024: step peak 459 -> 355 MiB).
SOLVE_CHUNK_BYTES = 16 << 20


def solve_psd(K: Tensor, b: Tensor, rtol, eigh_only: bool = False, refused: Optional[list] = None) -> Tensor:
    """c = K^+ b for symmetric PSD K [..., B, B], b [..., B] (or [..., B, m]); float64.

    Batched over leading dims (one call for every tensor of a model), in chunks of
    SOLVE_CHUNK_BYTES. ``rtol``: a float or a tensor broadcastable to [..., 1] (one tolerance per
    matrix). Well-conditioned matrices (all eigenvalues above the cutoff, proven by a bound) are
    solved by Cholesky; the rest by eigh. ``eigh_only``: every matrix by eigh (the same result;
    for matrices known to be singular, e.g. by the last step's solve). ``refused``: a list that
    gets, per chunk, whether the Cholesky path refused every matrix (under ``eigh_only``: whether
    no matrix had full rank; a host sync either way).
    """
    n = K.shape[-1]
    per = max(1, SOLVE_CHUNK_BYTES // max(1, n * n * 8))
    if K.dim() == 3 and K.shape[0] > per:
        parts = []
        for i in range(0, K.shape[0], per):
            rt = rtol[i : i + per] if isinstance(rtol, Tensor) and rtol.dim() > 0 and rtol.shape[0] == K.shape[0] else rtol
            parts.append(solve_psd(K[i : i + per], b[i : i + per], rt, eigh_only, refused))
        return torch.cat(parts)
    # (no symmetrization: Cholesky and eigh read the lower triangle only)
    K = K.double()
    vec = b.dim() == K.dim() - 1
    bb = b.double().unsqueeze(-1) if vec else b.double()
    if eigh_only:
        B, m = K.shape[-1], bb.shape[-1]
        rt = rtol.reshape(-1, 1) if isinstance(rtol, Tensor) and rtol.numel() > 1 else rtol
        full: list = []
        c = _eigh_solve(K.reshape(-1, B, B), bb.reshape(-1, B, m), rt, full).reshape(bb.shape)
        if refused is not None:  # no matrix of full rank: Cholesky would refuse them all again
            refused.append(not bool(full[0].any()))
        return c.squeeze(-1) if vec else c
    r2 = rtol * rtol if not isinstance(rtol, Tensor) else rtol.double().square().reshape(K.shape[:-2])
    c, ok = _well_conditioned_solve(K, bb, r2)
    # one host read: how many matrices the Cholesky path took
    n_ok, total = int(ok.sum()), ok.numel()
    if refused is not None:
        refused.append(n_ok == 0)
    if n_ok < total:  # eigh for the ill-conditioned matrices only, written over their c
        B, m = K.shape[-1], bb.shape[-1]
        cf, bad = c.view(-1, B, m), ok.reshape(-1).logical_not_().nonzero().squeeze(1)
        rt = rtol.reshape(-1, 1)[bad] if isinstance(rtol, Tensor) and rtol.numel() > 1 else rtol
        cf[bad] = _eigh_solve(K.reshape(-1, B, B)[bad], bb.reshape(-1, B, m)[bad], rt)
    return c.squeeze(-1) if vec else c


# solve_columns only for cutoffs whose eigenvalue ratio rtol^2 stays well above float64 rounding
# (float32 and half factors, rtol >= 1e-6): at the float64 factors' 1e-8 the cutoff sits at
# eps * lambda_max, where C's rounding decides (measured: rank-3 rows, 9 columns, 23 samples:
# wrong directions kept in some draws, while the B x B route stayed exact).
COLUMN_MIN_RTOL = 1e-7


def solve_columns(Gs: "list[Tensor]", us: "list[Tensor]", rtols: "list[float]", eigh_only: bool = False, refused: Optional[list] = None) -> "list[Tensor]":
    """c = K^+ G u for K = G G^T, per tensor, from the n x n column Gram C = G^T G instead of K.

    For rows G [B, n] with n < B (biases, norm weights: fewer entries than retain samples), K is
    B x B of rank <= n: the Cholesky fast path of :func:`solve_psd` always fails on it and every
    step pays a B x B eigh (B = 1024: ~0.25 s per tensor on 2 CPU cores; GPT-2-small has 74 such
    tensors at B = 1024). With G = U S V^T and the same cutoff (C's eigenvalues are K's nonzero
    ones), K^+ G u = U S^-1 V^T u = G (C^+ u): an n x n solve, whose Cholesky path succeeds
    whenever the samples span all n directions (then the projection removes all of u).
    Tensors of one size are solved as one batch (``eigh_only``, ``refused``: see :func:`solve_psd`)."""
    out: "list[Optional[Tensor]]" = [None] * len(Gs)
    by_n: dict = {}
    for k, G in enumerate(Gs):
        by_n.setdefault(G.shape[1], []).append(k)
    for ks in by_n.values():
        G = torch.stack([Gs[k].double() for k in ks])  # [m, B, n]
        u = torch.stack([us[k].reshape(-1).double() for k in ks])
        rt = torch.tensor([rtols[k] for k in ks], dtype=torch.float64, device=G.device).unsqueeze(-1)
        c = solve_columns_stacked(G, u, rt, eigh_only, refused)
        for j, k in enumerate(ks):
            out[k] = c[j]
    return out


def solve_columns_stacked(G: Tensor, u: Tensor, rtol, eigh_only: bool = False, refused: Optional[list] = None) -> Tensor:
    """:func:`solve_columns` for rows already stacked: G [m, B, n], u [m, n] float64 -> c [m, B]
    (``eigh_only``, ``refused``: see :func:`solve_psd`)."""
    C = G.transpose(1, 2) @ G
    y = solve_psd(C, u, rtol, eigh_only, refused)  # [m, n]
    return (G @ y.unsqueeze(-1)).squeeze(-1)


def _eigh_solve(K: Tensor, bb: Tensor, rtol, full: Optional[list] = None) -> Tensor:
    """c = K^+ bb by eigh; ``full``: a list that gets, per matrix, whether it kept every eigenvalue."""
    w, V = _eigh(K)
    wmax = w[..., -1:].clamp_min(0)
    keep = w > (rtol * rtol) * wmax
    if full is not None:
        full.append(keep.all(-1))
    inv = torch.where(keep, w.reciprocal(), 0.0)  # (the dropped eigenvalues' 1/w never reaches c)
    return V @ (inv.unsqueeze(-1) * (V.transpose(-1, -2) @ bb))


def rank(K: Tensor, rtol: float) -> Tensor:
    """Numerical rank of K under the same cutoff as :func:`solve_psd`."""
    w = _eigh(0.5 * (K.double() + K.double().transpose(-1, -2)))[0]
    return (w > (rtol * rtol) * w[..., -1:].clamp_min(0)).sum(-1)


def resolve_rtol(rtol: Optional[float], factor_dtype: torch.dtype, approx_gram: bool) -> float:
    if rtol is None:
        return default_rtol(factor_dtype, approx_gram)
    return float(rtol)
