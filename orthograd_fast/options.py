"""The OrthoGrad constructor's arguments: allowed values and their checks."""

from __future__ import annotations

from torch import nn

from .engine.triton_ops import BACKENDS

SCOPES = ("tensor", "global")
# Retain spans beyond one batch: cap on the total number of retain samples before project_().
MAX_RETAIN_SAMPLES = 4096


def check_options(model, scope: str, alpha: float, backend: str, rtol) -> float:
    """Raise the error that names the bad argument; return alpha as a float."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"OrthoGrad(model=...): expected a torch.nn.Module, got {type(model).__name__}")
    if scope not in SCOPES:
        raise ValueError(f"OrthoGrad(scope={scope!r}): use one of {SCOPES}")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"OrthoGrad(alpha={alpha}): alpha must lie in [0, 1]")
    if backend not in BACKENDS:
        raise ValueError(f"OrthoGrad(backend={backend!r}): use one of {BACKENDS}")
    if rtol is not None and not (0.0 <= float(rtol) < 1.0):
        raise ValueError(f"OrthoGrad(rtol={rtol}): use a value in [0, 1), or None for the default")
    return alpha
