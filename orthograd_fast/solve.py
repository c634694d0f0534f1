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

import numpy as np
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
    # On the CPU, torch's batched eigh nests LAPACK threads inside a parallel loop over the batch
    # (measured on 2 busy cores: 27 x 64 x 64 float64 in 0.19 s) and one call per matrix pays a
    # per-call overhead (8 x 64 x 64: 7.7 ms); numpy's stacked eigh loops in C (2.6 ms).
    if K.device.type == "cpu":
        w, V = np.linalg.eigh(K.detach().numpy())
        return torch.from_numpy(w), torch.from_numpy(V)
    return torch.linalg.eigh(K)


def solve_psd(K: Tensor, b: Tensor, rtol: float) -> Tensor:
    """c = K^+ b for symmetric PSD K [..., B, B], b [..., B] (or [..., B, m]); float64.

    Batched over leading dims (one eigendecomposition call for every tensor of a model).
    """
    K = K.double()
    K = 0.5 * (K + K.transpose(-1, -2))
    w, V = _eigh(K)
    wmax = w[..., -1:].clamp_min(0)
    keep = w > (rtol * rtol) * wmax
    inv = torch.where(keep, 1.0 / torch.where(keep, w, torch.ones_like(w)), torch.zeros_like(w))
    vec = b.dim() == K.dim() - 1
    bb = b.double().unsqueeze(-1) if vec else b.double()
    c = V @ (inv.unsqueeze(-1) * (V.transpose(-1, -2) @ bb))
    return c.squeeze(-1) if vec else c


def rank(K: Tensor, rtol: float) -> Tensor:
    """Numerical rank of K under the same cutoff as :func:`solve_psd`."""
    w = _eigh(0.5 * (K.double() + K.double().transpose(-1, -2)))[0]
    return (w > (rtol * rtol) * w[..., -1:].clamp_min(0)).sum(-1)


def resolve_rtol(rtol: Optional[float], factor_dtype: torch.dtype, approx_gram: bool) -> float:
    if rtol is None:
        return default_rtol(factor_dtype, approx_gram)
    return float(rtol)
