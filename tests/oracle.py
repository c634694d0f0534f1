"""Independent float64 oracle: an explicit per-sample autograd loop and an SVD projector.

Nothing here uses orthograd_fast: every test compares the package against these functions. The
loop and the projector are the benchmarks' oracle's (benchmarks/oracle.py: one copy for both);
this module keeps the small dict-of-rows interface the tests use.
"""

from __future__ import annotations

import copy

import torch

from benchmarks.oracle import per_sample_grads, svd_project_out


def _to64(x, dtype=torch.float64):
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def oracle_grads(model, loss_fn, x, y, dtype=torch.float64):
    """Per-sample G {name: [B, numel]}, one sample at a time, computed in ``dtype`` (a copy of the
    model) and returned in float64."""
    m = copy.deepcopy(model).to(dtype)
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    G = per_sample_grads(m, loss_fn, _to64(x, dtype), _to64(y, dtype), params, x.shape[0])
    return {n: G[id(p)] for n, p in named}


def oracle_unlearn_grad(model, loss_fn, x, y, dtype=torch.float64):
    m = copy.deepcopy(model).to(dtype)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    params = [p for n, p in m.named_parameters() if p.requires_grad]
    loss = loss_fn(m(_to64(x, dtype)), _to64(y, dtype) if isinstance(y, torch.Tensor) else y).mean()
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)).reshape(-1).double() for n, g, p in zip(names, gs, params)}


def project_out(G, u, rtol=1e-7):
    """u minus its component in the row span of G (exact SVD projector, float64)."""
    return svd_project_out(G, u, rtol)[0]


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


def orthogonality(G, d, u, scope="tensor", per_row=False):
    """How far ``d`` is from orthogonal to the retain rows: max_i |<g_i, d>| / (max_j |g_j| |u|),
    over each tensor (scope tensor) or over the whole model (scope global).

    The scale is the largest per-sample gradient of the scope, not each row's own norm: a row far
    below the others carries no direction a projection can resolve. A retain sample the model
    already fits with a huge margin has |g_i| ~ 1e-41 (HF MobileNetV2 / EfficientNet with
    initializer_range=0.5: 2.9e-41 next to rows of 2e3 to 3e4): below any rank cutoff (the oracle's
    1e-7, the engine's 1e-6 of the largest singular value) and, in float32, a denormal. Its own
    normalised ratio |<g_i, d>| / |g_i| is the cosine between u and that row, which the projection
    deliberately leaves: 0.57 for the float64 oracle's own exact direction, while the direction is
    right to 1e-5. Relative to the largest row, a direction the cutoff drops contributes at most
    ~rtol sqrt(B), and a tensor left unprojected still reads ~0.1 to 1 (tests/test_orthogonality.py).

    ``per_row``: the old per-row scale |g_i| |u| (meaningful only when every row is well above the
    rank cutoff)."""
    if scope == "tensor":
        worst = 0.0
        for n in G:
            worst = max(worst, _orth(G[n], d[n], u[n], per_row))
        return worst
    names = list(G)
    Gall = torch.cat([G[n] for n in names], 1)
    return _orth(Gall, torch.cat([d[n] for n in names]), torch.cat([u[n] for n in names]), per_row)


def _orth(G, d, u, per_row):
    un = u.norm()
    if un == 0 or G.numel() == 0:
        return 0.0
    gn = G.norm(dim=1)
    scale = gn.clamp_min(1e-300) if per_row else gn.max().clamp_min(1e-300)
    return float(((G @ d).abs() / (scale * un)).max())
