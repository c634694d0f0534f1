"""FLOP floor of an exact OrthoGrad step: the least extra work over a plain NegGrad+ step.

    from benchmarks.floor import flop_floor
    f = flop_floor(model, loss_fn, retain, unlearn)     # runs one plain step (weights untouched)
    f.ratio          # (plain + extra) / plain
    f.params         # per parameter: kind, shapes, the cheapest route and its extra flops

The plain step (retain fwd+bwd, unlearn fwd+bwd) is counted by ``torch.utils.flop_counter.
FlopCounterMode`` (GEMMs, convolutions, attention; forward ~2x and backward ~4x the layers'
multiply-adds). The shapes of every parameter's uses come from forward hooks on the same step's
retain pass, independent of the engine. Per trainable tensor (scope "tensor"), with B retain and
Bu unlearn samples, a use of T tokens, G groups, I inputs and O outputs per group (N = numel):

| route | Gram | coefficients <g_i, u> | update u - sum c_i g_i |
|---|---|---|---|
| ghost | 2 B^2 T^2 G (I + O) | min(2 B T G I O, 2 B Bu T^2 G (I + O)) | 2 B T G I O |
| tile | tiles 2 B T G I O, then 2 B^2 N | 2 B N | 2 B N |
| explicit (norms, biases, other) | rows, then 2 B^2 N | 2 B N | 2 B N |

A table used by lookups only can also take the sparse route: its rows summed per (table row,
sample), K from the products of the entries that share a table row (M entries, P pairs, from the
step's ids: 2 (M + P) I), a gather and a scatter of the tokens for b and the update.
An embedding's one-hot side counts 1 instead of the vocabulary (ids compared, never formed):
gather / scatter B T I instead of the GEMMs. The coefficients' second form uses the unlearn pass's
own factors (what ``og.forget()`` captures). Each tensor takes its cheapest route, plus a B x B
solve (B^3 / 3). Then the retain weight gradients are subtracted: an exact step never needs them
(lean retain skips them; gbar_r comes from the factors): 2 B T G I O per dense use, B T I per
lookup, the rows' cost for norms and biases. Per-sample tiles and rows cost the same as that
weight gradient, so on the tile and explicit routes they cancel. A tied tensor's uses are summed
(the ghost Gram with the uses' tokens together, cross terms included). A parameter of a module
without a known structure (the engine's generic fallback: custom raw parameters, recurrent cells)
counts as explicit rows at no cost beyond its Gram, coefficients and update: a lower bound.
``nn.MultiheadAttention`` counts as its two projections (in_proj, out_proj) over the tokens, a
batch-first ``nn.LSTM`` / ``GRU`` / ``RNN`` weight as a dense use over the time steps (gate
gradient x the step's input or previous hidden state).

The floor counts flops at one rate: the engine's float64 Gram (for exactness) and the small
per-tensor jobs run slower per flop, which is what ``measured / floor`` shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["Use", "ParamFloor", "Floor", "flop_floor", "capture_uses", "param_floor", "plain_flops"]

DENSE, CONV, LOOKUP, ROWS, OTHER = "dense", "conv", "lookup", "rows", "other"


@dataclass
class Use:
    """One use of a tensor in the retain forward: g_i = sum_t D_it (x) A_it per group.

    kind: ``dense`` / ``conv`` (T tokens or output positions, G groups of I -> O), ``lookup`` (an
    embedding: O = table rows, one-hot, I = width), ``rows`` (norm weights and biases: T tokens
    summed into N entries per sample), ``other`` (unknown structure: N entries per sample)."""

    kind: str
    T: int
    G: int = 1
    I: int = 1
    O: int = 1
    N: int = 0
    ids: Optional[torch.Tensor] = None  # a lookup's ids [B, T] (the sparse route's pairs depend on them)


@dataclass
class ParamFloor:
    name: str
    numel: int
    uses: List[Use]
    route: str
    extra: float  # flops over the plain step (route cost - the retain weight gradient + solve)
    costs: Dict[str, float] = field(default_factory=dict)  # route -> flops before the lean credit
    credit: float = 0.0  # the retain weight gradient's flops, subtracted (lean retain skips it)


@dataclass
class Floor:
    B: int
    Bu: int
    plain: float  # flops of the plain step
    plain_retain: float
    plain_unlearn: float
    extra: float
    params: List[ParamFloor]

    @property
    def ratio(self) -> float:
        return (self.plain + self.extra) / self.plain if self.plain > 0 else float("nan")

    def as_dict(self) -> dict:
        return {
            "B": self.B, "Bu": self.Bu, "plain_flops": self.plain, "plain_retain_flops": self.plain_retain,
            "plain_unlearn_flops": self.plain_unlearn, "extra_flops": self.extra, "floor_ratio": self.ratio,
            # the retain weight gradients the floor subtracts, counted at the plain step's mean rate
            # like every flop (a fused kernel may take as long without them: the README's LSTM)
            "retain_wgrad_credit_flops": sum(p.credit for p in self.params),
            "routes": {r: sum(1 for p in self.params if p.route == r) for r in sorted({p.route for p in self.params})},
            "top": [
                {"param": p.name, "route": p.route, "extra_flops": p.extra}
                for p in sorted(self.params, key=lambda p: -p.extra)[:5]
            ],
        }


# ----------------------------------------------------------------------------------------------
# shapes of the uses
# ----------------------------------------------------------------------------------------------
def _is_hf_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _trainable(p) -> bool:
    return isinstance(p, torch.Tensor) and p.requires_grad


def _module_uses(m: nn.Module, args, out, B: int) -> List[Tuple[torch.Tensor, Use]]:
    """(parameter, use) for one call of module m (batch of B on dim 0)."""
    x = args[0] if args else None
    uses: List[Tuple[torch.Tensor, Use]] = []
    if isinstance(m, nn.Linear) or _is_hf_conv1d(m):
        O, I = m.weight.shape if isinstance(m, nn.Linear) else m.weight.shape[::-1]
        T = x.numel() // (B * I)
        if _trainable(m.weight):
            uses.append((m.weight, Use(DENSE, T, 1, I, O)))
        if _trainable(getattr(m, "bias", None)):
            uses.append((m.bias, Use(ROWS, T, N=O)))
    elif isinstance(m, nn.modules.conv._ConvNd):
        Oc, Ig = m.weight.shape[:2]
        k = math.prod(m.weight.shape[2:])
        T = out[0].numel() // Oc if isinstance(out, torch.Tensor) else 1
        if _trainable(m.weight):
            uses.append((m.weight, Use(CONV, T, m.groups, Ig * k, Oc // m.groups)))
        if _trainable(m.bias):
            uses.append((m.bias, Use(ROWS, T, N=Oc)))
    elif isinstance(m, nn.Embedding):
        if _trainable(m.weight):
            ids = x.detach().reshape(B, -1)
            uses.append((m.weight, Use(LOOKUP, x.numel() // B, 1, m.weight.shape[1], m.weight.shape[0], ids=ids)))
    elif isinstance(m, nn.MultiheadAttention):
        E = m.embed_dim
        T = x.numel() // (B * E)  # batch_first query [B, T, E]
        if m.in_proj_weight is not None and _trainable(m.in_proj_weight):
            uses.append((m.in_proj_weight, Use(DENSE, T, 1, E, 3 * E)))
        for w, O, I in ((m.q_proj_weight, E, E), (m.k_proj_weight, E, m.kdim), (m.v_proj_weight, E, m.vdim)):
            if _trainable(w):
                uses.append((w, Use(DENSE, T, 1, I, O)))
        if _trainable(m.in_proj_bias):
            uses.append((m.in_proj_bias, Use(ROWS, T, N=3 * E)))
        if _trainable(m.out_proj.weight):
            uses.append((m.out_proj.weight, Use(DENSE, T, 1, E, E)))
        if _trainable(m.out_proj.bias):
            uses.append((m.out_proj.bias, Use(ROWS, T, N=E)))
        for p in (m.bias_k, m.bias_v):
            if _trainable(p):
                uses.append((p, Use(OTHER, 1, N=p.numel())))
    elif isinstance(m, nn.RNNBase) and not getattr(m, "proj_size", 0):
        T = x.numel() // (B * m.input_size)  # batch_first input [B, T, input_size]
        for name, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name.startswith("weight"):  # [gates * H, in]: per-sample sum over the time steps
                uses.append((p, Use(DENSE, T, 1, p.shape[1], p.shape[0])))
            else:
                uses.append((p, Use(ROWS, T, N=p.numel())))
    elif isinstance(m, _NORMS):
        for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
            if _trainable(p):
                uses.append((p, Use(ROWS, max(1, x.numel() // (B * p.numel())), N=p.numel())))
    else:
        for p in m.parameters(recurse=False):
            if p.requires_grad:
                uses.append((p, Use(OTHER, 1, N=p.numel())))
    return uses


def capture_uses(model: nn.Module, run: Callable[[], None], B: int) -> Dict[int, Tuple[torch.Tensor, List[Use]]]:
    """{id(parameter): (parameter, [Use])} from forward hooks during ``run()`` (one forward of a
    batch of B, with autograd on: under no_grad a fused eval path may skip the modules' forwards)."""
    found: Dict[int, Tuple[torch.Tensor, List[Use]]] = {}
    skip = set()
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):  # its forward reads out_proj's tensors directly
            skip.update(id(s) for s in m.modules() if s is not m)

    def hook(m, args, out):
        for p, use in _module_uses(m, args, out, B):
            found.setdefault(id(p), (p, []))[1].append(use)

    handles = []
    for m in model.modules():
        if id(m) in skip:
            continue
        if isinstance(m, nn.MultiheadAttention) or any(p.requires_grad for p in m.parameters(recurse=False)):
            handles.append(m.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return found


# ----------------------------------------------------------------------------------------------
# costs
# ----------------------------------------------------------------------------------------------
def _side(a: Use, b: Use) -> int:
    """I + O of the token Gram between two uses of a tensor; a one-hot side counts 1."""
    return a.I + (1 if LOOKUP in (a.kind, b.kind) else a.O)


def _form(use: Use, B: int) -> float:
    """Flops of forming this use's retain weight gradient (= its per-sample tiles / rows)."""
    if use.kind in (DENSE, CONV):
        return 2.0 * B * use.T * use.G * use.I * use.O
    if use.kind == LOOKUP:
        return float(B * use.T * use.I)
    if use.kind == ROWS:
        return float(B * use.T * use.N)
    return 0.0


def param_floor(name: str, numel: int, uses: List[Use], B: int, Bu: int) -> ParamFloor:
    """The cheapest route for one tensor and its extra flops over the plain step."""
    N = float(numel)
    form = sum(_form(u, B) for u in uses)  # = the retain weight gradient an exact step skips
    solve = B**3 / 3.0
    small = 2.0 * B * B * N + 2.0 * B * N + 2.0 * B * N  # Gram + coefficients + update from rows / tiles
    costs = {}
    if all(u.kind in (DENSE, CONV, LOOKUP) for u in uses):
        costs["tile"] = form + small
        gram = sum(2.0 * B * B * a.T * b.T * a.G * _side(a, b) for a in uses for b in uses)
        gemm = sum(2.0 * B * u.T * u.G * u.I * u.O if u.kind != LOOKUP else B * u.T * u.I for u in uses)
        cross = sum(2.0 * B * Bu * a.T * b.T * a.G * _side(a, b) for a in uses for b in uses)
        costs["ghost"] = gram + min(gemm, cross) + gemm
    else:
        costs["explicit"] = form + small
    if uses and all(u.kind == LOOKUP and u.ids is not None for u in uses):
        costs["sparse"] = _sparse_lookup(uses, B)
    route = min(costs, key=costs.get)
    return ParamFloor(name, numel, uses, route, costs[route] - form + solve, costs, form)


def _sparse_lookup(uses: List[Use], B: int) -> float:
    """A table used by lookups only: its rows summed per (table row, sample) (B T I adds), K from
    the products of the entries each table row holds (its samples' sums: M diagonal and P off-
    diagonal pairs of I entries), the coefficients a gather and the update a scatter of the
    tokens (B T I each). M and P from the ids of this step."""
    ids = torch.cat([u.ids.reshape(B, -1) for u in uses], 1).long()
    I = uses[0].I
    keys = torch.unique(ids * B + torch.arange(B).unsqueeze(1))
    counts = torch.unique_consecutive(keys // B, return_counts=True)[1].double()
    M, pairs = float(keys.numel()), float((counts * (counts - 1) / 2).sum())
    tokens = float(ids.numel())
    return tokens * I + 2.0 * (M + pairs) * I + 2.0 * tokens * I + tokens * I


def _rnn_flops(model: nn.Module, x: torch.Tensor) -> float:
    """Forward flops of the recurrent modules in one forward of x (FlopCounterMode does not see
    their fused kernels): 2 (gates H) (in + H) per token, layer and direction."""
    total = [0.0]

    def hook(m, args, out):
        inp = args[0]
        T = inp.shape[1] if m.batch_first else inp.shape[0]
        Bx = inp.shape[0] if m.batch_first else inp.shape[1]
        for name, p in m.named_parameters(recurse=False):
            if name.startswith("weight"):
                total[0] += 2.0 * Bx * T * p.numel()

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.RNNBase)]
    if not hs:
        return 0.0
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hs:
            h.remove()
    return total[0]


def plain_flops(model: nn.Module, loss_fn, retain, unlearn) -> Tuple[float, float]:
    """(retain, unlearn) flops of one plain NegGrad+ step: FlopCounterMode's count, plus 3x the
    forward flops of recurrent modules (forward, input and weight gradients), which it misses.
    Gradients are computed with torch.autograd.grad: ``.grad`` is not touched."""
    from torch.utils.flop_counter import FlopCounterMode

    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for x, y in (retain, unlearn):
        with FlopCounterMode(display=False) as fc:
            loss = loss_fn(model(x), y).mean()
            torch.autograd.grad(loss, params, allow_unused=True)
        out.append(float(fc.get_total_flops()) + 3.0 * _rnn_flops(model, x))
    return out[0], out[1]


def flop_floor(model: nn.Module, loss_fn, retain, unlearn) -> Floor:
    """The FLOP floor of an exact OrthoGrad step (scope "tensor") over the plain step."""
    B, Bu = int(retain[0].shape[0]), int(unlearn[0].shape[0])
    uses = capture_uses(model, lambda: model(retain[0]), B)
    pr, pu = plain_flops(model, loss_fn, retain, unlearn)
    params = []
    seen = set()
    for n, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        us = uses[id(p)][1] if id(p) in uses else [Use(OTHER, 1, N=p.numel())]  # never seen in a forward: rows at least
        params.append(param_floor(n, p.numel(), us, B, Bu))
    extra = sum(pf.extra for pf in params)
    return Floor(B, Bu, pr + pu, pr, pu, extra, params)
