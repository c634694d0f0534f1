"""Last-resort fallback: per-sample gradients of one module's own parameters by torch.func.

Used for one call of a module captured by operation (:mod:`orthograd_fast.engine.op_capture`) when that
call fed one of its parameters to an operation with no per-op rule; every such use is listed in
``og.stats["fallback"]`` and warned about once (:class:`FallbackLog`). The captured call gives the
module's inputs x and output gradients gy. The per-sample
gradient of its parameters theta is

    g_i = d/dtheta < M_theta(x_i), gy_i >

computed for all i at once by ``vmap(grad(...))`` over the module alone: materialized as
[B, numel] for this module only, never for the model. Tensors whose dim 0 equals the retain batch
are treated as batched; everything else (masks, constants) is broadcast.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import CaptureError, ReplayMismatch, UnsupportedModule
from .factors import ExplicitRows


class FallbackLog:
    """Fallback scopes seen by one OrthoGrad: module name, operation(s), parameter count."""

    def __init__(self):
        self._scopes: Dict[tuple, dict] = {}

    def add(self, module: str, module_type: str, ops: List[str], numel: int) -> None:
        key = (module, tuple(sorted(set(ops))))
        if key in self._scopes:
            return
        self._scopes[key] = {"module": module, "op": ", ".join(key[1]), "params": numel}
        warnings.warn(
            f"OrthoGrad: module '{module}' ({module_type}) feeds its parameters to {', '.join(key[1])}, which has no "
            f"per-sample rule: its {numel} parameters go through the torch.func fallback (the module is replayed per "
            "sample; slower). See og.stats['fallback'].",
            RuntimeWarning,
            stacklevel=4,
        )

    def report(self) -> List[dict]:
        return [dict(v) for v in self._scopes.values()]


# Per module type: keyword arguments that are never per-sample (broadcast to every sample).
SHARED_ARGS = {nn.MultiheadAttention: ("attn_mask",)}


def _bind(module: nn.Module, args, kwargs):
    """Positional arguments that have names become keywords, so shared ones can be recognized."""
    try:
        sig = inspect.signature(module.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return tuple(args), dict(kwargs)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        return tuple(args), dict(kwargs)
    return (), dict(bound.arguments)


def _shared_leaf_ids(module: nn.Module, args, kwargs) -> set:
    names = ()
    for cls, n in SHARED_ARGS.items():
        if isinstance(module, cls):
            names = n
    ids = set()
    for n in names:
        t = kwargs.get(n)
        if isinstance(t, Tensor):
            if isinstance(module, nn.MultiheadAttention) and t.dim() == 3:
                raise NotImplementedError(
                    "nn.MultiheadAttention with a 3-D attn_mask [B*heads, T, S] in the retain pass: pass a 2-D "
                    "attn_mask or a key_padding_mask [B, S] instead"
                )
            ids.add(id(t))
    return ids


def _is_batched(t, B: int) -> bool:
    return isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] == B


def fallback_uses(
    module: nn.Module, names: Dict[str, Tensor], call, B: int, module_name: str, ops: Sequence[str] = ()
) -> Dict[Tensor, ExplicitRows]:
    """Per-sample gradients of ``names`` (attribute path in ``module`` -> parameter) for one call.

    ``call`` holds ``args``, ``kwargs``, ``output`` (detached) and ``grads`` (one per flattened
    output tensor, None where no gradient reached it); ``ops``: the operations that sent the module
    here (for the error when the replay fails).
    """
    args, kwargs = _bind(module, call.args, call.kwargs)
    leaves, spec = tree_flatten((args, kwargs))
    # Which leaves carry the sample index: dim 0 == B, except arguments known to be shared by all
    # samples (an attention mask [T, S] whose T happens to equal B).
    shared = _shared_leaf_ids(module, args, kwargs)
    batched = [_is_batched(t, B) and id(t) not in shared for t in leaves]
    b_leaves = [t for t, isb in zip(leaves, batched) if isb]
    out_leaves, out_spec = tree_flatten(call.output)
    for g in call.grads:
        if g is not None and (g.dim() == 0 or g.shape[0] != B):
            raise CaptureError(
                f"module '{module_name}' ({type(module).__name__}) returned an output without the retain "
                f"batch on dim 0 (shape {tuple(g.shape)}, B={B}): it is shared by all samples (e.g. a positional "
                "table returning weight slices), so its per-sample gradients cannot be separated. Freeze it "
                "(requires_grad_(False)) or make it return one row per sample."
            )
    gmask = [g is not None for g in call.grads]
    grads = [g for g in call.grads if g is not None]
    if not grads:
        return {}
    params = {k: p.detach() for k, p in names.items()}

    # The replay must reproduce the captured forward (no dropout, no hidden state): check it once
    # on the whole batch so that a stochastic module is an error, not a silently wrong gradient.
    with torch.no_grad():
        args, kwargs = tree_unflatten(leaves, spec)
        replay, _ = tree_flatten(functional_call(module, params, tuple(args), kwargs))
    for r, o in zip(replay, out_leaves):
        if isinstance(o, Tensor) and isinstance(r, Tensor) and o.is_floating_point():
            if r.shape != o.shape or not torch.allclose(r.float(), o.float(), rtol=1e-4, atol=1e-5):
                raise ReplayMismatch(
                    f"module '{module_name}' ({type(module).__name__}) is handled by the generic torch.func "
                    "fallback, and replaying its forward did not reproduce the captured output (dropout or "
                    "other randomness, or state changed during the pass). Use dropout=0 / eval mode for "
                    "this module during the retain pass."
                )

    def inner(p, bl, gl):
        it = iter(bl)
        full = [next(it).unsqueeze(0) if isb else t for t, isb in zip(leaves, batched)]
        a, kw = tree_unflatten(full, spec)
        outs, _ = tree_flatten(functional_call(module, p, tuple(a), kw))
        total = 0.0
        gi = iter(gl)
        for o, has in zip(outs, gmask):
            if has:
                total = total + (o * next(gi).unsqueeze(0).to(o.dtype)).sum()
        return total

    try:
        per_sample = vmap(grad(inner), in_dims=(None, 0, 0))(params, b_leaves, grads)
    except (CaptureError, ReplayMismatch, UnsupportedModule):
        raise
    except RuntimeError as e:  # e.g. an autograd.Function without setup_context (no vmap rule)
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = why if why.endswith((".", "!", "?")) else why + "."
        raise CaptureError(
            f"module '{module_name}' ({type(module).__name__}) uses operation(s) without a per-sample rule"
            f"{' (' + ', '.join(ops) + ')' if ops else ''}, so its per-sample gradients come from the generic "
            f"torch.func fallback (vmap over its forward), and that replay failed: {why} Freeze this module's "
            "parameters (requires_grad_(False)), or write the operation with ones that have a rule (see the "
            "README's 'What is supported')."
        ) from e
    return {names[k]: ExplicitRows(v.reshape(B, -1)) for k, v in per_sample.items()}


def unit_parameters(module: nn.Module, whole: bool) -> Dict[str, Tensor]:
    """Trainable parameters a fallback unit differentiates: its own (or all, for whole units)."""
    return {k: p for k, p in module.named_parameters(recurse=whole) if p.requires_grad}


def merge(into: Dict[Tensor, List], new: Dict[Tensor, object]) -> None:
    for p, u in new.items():
        into.setdefault(p, []).append(u)
