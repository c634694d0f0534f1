"""Plain-torch references for the Triton kernels, one function per kernel (any device, any dtype).

They compute what the kernels compute, the straightforward way (einsum, materialized tensors), in
float32 for fp32/bf16/fp16 inputs and float64 if any input is float64, inputs upcast first (so a
bf16 kernel accumulating in fp32 matches to fp32 rounding). Memory is not a concern here: the
ghost reference forms the full (B T)^2 token Grams. Tests compare each kernel with these and these
with an explicit float64 per-sample loop.
"""

from __future__ import annotations

import torch

__all__ = ["tile_gram_ref", "ghost_gram_ref", "coef_ref", "cgs_step_ref", "cgs2_ref",
           "project_out_ref"]


def _acc(*ts) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) \
        else torch.float32


def tile_gram_ref(A: torch.Tensor, D: torch.Tensor, U: torch.Tensor | None = None):
    """(K [B, B], b [B] or None) from materialized per-sample gradients G_i = D_i^T A_i."""
    dt = _acc(A, D, U)
    G = torch.einsum("bto,bti->boi", D.to(dt), A.to(dt)).flatten(1)
    K = G @ G.T
    b = G @ U.to(dt).flatten() if U is not None else None
    return K, b


def ghost_gram_ref(A: torch.Tensor, D: torch.Tensor, U: torch.Tensor | None = None):
    """(K, b) through the token Grams: K[i, j] = sum((A_i A_j^T) * (D_i D_j^T))."""
    dt = _acc(A, D, U)
    A, D = A.to(dt), D.to(dt)
    sa = torch.einsum("bti,csi->btcs", A, A)
    sd = torch.einsum("bto,cso->btcs", D, D)
    K = (sa * sd).sum(dim=(1, 3))
    return K, (coef_ref(A, D, U) if U is not None else None)


def coef_ref(A: torch.Tensor, D: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """b_i = sum_t d_it^T U a_it = sum((D_i U) * A_i)."""
    dt = _acc(A, D, U)
    return ((D.to(dt) @ U.to(dt)) * A.to(dt)).sum(dim=(1, 2))


def cgs_step_ref(Q, X, Tm=None, C=None):
    """(Y = X Tm - Q C, Q^T Y, Y^T Y), all float64 (reference of kernels.cgs_step)."""
    X = X.double()
    Y = X @ Tm.double() if Tm is not None else X
    if Q is not None and C is not None:
        Y = Y - Q.double() @ C.double()
    sq = Q.double().T @ Y if Q is not None else None
    return Y, sq, Y.T @ Y


def cgs2_ref(G: torch.Tensor, rtol: float) -> torch.Tensor:
    """Column-by-column CGS2 in float64, the textbook rule the blocked version implements.

    Column k (norm nu_k) is projected off the accepted Q twice; kept iff the remaining norm is
    > rtol * nu_k. Returns Q (n x r) float64.
    """
    G = G.double()
    cols = []
    for k in range(G.shape[1]):
        x = G[:, k].clone()
        nu = torch.linalg.vector_norm(x)
        for _ in range(2):
            if cols:
                Q = torch.stack(cols, 1)
                x = x - Q @ (Q.T @ x)
        nrm = torch.linalg.vector_norm(x)
        if nrm > rtol * nu:
            cols.append(x / nrm)
    if not cols:
        return G.new_zeros((G.shape[0], 0))
    return torch.stack(cols, 1)


def project_out_ref(G: torch.Tensor, u: torch.Tensor, rtol: float) -> torch.Tensor:
    """u minus its projection on span(cgs2_ref(G, rtol)), float64."""
    Q = cgs2_ref(G, rtol)
    u = u.double()
    return u - Q @ (Q.T @ u)
