"""Run OrthoGrad on a model and compare with the float64 oracle (shared by the engine tests)."""

from __future__ import annotations

import contextlib

import torch

from oracle import oracle_direction, orthogonality

from orthograd_fast import OrthoGrad


def og_direction(model, loss_fn, retain, unlearn, forget=False, unlearn_first=False, **kw):
    og = OrthoGrad(model, **kw)
    model.zero_grad(set_to_none=True)

    def retain_pass():
        with og.retain():
            loss_fn(model(retain[0]), retain[1]).mean().backward()

    if not unlearn_first:
        retain_pass()
    with og.forget() if forget else contextlib.nullcontext():
        loss_fn(model(unlearn[0]), unlearn[1]).mean().backward()
    if unlearn_first:
        retain_pass()
    og.project_()
    return og, {n: p.grad.reshape(-1).double() for n, p in model.named_parameters() if p.requires_grad}


# Float32 rounding of the gradients, amplified by the conditioning of the retain rows (compare):
# errors above EXPLAIN_ABOVE are counted beyond ROUNDING_ALLOWANCE * eps32 * kappa.
EPS32 = torch.finfo(torch.float32).eps
ROUNDING_ALLOWANCE = 4.0
EXPLAIN_ABOVE = 1e-5


def _kappa(G: torch.Tensor, rtol: float = 1e-7) -> float:
    """sigma_max / sigma_min of G [B, n] over the directions the oracle keeps (its cutoff)."""
    if G.numel() == 0 or float(G.abs().max()) == 0.0:
        return 1.0
    S = torch.linalg.svdvals(G)
    S = S[S > rtol * S[0]]
    return float(S[0] / S[-1])


def compare(model, loss_fn, retain, unlearn, scope="tensor", alpha=0.0, forget=False, unlearn_first=False, **kw):
    """(max relative error per tensor, orthogonality of the P_perp part) against the oracle.

    Relative error of tensor t: ||d_t - d_t*|| / (||d_t*|| + ||(1-alpha) u_t|| + ||alpha gbar_t||),
    so a tensor whose exact direction is ~0 (u entirely in the span) is judged against u.

    A float32 model's gradients carry ~eps32 relative rounding, and the projection onto their span
    moves by up to ~eps32 * kappa (kappa = sigma_max / sigma_min of the retain rows): on nearly
    collinear rows no float32 computation reaches the float64 direction. Measured on the test MLP
    (300 draws): a softmax head's bias (rows summing to zero, as many samples as directions) at
    1.4e-4 with kappa 2.1e4 and 7.0e-5 with kappa 4.3e3, while the engine was exact (6e-11) for the
    rows it captured: 0.06-0.14 eps32 kappa. So an error above EXPLAIN_ABOVE is counted beyond
    ROUNDING_ALLOWANCE * eps32 * kappa_t (for well-conditioned rows, kappa ~ 10: 5e-6).
    """
    og, got = og_direction(model, loss_fn, retain, unlearn, forget=forget, unlearn_first=unlearn_first, scope=scope, alpha=alpha, **kw)
    err, orth = judge(model, got, loss_fn, retain, unlearn, scope=scope, alpha=alpha)
    return err, orth, og


def judge(model, got, loss_fn, retain, unlearn, scope="tensor", alpha=0.0):
    """(max relative error per tensor, orthogonality) of the directions ``got`` ({name: flat
    float64}) against the oracle on this data (see :func:`compare`)."""
    ref, G, u = oracle_direction(model, loss_fn, retain, unlearn, scope=scope, alpha=alpha)
    gbar = {n: G[n].mean(0) for n in G}
    if scope == "tensor":
        kappa = {n: _kappa(G[n]) for n in ref}
    else:
        k_all = _kappa(torch.cat([G[n] for n in ref], 1))
        kappa = {n: k_all for n in ref}
    f32 = all(p.dtype == torch.float32 for p in model.parameters())
    err = 0.0
    for n in ref:
        scale = ref[n].norm() + (1 - alpha) * u[n].norm() + alpha * gbar[n].norm() + 1e-30
        e = float((got[n] - ref[n]).norm() / scale)
        if f32 and e > EXPLAIN_ABOVE:
            e = max(0.0, e - ROUNDING_ALLOWANCE * EPS32 * kappa[n])
        err = max(err, e)
    orth = None
    if alpha < 1:
        perp = {n: (alpha * gbar[n] - got[n]) / (1 - alpha) for n in got}
        orth = orthogonality(G, perp, u, scope)
    return err, orth


def autocast_ok(dtype) -> bool:
    """Whether this torch build's CPU autocast produces ``dtype`` (bf16 everywhere; fp16 only in
    newer builds)."""
    try:
        with torch.autocast("cpu", dtype=dtype):
            y = torch.nn.Linear(3, 2)(torch.randn(2, 3))
        return y.dtype == dtype
    except RuntimeError:
        return False
