"""The public API: :class:`OrthoGrad`.

    og = OrthoGrad(model, scope="tensor", alpha=0.0, backend="auto", rtol=None)
    opt.zero_grad()
    with og.retain():                                  # hooks on: per-layer factors captured
        retain_loss_fn(model(x_r), y_r).backward()     # any sum or mean of per-sample losses
    unlearn_loss_fn(model(x_u), y_u).backward()        # .grad = u
    og.project_()                                      # .grad = alpha*gbar_r - (1-alpha)*P_perp(u)
    opt.step()

A step moves idle -> capturing (``retain()``) -> captured -> projected (``project_()``); the next
``retain()`` starts a new span. The facade only sequences: capture (:mod:`.capture`), the span
(:mod:`.retain_span`), the unlearn factors (:mod:`.unlearn_factors`), the projection
(:mod:`.projection`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .engine import checkpointing as _checkpointing
from .engine import checks as _checks
from .engine import distributed as _distributed
from .engine import layer_buffers as _layer_buffers
from .engine import prefetch as _prefetch
from .engine import projection as _projection
from .engine import retain_span as _retain_span
from .engine import threads as _threads
from .engine import triton_ops as _triton_ops
from .engine.capture import Capture, find_units
from .engine.fallback import FallbackLog
from .engine.gram import PerSampleGrads
from .engine.retain_span import RetainSpan, lean_params
from .engine.unlearn_factors import UnlearnFactors
from .errors import OrthoGradError
from .options import MAX_RETAIN_SAMPLES, check_options



class OrthoGrad:
    """Exact OrthoGrad projection from per-layer factors.

    Args:
        model: any nn.Module (DDP and PEFT models included); frozen parameters are ignored.
        scope: ``"tensor"`` projects each parameter tensor on its own (the paper's code);
            ``"global"`` projects once over all trainable parameters.
        alpha: weight of the retain gradient in ``.grad = alpha * gbar_r - (1 - alpha) * P_perp(u)``.
        backend: ``"auto"`` (Triton kernels for CUDA tensors when triton imports, else torch),
            ``"torch"`` (factored pure-PyTorch path, any device) or ``"triton"``.
        rtol: rank tolerance on the per-sample gradients' singular values, relative to the
            largest; None: :func:`orthograd_fast.engine.solve.default_rtol` (1e-6 for float32 factors).
        max_retain: cap on the retain samples accumulated over several ``retain()`` blocks.
        lean_retain: the retain backward skips the weight gradients of every factored layer (the
            factors replace them; ``alpha * gbar_r`` is formed from the factors): one B x O x I GEMM
            per layer less. Off under DDP; pass False for modules whose forward needs
            ``self.weight`` to be the ``nn.Parameter`` object itself.
        arm_forget: keep the :meth:`forget` capture attached from leaving ``retain()`` until
            ``project_()`` (README, "The armed capture"). Off under DDP.
        prefetch_mb: on the CPU, leaving ``retain()`` starts one background thread that forms the
            large tensors' float32 per-sample rows and their Grams while the unlearn pass runs
            (:mod:`orthograd_fast.engine.prefetch`), up to this many MiB of rows, kept from step
            to step; 0: off. Per-tensor scope, torch backend, not under DDP. Until ``project_()``
            (or ``reset()``, the next block) the thread that left ``retain()`` runs on one
            intra-op thread fewer: the prefetch has that core.
    """

    def __init__(
        self,
        model: nn.Module,
        scope: str = "tensor",
        alpha: float = 0.0,
        backend: str = "auto",
        rtol: Optional[float] = None,
        *,
        max_retain: int = MAX_RETAIN_SAMPLES,
        lean_retain: bool = True,
        arm_forget: bool = True,
        prefetch_mb: float = _prefetch.DEFAULT_MB,
    ):
        alpha = check_options(model, scope, alpha, backend, rtol)
        _distributed.check_supported(model)  # DDP/FSDP: sharded parameters are refused
        self._group = _distributed.ddp_group(model)  # under DDP the factors are all-gathered
        self.model, self.scope, self.alpha, self.backend, self.rtol = model, scope, alpha, backend, rtol
        self.lean_retain = bool(lean_retain) and not isinstance(model, nn.parallel.DistributedDataParallel)
        self._params: List[Tuple[str, Tensor]] = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("OrthoGrad(model=...): the model has no trainable parameters (requires_grad=True)")
        self._names = {p: n for n, p in self._params}  # the error messages' names
        if not prefetch_mb >= 0:
            raise ValueError(f"OrthoGrad(prefetch_mb={prefetch_mb}): use a size in MiB >= 0 (0: no prefetch)")
        self.prefetch_bytes = int(prefetch_mb * (1 << 20))
        self._prefetch: Optional[_prefetch.Prefetch] = None
        self._row_buffers = _prefetch.RowBuffers()
        self._span = RetainSpan(self._params, self._group, int(max_retain))
        self._unlearn = UnlearnFactors(self._params, bool(arm_forget) and self._group is None)
        self._units = None  # capture units, found on the first block
        self._lean: set = set()  # parameters whose retain gradient is never formed (gbar from factors)
        self._flag_modules: list = []  # modules with HF's gradient_checkpointing flag (first block)
        self._plan_cache = _projection.PlanCache()
        self._fallback_log = FallbackLog()  # torch.func fallback scopes seen (og.stats["fallback"])
        # the capture check (checks.check_capture) runs on the first projection only (the model's
        # structure does not change); with alpha == 0 the retain gradient is not kept afterwards
        self._capture_checked = False
        self._dots_deferred = False  # a capture check from retain-gradient dots had to wait
        self._deferred: list = []  # parameters whose check waited, filled by the check
        self._terms: Optional[Dict[Tensor, PerSampleGrads]] = None  # of the current span, once built
        self._terms_checked = False  # the parameters were checked against the retain pass (_build_terms)
        self._backend_used: Optional[str] = None
        self._projected = False
        self._in_retain = False
        self.stats = {}

    @property
    def stats(self) -> dict:
        """Stats of the last projection, and ``"fallback"``: the modules whose calls went through the
        torch.func fallback (module, op, params), empty when every use was captured by a rule."""
        self._stats["fallback"] = self._fallback_log.report()
        return self._stats

    @stats.setter
    def stats(self, value: dict) -> None:
        self._stats = value

    @property
    def parameters(self) -> List[Tuple[str, Tensor]]:
        """(name, parameter) for every trainable parameter OrthoGrad manages."""
        return list(self._params)

    @property
    def row_buffer_bytes(self) -> int:
        """Bytes of the prefetch's float32 row buffers, kept from step to step (``og.reset()``
        frees them)."""
        return self._row_buffers.nbytes

    @property
    def retain_size(self) -> int:
        """Retain samples captured since the last project_() (B_total over retain() blocks)."""
        return self._span.size

    # --- capturing ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def retain(self, batch_size: Optional[int] = None) -> Iterator["OrthoGrad"]:
        """Capture the per-layer factors of the retain backward run inside the block.

        ``batch_size``: the number of retain samples, where dim 0 of the model's first tensor input
        is not it (flat token ids with ``offsets`` for an ``nn.EmbeddingBag``: one bag per sample).
        By default B is read from that input; the inputs with B rows on dim 0 carry the batch.

        On leaving it (normally or by an exception) the hooks are removed and every ``.grad`` is
        what it was before; the retain gradient is kept aside for ``alpha``. Several blocks before
        one ``project_()`` accumulate (B_total = the sum; gbar_r = the mean of the blocks'). The
        unlearn backward may come before (lighter on memory) or after the block(s). Where the
        prefetch starts (CPU, the contract's order: README), the factors' per-sample rows are
        built on its thread while the unlearn pass runs, and an error there is raised by
        ``project_()``.
        """
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"og.retain(batch_size=...) takes the number of retain samples, a positive int; got {batch_size!r}")
        self._begin_block("og.retain() blocks cannot be nested", retain=True)
        # Until the first projection has checked the capture, the parameters run with their real
        # tensors: their retain gradient then shows any use the operations did not see (e.g. inside
        # a custom autograd.Function), which the capture check turns into an error.
        real = self._lean if not self._capture_checked else set()
        cap = Capture(
            self.model, self._units, lean_ops=bool(self._lean) and not real, fallback_log=self._fallback_log, batch_size=batch_size
        )
        self._in_retain = True
        try:
            # the first span keeps <retain gradient, u> only where u is already there (og.forget()
            # first), unless such a check was deferred before (u changed before project_())
            dots = not self._capture_checked and not self._dots_deferred
            # the builds of the block's uses go to the prefetch thread, beside the unlearn pass
            defer = _retain_span.DEFER_BUILD and self._prefetch_ok() and not _threads.autocast_on()
            # (Hugging Face's activation checkpointing off for the block: engine/checkpointing.py)
            with _checkpointing.hf_flags_off(self._flag_modules), self._span.block(
                cap, keep_gradients=self.alpha > 0 or not self._capture_checked, lean=self._lean, exempt=real, dots=dots, defer=defer
            ):
                try:
                    yield self
                except Exception as e:
                    err = _checkpointing.explain(e)
                    if err is None:
                        raise
                    raise err from e
        finally:
            self._in_retain = False
        self._unlearn.observe(*cap.dense_verdict)
        # the unlearn backward that follows keeps its factors, for the layers that can use them
        self._unlearn.arm(self._units, self._span.blocks[-1][0], self._span.dense_tokens())
        self._start_prefetch()

    def _start_prefetch(self) -> None:
        """Leaving retain(): form the large terms' rows and Grams on a background thread while the
        unlearn pass runs (CPU, per-tensor scope, torch backend, no DDP, several intra-op threads).
        Not when some .grad is already there: the unlearn pass came first (og.forget() first, the
        README's order) and project_() comes next, with nothing to overlap."""
        if not self._prefetch_ok():
            return
        if self._span.pending is not None:  # the block's uses are still to build: there first
            self._prefetch = _prefetch.Prefetch(None, self._row_buffers, setup=self._prefetch_pick)
            return
        picked = self._prefetch_pick()
        if picked:
            self._prefetch = _prefetch.Prefetch(picked, self._row_buffers)

    def _prefetch_ok(self) -> bool:
        """Whether leaving retain() starts the prefetch (see :meth:`_start_prefetch`)."""
        return not (
            self.prefetch_bytes <= 0
            or any(p.grad is not None for _, p in self._params)
            or self.scope != "tensor"
            or self.backend == "triton"
            or self._group is not None
            or torch.get_num_threads() < _prefetch.MIN_THREADS
            or any(p.device.type != "cpu" for _, p in self._params)
        )

    def _prefetch_pick(self) -> list:
        """The span's terms (built here, on the prefetch thread when the block's uses were left to
        it) and the ones the prefetch prepares; [] when building them fails (project_() builds
        them again and raises it there, as without prefetch)."""
        try:
            terms = self._make_terms(internal=True)
        except Exception:  # noqa: BLE001 - see above
            self._terms = None
            return []
        ts = list(terms.values())
        return _prefetch.pick(ts, _projection.term_rtols(self.rtol, ts, exact_gram=True), self.prefetch_bytes)

    def _finish_prefetch(self, discard: bool = False) -> None:
        """Wait for the background preparation (``discard``: and drop what it prepared)."""
        pf, self._prefetch = self._prefetch, None
        if pf is not None:
            pf.discard() if discard else pf.finish()

    def _begin_block(self, nested: str, retain: bool) -> None:
        """Common entry of retain() and forget(): a new span after a projection, model checks."""
        if self._in_retain:
            raise OrthoGradError(nested)
        if retain:  # (og.forget() after retain(): the unlearn pass the lend is for)
            _threads.give_back_own()  # an intra-op thread lent to a prefetch whose end ran elsewhere
        self._unlearn.disarm()
        if self._projected:  # a new span starts after a projection
            self._reset_span()
        elif retain:  # another retain block joins the span: its terms change
            self._finish_prefetch(discard=True)
            self._terms, self._terms_checked = None, False
        self._span.check_params(self.model)
        if self._units is None:
            self._units = find_units(self.model)
            self._lean = lean_params(self._units, self.lean_retain)
            self._flag_modules = _checkpointing.flag_modules(self.model)

    @contextlib.contextmanager
    def forget(self) -> Iterator["OrthoGrad"]:
        """Run the unlearn backward inside this block to make ``project_()`` cheaper.

        The hooks keep the unlearn pass's layer inputs and output gradients for nn.Linear (and
        transformers' Conv1D) layers; where that is cheaper (layers without a token axis), the
        coefficients <g_i, u> come from B x B_u products of factors instead of a GEMM over u. The
        result is the same with or without the block; factors that do not describe ``.grad``
        (changed in between, an unlearn loss term outside the modules' forwards) are ignored or
        raise CaptureError (:mod:`orthograd_fast.engine.unlearn_factors`). Without the block, leaving
        ``retain()`` arms the same capture until ``project_()`` (README, "og.forget()").
        No-op under DistributedDataParallel.
        """
        self._begin_block("og.forget() cannot be used inside og.retain() (or nested)", retain=False)
        if self._group is not None:  # DDP: .grad is the rank average; the local factors are not u
            yield self
            return
        self._in_retain = True  # no project_() inside
        try:
            with self._unlearn.block(self._units):
                yield self
        finally:
            self._in_retain = False

    def _reset_span(self) -> None:  # a new span: everything captured for the last one goes
        self._finish_prefetch(discard=True)
        self._unlearn.reset_span()
        self._span.reset()
        self._terms, self._terms_checked = None, False
        self._projected = False
        self.stats = {}

    def reset(self) -> None:
        """Drop captured factors (free their memory) and the armed unlearn capture without projecting."""
        self._unlearn.disarm(keep=False)
        self._reset_span()
        self._row_buffers.clear()
        _layer_buffers.release()
        _threads.give_back_own()

    close = reset  # every hook this object holds goes with its factors (also on deletion)

    def __del__(self):
        try:
            self._finish_prefetch(discard=True)
            self._unlearn.disarm(keep=False)
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to clean
            pass

    # --- projecting ---------------------------------------------------------------------------------
    def _build_terms(self, internal: bool = False) -> Dict[Tensor, PerSampleGrads]:
        """The span's terms, built once. The first call from the API checks that no parameter
        changed since the retain pass (``internal``: the prefetch's call on leaving retain(), which
        leaves that check to the next one; after it the parameters may change: prepare())."""
        self._finish_prefetch()  # the background thread works on the terms until here
        return self._make_terms(internal)

    def _make_terms(self, internal: bool) -> Dict[Tensor, PerSampleGrads]:
        """:meth:`_build_terms` without stopping the prefetch (the prefetch thread's own call)."""
        if self._terms is not None and not internal and not self._terms_checked:
            self._span.check_versions()
        if self._terms is None:
            on_cuda = any(p.is_cuda for _, p in self._params)
            backend = _triton_ops.resolve_backend(self.backend, on_cuda, f"OrthoGrad(backend={self.backend!r})", error=OrthoGradError)
            hold_ok = self.scope == "tensor" and backend != "triton"  # as projection.project decides
            self._terms, self._backend_used = self._span.terms(backend, hold_ok), backend
        self._terms_checked = self._terms_checked or not internal
        return self._terms

    def _project(self, vectors: Dict[Tensor, Tensor], check_sum: bool, **kw) -> Dict[Tensor, Tensor]:
        """scale * P_perp applied to {param: tensor} (:func:`orthograd_fast.engine.projection.project`)."""
        terms = self._build_terms()
        span = self._span
        world = _distributed.world_size(self._group)
        self._deferred = []
        capture = functools.partial(
            _checks.check_capture, self._params, terms, span.gsum, half=span.half, world=world, gdots=span.gdots, deferred=self._deferred
        )
        checks = _projection.Checks(
            nonfinite=functools.partial(_checks.raise_nonfinite, self._names),
            unlearn_factors=functools.partial(self._unlearn.verify, half=span.half),
            unlearn_error=self._unlearn.error,
            capture=capture if check_sum else None,
        )
        unlearn = {}
        if kw.get("inplace") and self._unlearn.factors:
            unlearn = self._unlearn.usable(terms, [p for p in terms if p in vectors], vectors)
        out, stats = _projection.project(
            terms, vectors, scope=self.scope, rtol=self.rtol, backend=self._backend_used, checks=checks, plan_cache=self._plan_cache, unlearn=unlearn, **kw
        )
        if stats:
            self.stats = stats
        return out

    @torch.no_grad()
    def project_(self) -> dict:
        """Replace every trainable ``.grad`` (= u) by ``alpha * gbar_r - (1 - alpha) * P_perp(u)``.

        ``p -= lr * .grad`` (plain SGD) is then the paper's step; any optimizer applies it. A missing
        gradient counts as u = 0. Returns a small stats dict."""
        if self._in_retain:
            raise OrthoGradError("og.project_() was called inside og.retain(); call it after the block")
        if self._projected:
            raise OrthoGradError("og.project_() was already applied to this retain pass; run a new `with og.retain():` "
                                 "pass before projecting again (project_vectors() can reuse the factors).")
        _threads.give_back_own()  # this thread's full intra-op count for the projection
        self._unlearn.disarm()  # the armed unlearn capture's factors join the span; its hooks go
        # the projection takes the prefetch over: no new term, and the one under way is waited
        # for in its own job (the other terms need not)
        pf, self._prefetch = self._prefetch, None
        pending = pf.handoff() if pf is not None else None
        if pf is not None and pending is None:
            pf.finish()
        try:
            return self._project_all(pending and (pending, pf.finish))
        finally:
            if pf is not None:
                pf.finish()

    def _project_all(self, pending) -> dict:
        """project_() after its checks; ``pending``: (term, wait) of the prefetch, or None."""
        self._build_terms()  # raises the no-retain error
        for _, p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        nblocks = len(self._span.blocks)
        a = self.alpha
        if a == 1.0:  # no projection at all: .grad = gbar_r
            gbar = self.retain_gradient()
            for name, p in self._params:
                p.grad.copy_(gbar[name])
            self._projected = True
            self.stats = {"B": self.retain_size, "backend": self._backend_used, "scope": self.scope, "tensors": 0}
            return self.stats
        # Lean retain: gbar_r = (1/nblocks) sum_i g_i from the factors. With
        # d = -(1-a) (u - sum_i (c_i + s) g_i), s = a / (nblocks (1-a)), it rides in the update GEMM.
        shift = {p: a / (nblocks * (1.0 - a)) for p in self._lean} if a > 0 else {}
        # in place: .grad becomes P_perp(u), then the direction, without copies of the model's size
        vecs = {p: p.grad for _, p in self._params}
        perp = self._project(vecs, check_sum=not self._capture_checked, inplace=True, shift=shift, scale=-(1.0 - a), pending=pending)
        if self._deferred:  # u changed after the retain pass: the next span checks whole gradients
            self._dots_deferred = True
        else:
            self._capture_checked = True
        for p, gs in self._span.gsum.items() if a > 0 else ():
            if p not in self._lean:
                perp[p].add_(gs.to(perp[p].dtype), alpha=a / nblocks)  # -(1 - a) P_perp(u) + a gbar_r
        self._projected = True
        return self.stats

    @torch.no_grad()
    def retain_gradient(self) -> Dict[str, Tensor]:
        """gbar_r of the captured span, {parameter name: tensor}: the mean of the ``retain()``
        blocks' retain gradients (what ``alpha`` weighs); from the factors under lean retain."""
        return self._span.retain_gradient(self._build_terms(), self._lean, self.alpha)

    def prepare(self) -> "OrthoGrad":
        """Build the projector from the captured factors: the parameters may change after it (a
        base optimizer step) and :meth:`project_vectors` still projects against the captured pass."""
        self._build_terms()
        return self

    @torch.no_grad()
    def project_vectors(self, vectors: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """P_perp (same retain factors, same scope) applied to {parameter name: tensor}, as new
        tensors: e.g. an optimizer's step instead of the gradient (:meth:`wrap`)."""
        by_name = dict(self._params)
        unknown = [n for n in vectors if n not in by_name]
        if unknown:
            raise KeyError(f"project_vectors(): not trainable parameters of the model: {unknown[:5]}")
        for n, v in vectors.items():
            if v.shape != by_name[n].shape:
                raise ValueError(f"project_vectors(): '{n}' has shape {tuple(v.shape)}, the parameter {tuple(by_name[n].shape)}")
        res = self._project({by_name[n]: v for n, v in vectors.items()}, check_sum=False)
        return {n: res[by_name[n]] for n in vectors}

    def wrap(self, optimizer):
        """An optimizer whose every step is projected off the retain per-sample gradients
        (see :func:`orthograd_fast.optim_wrap.wrap`)."""
        from .optim_wrap import wrap

        return wrap(self, optimizer)
