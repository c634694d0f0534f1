"""Independent float64 oracle: an explicit per-sample autograd loop and an SVD projector.

Nothing here uses orthograd_fast: every test compares the package against these functions.
"""

from __future__ import annotations

import copy

import torch


def _to64(x, dtype=torch.float64):
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def oracle_grads(model, loss_fn, x, y, dtype=torch.float64):
    """Per-sample G {name: [B, numel]}, one sample at a time, computed in ``dtype`` (a copy of the
    model) and returned in float64."""
    m = copy.deepcopy(model).to(dtype)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    params = [p for n, p in m.named_parameters() if p.requires_grad]
    rows = {n: [] for n in names}
    for i in range(x.shape[0]):
        xi = _to64(x[i : i + 1], dtype)
        yi = y[i : i + 1] if isinstance(y, torch.Tensor) else y
        loss = loss_fn(m(xi), _to64(yi, dtype)).sum()
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        for n, g, p in zip(names, gs, params):
            rows[n].append((g if g is not None else torch.zeros_like(p)).reshape(-1).double())
    G = {n: torch.stack(rows[n]) for n in names}
    return G


def oracle_unlearn_grad(model, loss_fn, x, y, dtype=torch.float64):
    m = copy.deepcopy(model).to(dtype)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    params = [p for n, p in m.named_parameters() if p.requires_grad]
    loss = loss_fn(m(_to64(x, dtype)), _to64(y, dtype) if isinstance(y, torch.Tensor) else y).mean()
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)).reshape(-1).double() for n, g, p in zip(names, gs, params)}


def project_out(G, u, rtol=1e-7):
    """u minus its component in the row span of G (exact SVD projector, float64)."""
    if G.numel() == 0 or G.abs().max() == 0:
        return u.clone()
    _, S, Vh = torch.linalg.svd(G, full_matrices=False)
    V = Vh[S > rtol * S.max()]
    return u - V.t() @ (V @ u)


def oracle_direction(model, loss_fn, retain, unlearn, scope="tensor", alpha=0.0, rtol=1e-7, dtype=torch.float64):
    """{name: flat float64 direction} = alpha * gbar_r - (1 - alpha) * P_perp(u).

    ``dtype``: precision of the per-sample gradients and u (float32: the exact projection of a
    float32 model's own gradients, i.e. what its rounding alone does to the direction)."""
    G = oracle_grads(model, loss_fn, *retain, dtype=dtype)
    u = oracle_unlearn_grad(model, loss_fn, *unlearn, dtype=dtype)
    names = list(G)
    gbar = {n: G[n].mean(0) for n in names}
    if scope == "tensor":
        perp = {n: project_out(G[n], u[n], rtol) for n in names}
    else:
        Gall = torch.cat([G[n] for n in names], 1)
        r = project_out(Gall, torch.cat([u[n] for n in names]), rtol)
        perp, k = {}, 0
        for n in names:
            perp[n] = r[k : k + u[n].numel()]
            k += u[n].numel()
    return {n: alpha * gbar[n] - (1 - alpha) * perp[n] for n in names}, G, u


def orthogonality(G, d, u, scope="tensor"):
    """max_i |<g_i, d>| / (|g_i| |u|) over tensors (scope tensor) or over the whole model."""
    worst = 0.0
    if scope == "tensor":
        for n in G:
            un = u[n].norm()
            if un == 0:
                continue
            gn = G[n].norm(dim=1).clamp_min(1e-300)
            worst = max(worst, float(((G[n] @ d[n]).abs() / (gn * un)).max()))
        return worst
    names = list(G)
    Gall = torch.cat([G[n] for n in names], 1)
    dall = torch.cat([d[n] for n in names])
    uall = torch.cat([u[n] for n in names])
    gn = Gall.norm(dim=1).clamp_min(1e-300)
    return float(((Gall @ dall).abs() / (gn * uall.norm())).max())
