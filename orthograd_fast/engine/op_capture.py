"""Operation-level capture: a ``TorchFunctionMode`` active inside ``retain()`` sees every functional
call that consumes a trainable parameter, whatever module made it: a stock nn.Linear, a norm
subclass with its own forward, a raw ``nn.Parameter`` such as a cls token or a layer scale,
``nn.MultiheadAttention``.

Per call, in order:

* a rule for the operation (:mod:`orthograd_fast.engine.rules`: linear, conv, norms, embedding, ...)
  with its data input batched: the rule runs it and records the input; the output gradient comes
  in the backward;
* a broadcasting operation with batched data (add, mul, where, cat along a feature dim, ...): each
  parameter operand is handed out expanded along the batch, so the backward delivers its
  per-sample rows (:class:`orthograd_fast.engine.param_space.PerSample`);
* no batched operand: a computation on parameters only (a view, ``.float()``, a lookup with shared
  ids), remembered so its rows can be mapped back (:class:`~orthograd_fast.engine.param_space.ParamSpace`);
* otherwise no rule: the smallest enclosing module that owns the parameter is replayed by the
  torch.func fallback for that call (visible in ``og.stats["fallback"]``, warned once).

Under lean retain the operations receive detached aliases of the parameters (the retain backward
forms no weight gradient), and an output that then needs no gradient is re-attached to the graph.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import rules, threads
from .batch_layout import Provenance, is_batched
from .call_args import flat as _flat, flatten as _flatten, unflatten as _unflatten
from .param_space import ParamSpace, PerSample, anchored, in_place
from ..errors import CaptureError
from .factors import ExplicitRows


@dataclass
class Frame:
    """One call of a module that owns managed parameters (the fallback's scope)."""

    unit: object  # capture.Unit
    params: set  # id() of the parameters the unit owns
    unknown: List[str] = field(default_factory=list)  # ops without a rule seen in this call
    # (memory of x, memory of out, id(w), transposed) of its dense ops (judge_dense); no tensor is
    # held: records keep their frames, and a tensor here would tie an output to its own hook
    dense: list = field(default_factory=list)


class OpRecord:
    """One intercepted call: ``build(output_gradient)`` -> {param: [uses]} on leaving retain()."""

    def __init__(self, build: Callable, owners: List[Tensor], frames: tuple, name: str, dense: Optional[Tensor] = None, tokens: int = 0):
        self.build = build
        self.owners = owners
        self.frames = frames
        self.name = name
        self.grad: Optional[Tensor] = None
        # the parameter whose use this record builds as one dense factor of the weight itself (a
        # Linear), over ``tokens`` tokens per sample: known before the build (dense_tokens)
        self.dense = dense
        self.tokens = tokens

    def hook(self, g):
        self.grad = g.detach() if self.grad is None else self.grad + g.detach()


# Functions that run eagerly where torch.compile traces them, and their torch.compiler.disable
# twins. A twin is made once torch._dynamo is loaded (torch.compile() imports it before it traces
# anything; OpContext asks at each block), not by a decorator at import: torch.compiler.disable
# imports dynamo and triton, about 2 s on the import of this package.
_EAGER_FNS: List[Callable] = []
_EAGER_TWINS: Dict[Callable, Callable] = {}


def _eager_under_compile(fn: Callable) -> Callable:
    """``fn``, run through its disabled twin while dynamo traces the call."""
    _EAGER_FNS.append(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            twin = _EAGER_TWINS.get(fn)
            if twin is None:  # (prepare_eager made them all before any trace that reaches here)
                twin = _EAGER_TWINS[fn] = torch.compiler.disable(fn)
            return twin(*args, **kwargs)
        return fn(*args, **kwargs)

    return call


def prepare_eager() -> None:
    """Make the disabled twins once torch.compile may trace this package (torch._dynamo loaded)."""
    if len(_EAGER_TWINS) < len(_EAGER_FNS) and "torch._dynamo" in sys.modules:
        for fn in _EAGER_FNS:
            if fn not in _EAGER_TWINS:
                _EAGER_TWINS[fn] = torch.compiler.disable(fn)


class OpContext:
    """What a rule needs: the batch, the layout, the parameters and how to record a use."""

    def __init__(self, capture, space: ParamSpace):
        prepare_eager()
        self.capture = capture
        self.space = space
        self.seq_first = False  # inside multi-head attention: (T, B, E) / (T * B, E)
        self.prov = Provenance()  # which tensors carry the batch (not judged by shape)
        self.records: List[OpRecord] = []
        self.frames: List[Frame] = []
        # dense layers seen in this block: id(weight) -> (module, weight, transposed, calls), and
        # id(weight) of those refuted (a call that was not one dense op from input to output)
        self.dense: Dict[int, list] = {}
        self.not_dense: set = set()
        self.uses_of: Dict[int, int] = {}  # id(param) -> intercepted calls that consumed it

    @property
    def B(self) -> int:
        return self.capture.B

    def is_data(self, t) -> bool:
        """A batched tensor (derived from the model's inputs, with the batch where the layout puts
        it) that is not made of parameters."""
        return isinstance(t, Tensor) and self.fold(t) is not None and self.space.base(t) is None

    def fold(self, t) -> Optional[int]:
        """Rows per sample on dim 0 (1: batch-first; k: the batch folded sample by sample into
        dim 0, e.g. windows), None when ``t`` does not carry the batch in a known layout. Inside
        multi-head attention (sequence-first) only the batch-first test applies."""
        if self.seq_first:
            return 1 if self.prov.batched(t) and is_batched(t, self.B, True) else None
        return self.prov.fold(t, self.B)

    def is_activation(self, t) -> bool:
        """A tensor of the forward that is not made of parameters alone: batched, or needing a
        gradient (the batch folded into another dim, e.g. windows of an image); then an op with a
        parameter is not a computation on parameters only."""
        if not isinstance(t, Tensor) or self.space.base(t) is not None:
            return False
        return self.prov.batched(t) or t.requires_grad

    def use(self, t):
        return self.space.use(t) if isinstance(t, Tensor) else t

    def where(self) -> str:
        if not self.frames:
            return "the model"
        u = self.frames[-1].unit
        return f"module '{u.name}' ({type(u.module).__name__})"

    def note_dense(self, x: Tensor, out: Tensor, w: Tensor, transposed: bool) -> None:
        """A dense op (linear, addmm, matmul) inside a module call: kept on the frame, judged on
        the module's exit (:func:`frame_hooks`)."""
        if self.frames and not self.seq_first:
            self.frames[-1].dense.append((_memory(x), _memory(out), id(w), transposed))

    def judge_dense(self, fr: Frame, args, output) -> None:
        """Whether this call of a module owning ``weight`` (and maybe ``bias``) was exactly one dense
        op from its input to its output, up to reshapes: then og.forget() may factor its unlearn
        gradient from the module's input and output gradient (forget_window)."""
        m = fr.unit.module
        w = m._parameters.get("weight")
        if not isinstance(w, Tensor) or not w.requires_grad or w.dim() != 2:
            return
        x = args[0] if args else None
        ok = (
            len(fr.dense) == 1
            and not fr.unknown
            and fr.dense[0][2] == id(w)
            and all(n in ("weight", "bias") for n, q in m._parameters.items() if q is not None)
            and None not in fr.dense[0][:2]
            and _memory(x) == fr.dense[0][0]
            and _memory(output) == fr.dense[0][1]
        )
        if not ok:
            self.not_dense.add(id(w))
            return
        entry = self.dense.setdefault(id(w), [m, w, fr.dense[0][3], 0])
        if entry[0] is not m or entry[2] != fr.dense[0][3]:
            self.not_dense.add(id(w))
        entry[3] += 1

    def dense_verdict(self) -> tuple:
        """({id(weight): (module, weight, transposed)}, refuted ids): confirmed are the modules
        whose every call in this block was one dense op and whose weight no other intercepted call
        consumed."""
        ok, bad = {}, set(self.not_dense)
        for k, (m, w, tr, n) in self.dense.items():
            if k in bad or self.uses_of.get(k, 0) != n:
                bad.add(k)
            else:
                ok[k] = (m, w, tr)
        return ok, bad

    def record(self, func, out, operands, build, dense: Optional[Tensor] = None, tokens: int = 0):
        """Register the output gradient hook of a rule's call and keep its record (``dense``,
        ``tokens``: see OpRecord)."""
        owners = []
        for t in operands:
            for p in self.space.owners(t) if isinstance(t, Tensor) else ():
                if all(p is not q for q in owners):
                    owners.append(p)
        for p in owners:
            self.uses_of[id(p)] = self.uses_of.get(id(p), 0) + 1
        out = anchored(out, owners if self.space.lean else [])
        if isinstance(out, Tensor) and out.requires_grad:
            rec = OpRecord(build, owners, tuple(self.frames), rules.op_name(func), dense, tokens)
            out.register_hook(rec.hook)
            self.records.append(rec)
        return out

    def per_sample(self, func, t: Tensor, src: Tensor, k: int = 1) -> Tensor:
        """``src`` (a view of operand ``t`` with a leading dim of 1) expanded along the batch (to
        ``k * B`` rows for data folded ``k`` rows per sample); its per-sample gradient rows are
        recorded and mapped back to the parameters on finish."""
        owners = self.space.owners(t)
        for p in owners:
            self.uses_of[id(p)] = self.uses_of.get(id(p), 0) + 1
        # anchored to the real parameters when ``src`` has no gradient of its own (lean retain:
        # computed from detached aliases)
        anchors = owners if (self.space.lean or not src.requires_grad) else []
        B = self.B
        rows = PerSample.apply(src, k * B, *anchors)
        space = self.space

        def build(g):
            g = g.reshape(B, k, -1).sum(1) if k > 1 else g.reshape(B, -1)
            return space.rows_to_uses(src, g)

        rec = OpRecord(build, owners, tuple(self.frames), rules.op_name(func))
        rows.register_hook(rec.hook)
        self.records.append(rec)
        return rows

    # --- calls without a rule -------------------------------------------------------------------
    # run eagerly under torch.compile: dynamo's trace of this loop fails on ``id()`` of a tensor it
    # reached through a tuple iterator (InternalTorchDynamoError ___tuple_iterator_getitem)
    @_eager_under_compile
    def broadcast(self, func, args, kwargs, leaves, spec):
        """A broadcasting op with batched data: parameter operands expanded along the batch."""
        B = self.B
        data = [t for t in leaves if self.is_data(t)]
        n = max(t.dim() for t in data)
        folds = {self.fold(t) for t in data if t.dim() == n}
        if len(folds) != 1:
            return NotImplemented
        k = folds.pop()
        if func in rules.CONCAT:
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if dim % n == 0:
                return NotImplemented
        name = getattr(func, "__name__", "")
        if (name.endswith("_") and not name.startswith("__")) or name.startswith("__i"):
            if self.space.base(args[0]) is not None:
                return NotImplemented  # in place on a parameter
        new = []
        for t in leaves:
            if isinstance(t, Tensor) and t.is_floating_point() and self.space.base(t) is not None:
                u = self.use(t)
                if u.dim() < n or (u.dim() == n and u.shape[0] == 1):
                    src = u
                    for _ in range(n - u.dim()):
                        src = src.unsqueeze(0)
                elif u.dim() == n and self.space.one_row(u, B, k):
                    # each sample's k rows the same k rows of parameters (k = 1: an expanded cls
                    # token, a repeated encoding; k > 1: a bias per head repeated along the batch,
                    # the heads folded into dim 0, WavLM's gated position bias): handed out as
                    # [1, k, ...] expanded along the batch
                    new.append(self.per_sample(func, t, u[:k].unsqueeze(0), 1).reshape(u.shape))
                    continue
                else:
                    return NotImplemented
                rows = self.per_sample(func, t, src, k)
                new.append(rows)
            else:
                new.append(t)
        a, kw = _unflatten(new, spec)
        return func(*a, **kw)

    def unknown(self, func, args, kwargs, leaves, spec):
        """No rule: flag the innermost running module that owns the parameters (torch.func
        fallback for this call), run the op on the handed-out parameters."""
        owners = [p for t in leaves if isinstance(t, Tensor) for p in self.space.owners(t)]
        name = rules.op_name(func)
        for fr in reversed(self.frames):
            if all(id(p) in fr.params for p in owners):
                fr.unknown.append(name)
                break
        else:
            names = self.capture.param_names(owners)
            if not any(self.fold(t) == 1 for t in leaves):
                raise CaptureError(
                    f"parameter(s) {names}: operation {name} combines them with data whose dim 0 is not the retain "
                    f"batch one row per sample (B={self.B}; shapes {[tuple(t.shape) for t in leaves if isinstance(t, Tensor)]}):"
                    " the batch is folded into dim 0 for an operation without a rule for folds (e.g. a convolution "
                    "over (B * k, C, H, W) images), sits on another dim (sequence-first), or passed an operation "
                    "that mixes samples, so per-sample gradients cannot be attributed. Keep the batch on dim 0 "
                    "there, or freeze these parameters (requires_grad_(False))."
                )
            raise CaptureError(
                f"parameter(s) {names}: operation {name} consumes them together with batched data, has no per-sample "
                "rule, and runs outside the forward of the module that owns them, so no module can be replayed for "
                "it. Move the computation into the owning module's forward, or freeze the parameters."
            )
        a, kw = _unflatten([self.use(t) if isinstance(t, Tensor) else t for t in leaves], spec)
        return anchored(func(*a, **kw), owners if self.space.lean else [])


class OpMode(TorchFunctionMode):
    def __init__(self, ctx: OpContext):
        super().__init__()
        self.ctx = ctx

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = _flat(args, kwargs)
        out = self._handle(func, args, kwargs, leaves)
        self.ctx.prov.propagate(func, args, kwargs, leaves, out, self.ctx.capture.B)
        return out

    def _handle(self, func, args, kwargs, leaves):
        ctx = self.ctx
        space = ctx.space
        if not torch.is_grad_enabled() or ctx.capture.B is None:
            return func(*args, **kwargs)
        if not any(isinstance(t, Tensor) and space.base(t) is not None for t in leaves):
            return func(*args, **kwargs)
        leaves, spec = _flatten(args, kwargs)
        if getattr(func, "__name__", "") == "__get__":  # attribute of a parameter (requires_grad, .T, ...)
            out = func(*args, **kwargs)
            if isinstance(out, Tensor) and space.lean:
                out = func(*[space.use(t) for t in args], **kwargs)
            return out
        if func in rules.MHA_FUNCS:
            return self._attention(func, args, kwargs, leaves, spec)
        if func in rules.CELLS:  # one recurrent step: its linear maps are captured as such
            with self:  # (the mode is popped while it handles a call)
                return rules.CELLS[func](*args, **kwargs)
        rule = rules.RULES.get(func)
        if rule is not None:
            out = rule(ctx, func, args, kwargs)
            if out is not NotImplemented:
                return out
        has_data = any(ctx.is_data(t) for t in leaves)
        if has_data and not ctx.seq_first and (func in rules.BROADCAST or func in rules.CONCAT):
            out = ctx.broadcast(func, args, kwargs, leaves, spec)
            if out is not NotImplemented:
                return out
        if not has_data and not any(ctx.is_activation(t) for t in leaves):
            # parameters only (and constants): a view or a derived tensor, mapped back later
            used = [space.use(t) if isinstance(t, Tensor) else t for t in leaves]
            a, kw = _unflatten(used, spec)
            if args and isinstance(args[0], Tensor) and space.base(args[0]) is not None and in_place(func, kwargs):
                space.before_in_place(func, args, kwargs, rules.op_name(func))
            out = func(*a, **kw)
            space.add_derived(out, func, args, kwargs)
            if (func in _REPEATS and _repeats_one_row(a, kw, ctx.B)) or (func in rules.ROWWISE and _row_wise(func, used, kwargs, ctx.B, space)):
                space.mark_rows(out, ctx.B)
            return out
        return ctx.unknown(func, args, kwargs, leaves, spec)

    def _attention(self, func, args, kwargs, leaves, spec):
        ctx = self.ctx
        q = args[0] if args else kwargs.get("query")
        if not (isinstance(q, Tensor) and q.dim() == 3 and q.shape[1] == ctx.B):
            return ctx.unknown(func, args, kwargs, leaves, spec)
        prev = ctx.seq_first
        ctx.seq_first = True
        try:
            with self:  # the mode is popped while it handles a call: see the projections inside
                return rules.MHA_FORWARD(*args, **kwargs)
        finally:
            ctx.seq_first = prev


_REPEATS = (Tensor.repeat, torch.tile, Tensor.tile)


def _row_wise(func, used: list, kwargs, B: Optional[int], space) -> bool:
    """A row-wise operation (:data:`rules.ROWWISE`, not in place) on parameters only whose input
    is one row of parameters along the batch (``latent.expand(B, -1, -1)``, a learned query; or a
    tensor that was): its B output rows are equal too, each the same function of the parameters.
    ``used``: the call's flattened operands as handed out."""
    if B is None or B < 2 or in_place(func, kwargs):
        return False
    rows = [space.one_row(t, B) for t in used]
    if not any(rows):
        return False
    if func in rules.ROWWISE_FIRST:  # (linear, norms: the input is the row operand, not the weight)
        return rows[0] and not any(rows[1:])
    # broadcasting: every other operand broadcasts along dim 0 of the row operands
    n = max(t.dim() for t, r in zip(used, rows) if r)
    return not any(isinstance(t, Tensor) and not r and t.dim() >= n and t.shape[t.dim() - n] != 1 for t, r in zip(used, rows))


def _repeats_one_row(args, kwargs, B: Optional[int]) -> bool:
    """``t.repeat(B, 1, ..)`` (or ``tile``) of a tensor of parameters with one row (or fewer
    dims): B equal rows (a position encoding repeated for the batch, timm's XCiT)."""
    if B is None or B < 2 or kwargs or not args or not isinstance(args[0], Tensor):
        return False
    t = args[0]
    reps = tuple(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else tuple(args[1:])
    if not reps or not all(isinstance(r, int) for r in reps) or reps[0] != B or any(r != 1 for r in reps[1:]):
        return False
    # (tile pads short repeats with leading ones: then the batch's repeat is not on dim 0)
    return len(reps) >= t.dim() and (len(reps) > t.dim() or t.shape[0] == 1)


def frame_hooks(ctx: OpContext, unit, module: nn.Module, params: set, on_exit: Callable):
    """Forward pre-/post-hooks keeping the stack of running op-unit calls."""

    def pre(mod, args):
        ctx.frames.append(Frame(unit, params))
        return None

    def post(mod, args, kwargs, output):
        fr = ctx.frames.pop() if ctx.frames and ctx.frames[-1].unit is unit else None
        if fr is None:
            return None
        if torch.is_grad_enabled():
            # a hook runs with the mode active: its own tensor queries would each be intercepted
            with torch._C.DisableTorchFunction():
                ctx.judge_dense(fr, args, output)
        if fr.unknown:
            return on_exit(fr, args, kwargs, output)
        return None

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post, with_kwargs=True)]


def _memory(t) -> Optional[tuple]:
    """(address, numel, dtype) of a contiguous tensor, (address, shape, strides, dtype) of another
    (a class token's column ``h[:, 0]``), None for a non-tensor: two tensors with equal (not None)
    values are one another up to a reshape, the same elements in the same order."""
    if not isinstance(t, Tensor):
        return None
    if t.is_contiguous():
        return (t.data_ptr(), t.numel(), t.dtype)
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


# Records whose output gradients hold fewer elements than this in all build in the calling
# thread: their builds are mostly views (one-token dense layers), and handing them to threads
# costs more than they do (MLP, 4 layers, B = 64: retain exit 0.94 -> 0.5 ms).
BUILD_SPREAD_MIN = 1 << 20


def _build_all(recs: List[OpRecord]) -> List[Dict[Tensor, list]]:
    """Each record's uses. On the CPU the records build side by side on one intra-op thread each:
    their ops (token sums, norm recomputations, small products) are too small to gain from the
    intra-op pool and would pay its wake-up per op."""
    if not recs:
        return []
    cost = [rec.grad.numel() for rec in recs]
    if sum(cost) < BUILD_SPREAD_MIN:
        with threads.one_thread(recs[0].grad.device.type == "cpu"):
            return [rec.build(rec.grad) for rec in recs]
    return threads.side_by_side(lambda rec: rec.build(rec.grad), recs, cost, recs[0].grad.device)


def reached(ctx: OpContext) -> List[OpRecord]:
    """The records whose output gradient arrived (the ones :func:`build_uses` builds)."""
    return [rec for rec in ctx.records if rec.grad is not None]


def dense_tokens(recs: List[OpRecord], flagged: List[Frame]) -> Dict[int, List[int]]:
    """{id(param): tokens per sample of each record} of the parameters whose every reached record
    builds one dense factor of the weight itself (and that no flagged frame replays): what
    :func:`build_uses` will give them, known before it runs."""
    replayed = {k for f in flagged for k in f.params}
    per: Dict[int, Optional[List[int]]] = {}
    for rec in recs:
        for p in rec.owners:
            ts = per.setdefault(id(p), [])
            if ts is not None:  # (appended in place: a cell stepped T times has T records)
                if rec.dense is p:
                    ts.append(rec.tokens)
                else:
                    per[id(p)] = None
    return {k: v for k, v in per.items() if v and k not in replayed}


def build_uses(recs: List[OpRecord], flagged: List[Frame]) -> Dict[Tensor, list]:
    """{param: [uses]} of the reached records ``recs`` (:func:`reached`); records of parameters a
    flagged frame replays by the fallback are dropped (the replay covers that call whole)."""
    uses: Dict[Tensor, list] = {}
    flagged_ids = {id(f): f for f in flagged}
    for rec, built in zip(recs, _build_all(recs)):
        for p, us in built.items():
            if any(id(f) in flagged_ids and id(p) in f.params for f in rec.frames):
                continue
            uses.setdefault(p, []).extend(us)
    # one parameter's explicit rows from several calls: summed (exact, one use)
    for p, us in uses.items():
        ex = [u for u in us if isinstance(u, ExplicitRows)]
        if len(ex) > 1:
            G = ex[0].G.double()
            for u in ex[1:]:
                G = G + u.G.double()
            uses[p] = [u for u in us if not isinstance(u, ExplicitRows)] + [ExplicitRows(G)]
    return uses


__all__ = ["OpContext", "OpMode", "OpRecord", "Frame", "frame_hooks", "build_uses", "reached", "dense_tokens", "PerSample"]
