"""Hooks that capture each layer's input and output gradient during one retain backward.

Three kinds of units (:func:`find_units`): a module with a class rule (:mod:`orthograd_fast.engine.rules`:
nn.Linear, nn.Conv*, nn.Embedding, the stock norms) is captured by module hooks, described here; a
recurrent module (:mod:`orthograd_fast.engine.recurrent`) runs an unrolled forward; every other module that
owns trainable parameters (a custom forward, raw parameters, nn.MultiheadAttention) is captured by
operation (:mod:`orthograd_fast.engine.op_capture`), with the torch.func replay
(:mod:`orthograd_fast.engine.fallback`) only for a call that hits an operation with no rule.

Which tensors carry the batch is tracked by origin inside every block
(:class:`~orthograd_fast.engine.batch_layout.Provenance`): a class-rule layer called on a tensor that does
not (a table of positions, ids shared by all samples) is a computation on parameters only, captured
by operation where its output meets batched data.

A forward hook on every class-rule module stores its (detached) input and
registers a tensor hook on its output; the tensor hook stores the output gradient when the retain
backward reaches it. Nothing is computed during the backward: the factors are assembled on
leaving ``retain()`` (:meth:`Capture.finish`), after the hooks are gone.

Weight-gradient-free retain pass: the factors replace the retain weight gradients, so by default
(``OrthoGrad(lean_retain=True)``, the ``swap`` plan) a forward pre-hook hands each rule layer detached aliases of its own parameters
for the call. The backward then computes input gradients only (the B x O x I weight-gradient GEMM
of every layer and its retain ``.grad`` buffer are never formed), and a parameter that still
receives a retain gradient was used outside its owner's forward: an error, found exactly. A layer
whose input needs no gradient (the first one) would then produce an output that needs none; it is
re-attached to the graph through :class:`~orthograd_fast.engine.batch_layout.Anchor` (a no-op marked in
place) so its output gradient is still computed.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from . import fallback, op_capture, recurrent, rules
from .batch_layout import Anchor, ParamSpace


from ..errors import CaptureError  # noqa: E402  (re-exported: orthograd_fast.engine.capture.CaptureError)


@dataclass
class Call:
    args: Any
    kwargs: Any
    output: Any
    grads: List[Optional[Tensor]] = field(default_factory=list)
    # autocast: (device, dtype) pairs active at the call; the fallback replays under them
    autocast: tuple = ()
    # rows per sample on dim 0 of the input (k > 1: the batch folded sample by sample, e.g. windows)
    fold: Optional[int] = 1


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
    rule: Any  # a rules.* function (class-rule units), else None
    whole: bool = False  # owns its sub-modules' parameters too (MultiheadAttention reads out_proj.weight)
    kind: str = "rule"  # "rule" (module hooks), "ops" (operation capture), "recurrent" (unrolled forward)
    checked: bool = False  # recurrent: the unrolled forward was checked against the module

    def parameters(self) -> List[Tensor]:
        return [p for p in self.module.parameters(recurse=self.whole) if p.requires_grad]


def _replay(module: nn.Module, names: List[str], x: Tensor, *params: Tensor):
    """The module's forward on ``x`` with ``params`` in place of its parameters ``names``."""
    return torch.func.functional_call(module, dict(zip(names, params)), (x,))


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
        reason = rules.refuse_reason(m) or (recurrent.refuse_reason(m) if isinstance(m, nn.RNNBase) else "")
        if reason:
            raise rules.UnsupportedModule(f"module '{name or type(model).__name__}': {reason}")
        rule = None if whole else rules.rule_for(m)
        kind = "recurrent" if isinstance(m, nn.RNNBase) else ("rule" if rule is not None else "ops")
        units.append(Unit(name=name or "<root>", module=m, rule=rule, whole=whole, kind=kind))
    return units


def op_parameters(units: List[Unit]) -> List[Tensor]:
    """Parameters captured by operation: owned by an "ops" unit and by no class-rule unit."""
    ruled = {id(p) for u in units if u.kind != "ops" for p in u.parameters()}
    out, seen = [], set()
    for u in units:
        if u.kind == "ops":
            for p in u.parameters():
                if id(p) not in ruled and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


class Capture:
    """One retain() block: hooks on, calls recorded, factors assembled on finish."""

    def __init__(
        self,
        model: nn.Module,
        units: List[Unit],
        swap: Optional[Dict[int, list]] = None,
        lean_ops: bool = False,
        fallback_log: Optional[fallback.FallbackLog] = None,
    ):
        self.model = model
        self.units = units
        # operation capture and recurrent units
        self.lean_ops = lean_ops
        self.fallback_log = fallback_log if fallback_log is not None else fallback.FallbackLog()
        # the operation mode runs in every block: it tracks which tensors carry the batch
        # (batch_layout.Provenance) and captures the operation-captured parameters
        self.ctx = op_capture.OpContext(self, ParamSpace(op_parameters(units), lean_ops))
        self._mode: Optional[op_capture.OpMode] = None
        self.rnn_calls: List[recurrent.RecurrentCall] = []
        self._flagged: List[tuple] = []  # (op_capture.Frame, Call) replayed by the fallback
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
            if u.kind == "ops":
                if self.ctx is not None:
                    ids = {id(p) for p in u.parameters()}
                    self.handles += op_capture.frame_hooks(self.ctx, u, u.module, ids, self._fallback_call)
                continue
            if u.kind == "recurrent":
                u.module.forward = functools.partial(self._recurrent_forward, u)
                continue
            self.handles.append(u.module.register_forward_pre_hook(self._rule_pre))
            self.handles.append(u.module.register_forward_hook(self._make_hook(u), with_kwargs=True))
        self._mode = op_capture.OpMode(self.ctx)
        self._mode.__enter__()

    def detach(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for u in self.units:
            if u.kind == "recurrent" and "forward" in u.module.__dict__:
                del u.module.forward
        self.ctx.frames.clear()
        self.ctx.in_rule = 0
        self._unswap_all()

    def param_names(self, params) -> List[str]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names.get(id(p), "?") for p in params]

    def _recurrent_forward(self, unit: Unit, *args, **kwargs):
        m = unit.module
        if not torch.is_grad_enabled():
            return type(m).forward(m, *args, **kwargs)
        call = recurrent.RecurrentCall(m, unit.name, self.lean_ops)
        # the unrolled steps need no operation capture (the call records its own uses): run them
        # outside the mode, then tag the outputs with the input's batch layout
        with torch._C.DisableTorchFunction():
            out = call.forward(*args, **kwargs)
        x = args[0] if args else kwargs.get("input")
        prov, lay = self.ctx.prov, self.ctx.prov.layout(x, self.B)
        if lay is not None and lay[0] == 1:
            outs, _ = tree_flatten(out)
            prov.mark(outs[0], lay)  # the output sequence: the input's layout
            for h in outs[1:]:
                prov.mark(h, (1, 1))  # h_n / c_n: [layers * directions, B, H]
        if not unit.checked:
            recurrent.check_against_module(m, unit.name, out, args, kwargs)
            unit.checked = True
        self.rnn_calls.append(call)
        return out

    def _fallback_call(self, frame, args, kwargs, output):
        """An op-unit call that hit an operation without a rule: keep it for the torch.func replay."""
        u = frame.unit
        self.fallback_log.add(u.name, type(u.module).__name__, frame.unknown, sum(p.numel() for p in u.parameters()))
        call = Call(args=_detach(args), kwargs=_detach(kwargs), output=_detach(output), autocast=_autocast_state())
        outs, _ = tree_flatten(output)
        call.grads = [None] * len(outs)
        for k, o in enumerate(outs):
            if isinstance(o, Tensor) and o.requires_grad:
                o.register_hook(self._grad_hook(call, k))
        self._flagged.append((frame, call))
        return None

    def _rule_pre(self, module, args):
        self.ctx.in_rule += 1
        for name, p in self.swap.get(id(module), ()):
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
        self.ctx.in_rule = 0
        for t in leaves:  # the inputs carrying the batch on dim 0
            if isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] == self.B:
                self.ctx.prov.mark(t)
        if self.B == 0:
            # an empty retain batch has no per-sample gradients; without
            # this check it fails later inside a layer rule with an unrelated reshape error.
            raise CaptureError(
                "og.retain(): the retain batch is empty (B=0 on dim 0 of the model input). Skip the "
                "retain() block for an empty batch, or give it at least one sample."
            )
        return None

    def _make_hook(self, unit: Unit):
        def hook(module, args, kwargs, output):
            self.ctx.in_rule = max(self.ctx.in_rule - 1, 0)
            swapped = self._unswap(module) if self.swap.get(id(module)) else []
            x = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(x, Tensor) and torch.is_grad_enabled() and not self.ctx.prov.batched(x):
                # an input that does not carry the batch (a table of positions, ids shared by all
                # samples): a computation on parameters only, captured where it meets the batch
                self._parameters_only(module, x, output)
                return None
            if (
                swapped
                and isinstance(output, Tensor)
                and not output.requires_grad
                and torch.is_grad_enabled()
                and output.is_floating_point()
            ):
                output = Anchor.apply(output, *swapped)
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                rules.check_batchnorm(module)
            # a rule needs the layer input only; keeping outputs alive would cost memory
            call = Call(args=(x.detach(),) if isinstance(x, Tensor) else (), kwargs={}, output=None,
                        fold=self.ctx.prov.fold(x, self.B))
            outs, _ = tree_flatten(output)
            call.grads = [None] * len(outs)
            for k, o in enumerate(outs):
                if isinstance(o, Tensor) and o.requires_grad:
                    o.register_hook(self._grad_hook(call, k))
            self.calls[id(module)].append(call)
            return output

        return hook

    def _parameters_only(self, module: nn.Module, x: Tensor, output) -> None:
        """A class-rule layer called on a tensor without the batch: its output is recorded as a
        computation on its parameters (an embedding lookup, or a replay of the module), whose
        per-sample rows come from where it meets batched data (op_capture)."""
        space = self.ctx.space
        if isinstance(module, nn.Embedding) and isinstance(output, Tensor):
            if module.weight.requires_grad:
                space.add_lookup(output, module.weight, x, module.padding_idx)
            return
        named = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        for _, p in named:
            space.add_param(p)
        space.add_computed(output, functools.partial(_replay, module, [n for n, _ in named]), [x] + [p for _, p in named])

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
        for frame, call in self._flagged:  # op-unit calls with an operation without a rule
            if all(g is None for g in call.grads):
                continue
            any_grad = True
            u = frame.unit
            names = fallback.unit_parameters(u.module, u.whole)
            # autocast: replay under the autocast state of the captured call, else
            # the replay runs in fp32 and does not reproduce the captured half-precision output
            with contextlib.ExitStack() as stack:
                for dev, dt in call.autocast:
                    stack.enter_context(torch.autocast(dev, dtype=dt))
                fallback.merge(uses, fallback.fallback_uses(u.module, names, call, B, u.name))
        if self.ctx is not None:
            op_uses = op_capture.build_uses(self.ctx, [f for f, _ in self._flagged])
            any_grad = any_grad or bool(op_uses)
            for p, us in op_uses.items():
                uses.setdefault(p, []).extend(us)
        for rc in self.rnn_calls:
            rnn_uses = rc.uses(B)
            any_grad = any_grad or bool(rnn_uses)
            for p, us in rnn_uses.items():
                uses.setdefault(p, []).extend(us)
        for u in self.units:
            for call in self.calls[id(u.module)]:
                if all(g is None for g in call.grads):
                    continue  # output did not reach the loss
                any_grad = True
                if B is None:
                    B = self._infer_B(call)
                x = tree_flatten(call.args)[0][0] if call.args else None
                gy = call.grads[0]
                if x is None or gy is None:
                    continue
                k = call.fold or 1  # None: the batch is not on dim 0 (refused just below)
                if k > 1 and u.rule not in rules.TOKEN_RULES:
                    raise CaptureError(
                        f"module '{u.name}' ({type(u.module).__name__}) got an input whose dim 0 holds {k} rows per "
                        f"sample (the retain batch B={B} folded into dim 0, e.g. windows of an image): its per-sample "
                        "gradients sum over images, which OrthoGrad factors for token layers (Linear, LayerNorm, "
                        "RMSNorm, Embedding) only. Freeze this layer (requires_grad_(False)) or keep the batch "
                        "on dim 0 of its input."
                    )
                if call.fold is None or x.dim() == 0 or x.shape[0] != k * B or gy.shape[0] != k * B:
                    raise CaptureError(
                        f"module '{u.name}' ({type(u.module).__name__}) got an input with leading dimension "
                        f"{x.shape[0] if x.dim() else 'none'} that does not hold the retain batch (B={B} samples) "
                        "sample by sample. OrthoGrad needs the sample index on dim 0 of every layer's input "
                        "(batch-first, e.g. batch_first=True for transformer layers; a batch folded into dim 0 "
                        "by reshapes, as in window attention, is followed); this input is sequence-first or "
                        "comes from an operation that moves or mixes the batch dim. Transpose it back before "
                        "the layer, or freeze the layer (requires_grad_(False))."
                    )
                fallback.merge(uses, u.rule(u.module, x, gy, B))
        if not any_grad:
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
