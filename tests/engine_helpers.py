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


def compare(model, loss_fn, retain, unlearn, scope="tensor", alpha=0.0, forget=False, unlearn_first=False, **kw):
    """(max relative error per tensor, orthogonality of the P_perp part) against the oracle.

    Relative error of tensor t: ||d_t - d_t*|| / (||d_t*|| + ||(1-alpha) u_t|| + ||alpha gbar_t||),
    so a tensor whose exact direction is ~0 (u entirely in the span) is judged against u.
    """
    og, got = og_direction(model, loss_fn, retain, unlearn, forget=forget, unlearn_first=unlearn_first, scope=scope, alpha=alpha, **kw)
    ref, G, u = oracle_direction(model, loss_fn, retain, unlearn, scope=scope, alpha=alpha)
    gbar = {n: G[n].mean(0) for n in G}
    err = 0.0
    for n in ref:
        scale = ref[n].norm() + (1 - alpha) * u[n].norm() + alpha * gbar[n].norm() + 1e-30
        err = max(err, float((got[n] - ref[n]).norm() / scale))
    orth = None
    if alpha < 1:
        perp = {n: (alpha * gbar[n] - got[n]) / (1 - alpha) for n in got}
        orth = orthogonality(G, perp, u, scope)
    return err, orth, og


def autocast_ok(dtype) -> bool:
    """Whether this torch build's CPU autocast produces ``dtype`` (bf16 everywhere; fp16 only in
    newer builds)."""
    try:
        with torch.autocast("cpu", dtype=dtype):
            y = torch.nn.Linear(3, 2)(torch.randn(2, 3))
        return y.dtype == dtype
    except RuntimeError:
        return False
