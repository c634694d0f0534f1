"""Capture of one retain backward: every call that consumes a trainable parameter becomes per-sample
uses (factors), assembled on leaving ``retain()``.

Two kinds of units (:func:`find_units`): a recurrent module (:mod:`orthograd_fast.engine.recurrent`)
runs an unrolled forward that records its own uses; every other module that owns trainable
parameters is a scope of operation capture (:mod:`orthograd_fast.engine.op_capture`): the rules
key on the functional call (F.linear, conv, norms, embedding, attention, broadcasting ops), so a
subclass with its own forward, a raw parameter or nn.MultiheadAttention is captured like a stock
layer. A call that hits an operation with no rule is replayed whole by the torch.func fallback
(:mod:`orthograd_fast.engine.fallback`), smallest owning module first, and counted in
``og.stats["fallback"]``.

Which tensors carry the batch is tracked by origin inside every block
(:class:`~orthograd_fast.engine.batch_layout.Provenance`). Nothing is computed during the backward:
output gradients are stored by tensor hooks and the factors are built on leaving ``retain()``
(:meth:`Capture.finish`), after the hooks are gone.

Weight-gradient-free retain pass (``OrthoGrad(lean_retain=True)``): the operations receive
detached aliases of the parameters, so the backward forms input gradients only (no B x O x I
weight-gradient GEMM, no retain ``.grad`` buffer); an output that then needs no gradient is
re-attached to the graph (:class:`~orthograd_fast.engine.param_space.Anchor`). A parameter that
still receives a retain gradient was used where the capture could not see it: an error.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from . import fallback, op_capture, recurrent
from .param_space import ParamSpace


from ..errors import CaptureError, UnsupportedModule  # noqa: E402  (CaptureError re-exported)


@dataclass
class Call:
    args: Any
    kwargs: Any
    output: Any
    grads: List[Optional[Tensor]] = field(default_factory=list)
    # autocast: (device, dtype) pairs active at the call; the fallback replays under them
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
    whole: bool = False  # owns its sub-modules' parameters too (MultiheadAttention reads out_proj.weight)
    kind: str = "ops"  # "ops" (operation capture) or "recurrent" (unrolled forward)
    checked: bool = False  # recurrent: the unrolled forward was checked against the module
    # the trainable parameters and their ids, read once: every block first checks that the model's
    # trainable parameters are the ones OrthoGrad was made for (RetainSpan.check_params)
    _params: Optional[List[Tensor]] = field(default=None, repr=False, compare=False)
    _ids: Optional[frozenset] = field(default=None, repr=False, compare=False)

    def parameters(self) -> List[Tensor]:
        if self._params is None:
            self._params = [p for p in self.module.parameters(recurse=self.whole) if p.requires_grad]
        return self._params

    def param_ids(self) -> frozenset:
        if self._ids is None:
            self._ids = frozenset(id(p) for p in self.parameters())
        return self._ids


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
        whole = isinstance(m, WHOLE_UNITS)
        own = [p for p in m.parameters(recurse=whole) if p.requires_grad]
        if whole:
            for sub in m.modules():
                claimed.add(id(sub))
        if not own:
            continue
        reason = refuse_reason(m) or (recurrent.refuse_reason(m) if isinstance(m, nn.RNNBase) else "")
        if reason:
            raise UnsupportedModule(f"module '{name or type(model).__name__}': {reason}")
        kind = "recurrent" if isinstance(m, nn.RNNBase) else "ops"
        units.append(Unit(name=name or "<root>", module=m, whole=whole, kind=kind))
    return units


def op_parameters(units: List[Unit]) -> List[Tensor]:
    """Parameters captured by operation: owned by an "ops" unit and by no recurrent unit."""
    recur = {id(p) for u in units if u.kind == "recurrent" for p in u.parameters()}
    out, seen = [], set()
    for u in units:
        if u.kind == "ops":
            for p in u.parameters():
                if id(p) not in recur and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


# Modules captured by operation with all their parameters (their forward uses sub-module
# parameters directly, e.g. MultiheadAttention reads out_proj.weight without calling out_proj).
WHOLE_UNITS = (nn.MultiheadAttention,)


def refuse_reason(m: nn.Module) -> Optional[str]:
    if isinstance(m, nn.MultiheadAttention) and not m.batch_first:
        return (
            "nn.MultiheadAttention with batch_first=False: per-sample gradients need batch-first layouts "
            "(the retain batch on dim 0 of every layer's input). Build it with batch_first=True."
        )
    if isinstance(m, nn.Embedding) and m.sparse:
        return "nn.Embedding with sparse=True: OrthoGrad needs dense gradients. Build it with sparse=False."
    return None


class Capture:
    """One retain() block: hooks on, calls recorded, factors assembled on finish."""

    def __init__(
        self,
        model: nn.Module,
        units: List[Unit],
        lean_ops: bool = False,
        fallback_log: Optional[fallback.FallbackLog] = None,
        batch_size: Optional[int] = None,
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
        self.B: Optional[int] = None
        self.declared_B = batch_size  # og.retain(batch_size=...): B given, not read from the inputs
        self.root_calls = 0
        self.handles = []
        self.error: Optional[BaseException] = None
        self.dense_verdict: tuple = ({}, set())  # OpContext.dense_verdict(), kept by finish()
        self.dense_tokens: dict = {}  # finish(defer=True): op_capture.dense_tokens of the block
        self.deferred_bytes = 0  # finish(defer=True): see there

    # --- hooks -------------------------------------------------------------------------------
    def attach(self) -> None:
        self.handles.append(self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        for u in self.units:
            if u.kind == "recurrent":
                u.module.forward = functools.partial(self._recurrent_forward, u)
            else:
                self.handles += op_capture.frame_hooks(self.ctx, u, u.module, u.param_ids(), self._fallback_call)
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

    def release(self) -> None:
        """Drop what the block recorded (after :meth:`finish`, or after an error): the capture and
        its context refer to each other, and the records hold layer inputs and closures; without
        this they wait for the garbage collector instead of going when the block ends."""
        self.detach()
        self.ctx.records = []
        self.ctx.capture = None
        self._flagged = []
        self.rnn_calls = []

    def param_names(self, params) -> List[str]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names.get(id(p), "?") for p in params]

    def _recurrent_forward(self, unit: Unit, *args, **kwargs):
        m = unit.module
        if not torch.is_grad_enabled():
            return type(m).forward(m, *args, **kwargs)
        x = args[0] if args else kwargs.get("input")
        # in at least float32 and outside autocast, the steps and the check alike (recurrent.
        # full_precision); the outputs back in the input's dtype
        dtype = recurrent.compute_dtype(m)
        call = recurrent.RecurrentCall(m, unit.name, self.lean_ops, dtype)
        run_args, run_kwargs, precision = recurrent.full_precision(x, dtype, args, kwargs)
        with precision:
            # the unrolled steps need no operation capture (the call records its own uses): run
            # them outside the mode, then tag the outputs with the input's batch layout
            with torch._C.DisableTorchFunction():
                out = call.forward(*run_args, **run_kwargs)
            if not unit.checked:
                recurrent.check_against_module(m, unit.name, out, run_args, run_kwargs, dtype)
                unit.checked = True
        xd = x.data if isinstance(x, nn.utils.rnn.PackedSequence) else x
        if isinstance(xd, Tensor) and xd.is_floating_point() and dtype is not None and xd.dtype != dtype:
            out = recurrent.as_dtype(out, xd.dtype)
        prov = self.ctx.prov
        if isinstance(x, nn.utils.rnn.PackedSequence):
            # h_n / c_n: [layers * directions, B, H] in the caller's batch order (the packed output
            # sequence is no batch-first tensor)
            for h in tree_flatten(out[1])[0]:
                prov.mark(h, (1, 1))
        else:
            bdim = 0 if m.batch_first else 1
            lay = prov.layout(x, self.B)
            if lay is not None and lay[1] == bdim:
                # k sequences per sample (k = 1: one), sample by sample: the outputs keep the layout
                call.fold = lay[0]
                outs, _ = tree_flatten(out)
                prov.mark(outs[0], lay)  # the output sequence: the input's layout
                for h in outs[1:]:
                    prov.mark(h, (lay[0], 1))  # h_n / c_n: [layers * directions, k * B, H]
            elif isinstance(x, Tensor) and x.dim() == 3 and x.shape[bdim] != self.B:
                raise CaptureError(
                    f"module '{unit.name}' ({type(m).__name__}) got an input of shape {tuple(x.shape)} whose batch dim "
                    f"{bdim} holds {x.shape[bdim]} sequences, not the retain batch B={self.B} nor the batch folded "
                    "into it sample by sample (as a reshape of a batch-first tensor makes it): per-sample gradients "
                    "cannot be attributed. Keep each sample's sequences together on that dim, or freeze the module "
                    "(requires_grad_(False))."
                )
        self.rnn_calls.append(call)
        return out

    def _fallback_call(self, frame, args, kwargs, output):
        """An op-unit call that hit an operation without a rule: keep it for the torch.func replay."""
        u = frame.unit
        prov, B = self.ctx.prov, self.B
        for t in tree_flatten((args, kwargs))[0]:
            # the replay maps dim 0 to the sample: an input that carries the batch elsewhere (a
            # transposed, sequence-first input; k rows per sample) cannot be replayed
            if isinstance(t, Tensor) and prov.batched(t) and prov.fold(t, B) != 1:
                k = prov.fold(t, B)
                raise CaptureError(
                    f"module '{u.name}' ({type(u.module).__name__}) got an input (shape {tuple(t.shape)}) that carries "
                    f"the retain batch (B={B}) "
                    + (f"folded into dim 0, {k} rows per sample, " if k else "on another dim than dim 0 (sequence-first), ")
                    + f"and calls {', '.join(frame.unknown)}, which has no per-sample rule for that layout. Keep the "
                    "batch on dim 0 of its input, one row per sample, or freeze the module (requires_grad_(False))."
                )
        self.fallback_log.add(u.name, type(u.module).__name__, frame.unknown, sum(p.numel() for p in u.parameters()))
        call = Call(args=_detach(args), kwargs=_detach(kwargs), output=_detach(output), autocast=_autocast_state())
        outs, spec = tree_flatten(output)
        call.grads = [None] * len(outs)
        hooked = [k for k, o in enumerate(outs) if isinstance(o, Tensor) and o.requires_grad]
        # One output may be computed from another inside the module (an LSTM cell's h from its c):
        # a hook on that one would also see the gradient the other sends back through the module,
        # which the replay counts again. The rest of the model gets aliases instead, whose hooks
        # see only what comes from outside.
        alias = len(hooked) > 1
        if alias:
            outs = [o.view_as(o) if k in hooked else o for k, o in enumerate(outs)]
        for k in hooked:
            outs[k].register_hook(self._grad_hook(call, k))
        self._flagged.append((frame, call))
        return tree_unflatten(outs, spec) if alias else None

    def _root_pre(self, module, args, kwargs):
        # the hook runs with the operation mode active: its own tensor queries (dim, shape) would
        # each be intercepted (four calls, ~45 us on the MLP)
        with torch._C.DisableTorchFunction():
            self._root_call(args, kwargs)
        return None

    def _root_call(self, args, kwargs) -> None:
        """The model's call: one per block; the retain batch B and the inputs that carry it."""
        self.root_calls += 1
        if self.root_calls > 1:
            raise CaptureError(
                "the model was called more than once inside one og.retain() block: each sample's loss must "
                "come from one forward. Use one retain() block per micro-batch (they accumulate)."
            )
        leaves, _ = tree_flatten((args, kwargs))
        if self.declared_B is not None:
            self.B = self.declared_B
        for t in leaves:
            if self.B is None and isinstance(t, Tensor) and t.dim() >= 1:
                self.B = t.shape[0]
                break
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

    @staticmethod
    def _grad_hook(call: Call, k: int):
        def h(g):
            call.grads[k] = g.detach() if call.grads[k] is None else call.grads[k] + g.detach()
            return None

        return h

    # --- factors -----------------------------------------------------------------------------
    def finish(self, defer: bool = False, small: Optional[Callable[[Tensor], bool]] = None):
        """Per trainable parameter, the list of per-sample uses seen in this block. ``defer``: the
        operation records' builds are left to the caller: a callable returning the same dict
        (it holds what it needs; call it once, on any thread, after :meth:`release` too), and
        ``dense_tokens`` (:func:`op_capture.dense_tokens`) and ``deferred_bytes`` are set now:
        the output gradients of the records whose parameters are all ``small`` (turned into
        rows by their build, then freed; the deferral keeps them until then)."""
        uses: Dict[Tensor, list] = {}
        any_grad = False
        B = self.B
        if B is None:
            raise CaptureError("og.retain(): the model was not called inside the block (no retain batch seen)")
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
                ops = sorted(set(frame.unknown))
                fallback.merge(uses, fallback.fallback_uses(u.module, names, call, B, u.name, ops))
        flagged = [f for f, _ in self._flagged]
        recs = op_capture.reached(self.ctx)
        op_uses = op_capture.build_uses(recs, flagged) if not defer else {}
        self.dense_verdict = self.ctx.dense_verdict()
        any_grad = any_grad or bool(op_uses) or (defer and bool(recs))
        rnn: Dict[Tensor, list] = {}
        for rc in self.rnn_calls:
            rnn_uses = rc.uses(B)
            any_grad = any_grad or bool(rnn_uses)
            for p, us in rnn_uses.items():
                rnn.setdefault(p, []).extend(us)
        if not any_grad:
            raise CaptureError(
                "og.retain(): no gradient reached any layer inside the block. Call "
                "retain_loss.backward() inside `with og.retain():` (the loss must depend on the model)."
            )
        if not defer:
            _merge(uses, op_uses)
            return _merge(uses, rnn)
        other = {id(p) for p in rnn} | {id(p) for p in uses}
        self.dense_tokens = {k: v for k, v in op_capture.dense_tokens(recs, flagged).items() if k not in other}
        self.deferred_bytes = sum(
            r.grad.numel() * r.grad.element_size() for r in recs if r.owners and small is not None and all(small(p) for p in r.owners)
        )

        def later() -> Dict[Tensor, list]:  # the same order of uses as above
            return _merge(_merge(uses, op_capture.build_uses(recs, flagged)), rnn)

        return later


def _merge(into: Dict[Tensor, list], new: Dict[Tensor, list]) -> Dict[Tensor, list]:
    for p, us in new.items():
        into.setdefault(p, []).extend(us)
    return into
