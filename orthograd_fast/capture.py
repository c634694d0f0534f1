"""Hooks that capture each layer's input and output gradient during one retain backward.

A forward hook on every module that owns trainable parameters stores its (detached) input and
registers a tensor hook on its output; the tensor hook stores the output gradient when the retain
backward reaches it. Nothing is computed during the backward: the factors are assembled on
leaving ``retain()`` (:meth:`Capture.finish`), after the hooks are gone.

Weight-gradient-free retain pass: the factors replace the retain weight gradients, so by default
(``OrthoGrad(lean_retain=True)``, the ``swap`` plan) a forward pre-hook hands each rule layer detached aliases of its own parameters
for the call. The backward then computes input gradients only (the B x O x I weight-gradient GEMM
of every layer and its retain ``.grad`` buffer are never formed), and a parameter that still
receives a retain gradient was used outside its owner's forward: an error, found exactly. A layer
whose input needs no gradient (the first one) would then produce an output that needs none; it is
re-attached to the graph through :class:`_Anchor` (a no-op marked in place) so its output gradient
is still computed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from . import fallback, rules


from .errors import CaptureError  # noqa: E402  (re-exported: orthograd_fast.capture.CaptureError)


@dataclass
class Call:
    args: Any
    kwargs: Any
    output: Any
    grads: List[Optional[Tensor]] = field(default_factory=list)
    # autocast (issue 6): (device, dtype) pairs active at the call; the fallback replays under them
    autocast: tuple = ()


def _autocast_state() -> tuple:
    state = []
    for dev in ("cpu", "cuda"):
        try:
            if torch.is_autocast_enabled(dev):
                state.append((dev, torch.get_autocast_dtype(dev)))
        except (RuntimeError, TypeError, AttributeError):  # older torch / no such device type
            pass
    return tuple(state)


@dataclass
class Unit:
    """A module that owns trainable parameters, and how its calls become per-sample uses."""

    name: str
    module: nn.Module
    rule: Any  # a rules.* function, or None for the generic fallback
    whole: bool = False  # fallback over all its parameters (MultiheadAttention)


class _Anchor(torch.autograd.Function):
    """Identity on a layer output that does not require grad, attached to the graph through the
    layer's (real) parameters so the retain backward still reaches it; returns no gradient.
    Marked dirty (no copy) unless the output is a view, which is copied (in-place ops on views
    made inside a custom Function are refused by autograd), or torch.compile is tracing (the
    traced dirty output loses requires_grad under inductor)."""

    @staticmethod
    def forward(ctx, out, *params):
        if out._base is not None or _compiling():
            return out.clone()
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, g):
        return (None,) * len(ctx.needs_input_grad)


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # older torch
        return False


def _detach(x):
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, x)


def find_units(model: nn.Module) -> List[Unit]:
    """Units for every module owning trainable parameters; raises for unsupported ones."""
    units: List[Unit] = []
    claimed = set()
    for name, m in model.named_modules():
        if id(m) in claimed:
            continue
        whole = isinstance(m, rules.WHOLE_UNITS)
        own = [p for p in m.parameters(recurse=whole) if p.requires_grad]
        if whole:
            for sub in m.modules():
                claimed.add(id(sub))
        if not own:
            continue
        reason = rules.refuse_reason(m)
        if reason:
            raise rules.UnsupportedModule(f"module '{name or type(model).__name__}': {reason}")
        rule = None if whole else rules.rule_for(m)
        units.append(Unit(name=name or "<root>", module=m, rule=rule, whole=whole))
    return units


class Capture:
    """One retain() block: hooks on, calls recorded, factors assembled on finish."""

    def __init__(
        self, model: nn.Module, units: List[Unit], swap: Optional[Dict[int, list]] = None, single_token_only: bool = False
    ):
        self.model = model
        self.units = units
        # og.forget(): keep only calls with one token per sample (the only ones it can use)
        self.single_token_only = single_token_only
        self.skipped: set = set()  # id(module) with a call not kept (single_token_only)
        # id(module) -> [(name, param)] handed out detached during the module's calls (see top)
        self.swap = swap or {}
        self._swapped: List[tuple] = []  # (module, name, param) currently replaced
        self.calls: Dict[int, List[Call]] = {id(u.module): [] for u in units}
        self.B: Optional[int] = None
        self.root_calls = 0
        self.handles = []
        self.error: Optional[BaseException] = None

    # --- hooks -------------------------------------------------------------------------------
    def attach(self) -> None:
        self.handles.append(self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        for u in self.units:
            if self.swap.get(id(u.module)):
                self.handles.append(u.module.register_forward_pre_hook(self._swap_pre))
            self.handles.append(u.module.register_forward_hook(self._make_hook(u), with_kwargs=True))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._unswap_all()

    def _swap_pre(self, module, args):
        for name, p in self.swap[id(module)]:
            if module._parameters.get(name) is p:  # not already swapped (re-entrant call)
                module._parameters[name] = p.detach()
                self._swapped.append((module, name, p))
        return None

    def _unswap(self, module) -> list:
        """Put the module's own parameters back; returns those that were swapped."""
        back, keep = [], []
        for m, name, p in self._swapped:
            if m is module:
                m._parameters[name] = p
                back.append(p)
            else:
                keep.append((m, name, p))
        self._swapped = keep
        return back

    def _unswap_all(self) -> None:
        for m, name, p in self._swapped:
            m._parameters[name] = p
        self._swapped = []

    def _root_pre(self, module, args, kwargs):
        self.root_calls += 1
        if self.root_calls > 1:
            raise CaptureError(
                "the model was called more than once inside one og.retain() block: each sample's loss must "
                "come from one forward. Use one retain() block per micro-batch (they accumulate)."
            )
        leaves, _ = tree_flatten((args, kwargs))
        for t in leaves:
            if isinstance(t, Tensor) and t.dim() >= 1:
                self.B = t.shape[0]
                break
        if self.B == 0:
            # issue 6 (bad-input contract): an empty retain batch has no per-sample gradients; without
            # this check it fails later inside a layer rule with an unrelated reshape error.
            raise CaptureError(
                "og.retain(): the retain batch is empty (B=0 on dim 0 of the model input). Skip the "
                "retain() block for an empty batch, or give it at least one sample."
            )
        return None

    def _make_hook(self, unit: Unit):
        def hook(module, args, kwargs, output):
            swapped = self._unswap(module) if self.swap.get(id(module)) else []
            if (
                swapped
                and isinstance(output, Tensor)
                and not output.requires_grad
                and torch.is_grad_enabled()
                and output.is_floating_point()
            ):
                output = _Anchor.apply(output, *swapped)
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                rules.check_batchnorm(module)
            if unit.rule is None:  # the fallback replays the module: keep every input and the output
                call = Call(args=_detach(args), kwargs=_detach(kwargs), output=_detach(output), autocast=_autocast_state())
            else:  # a rule needs the layer input only; keeping outputs alive would cost memory
                x = args[0] if args else next(iter(kwargs.values()), None)
                if self.single_token_only and (not isinstance(x, Tensor) or x.dim() < 2 or x[0].numel() != x.shape[-1]):
                    self.skipped.add(id(module))
                    return output
                if (
                    isinstance(module, nn.Embedding)
                    and isinstance(x, Tensor)
                    and x.dim() >= 1
                    and x.shape[0] == 1
                    and (self.B or 1) > 1
                    and isinstance(output, Tensor)
                ):
                    # Ids shared by the batch (GPT-2's position_ids [1, T]): the output would be
                    # broadcast later and its gradient summed over samples. Hand out the output
                    # already expanded to the batch so its gradient keeps one row per sample.
                    x = x.expand(self.B, *x.shape[1:])
                    output = output.expand(self.B, *output.shape[1:])
                call = Call(args=(x.detach(),) if isinstance(x, Tensor) else (), kwargs={}, output=None)
            outs, _ = tree_flatten(output)
            call.grads = [None] * len(outs)
            for k, o in enumerate(outs):
                if isinstance(o, Tensor) and o.requires_grad:
                    o.register_hook(self._grad_hook(call, k))
            self.calls[id(module)].append(call)
            return output

        return hook

    @staticmethod
    def _grad_hook(call: Call, k: int):
        def h(g):
            call.grads[k] = g.detach() if call.grads[k] is None else call.grads[k] + g.detach()
            return None

        return h

    # --- factors -----------------------------------------------------------------------------
    def finish(self) -> Dict[Tensor, list]:
        """Per trainable parameter, the list of per-sample uses seen in this block."""
        uses: Dict[Tensor, list] = {}
        any_grad = False
        B = self.B
        for u in self.units:
            for call in self.calls[id(u.module)]:
                if all(g is None for g in call.grads):
                    continue  # output did not reach the loss
                any_grad = True
                if B is None:
                    B = self._infer_B(call)
                if u.rule is None:
                    names = fallback.unit_parameters(u.module, u.whole)
                    # autocast (issue 6): replay under the autocast state of the captured call, else
                    # the replay runs in fp32 and does not reproduce the captured half-precision output
                    with contextlib.ExitStack() as stack:
                        for dev, dt in call.autocast:
                            stack.enter_context(torch.autocast(dev, dtype=dt))
                        fallback.merge(uses, fallback.fallback_uses(u.module, names, call, B, u.name))
                    continue
                x = tree_flatten(call.args)[0][0] if call.args else None
                gy = call.grads[0]
                if x is None or gy is None:
                    continue
                if x.dim() == 0 or x.shape[0] != B or gy.shape[0] != B:
                    raise CaptureError(
                        f"module '{u.name}' ({type(u.module).__name__}) got an input with leading dimension "
                        f"{x.shape[0] if x.dim() else 'none'}, but the retain batch has B={B} samples. "
                        "OrthoGrad needs batch-first layouts (the sample index on dim 0 of every layer's "
                        "input), e.g. batch_first=True for transformer layers."
                    )
                fallback.merge(uses, u.rule(u.module, x, gy, B))
        if not any_grad and not self.single_token_only:
            raise CaptureError(
                "og.retain(): no gradient reached any layer inside the block. Call "
                "retain_loss.backward() inside `with og.retain():` (the loss must depend on the model)."
            )
        self.B = B
        return uses

    @staticmethod
    def _infer_B(call: Call) -> int:
        for t in tree_flatten(call.args)[0]:
            if isinstance(t, Tensor) and t.dim() >= 1:
                return t.shape[0]
        raise CaptureError("could not determine the retain batch size from the captured inputs")
