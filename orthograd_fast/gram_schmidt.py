"""Blocked classical Gram-Schmidt with one re-orthogonalization (BCGS2) and a rank tolerance.

For explicit vectors: the columns of a tall matrix G (n x m, n >> m), e.g. per-sample gradients
of one tensor laid out as columns. ``cgs2(G)`` returns Q (n x r) with orthonormal columns spanning
the numerically independent columns of G; ``project_out(G, u)`` returns u minus its component in
span(G) (applied twice: "twice is enough").

Not used by the engine, which never imports this module: OrthoGrad solves the small B x B Gram in
float64 instead (orthograd_fast.engine.solve), which was faster in every case measured where per-sample
rows exist (benchmarks/cgs2_vs_gram.py). Both give the same projector: the Cholesky factor of the
Gram is Gram-Schmidt carried out in Gram coordinates (docs/math.md section 10). What CGS2 offers
is precision, not speed: it never squares the condition number, so a direction at s = sigma /
sigma_max is resolved to ~eps / s instead of ~eps / s^2, down to s ~ 1e-12 in float64.

Per block X of ``block`` columns (Q = columns accepted so far):

    pass 1:  Y = X - Q (Q^T X);   W1 = Y^T Y;  in-order Cholesky of W1 with drops -> R1;  Z = Y R1^-1
    pass 2:  Z' = Z - Q (Q^T Z);  W2 = Z'^T Z'; in-order Cholesky of W2 with drops -> R2; Q_new = Z' R2^-1

The in-block Cholesky is Gram-Schmidt in coefficient space: its pivot d_k is the squared norm of
column k after removing Q and the block's earlier kept columns. Rank rule (per column, as in
column-wise CGS2): column k with original norm nu_k is dropped when its norm after the two passes,
R1_kk * sqrt(d2_k), is <= rtol * nu_k (pass 1 already drops R1_kk <= rtol * nu_k). The Grams
W1, W2 are accumulated in float64 so those decisions hold down to ~1e-8 relative; the tall
GEMMs run in the work dtype (fp32 for fp32/bf16/fp16 input, fp64 for fp64) with TF32 off.

Q^T Z in pass 2 costs no extra pass: it equals (Q^T Y) R1^-1, and Q^T Y comes out of the fused
pass-1 update; the original column norms come free as well (|x|^2 = |Q^T x|^2 + |y|^2). So a block
reads Q three times (Q^T X; Y = X - QC with Q^T Y and Y^T Y; Z' = Y T - QC with Z'^T Z').
The backend "triton" runs each of those passes as one kernel (orthograd_fast.kernels.cgs_step);
"torch" does the same with torch matmuls; "auto" picks triton for CUDA tensors when importable
(orthograd_fast.engine.triton_ops.resolve_backend).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from .engine import triton_ops
from .engine.solve import default_rtol

__all__ = ["cgs2", "project_out", "cgs2_rtol", "MAX_BLOCK"]

MAX_BLOCK = 64  # the fused kernel holds a block's m x m Gram on chip

# Rounding floor of CGS2's own arithmetic, by work dtype: residuals come from tall GEMMs in that
# dtype, so a column dependent up to rounding keeps about eps * (growth over long sums) of its norm.
_WORK_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5}


def cgs2_rtol(dtype: torch.dtype) -> float:
    """Default rank tolerance of :func:`cgs2` for input of ``dtype``: a column is dropped when its
    norm after the two passes is <= this times its original norm.

    Not :func:`orthograd_fast.engine.solve.default_rtol`'s numbers, which cut sigma_k / sigma_max of the
    rows through their Gram: K = G G^T squares the singular values, so float64 K resolves ratios
    only to ~1e-8, while CGS2 forms each residual explicitly and in float64 resolves ~1e-12. The
    rounding an input dtype carries limits both alike, so a reduced-precision input takes at least
    ``default_rtol(dtype)`` (bfloat16 / float16: 1e-3), and float32 work adds its floor of 1e-5.
    """
    if dtype == torch.float64:
        return _WORK_FLOOR[torch.float64]
    return max(default_rtol(dtype), _WORK_FLOOR[torch.float32])


def _work_dtype(*ts) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


@contextlib.contextmanager
def _no_tf32():
    """fp32 matmuls at full fp32 precision inside (TF32 would cost ~1e-3 relative)."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):  # torch >= 2.9 API; mixing with allow_tf32 warns
        old = m.fp32_precision
        m.fp32_precision = "ieee"
        try:
            yield
        finally:
            m.fp32_precision = old
    else:
        old = m.allow_tf32
        m.allow_tf32 = False
        try:
            yield
        finally:
            m.allow_tf32 = old


def _gram64(Y: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """Y^T Y in float64, converting at most ``chunk`` rows at a time (bounded extra memory)."""
    m = Y.shape[1]
    out = torch.zeros((m, m), dtype=torch.float64, device=Y.device)
    for i in range(0, Y.shape[0], chunk):
        y = Y[i:i + chunk].to(torch.float64)
        out += y.T @ y
    return out


def _torch_step(Q, X, Tm=None, C=None, *, store_y=True, want_sq=True, want_sy=True, out=None):
    """Same contract as orthograd_fast.kernels.cgs_step.cgs_step, in torch."""
    with _no_tf32():
        Y = X @ Tm if Tm is not None else X
        if C is not None and Q is not None and Q.shape[1] > 0:
            Y = Y - Q @ C
        sq = (Q.T @ Y).to(torch.float64) if (want_sq and Q is not None and Q.shape[1] > 0) else None
    sy = _gram64(Y) if want_sy else None
    if not store_y:
        return None, sq, sy
    if out is not None:
        out.copy_(Y)
        Y = out
    return Y, sq, sy


def _resolve_backend(backend: str, who: str, *ts) -> str:
    return triton_ops.resolve_backend(backend, all(t.is_cuda for t in ts), who)


def _step_fn(backend: str):
    if backend == "triton":
        from .kernels.cgs_step import cgs_step

        return cgs_step
    return _torch_step


def _chol_drop(W: torch.Tensor, thr2: np.ndarray):
    """In-order Cholesky of the small Gram W (float64) that skips columns whose pivot <= thr2.

    Returns (kept indices, R^-1 for the kept columns (k x k, upper), R's diagonal (k,)).
    """
    w = W.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(w).all():
        raise ValueError("cgs2: G (or u) contains non-finite values")
    m = w.shape[0]
    R = np.zeros((m, m))
    kept: list[int] = []
    for k in range(m):
        if kept:
            rk = np.linalg.solve(R[np.ix_(kept, kept)].T, w[kept, k])
            d = w[k, k] - rk @ rk
        else:
            rk, d = None, w[k, k]
        if not d > thr2[k]:
            continue
        if kept:
            R[kept, k] = rk
        R[k, k] = math.sqrt(d)
        kept.append(k)
    if not kept:
        return kept, np.zeros((0, 0)), np.zeros(0)
    Rk = R[np.ix_(kept, kept)]
    return kept, np.linalg.inv(Rk), np.diag(Rk).copy()


def _check_matrix(G, name="G"):
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() != 2:
        raise ValueError(f"{name} must be 2-D (n x m, vectors as columns), got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {G.dtype}")


def _check_block(block):
    if not (isinstance(block, int) and 1 <= block <= MAX_BLOCK):
        raise ValueError(f"block must be an int in [1, {MAX_BLOCK}], got {block!r}")


def cgs2(G: torch.Tensor, rtol: float | None = None, block: int = 32,
         backend: str = "auto") -> torch.Tensor:
    """Orthonormal basis Q (n x r) of span(G's columns), by blocked CGS2 with a rank tolerance.

    G: n x m floating tensor (any device, any strides). rtol: drop a column whose norm after two
    passes is <= rtol times its original norm (None: ``cgs2_rtol(G.dtype)``); columns are
    taken in order, so of a dependent set the later ones drop. Q has the work dtype (float64 for
    float64 G, else float32) and r <= min(n, m) columns.
    """
    _check_matrix(G)
    _check_block(block)
    G = G.detach()
    backend = _resolve_backend(backend, "cgs2", G)
    work = _work_dtype(G)
    rtol = cgs2_rtol(G.dtype) if rtol is None else float(rtol)
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")
    n, mtot = G.shape
    step = _step_fn(backend)
    dev = G.device
    Qbuf = torch.empty((n, mtot), device=dev, dtype=work)
    r = 0
    for j0 in range(0, mtot, block):
        X = G[:, j0:j0 + block]
        if X.dtype != work:
            X = X.to(work)
        Qr = Qbuf[:, :r] if r else None
        # pass 1
        if r:
            _, c1, _ = step(Qr, X, store_y=False, want_sq=True, want_sy=False)
            Y, sq1, w1 = step(Qr, X, None, c1.to(work), store_y=True, want_sq=True, want_sy=True)
            # original squared norms for free: x = Q c1 + y with Q orthonormal (to rounding)
            nu2 = (torch.diagonal(w1) + (c1 * c1).sum(0)).cpu().numpy()
        else:
            _, _, w1 = step(None, X, store_y=False, want_sq=False, want_sy=True)
            nu2 = torch.diagonal(w1).cpu().numpy()
            Y, sq1 = X, None
        thr1 = rtol * rtol * nu2
        kept1, rinv1, rdiag1 = _chol_drop(w1, thr1)
        if not kept1:
            continue
        T1 = np.zeros((X.shape[1], len(kept1)))
        T1[kept1] = rinv1
        T1t = torch.from_numpy(T1).to(device=dev, dtype=work)
        c2 = (sq1 @ torch.from_numpy(T1).to(sq1.device)).to(work) if sq1 is not None else None
        # pass 2 (re-orthogonalization of the normalized block)
        Z, _, w2 = step(Qr, Y, T1t, c2, store_y=True, want_sq=False, want_sy=True)
        # norm after two passes = R1_kk * sqrt(d2_k); compare with rtol * nu_k
        with np.errstate(divide="ignore"):
            thr2 = rtol * rtol * nu2[kept1] / (rdiag1 * rdiag1)
        kept2, rinv2, _ = _chol_drop(w2, thr2)
        if not kept2:
            continue
        T2 = np.zeros((len(kept1), len(kept2)))
        T2[kept2] = rinv2
        T2t = torch.from_numpy(T2).to(device=dev, dtype=work)
        step(None, Z, T2t, None, store_y=True, want_sq=False, want_sy=False,
             out=Qbuf[:, r:r + len(kept2)])
        r += len(kept2)
    Q = Qbuf[:, :r]
    return Q if r == mtot else Q.contiguous()


def project_out(G: torch.Tensor, u: torch.Tensor, rtol: float | None = None, block: int = 32,
                backend: str = "auto") -> torch.Tensor:
    """u minus its component in span(G's columns) (G: n x m; u: [n] or [n, k]).

    Builds Q = cgs2(G, rtol) and subtracts Q (Q^T u) twice, so the result is orthogonal to Q to
    the work precision even when u lies mostly in the span. Returns u's shape and dtype.
    """
    _check_matrix(G)
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"u must be a torch.Tensor, got {type(u).__name__}")
    if u.dim() not in (1, 2) or u.shape[0] != G.shape[0]:
        raise ValueError(f"u must have shape [n] or [n, k] with n = G.shape[0] = {G.shape[0]}, "
                         f"got {tuple(u.shape)}")
    if not u.is_floating_point():
        raise ValueError(f"u must be a floating tensor, got dtype {u.dtype}")
    if u.device != G.device:
        raise ValueError(f"u is on {u.device} but G is on {G.device}")
    backend = _resolve_backend(backend, "project_out", G, u)
    Q = cgs2(G, rtol=rtol, block=block, backend=backend)
    return _project_with_q(Q, u, backend)


def _project_with_q(Q: torch.Tensor, u: torch.Tensor, backend: str) -> torch.Tensor:
    u = u.detach()
    U2 = u if u.dim() == 2 else u[:, None]
    if Q.shape[1] == 0:
        return u.clone()
    work = _work_dtype(Q, u)
    step = _step_fn(backend)
    Q = Q.to(work)
    out = torch.empty(U2.shape, device=u.device, dtype=work)
    for j0 in range(0, U2.shape[1], MAX_BLOCK):
        X = U2[:, j0:j0 + MAX_BLOCK].to(work)
        _, c1, _ = step(Q, X, store_y=False, want_sq=True, want_sy=False)
        Y, c2, _ = step(Q, X, None, c1.to(work), store_y=True, want_sq=True, want_sy=False)
        step(Q, Y, None, c2.to(work), store_y=True, want_sq=False, want_sy=False,
             out=out[:, j0:j0 + X.shape[1]])
    out = out.to(u.dtype)
    return out if u.dim() == 2 else out[:, 0]
