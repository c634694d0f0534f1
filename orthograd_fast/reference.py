"""The paper's reference OrthoGrad: materialized per-sample gradients, then a projection.

This mirrors the public research code: per-sample gradients of every trainable tensor by
``torch.func.vmap(grad(...))`` (B copies of the model's gradient in memory), then per tensor
``torch.linalg.qr`` of its B x numel block (``method="qr"``, no tolerance: paper parity) or an
exact SVD projector with a rank tolerance (``method="svd"``). It is the pure-PyTorch check and the
benchmark baseline; :class:`orthograd_fast.OrthoGrad` computes the same direction from factors.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .engine.solve import default_rtol


def per_sample_grads(model: nn.Module, loss_fn: Callable, x: Tensor, y) -> Dict[str, Tensor]:
    """{name: [B, *param.shape]} per-sample gradients of loss_fn(model(x_i), y_i) (torch.func)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def sample_loss(prm, xi, yi):
        out = functional_call(model, (prm, buffers), (xi.unsqueeze(0),))
        yb = yi.unsqueeze(0) if isinstance(yi, Tensor) else yi
        return loss_fn(out, yb).sum()

    in_y = 0 if isinstance(y, Tensor) else None
    return vmap(grad(sample_loss), in_dims=(None, 0, in_y))(params, x, y)


def _project_out(G: Tensor, u: Tensor, method: str, rtol: Optional[float]) -> Tensor:
    """u - proj_{span rows of G}(u); G [B, n], u [n]."""
    if method == "qr":
        Q, _ = torch.linalg.qr(G.t(), mode="reduced")
        return u - Q @ (Q.t() @ u)
    U_, S, Vh = torch.linalg.svd(G, full_matrices=False)
    tol = default_rtol(G.dtype) if rtol is None else rtol
    keep = S > tol * S.max() if S.numel() and S.max() > 0 else torch.zeros_like(S, dtype=torch.bool)
    V = Vh[keep]
    return u - V.t() @ (V @ u)


def orthograd_direction(
    model: nn.Module,
    loss_fn: Callable,
    retain: Tuple[Tensor, Tensor],
    unlearn: Tuple[Tensor, Tensor],
    *,
    scope: str = "tensor",
    alpha: float = 0.0,
    method: str = "qr",
    rtol: Optional[float] = None,
) -> Dict[str, Tensor]:
    """The OrthoGrad direction ``alpha * gbar_r - (1 - alpha) * P_perp(u)`` per parameter name.

    Args:
        loss_fn: ``loss_fn(outputs, targets) -> per-sample losses [B]`` (reduction="none").
        retain, unlearn: ``(x, y)`` batches; gbar_r and u are gradients of the *mean* losses.
        scope: "tensor" (one projection per tensor, the paper) or "global" (one over all).
        method: "qr" (torch.linalg.qr, no tolerance) or "svd" (rank tolerance ``rtol`` on
            singular values, default 1e-6 relative; 1e-8 for float64).
    """
    if scope not in ("tensor", "global"):
        raise ValueError(f"orthograd_direction(scope={scope!r}): use 'tensor' or 'global'")
    if method not in ("qr", "svd"):
        raise ValueError(f"orthograd_direction(method={method!r}): use 'qr' or 'svd'")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    x_r, y_r = retain
    x_u, y_u = unlearn
    G = per_sample_grads(model, loss_fn, x_r, y_r)
    B = x_r.shape[0]
    gbar = {n: G[n].mean(0) for n in names}
    u_list = torch.autograd.grad(loss_fn(model(x_u), y_u).mean(), params, allow_unused=True)
    u = {n: (g if g is not None else torch.zeros_like(p)).detach() for n, g, p in zip(names, u_list, params)}
    if scope == "tensor":
        perp = {n: _project_out(G[n].reshape(B, -1), u[n].reshape(-1), method, rtol).reshape(u[n].shape) for n in names}
    else:
        Gall = torch.cat([G[n].reshape(B, -1) for n in names], dim=1)
        uall = torch.cat([u[n].reshape(-1) for n in names])
        r = _project_out(Gall, uall, method, rtol)
        perp, k = {}, 0
        for n in names:
            m = u[n].numel()
            perp[n] = r[k : k + m].reshape(u[n].shape)
            k += m
    return {n: alpha * gbar[n] - (1.0 - alpha) * perp[n] for n in names}
