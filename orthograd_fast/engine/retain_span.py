"""The retain side of a step: the captured blocks of one span, the retain gradient kept aside, and
the lean-retain plan (which parameters' retain gradients are never formed).

A *span* is everything captured by ``og.retain()`` blocks since the last projection: per block its
sample count and {param: uses} (factors, or float64 rows for small tensors), the sum of the blocks'
retain gradients where they are kept (``alpha`` and the capture check need them), and each
parameter's version at capture. :meth:`RetainSpan.terms` turns it into one
:class:`orthograd_fast.engine.gram.PerSampleGrads` per tensor, once per span.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from . import span_blocks as _span_blocks
from . import distributed as _distributed
from . import gram
from .conv_factors import ConvFactors
from ..errors import CaptureError, OrthoGradError
from .factors import ExplicitRows, OuterFactors, explicit_rows_many
from .gram import PerSampleGrads

_HALF = (torch.float16, torch.bfloat16)
# leaving retain() where the prefetch starts (CPU, contract order): the operation records' builds
# and the small tensors' rows run on the prefetch thread, in the core the unlearn pass leaves idle,
# instead of between the retain backward and the unlearn pass (False: on leaving, as elsewhere)
DEFER_BUILD = True
# ... unless the output gradients it would keep alive into the unlearn pass (those of the records
# of small tensors, which their rows replace) exceed this many bytes: a large model's early batch
# norms hold B x C x H x W each (ResNet-50 at 224 px, B = 32: ~100 MiB per layer); then built on
# leaving, as before
DEFER_MAX_BYTES = 64 << 20


def is_half(u) -> bool:
    """Whether a captured use carries half-precision factors (autocast)."""
    if type(u) is ExplicitRows:  # the common case (biases, norm weights, compacted rows): one dtype
        return u.G.dtype in _HALF
    return any(t is not None and t.dtype in _HALF for t in (getattr(u, "G", None), getattr(u, "A", None), getattr(u, "D", None)))


class Deferred:
    """``fn()`` run once, by whichever thread comes first: the prefetch thread while the unlearn
    pass runs, or the first reader (:meth:`result`), which otherwise waits for it. Its exception
    is raised to every reader."""

    def __init__(self, fn: Callable):
        self._fn: Optional[Callable] = fn
        self._claim = threading.Lock()
        self._done = threading.Event()
        self._out = None
        self._err: Optional[BaseException] = None

    def run(self) -> None:
        if not self._claim.acquire(blocking=False):
            return  # under way (or done) on another thread
        try:
            self._out = self._fn()
        except BaseException as e:  # noqa: BLE001 - raised to the readers
            self._err = e
        finally:
            self._fn = None
            self._done.set()

    def result(self):
        self.run()
        self._done.wait()
        if self._err is not None:
            raise self._err
        return self._out


class RetainSpan:
    """Retain blocks captured since the last projection (see the module docstring)."""

    def __init__(self, params: List[Tuple[str, Tensor]], group, max_retain: int):
        self.params = params
        self.group = group  # DDP process group (factors all-gathered), or None
        self.max_retain = max_retain
        self.blocks: List[Tuple[int, Dict[Tensor, list]]] = []
        self.gsum: Dict[Tensor, Optional[Tensor]] = {}
        # first span, parameters whose unlearn gradient u was already there (og.forget() first):
        # <retain gradient, u> and whether it was nonzero, taken as the gradient arrived (it is
        # freed at once), for the capture check: {param: RetainDot}
        self.gdots: Dict[Tensor, "RetainDot"] = {}
        self.versions: Dict[Tensor, int] = {}
        self.half_seen = False  # a half-precision factor was folded into float64 rows (compact)
        self.half = False  # any captured factor was half precision (set by terms())
        self._terms: Optional[Dict[Tensor, PerSampleGrads]] = None
        # the last block's uses while their build runs (block(defer=True)); its entry in
        # ``blocks`` holds None until :meth:`settle`
        self._pending: Optional[Deferred] = None
        self._pending_tokens: Dict[int, List[int]] = {}

    @property
    def size(self) -> int:
        """Retain samples captured in the span (B_total over its blocks)."""
        return sum(B for B, _ in self.blocks)

    def check_params(self, model) -> None:
        """The model's trainable parameters must be the ones the span was made for."""
        current = [p for p in model.parameters() if p.requires_grad]
        if [id(p) for p in current] != [id(p) for _, p in self.params]:
            raise OrthoGradError(
                "the model's trainable parameters changed since OrthoGrad was created (parameters added/removed "
                "or requires_grad toggled); create a new OrthoGrad for the new model"
            )

    def reset(self) -> None:
        self._pending = None  # (its thread, the prefetch's, was joined before: api._reset_span)
        self.half_seen = False
        self.blocks.clear()
        self.gsum.clear()
        self.gdots.clear()
        self.versions.clear()
        self._terms = None

    def settle(self) -> None:
        """The last block's uses, built (on this thread if the prefetch has not started them;
        their build's error is raised here)."""
        d = self._pending
        if d is not None:
            uses = d.result()
            self._pending = None
            self.blocks[-1] = (self.blocks[-1][0], uses)

    @property
    def pending(self) -> Optional[Deferred]:
        """The last block's build while it is left to run (None once settled)."""
        return self._pending

    def add_block(self, B: int, uses, dense_tokens: Optional[Dict[int, List[int]]] = None) -> None:
        """A finished retain() block joins the span (refused past ``max_retain`` samples).
        ``uses``: {param: uses}, or a callable that builds them (Capture.finish(defer=True)):
        left to :attr:`pending` with ``dense_tokens`` (:meth:`dense_tokens` of the block) known now."""
        self.settle()
        if self.size + B > self.max_retain:
            raise OrthoGradError(
                f"retain span of {self.size + B} samples exceeds max_retain={self.max_retain}: the "
                f"factors are kept until project_() (roughly B x activations of memory) and the solve is "
                f"B^3. Call project_() more often or raise OrthoGrad(max_retain=...)."
            )
        if callable(uses):
            self._pending = Deferred(lambda: self._small_as_rows(uses(), B))
            self._pending_tokens = dense_tokens or {}
            self.blocks.append((B, None))
        else:
            self.blocks.append((B, self._small_as_rows(uses, B)))
        self._terms = None  # terms built before (the prefetch's) describe the span without it

    @contextlib.contextmanager
    def block(self, cap, *, keep_gradients: bool, lean: set, exempt: set, dots: bool = False, defer: bool = False) -> Iterator[None]:
        """One retain() block around the capture ``cap``: ``.grad`` set aside and put back exactly
        (also on an exception), the block's factors and (``keep_gradients``) its retain gradients
        added to the span. ``lean``: parameters whose retain gradient is never formed, except
        those in ``exempt`` (they ran with their real tensors). ``dots``: an exempt lean parameter
        that already holds its unlearn gradient u keeps only <retain gradient, u> (what the capture
        check reads; its retain gradient is needed for nothing else), taken by a hook as the
        gradient arrives and freed: no second model-sized gradient alive (MLP, B = 64, first step:
        peak 1.42x -> 1.08x of a plain step). ``defer``: the operation records' builds and the
        small tensors' rows are left to :attr:`pending` (the prefetch thread forms them while the
        unlearn pass runs); every check and the gradients' restore still run here."""
        params = self.params
        saved = {p: p.grad for _, p in params}
        # DDP: with gradient_as_bucket_view=True the reducer writes the retain gradient
        # into the bucket that a saved .grad is a view of; keep the values to put them back.
        saved_vals = {p: g.clone() for p, g in saved.items() if g is not None} if self.group is not None else {}
        for _, p in params:
            p.grad = None
        block_dots: Dict[Tensor, RetainDot] = {}
        hooks = []
        if dots and self.group is None:
            for _, p in params:
                if p in lean and p in exempt and saved[p] is not None:
                    hooks.append(p.register_post_accumulate_grad_hook(_dot_hook(saved[p], block_dots)))
        cap.attach()
        try:
            yield
            cap.detach()
            uses = cap.finish(defer=defer, small=lambda p: gram.materialized(cap.B, p.numel()))
            if callable(uses) and cap.deferred_bytes > DEFER_MAX_BYTES:
                uses = uses()  # too much memory kept into the unlearn pass: built now
            check_lean(lean, params, exempt=exempt)  # a refused block leaves no factors
            self.add_block(cap.B, uses, cap.dense_tokens)
            for p, d in block_dots.items():
                prev = self.gdots.get(p)
                self.gdots[p] = d if prev is None else prev.merged(d)
            for _, p in params:
                g = p.grad if keep_gradients and (p not in lean or p in exempt) else None
                if g is not None:
                    # p.grad is restored below, so the retain gradient tensor is ours: no copy
                    # (DDP: with gradient_as_bucket_view the next backward reuses this storage)
                    g = (g.clone() if self.group is not None else g).detach()
                    prev = self.gsum.get(p)
                    self.gsum[p] = g if prev is None else prev + g
                self.versions[p] = p._version
        finally:
            for h in hooks:
                h.remove()
            cap.release()
            for _, p in params:
                p.grad = saved[p]
                if p in saved_vals:  # DDP bucket views: restore the values too (see above)
                    p.grad.copy_(saved_vals[p])

    def retain_gradient(self, terms: Dict[Tensor, PerSampleGrads], lean: set, alpha: float) -> Dict[str, Tensor]:
        """gbar_r, {name: tensor}: the mean of the blocks' retain gradients, formed from the
        factors for ``lean`` parameters, from the kept sums for the others."""
        n = len(self.blocks)
        out = {}
        for name, p in self.params:
            gs = self.gsum.get(p)
            if p in lean:
                g = torch.zeros_like(p)
                if p in terms:
                    terms[p].apply_(g, torch.full((terms[p].B,), -1.0 / n, dtype=torch.float64, device=g.device))
            elif gs is not None:
                g = gs.to(p.dtype) / n
            elif alpha == 0:
                raise OrthoGradError(
                    f"retain_gradient(): the retain gradient of '{name}' was not kept (alpha == 0 and it is not "
                    "formed from factors); create the OrthoGrad with alpha > 0, or lean_retain=True."
                )
            else:
                g = torch.zeros_like(p)  # no retain gradient reached it
            out[name] = g
        return out

    def dense_tokens(self) -> Dict[int, List[int]]:
        """{id(param): tokens per sample of each use} of the parameters whose uses in the last
        block are all dense factors of the weight itself over one token group (a Linear) left as
        factors: the only ones whose unlearn factors can replace the coefficient GEMM (the ghost
        route; :meth:`UnlearnFactors.arm` picks the ones worth a window)."""
        if not self.blocks:
            return {}
        if self._pending is not None:  # known before the build (small weights become rows)
            B = self.blocks[-1][0]
            return {id(p): self._pending_tokens[id(p)] for _, p in self.params if id(p) in self._pending_tokens and not gram.materialized(B, p.numel())}
        return {
            id(p): [u.a_shape[1] for u in us]
            for p, us in self.blocks[-1][1].items()
            if us and all(type(u) is OuterFactors and u.ids is None and u.a_shape[2] == 1 for u in us)
        }

    def _small_as_rows(self, uses: Dict[Tensor, list], B: int) -> Dict[Tensor, list]:
        """Small tensors (gram.materialized, the ones PerSampleGrads materializes anyway) become
        their float64 per-sample rows now, so the layer inputs and output gradients behind them
        are freed (a first conv's output gradient is B x C x H x W, its weight's rows only B x
        numel): before the unlearn pass, or early in it where the prefetch thread builds them."""
        small = [p for p, us in uses.items() if gram.materialized(B, p.numel()) and not all(isinstance(u, ExplicitRows) for u in us)]
        for p in small:
            self.half_seen = self.half_seen or any(is_half(u) for u in uses[p])
        rows = dict(zip(small, explicit_rows_many([uses[p] for p in small])))
        return {p: [ExplicitRows(rows[p])] if p in rows else us for p, us in uses.items()}

    def check_versions(self) -> None:
        """No parameter changed since its retain pass (the facade asks again when the prefetch
        built the terms on leaving retain())."""
        for name, p in self.params:
            v = self.versions.get(p)
            if v is not None and p._version != v:
                raise OrthoGradError(
                    f"parameter '{name}' was modified after the retain pass (optimizer.step() between "
                    "og.retain() and og.project_()?): the captured factors describe the old weights. Run the "
                    "retain pass again."
                )

    def terms(self, backend: str, hold_ok: bool = False) -> Dict[Tensor, PerSampleGrads]:
        """One PerSampleGrads per captured tensor (built once per span); ``hold_ok``: the projection
        lets terms hold float32 rows (per-tensor scope, torch backend; it weighs the route choice)."""
        if not self.blocks:
            raise OrthoGradError(
                "og.project_(): no retain pass was captured. Run the retain loss backward inside "
                "`with og.retain():` before project_()."
            )
        if self._terms is not None:
            return self._terms
        self.settle()
        self.check_versions()
        blocks = self.blocks
        if len(blocks) > 1 or self.group is not None:
            # several blocks / DDP ranks are concatenated along samples in the token form
            blocks = [(B, {p: [u.outer() if isinstance(u, ConvFactors) else u for u in us] for p, us in uses.items()}) for B, uses in blocks]
        uses = _span_blocks.concat_blocks(blocks)
        # autocast: whether any captured factor was half precision (the capture check's tolerance);
        # _small_as_rows recorded it for the tensors it turned into float64 rows
        self.half = self.half_seen or any(is_half(u) for us in uses.values() for u in us)
        if self.group is not None:  # DDP: the union of every rank's retain samples
            names = {p: n for n, p in self.params}
            uses = _distributed.gather_uses(uses, [p for _, p in self.params], names, self.size, self.group)
        terms = {}
        for name, p in self.params:
            us = uses.get(p)
            if us:
                terms[p] = PerSampleGrads(name, p, us, backend, hold_ok)
        gram.share_bias_grams(list(terms.values()))
        self._terms = terms
        return terms


def lean_params(units, lean_retain: bool) -> set:
    """The parameters whose retain gradient is never formed under lean retain (their gbar_r comes
    from the factors): every parameter a unit captures, by operation or by an unrolled recurrent
    forward; empty without lean retain."""
    if not lean_retain:
        return set()
    return {p for u in units for p in u.parameters()}


class RetainDot:
    """<retain gradient, u> of one parameter (float64, 0-d), whether that gradient was nonzero
    (bool, 0-d), u itself and its version then, and whether it was half precision: the capture
    check can use the dot only while u is unchanged (:meth:`valid_for`)."""

    def __init__(self, dot: Tensor, nonzero: Tensor, u: Tensor, half: bool):
        self.dot, self.nonzero, self.u, self.version, self.half = dot, nonzero, u, u._version, half
        self.consistent = True  # every block's dot was taken against the same, unchanged u

    def merged(self, other: "RetainDot") -> "RetainDot":
        """The sum over two blocks (their retain gradients add up)."""
        out = RetainDot(self.dot + other.dot, self.nonzero | other.nonzero, other.u, self.half or other.half)
        out.version = other.version
        out.consistent = self.consistent and other.consistent and self.u is other.u and self.version == other.version
        return out

    def valid_for(self, u: Tensor) -> bool:
        """Whether the dot was taken against this very u, unchanged since."""
        return self.consistent and self.u is u and self.version == u._version


def _dot_hook(u: Tensor, into: Dict[Tensor, RetainDot]):
    """A post-accumulate-grad hook: fold the parameter's retain gradient into <g, u> and free it."""

    def hook(p: Tensor) -> None:
        g = p.grad
        p.grad = None
        d = RetainDot(torch.dot(g.reshape(-1), u.reshape(-1).to(g.dtype)).double(), (g != 0).any(), u, g.dtype in _HALF)
        prev = into.get(p)
        into[p] = d if prev is None else prev.merged(d)

    return hook


def check_lean(lean, params: List[Tuple[str, Tensor]], exempt=()) -> None:
    """Lean retain: a parameter handed out detached that still got a retain gradient was used
    where the capture cannot see it (inside a custom autograd.Function, a weight penalty).
    ``exempt``: parameters that ran with their real tensors in this block."""
    names = {p: n for n, p in params}
    for p in lean:
        if p.grad is not None and p not in exempt:
            raise CaptureError(
                f"parameter '{names[p]}' received a retain gradient outside the forward of the module that "
                "owns it (e.g. `h @ self.emb.weight.T` in a parent's forward, or a weight penalty in the "
                "retain loss): the hooks cannot see that use, so its per-sample gradients would be wrong. "
                "Route the use through a module (nn.Linear with the tied weight) or freeze the parameter."
            )
