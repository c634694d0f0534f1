"""Checks of a projection that turn silent errors into named ones: non-finite values, and the
capture check (the per-sample gradients must add up to the retain gradient)."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from ..errors import CaptureError


def raise_nonfinite(names: Dict[Tensor, str], active, Ks, bs, vecs) -> None:
    """Raise the error that names the first tensor with NaN or inf (in u, or in its retain K, b)."""
    for p, K, b in zip(active, Ks, bs):
        if not torch.isfinite(vecs[p]).all():
            raise FloatingPointError(
                f"the unlearn gradient of parameter '{names[p]}' contains NaN or inf; fix the unlearn loss "
                "(under fp16 autocast, use a GradScaler or bf16) before project_()."
            )
        if not (torch.isfinite(K).all() and torch.isfinite(b).all()):
            raise FloatingPointError(
                f"the retain factors of parameter '{names[p]}' contain NaN or inf (an fp16 overflow in the "
                "retain backward, or a NaN loss); use bf16 or fp32 for the retain pass, or check the retain loss."
            )
    raise FloatingPointError("non-finite values in the OrthoGrad Gram")


def check_capture(
    params: List, terms: Dict, gsum: Dict[Tensor, Optional[Tensor]], active, K, bs, vecs, *, half: bool, world: int,
    gdots: Optional[Dict] = None, deferred: Optional[list] = None,
) -> None:
    """sum_i <g_i, u> must equal <sum of the retain gradients, u>: a use the hooks missed (a
    parameter used outside its module's forward) breaks it. Scalar per tensor, no extra pass.

    Rounding in both sums scales with the per-sample rows, sum_i |g_i| |u| (|g_i| = sqrt(K_ii)),
    not with |sum_i g_i|, which vanishes when the samples cancel. A tensor whose every row is
    rounding noise (its true gradient is exactly zero, e.g. a bias a later op removes) is judged
    against the model-wide scale sum_t sum_i |g_i,t| |u_t| instead: its noise is far below it,
    a real missed use is not. ``world``: DDP ranks (.grad is their average, the gathered rows sum
    every rank's local gradient); ``half``: half-precision factors (looser tolerances).

    ``gdots`` {param: RetainDot}: parameters whose retain gradient was kept only as <g, u>
    (retain_span.RetainSpan.block); where u has changed since, that parameter is appended to
    ``deferred`` instead (its check waits for a later span, which keeps the whole gradient)."""
    gdots = gdots or {}
    names = {p: n for n, p in params}
    rows = K.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt().sum(-1)  # sum_i |g_i| per tensor
    model_scale = None  # formed only if some tensor misses its own tolerance
    ks, diffs, tols, halves = [], [], [], []
    for k, (p, b) in enumerate(zip(active, bs)):
        gs, dot = gsum.get(p), gdots.get(p)
        if gs is None and dot is None:
            continue
        u = vecs[p]
        if dot is not None and not dot.valid_for(u):
            if deferred is not None:
                deferred.append(p)
            continue
        # blocks that kept the whole gradient (gs) and blocks that kept <g, u> (dot) add up
        rhs, h = 0.0, False
        if gs is not None:
            # float32 dots are enough for the tolerance and avoid float64 copies of big tensors
            rhs = torch.dot(gs.reshape(-1), u.reshape(-1).to(gs.dtype)).double()
            h = gs.dtype in (torch.float16, torch.bfloat16)
        if dot is not None:
            rhs, h = rhs + dot.dot, h or dot.half
        rhs = rhs * world
        unorm = torch.linalg.vector_norm(u).double()
        # autocast: half factors (bf16/fp16 activations and output gradients) with an fp32
        # .grad still carry half-precision rounding: use the half tolerances for them too.
        h = h or half
        ks.append(k)
        halves.append(h)
        diffs.append((b.sum() - rhs).abs())
        tols.append((3e-2 if h else 2e-3) * rows[k] * unorm + 1e-30)
    # one host sync for every tensor; the rare misses are then looked at one by one
    over = ~(torch.stack(diffs) <= torch.stack(tols)) if ks else None  # NaN counts as over
    over = over.nonzero().flatten().tolist() if over is not None and bool(over.any()) else []
    for j in over:
        k, h, p = ks[j], halves[j], active[ks[j]]
        if model_scale is None:
            model_scale = sum(float(rows[i]) * float(torch.linalg.vector_norm(vecs[q])) for i, q in enumerate(active))
        if float(diffs[j]) <= (1e-3 if h else 1e-5) * model_scale:
            continue
        raise CaptureError(
            f"parameter '{names[p]}': the per-sample gradients captured by the hooks do not add up to its "
            "retain gradient. It is used outside the forward of the module that owns it (e.g. "
            "`h @ self.emb.weight.T` in a parent's forward). Route that use through a module "
            "(nn.Linear with the tied weight) or freeze the parameter."
        )
    for name, p in params:
        if p in terms:
            continue
        if (gsum.get(p) is not None and bool(gsum[p].abs().max() > 0)) or (p in gdots and bool(gdots[p].nonzero)):
            raise CaptureError(
                f"parameter '{name}' received a retain gradient, but no module that owns it saw the retain "
                "forward: it is used outside its module's forward. Route the use through a module, or freeze it. "
                "(Or its module ran under torch.no_grad() and again in the backward: activation checkpointing "
                "with use_reentrant=True. Turn checkpointing off for the retain pass.)"
            )
