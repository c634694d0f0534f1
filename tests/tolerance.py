"""The one tolerance rule of the test suite.

    assert_close(actual, expected, *, dtype, reduction_len, scale=1.0)

passes when |actual - expected| <= rtol * |expected| + atol elementwise, with
    rtol = RTOL[dtype]    (the precision of the computation under test: its input dtype)
    atol = rtol * sqrt(reduction_len) * scale
where reduction_len is the number of terms summed into one output entry and ``scale`` the typical
magnitude of one term (1 for products of unit-scale random inputs). sqrt: rounding errors of a
long sum grow like a random walk, and entries near zero (cancellation) need an absolute floor.
Shapes must match; NaN or inf anywhere in ``actual`` fails.
"""

from __future__ import annotations

import math

import torch

RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 1.6e-2,
    torch.float16: 1e-3,
}


def rtol_for(dtype: torch.dtype) -> float:
    try:
        return RTOL[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for dtype {dtype}; known: {list(RTOL)}") from None


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype,
                 reduction_len: int, scale: float = 1.0) -> None:
    rtol = rtol_for(dtype)
    atol = rtol * math.sqrt(max(int(reduction_len), 1)) * float(scale)
    a = torch.as_tensor(actual).detach().to("cpu", torch.float64)
    e = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: actual {tuple(a.shape)} vs expected {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        raise AssertionError(f"actual has {int((~torch.isfinite(a)).sum())} non-finite entries "
                             f"(NaN-poisoned output left unwritten?)")
    err = (a - e).abs()
    bound = rtol * e.abs() + atol
    if bool((err > bound).any()):
        i = int(torch.argmax(err - bound))
        rel = (err / e.abs().clamp_min(1e-300)).max().item()
        raise AssertionError(
            f"not close ({dtype}, reduction_len={reduction_len}, rtol={rtol:g}, atol={atol:g}): "
            f"{int((err > bound).sum())}/{err.numel()} entries out; worst at flat index {i}: "
            f"actual {a.flatten()[i].item():.9g} expected {e.flatten()[i].item():.9g}; "
            f"max abs err {err.max().item():.3g}, max rel err {rel:.3g}")
