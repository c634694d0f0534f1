"""The public API: :class:`OrthoGrad`.

    og = OrthoGrad(model, scope="tensor", alpha=0.0, backend="auto", rtol=None)
    opt.zero_grad()
    with og.forget():                                  # optional: cheaper coefficients, same result
        unlearn_loss_fn(model(x_u), y_u).backward()    # .grad = u
    with og.retain():                                  # hooks on: per-layer factors captured
        retain_loss_fn(model(x_r), y_r).backward()     # any sum or mean of per-sample losses
    og.project_()                                      # .grad = alpha*gbar_r - (1-alpha)*P_perp(u)
    opt.step()

The two passes may come in either order; unlearn first keeps the peak memory lowest (the retain
factors are captured after the unlearn pass's activations are freed).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import blocks as _blocks
from . import distributed as _distributed
from . import gram
from . import threads as _threads
from . import triton_ops as _triton_ops
from .capture import Capture, CaptureError, find_units, op_parameters
from .fallback import FallbackLog
from .conv_factors import ConvUse
from .factors import ExplicitUse, explicit_rows
from .forget_window import ForgetWindow
from .gram import ParamTerm
from .solve import COLUMN_MIN_RTOL, resolve_rtol, solve_columns, solve_psd

SCOPES = ("tensor", "global")
BACKENDS = _triton_ops.BACKENDS
# Retain spans beyond one batch: cap on the total number of retain samples before project_().
MAX_RETAIN_SAMPLES = 4096


# CPU: a term (its Gram and coefficients, or its update) of at most this many multiply-adds always
# runs on one intra-op thread, beside other terms (orthograd_fast.threads.run_spread).
SMALL_TERM_WORK = 1 << 25


_HALF = (torch.float16, torch.bfloat16)


def _is_half(u) -> bool:
    if type(u) is ExplicitUse:  # the common case (biases, norm weights, compacted rows): one dtype
        return u.G.dtype in _HALF
    return any(
        t is not None and t.dtype in _HALF for t in (getattr(u, "G", None), getattr(u, "A", None), getattr(u, "D", None))
    )


class OrthoGradError(RuntimeError):
    """Misuse of the OrthoGrad API (order of calls, changed model, bad values)."""


class OrthoGrad:
    """Exact OrthoGrad projection from per-layer factors.

    Args:
        model: any nn.Module (a DistributedDataParallel or PEFT model included; frozen parameters,
            requires_grad=False, are ignored).
        scope: ``"tensor"`` projects each parameter tensor on its own (the paper's code);
            ``"global"`` projects once over all trainable parameters.
        alpha: weight of the retain gradient, in [0, 1]:
            ``.grad = alpha * gbar_r - (1 - alpha) * P_perp(u)``.
        backend: ``"auto"`` (Triton kernels for CUDA tensors when triton imports, else torch),
            ``"torch"`` (factored pure-PyTorch path, any device) or ``"triton"``.
        rtol: rank tolerance of the small solve, relative to the largest singular value of the
            per-sample gradient matrix; None picks the per-dtype default of
            :func:`orthograd_fast.solve.default_rtol` (1e-6 for float32 factors).
        max_retain: cap on the retain samples accumulated over several ``retain()`` blocks.
        lean_retain: the retain backward skips the weight gradients of every layer with a factored
            rule (they are never needed: the factors replace them, and ``alpha * gbar_r`` is formed
            from the factors inside the update GEMM). Saves one B x O x I GEMM per layer and the
            retain ``.grad`` buffers. Turned off under DistributedDataParallel (its reducer expects
            every gradient); pass False for modules whose forward needs ``self.weight`` to be the
            ``nn.Parameter`` object itself.
        arm_forget: on leaving ``retain()``, keep the :meth:`forget` capture attached until
            ``project_()``, so an unlearn backward after the retain block gets the cheaper
            coefficients without the block (README, "The armed capture"). Off under DDP.
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
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"OrthoGrad(model=...): expected a torch.nn.Module, got {type(model).__name__}")
        if scope not in SCOPES:
            raise ValueError(f"OrthoGrad(scope={scope!r}): use one of {SCOPES}")
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"OrthoGrad(alpha={alpha}): alpha must lie in [0, 1]")
        if backend not in BACKENDS:
            raise ValueError(f"OrthoGrad(backend={backend!r}): use one of {BACKENDS}")
        if rtol is not None and not (0.0 <= float(rtol) < 1.0):
            raise ValueError(f"OrthoGrad(rtol={rtol}): use a value in [0, 1), or None for the default")
        # DDP/FSDP: refuse sharded parameters; under DDP the factors are all-gathered.
        _distributed.check_supported(model)
        self._group = _distributed.ddp_group(model)
        self.model = model
        self.scope = scope
        self.alpha = alpha
        self.backend = backend
        self.rtol = rtol
        self.max_retain = int(max_retain)
        self.lean_retain = bool(lean_retain) and not isinstance(model, nn.parallel.DistributedDataParallel)
        self._swap: Optional[Dict[int, list]] = None  # id(module) -> [(name, param)] (lean retain)
        self._lean: set = set()  # parameters whose retain gradient is never formed (gbar from factors)
        # og.forget(): {param: [unlearn OuterUse, ...]} and, per param, (.grad object, its _version)
        # at the block's exit; the factors are used only while .grad is that same, unmodified tensor
        self._forget: Dict[Tensor, list] = {}
        self._forget_grad: Dict[Tensor, tuple] = {}
        self._forget_bad: set = set()
        self._cross_checked = False
        # the unlearn capture armed on leaving retain() (see forget()); off under DDP
        self.arm_forget = bool(arm_forget) and self._group is None
        self._window: Optional[ForgetWindow] = None
        self._forget_explicit = False  # an og.forget() block ran in this span: no arming, errors raise
        self._arm_off: Optional[str] = None  # why arming stopped for good (armed factors failed a check)
        self._row_gen = torch.Generator().manual_seed(0)  # rows of the per-step check of the factors
        self._plan_cache: Optional[tuple] = None  # (key, plan) of the last projection (_plan)
        self._half_seen = False  # a half-precision factor was folded into float64 rows (_compact)
        self._params: List[Tuple[str, Tensor]] = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("OrthoGrad(model=...): the model has no trainable parameters (requires_grad=True)")
        self._units = None
        self._blocks: List[Tuple[int, Dict[Tensor, list]]] = []
        self._gsum: Dict[Tensor, Optional[Tensor]] = {}
        # The capture check (per-sample gradients add up to the retain gradient) needs the retain
        # gradient; the model's structure does not change between steps, so it runs on the first
        # projection only, and with alpha == 0 the retain gradient is not kept afterwards.
        self._capture_checked = False
        self._versions: Dict[Tensor, int] = {}
        self._terms: Optional[Dict[Tensor, ParamTerm]] = None
        self._projected = False
        self._in_retain = False
        self._fallback_log = FallbackLog()  # torch.func fallback scopes seen (og.stats["fallback"])
        self._op_params: set = set()  # parameters captured by operation (capture.op_parameters)
        self.stats = {}

    # ------------------------------------------------------------------------------------------
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
    def retain_size(self) -> int:
        """Retain samples captured since the last project_() (B_total over retain() blocks)."""
        return sum(B for B, _ in self._blocks)

    def _resolve_backend(self) -> str:
        on_cuda = any(p.is_cuda for _, p in self._params)
        return _triton_ops.resolve_backend(self.backend, on_cuda, f"OrthoGrad(backend={self.backend!r})", error=OrthoGradError)

    # ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def retain(self) -> Iterator["OrthoGrad"]:
        """Capture the per-layer factors of the retain backward run inside the block.

        On leaving the block (normally or by an exception) the hooks are removed and every
        ``.grad`` is exactly what it was before the block; the retain gradient gbar_r is kept
        aside for ``alpha``. Several blocks before one ``project_()`` accumulate: the projection
        is then against the per-sample gradients of all of them (B_total = the sum), and gbar_r
        is the mean of the blocks' retain gradients.

        The unlearn backward may run before or after the block(s): ``.grad`` is set aside inside
        it. Before is lighter: the retain factors (about the size of the retain pass's
        activations) then never coexist with the unlearn pass's activations.
        """
        if self._in_retain:
            raise OrthoGradError("og.retain() blocks cannot be nested")
        self._disarm()
        self._begin_block()
        saved = {p: p.grad for _, p in self._params}
        # DDP: with gradient_as_bucket_view=True the reducer writes the retain gradient
        # into the bucket that a saved .grad is a view of; keep the values to put them back.
        saved_vals = {p: g.clone() for p, g in saved.items() if g is not None} if self._group is not None else {}
        for _, p in self._params:
            p.grad = None
        # Until the first projection has checked the capture, operation-captured parameters run with
        # their real tensors: their retain gradient then shows any use the operations did not see
        # (e.g. inside a custom autograd.Function), which the capture check turns into an error.
        op_real = self._op_params if self.lean_retain and not self._capture_checked else set()
        cap = Capture(
            self.model, self._units, self._swap, lean_ops=self.lean_retain and not op_real, fallback_log=self._fallback_log
        )
        self._in_retain = True
        cap.attach()
        try:
            yield self
            cap.detach()
            uses = cap.finish()
            B = cap.B
            if self.retain_size + B > self.max_retain:
                raise OrthoGradError(
                    f"retain span of {self.retain_size + B} samples exceeds max_retain={self.max_retain}: the "
                    f"factors are kept until project_() (roughly B x activations of memory) and the solve is "
                    f"B^3. Call project_() more often or raise OrthoGrad(max_retain=...)."
                )
            self._check_lean(exempt=op_real)  # before the block joins the span: a refused block leaves no factors
            self._blocks.append((B, self._compact(uses, B)))
            keep_retain_grad = self.alpha > 0 or not self._capture_checked
            for _, p in self._params:
                g = p.grad if keep_retain_grad and (p not in self._lean or p in op_real) else None
                if g is not None and self._group is not None:
                    # DDP: with gradient_as_bucket_view the next backward reuses this storage
                    g = g.clone()
                if g is not None:
                    prev = self._gsum.get(p)
                    # p.grad is restored below, so the retain gradient tensor is ours: no copy
                    self._gsum[p] = g.detach() if prev is None else prev + g.detach()
                self._versions[p] = p._version
        finally:
            cap.detach()
            for _, p in self._params:
                p.grad = saved[p]
                if p in saved_vals:  # DDP bucket views: restore the values too (see above)
                    p.grad.copy_(saved_vals[p])
            self._in_retain = False
        self._arm()  # the unlearn backward that follows keeps its factors (forget())

    def _begin_block(self) -> None:
        """Common entry of retain() and forget(): a new span after a projection, model checks."""
        if self._projected:  # a new span starts after a projection
            self._reset_span()
        current = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if [id(p) for _, p in current] != [id(p) for _, p in self._params]:
            raise OrthoGradError(
                "the model's trainable parameters changed since OrthoGrad was created (parameters added/removed "
                "or requires_grad toggled); create a new OrthoGrad for the new model"
            )
        if self._units is None:
            self._units = find_units(self.model)
            self._swap, self._lean = self._swap_plan()

    @contextlib.contextmanager
    def forget(self) -> Iterator["OrthoGrad"]:
        """Run the unlearn backward inside this block to make ``project_()`` cheaper.

        The hooks keep the unlearn pass's layer inputs and output gradients for nn.Linear (and
        transformers' Conv1D) layers; where it is cheaper (layers without a token axis: an MLP, a
        classifier head), the coefficients <g_i, u> then come from B x B_u products of factors
        instead of a pass of the B x O x I GEMM over u. ``.grad`` is computed as usual, so the
        result is the same with or without the block. The factors are used for a parameter only if
        its ``.grad`` was None before the step's first unlearn accumulation
        (``zero_grad(set_to_none=True)``), every later accumulation found what the previous one
        left, and it is that same, unmodified tensor at ``project_()`` (gradient clipping in
        between: they are ignored). Their first use is checked against the GEMM, later ones on a
        few random rows of ``.grad``: a mismatch (an unlearn loss term outside the modules'
        forwards, e.g. a weight penalty) raises CaptureError. Several blocks before one
        ``project_()`` accumulate, before or after the retain blocks of the step (a block after a
        projection starts the next step). No-op under DistributedDataParallel.

        Without the block, leaving ``retain()`` arms the same capture until ``project_()`` (see
        the README, "og.forget()"): an unlearn backward after the retain block is as fast as one
        inside ``forget()``.
        """
        if self._in_retain:
            raise OrthoGradError("og.forget() cannot be used inside og.retain() (or nested)")
        self._disarm()
        self._begin_block()
        if self._group is not None:  # DDP: .grad is the rank average; the local factors are not u
            yield self
            return
        self._forget_explicit = True
        win = self._forget_start()
        self._in_retain = True  # no project_() inside
        ok = False
        try:
            yield self
            ok = True
        finally:
            self._in_retain = False
            if win is not None:
                self._forget_finish(win, ok)

    # Layer inputs an armed unlearn capture may hold (one-token dense layers: B_u x I each); past it
    # the window gives up and those weights use the coefficient GEMM.
    FORGET_MAX_BYTES = 256 << 20

    def _forget_start(self) -> Optional[ForgetWindow]:
        """Hooks of one unlearn window (an og.forget() block or the armed capture), attached."""
        from . import rules

        units = [u for u in self._units if u.rule in (rules.linear_uses, rules.hf_conv1d_uses)]
        # a parameter also owned by a module outside this set (tied to an embedding or a fallback
        # module) would get unlearn gradient the captured factors do not hold
        dense = {id(u) for u in units}
        elsewhere = {id(q) for u in self._units if id(u) not in dense for q in u.module.parameters(recurse=u.whole)}
        self._forget_bad.update(p for _, p in self._params if id(p) in elsewhere)
        layers = [
            (u.module, u.module.weight, u.rule is rules.hf_conv1d_uses)
            for u in units
            if u.module.weight.requires_grad and id(u.module.weight) not in elsewhere
        ]
        if not layers:
            return None
        win = ForgetWindow(layers, dict(self._forget_grad), self.FORGET_MAX_BYTES)
        win.attach()
        return win

    def _forget_finish(self, win: ForgetWindow, ok: bool) -> None:
        """Hooks off; the window's factors join the span for the weights whose .grad they describe."""
        win.detach()
        uses = win.uses() if ok and not win.overflow else {}
        for p in win.weights:
            us = uses.get(p, [])
            if p not in win.seen and not us and p not in win.bad and p not in win.partial:
                continue  # untouched by this window (what earlier windows left still holds)
            if not ok or win.overflow or p in self._forget_bad or p in win.partial or p in win.bad or p not in win.seen or not us:
                self._forget_bad.add(p)
                self._forget.pop(p, None)
                continue
            self._forget.setdefault(p, []).extend(us)
            self._forget_grad[p] = win.seen[p]

    def _arm(self) -> None:
        """On leaving retain(): keep an unlearn capture attached until project_() (or reset(), the next
        retain() or forget(), close()), unless an og.forget() block ran in this span."""
        if not self.arm_forget or self._arm_off or self._forget_explicit or self._window is not None:
            return
        self._window = self._forget_start()

    def _disarm(self, keep: bool = True) -> None:
        """Detach the armed capture; ``keep``: its factors join the span (else dropped)."""
        win, self._window = self._window, None
        if win is None:
            return
        if keep:
            self._forget_finish(win, True)
        else:
            win.detach()

    def _cross_usable(self, terms, active, vecs) -> Dict[Tensor, list]:
        """{param: og.forget() factors} where they are valid for .grad and b from them is cheaper
        (the coefficients themselves are formed per tensor, next to its Gram)."""
        out = {}
        for p in active:
            fu = self._forget.get(p)
            if not fu or p in self._forget_bad:
                continue
            g, ver = self._forget_grad[p]
            if vecs[p] is not g or g._version != ver or not terms[p].cross_usable(fu):
                continue
            out[p] = fu
        return out

    def _compact(self, uses: Dict[Tensor, list], B: int) -> Dict[Tensor, list]:
        """Small tensors (B * numel <= gram.EXPLICIT_MAX, the ones ParamTerm materializes anyway)
        become their float64 per-sample rows now, so the layer inputs and output gradients behind
        them are freed before the unlearn pass (a first conv's output gradient is B x C x H x W,
        its weight's rows only B x numel)."""
        out = {}
        for p, us in uses.items():
            if B * p.numel() <= gram.EXPLICIT_MAX and not all(isinstance(u, ExplicitUse) for u in us):
                self._half_seen = self._half_seen or any(_is_half(u) for u in us)
                out[p] = [ExplicitUse(explicit_rows(us))]
            else:
                out[p] = us
        return out

    def _swap_plan(self):
        """Lean retain: the (name, param) pairs each class-rule layer gets detached during its calls,
        and every parameter whose retain gradient is never formed (class-rule, operation-captured
        and recurrent ones: their gbar_r comes from the factors). A parameter also owned by an
        operation-captured or recurrent unit is not swapped (it keeps its retain gradient)."""
        self._op_params = set(op_parameters(self._units))
        if not self.lean_retain:
            return {}, set()
        shared = {id(p) for u in self._units if u.kind != "rule" for p in u.parameters()}
        swap, lean = {}, set()
        for u in self._units:
            if u.kind == "recurrent":
                lean.update(u.parameters())
            if u.kind != "rule":
                continue
            own = [
                (n, p)
                for n, p in u.module.named_parameters(recurse=False)
                if n in ("weight", "bias") and p.requires_grad and id(p) not in shared
            ]
            if own:
                swap[id(u.module)] = own
                lean.update(p for _, p in own)
        lean.update(self._op_params)
        return swap, lean

    def _check_lean(self, exempt=()) -> None:
        """Lean retain: a parameter handed out detached to its owner that still got a retain
        gradient was used outside its owner's forward (the hooks cannot see that use).
        ``exempt``: parameters that ran with their real tensors in this block."""
        names = {p: n for n, p in self._params}
        for p in self._lean:
            if p.grad is not None and p not in exempt:
                raise CaptureError(
                    f"parameter '{names[p]}' received a retain gradient outside the forward of the module that "
                    "owns it (e.g. `h @ self.emb.weight.T` in a parent's forward, or a weight penalty in the "
                    "retain loss): the hooks cannot see that use, so its per-sample gradients would be wrong. "
                    "Route the use through a module (nn.Linear with the tied weight) or freeze the parameter."
                )

    def _reset_span(self) -> None:
        self._half_seen = False
        self._forget_explicit = False
        self._forget.clear()
        self._forget_grad.clear()
        self._forget_bad.clear()
        self._blocks.clear()
        self._gsum.clear()
        self._versions.clear()
        self._terms = None
        self._projected = False
        self.stats = {}

    def reset(self) -> None:
        """Drop captured factors (free their memory) and the armed unlearn capture without projecting."""
        self._disarm(keep=False)
        self._reset_span()

    def close(self) -> None:
        """Remove every hook this object holds and drop its factors (also done on deletion)."""
        self.reset()

    def __del__(self):
        try:
            self._disarm(keep=False)
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to clean
            pass

    # ------------------------------------------------------------------------------------------
    def _build_terms(self) -> Dict[Tensor, ParamTerm]:
        if self._terms is not None:
            return self._terms
        if not self._blocks:
            raise OrthoGradError(
                "og.project_(): no retain pass was captured. Run the retain loss backward inside "
                "`with og.retain():` before project_()."
            )
        versions = self._versions
        for name, p in self._params:
            v = versions.get(p)
            if v is not None and p._version != v:
                raise OrthoGradError(
                    f"parameter '{name}' was modified after the retain pass (optimizer.step() between "
                    "og.retain() and og.project_()?): the captured factors describe the old weights. Run the "
                    "retain pass again."
                )
        blocks = self._blocks
        if len(blocks) > 1 or self._group is not None:
            # several blocks / DDP ranks are concatenated along samples in the token form
            blocks = [(B, {p: [u.outer() if isinstance(u, ConvUse) else u for u in us] for p, us in uses.items()}) for B, uses in blocks]
        uses = _blocks.concat_blocks(blocks)
        # autocast: whether any captured factor was half precision (_check_capture);
        # _compact recorded it for the tensors it turned into float64 rows
        self._half_factors = self._half_seen or any(_is_half(u) for us in uses.values() for u in us)
        if self._group is not None:  # DDP: the union of every rank's retain samples
            names_ = {p: n for n, p in self._params}
            uses = _distributed.gather_uses(uses, [p for _, p in self._params], names_, self.retain_size, self._group)
        backend = self._resolve_backend()
        terms = {}
        for name, p in self._params:
            us = uses.get(p)
            if us:
                terms[p] = ParamTerm(name, p, us, backend)
        gram.link_twins(list(terms.values()))
        self._terms = terms
        self._backend_used = backend
        return terms

    def _project(
        self,
        vectors: Dict[Tensor, Tensor],
        check_sum: bool,
        inplace: bool = False,
        shift: Optional[Dict[Tensor, float]] = None,
        scale: float = 1.0,
    ) -> Dict[Tensor, Tensor]:
        """scale * P_perp applied to {param: tensor}; new tensors unless ``inplace`` (then written
        through).

        ``shift`` {param: s}: also subtract s * sum_i g_i (the retain gradient from the factors,
        for alpha under lean retain) in the same update GEMM; ``scale`` rides in that GEMM too (no
        extra pass over the gradient)."""
        shift = shift or {}
        terms = self._build_terms()
        active = [p for p in terms if p in vectors]
        # .grad needs no detached alias unless it is itself part of a graph (create_graph=True)
        out = {p: ((v.detach() if v.requires_grad else v) if inplace else v.detach().clone()) for p, v in vectors.items()}
        if scale != 1.0:  # tensors the projection does not touch
            for p in out:
                if p not in terms:
                    out[p].mul_(scale)
        if not active:
            return out
        cross = self._cross_usable(terms, active, vectors) if inplace else {}
        # tile and conv terms that can hold their float32 rows project inside their own job
        # (orthograd_fast.held_rows; per-tensor solves only: the passes use each term's own K)
        hold = [terms[p] for p in active if p not in cross]
        if self.scope != "tensor" or self._backend_used == "triton":
            hold = []
        for p in active:
            terms[p].hold = False
        gram.hold_rows(hold, [resolve_rtol(self.rtol, t.factor_dtype, False) for t in hold])
        try:
            return self._project_terms(terms, active, out, cross, check_sum, shift, scale, inplace)
        finally:
            for p in active:
                terms[p].drop_rows()  # held rows live for one projection at most

    def _project_terms(self, terms, active, out, cross, check_sum, shift, scale, inplace) -> Dict[Tensor, Tensor]:
        # On the CPU the terms run side by side on Python threads, one intra-op thread each
        # (orthograd_fast.threads: a projection is many independent small GEMMs, and waking the
        # OpenMP pool for each small op costs more than the op); a dominant term runs on all threads.
        # (Triton terms on the CPU run in its interpreter, which is not thread-safe: one at a time.)
        on_cpu = out[active[0]].device.type == "cpu" and self._backend_used != "triton"
        nthreads = torch.get_num_threads() if on_cpu else 1

        # terms projected in their own job (held rows): into a copy when writing through, so that
        # .grad stays as it was until every check below has passed
        staged = {}

        def gram_coef(p):
            t = terms[p]
            K, b = t.gram_coef(out[p], t.cross_coef(cross[p]) if p in cross else None)
            if t.rows is not None:
                staged[p] = out[p].clone() if inplace else out[p]
                t.project_held_(staged[p], b, scale, shift.get(p, 0.0))
            return K, b

        # a one-token layer's bias takes its Gram from its weight's job (gram.link_twins): after it
        riders, groups, jobs, plan = self._plan(terms, active)

        def gram_job(item):
            if isinstance(item, gram.ExplicitGroup):
                return item.gram_coef([out[t.param] for t in item.terms])
            return gram_coef(item)

        items = jobs + groups
        res = _threads.run_spread(
            gram_job,
            items,
            [terms[p].work(p in cross) for p in jobs] + [g.work() for g in groups],
            nthreads,
            small=SMALL_TERM_WORK,
            alone=[not terms[p].spreadable() for p in jobs] + [False] * len(groups),
        )
        got = dict(zip(jobs, res))
        for p in riders:
            got[p] = gram_coef(p)
        if cross:
            self._verify_cross(cross, got, terms, out)
            self._cross_checked = True
        # K, b stacked in the plan's order (single terms, then each group's [m, B, B] as it came),
        # then put in the order of ``active`` by one index (no per-member unbind and restack)
        single = jobs + riders
        parts = ([(torch.stack([got[p][0] for p in single]), torch.stack([got[p][1] for p in single]))] if single else [])
        parts += res[len(jobs) :]
        K = torch.cat([q[0] for q in parts]) if len(parts) > 1 else parts[0][0]
        b = torch.cat([q[1] for q in parts]) if len(parts) > 1 else parts[0][1]
        if plan["inv"] is not None:
            K, b = K[plan["inv"]], b[plan["inv"]]
        del got, parts, res
        rtols = [resolve_rtol(self.rtol, t.factor_dtype, t.approx) for t in map(terms.__getitem__, active)]
        for t, Kk in zip(map(terms.__getitem__, active), K.unbind(0)):  # views of the stack, not a second copy of every K
            t._K = Kk
        finite = torch.isfinite(K.sum() + b.sum())  # NaN and inf propagate: one small reduction, one sync
        if not bool(finite):
            self._raise_nonfinite(active, list(K), list(b), out)
        if check_sum:
            self._check_capture(active, K, b, out)
        with _threads.one_thread(K.device.type == "cpu"):  # B x B matrices: one thread (see above)
            if self.scope == "global":
                rt = max(rtols)
                c = solve_psd(K.sum(0), b.sum(0), rt).unsqueeze(0).expand(len(active), -1)
                Kg = K.sum(0)
            else:
                rt = torch.tensor(rtols, dtype=torch.float64, device=K.device).unsqueeze(-1)
                # materialized tensors with fewer entries than samples: the same c from their n x n
                # column Gram (K is rank-deficient there: no B x B eigh every step)
                # (groups of explicit terms: one batched column solve per group)
                col_groups = [g for g in groups if g.numel < g.B and rtols[g.ks[0]] >= COLUMN_MIN_RTOL]
                in_groups = {k for g in col_groups for k in g.ks}
                col = [
                    k
                    for k, p in enumerate(active)
                    if terms[p].mode == "explicit" and terms[p].numel < terms[p].B and rtols[k] >= COLUMN_MIN_RTOL and k not in in_groups
                ]
                if col or col_groups:
                    rest = sorted(set(range(len(active))) - set(col) - in_groups)
                    c = torch.empty_like(b)
                    if rest:
                        c[rest] = solve_psd(K[rest], b[rest], rt[rest])
                    if col:
                        got_c = solve_columns([terms[active[k]].G for k in col], [out[active[k]] for k in col], [rtols[k] for k in col])
                        for k, ck in zip(col, got_c):
                            c[k] = ck
                    for g in col_groups:
                        c[g.rows] = g.solve_columns(rtols[g.ks[0]])
                else:
                    c = solve_psd(K, b, rt)
        approx = any(terms[p].approx for p in active)
        if not approx:
            # fold the retain-gradient term into the coefficients of the same update GEMM
            if shift:
                c = c + torch.tensor([shift.get(p, 0.0) for p in active], dtype=c.dtype, device=c.device).unsqueeze(-1)
            # groups always form their update in float64: only the single terms are checked
            exact = [False] * len(active)
            ks = plan["single_ks"]
            if ks:
                idx = plan["single_idx"]
                for k, e in zip(ks, self._needs_exact(K[idx], c[idx], [out[active[k]] for k in ks])):
                    exact[k] = e
        # the scale rides in the update GEMM too, unless a re-projection follows
        if approx:
            for k, p in enumerate(active):
                terms[p].apply_(out[p], c[k])
        else:

            def update(item):
                if isinstance(item, gram.ExplicitGroup):
                    item.apply_([out[t.param] for t in item.terms], c[item.rows], scale)
                elif active[item] in staged:
                    if staged[active[item]] is not out[active[item]]:
                        out[active[item]].copy_(staged[active[item]])
                else:
                    terms[active[item]].apply_(out[active[item]], c[item], scale, exact=exact[item])

            ks = plan["single_ks"] + groups
            work = [terms[active[k]].update_work() for k in plan["single_ks"]] + [g.update_work() for g in groups]
            _threads.run_spread(update, ks, work, nthreads, small=SMALL_TERM_WORK)
        if approx:
            # Float32-accumulated Gram (Triton): project the residual once more ("twice is enough").
            b2 = torch.stack([terms[p].coef(out[p]) for p in active])
            c2 = solve_psd(Kg, b2.sum(0), rt).unsqueeze(0).expand(len(active), -1) if self.scope == "global" else solve_psd(K, b2, rt)
            for k, p in enumerate(active):
                terms[p].apply_(out[p], c2[k] + shift[p] if p in shift else c2[k], scale)
        # terms[...].B: under DDP the union of every rank's retain samples (retain_size is local)
        self.stats = {
            "B": terms[active[0]].B,
            "backend": self._backend_used,
            "scope": self.scope,
            "tensors": len(active),
            "held_rows": len(staged),  # tensors projected from float32 rows (orthograd_fast.held_rows)
        }
        return out

    # explicit terms of one size grouped from this many members on (below: per-term jobs), and at
    # most this many bytes of stacked float64 rows per group (a group's stack is a copy of its rows)
    GROUP_MIN = 2
    GROUP_MAX_BYTES = 32 << 20

    def _plan(self, terms, active):
        """(riders, explicit groups, per-term jobs, index plan) of a projection, cached while the
        terms' kinds and shapes repeat (every step of a training loop): riders take their Gram from
        their host's job (gram.link_twins); explicit terms of one size form
        :class:`gram.ExplicitGroup` s. The index plan: ``single_ks`` (positions in ``active`` of
        the terms outside groups, as an index tensor ``single_idx``) and ``inv``, the index that
        puts K and b stacked as jobs, riders, then each group's members in ``active``'s order
        (None when that is already the order)."""
        key = tuple((id(p), t.mode, t.B, t.numel, t.host is not None) for p, t in zip(active, map(terms.__getitem__, active)))
        if self._plan_cache is not None and self._plan_cache[0] == key:
            riders, spec, jobs, plan = self._plan_cache[1]
        else:
            active_set = set(active)
            riders = [p for p in active if terms[p].host is not None and terms[p].host.param in active_set]
            riding = set(riders)
            by_key: Dict[tuple, list] = {}
            if self._backend_used != "triton":
                for k, p in enumerate(active):
                    gk = gram.ExplicitGroup.key(terms[p]) if p not in riding else None
                    if gk is not None:
                        by_key.setdefault(gk, []).append(k)
            dev = terms[active[0]].param.device
            spec = []
            for ks in by_key.values():
                t = terms[active[ks[0]]]
                per = max(1, self.GROUP_MAX_BYTES // (8 * t.B * t.numel))
                for i in range(0, len(ks), per):
                    part = ks[i : i + per]
                    if len(part) >= self.GROUP_MIN:
                        shapes = {active[k].shape for k in part}
                        spec.append((part, torch.tensor(part, device=dev), shapes.pop() if len(shapes) == 1 else None))
            grouped = {active[k] for ks, _, _ in spec for k in ks}
            jobs = [p for p in active if p not in riding and p not in grouped]
            pos = {id(p): k for k, p in enumerate(active)}
            order = [pos[id(p)] for p in jobs + riders] + [k for ks, _, _ in spec for k in ks]
            inv = None
            if order != list(range(len(active))):
                inv = torch.empty(len(order), dtype=torch.long)
                inv[torch.tensor(order)] = torch.arange(len(order))
                inv = inv.to(dev)
            single_ks = [k for k, p in enumerate(active) if p not in grouped]
            plan = {"inv": inv, "single_ks": single_ks, "single_idx": torch.tensor(single_ks, dtype=torch.long, device=dev)}
            self._plan_cache = (key, (riders, spec, jobs, plan))
        groups = [gram.ExplicitGroup([terms[active[k]] for k in ks], ks, rows, shape) for ks, rows, shape in spec]
        return riders, groups, jobs, plan

    @staticmethod
    def _needs_exact(K: Tensor, c: Tensor, vecs: List[Tensor]) -> List[bool]:
        """Per tensor: nearly collinear per-sample gradients give large coefficients of opposite
        signs whose terms cancel in the update; its rounding in the tensor's dtype, eps x
        update_amplification, would exceed gram.EXACT_UPDATE_TOL (random rows: amplification
        ~ sqrt(B), float32 fine up to B ~ 10^4). One host sync for all tensors."""

        eps = torch.tensor(
            [torch.finfo(v.dtype).eps if v.dtype != torch.float64 else 0.0 for v in vecs], dtype=K.dtype, device=K.device
        )
        return (gram.update_amplification(K, c.to(K.dtype)) * eps > gram.EXACT_UPDATE_TOL).tolist()

    # rows of .grad compared with the unlearn factors at every projection after the first
    CROSS_CHECK_ROWS = 4

    def _verify_cross(self, cross, got, terms, vecs) -> None:
        """The unlearn factors must reproduce .grad: the first use compares the coefficients with
        the GEMM, later ones a few random rows of .grad (a loss term that appears later, e.g. a
        penalty switched on after some steps). A mismatch raises under og.forget(); factors of the
        armed capture are replaced by the GEMM and arming stops for this object, with a warning."""
        first = not self._cross_checked
        errs = []
        for p in cross:
            if first:
                b_gemm = terms[p].coef(vecs[p])
                errs.append(self._cross_error(p, got[p][0], got[p][1], b_gemm, vecs[p]))
            else:
                errs.append(terms[p].cross_rows_error(cross[p], vecs[p], self.CROSS_CHECK_ROWS, self._row_gen))
        tol = 3e-2 if self._half_factors else 1e-3
        # one host sync; a NaN from a non-finite retain Gram is left to the finite check that follows
        bad = [
            p
            for p, e in zip(cross, torch.stack(errs).tolist())
            if e > tol or (e != e and bool(torch.isfinite(got[p][0]).all()))
        ]
        self._cross_checked = True
        if not bad:
            return
        names = {q: n for n, q in self._params}
        if self._forget_explicit:
            raise CaptureError(
                f"parameter '{names[bad[0]]}': the unlearn factors captured by og.forget() do not reproduce its "
                "unlearn gradient (a use outside the owning module's forward, or a loss term such as a weight "
                "penalty). Run the unlearn backward outside og.forget() for this model."
            )
        for p in bad:
            got[p] = (got[p][0], terms[p].coef(vecs[p]))
        self._arm_off = names[bad[0]]
        warnings.warn(
            f"OrthoGrad: the unlearn pass after retain() does not come from the modules' forwards alone for "
            f"parameter '{names[bad[0]]}' (a loss term such as a weight penalty?); its coefficients use the GEMM "
            "and the unlearn capture is no longer armed (OrthoGrad(arm_forget=False) skips it from the start).",
            RuntimeWarning,
            stacklevel=3,
        )

    def _cross_error(self, p, K, b_cross, b_gemm, u) -> Tensor:
        """max_i |b_cross - b_gemm| / (|g_i| |u|), a 0-d tensor (no host sync)."""
        unorm = torch.linalg.vector_norm(u).double()  # in u's dtype: dtype=float64 would copy u
        scale = K.diagonal().clamp_min(0).sqrt() * unorm + 1e-30
        return ((b_cross - b_gemm).abs() / scale).max()

    def _raise_nonfinite(self, active, Ks, bs, vecs) -> None:
        names = {p: n for n, p in self._params}
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

    def _check_capture(self, active, K, bs, vecs) -> None:
        """sum_i <g_i, u> must equal <sum of the retain gradients, u>: a use the hooks missed (a
        parameter used outside its module's forward) breaks it. Scalar per tensor, no extra pass.

        Rounding in both sums scales with the per-sample rows, sum_i |g_i| |u| (|g_i| = sqrt(K_ii)),
        not with |sum_i g_i|, which vanishes when the samples cancel. A tensor whose every row is
        rounding noise (its true gradient is exactly zero, e.g. a bias a later op removes) is judged
        against the model-wide scale sum_t sum_i |g_i,t| |u_t| instead: its noise is far below it,
        a real missed use is not."""
        names = {p: n for n, p in self._params}
        rows = K.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt().sum(-1)  # sum_i |g_i| per tensor
        model_scale = None  # formed only if some tensor misses its own tolerance
        # DDP: .grad is the rank average, the gathered rows sum every rank's local gradient.
        world = _distributed.world_size(self._group)
        ks, diffs, tols, halves = [], [], [], []
        for k, (p, b) in enumerate(zip(active, bs)):
            gs = self._gsum.get(p)
            if gs is None:
                continue
            u = vecs[p]
            # float32 dots are enough for the tolerance and avoid float64 copies of big tensors
            rhs = torch.dot(gs.reshape(-1), u.reshape(-1).to(gs.dtype)).double() * world
            unorm = torch.linalg.vector_norm(u).double()
            # autocast: half factors (bf16/fp16 activations and output gradients) with an fp32
            # .grad still carry half-precision rounding: use the half tolerances for them too.
            half = gs.dtype in (torch.float16, torch.bfloat16) or self._half_factors
            ks.append(k)
            halves.append(half)
            diffs.append((b.sum() - rhs).abs())
            tols.append((3e-2 if half else 2e-3) * rows[k] * unorm + 1e-30)
        # one host sync for every tensor; the rare misses are then looked at one by one
        over = ~(torch.stack(diffs) <= torch.stack(tols)) if ks else None  # NaN counts as over
        over = over.nonzero().flatten().tolist() if over is not None and bool(over.any()) else []
        for j in over:
            k, half, p = ks[j], halves[j], active[ks[j]]
            if model_scale is None:
                model_scale = sum(float(rows[i]) * float(torch.linalg.vector_norm(vecs[q])) for i, q in enumerate(active))
            if float(diffs[j]) <= (1e-3 if half else 1e-5) * model_scale:
                continue
            raise CaptureError(
                f"parameter '{names[p]}': the per-sample gradients captured by the hooks do not add up to its "
                "retain gradient. It is used outside the forward of the module that owns it (e.g. "
                "`h @ self.emb.weight.T` in a parent's forward). Route that use through a module "
                "(nn.Linear with the tied weight) or freeze the parameter."
            )
        for name, p in self._params:
            if p not in self._terms and self._gsum.get(p) is not None and bool(self._gsum[p].abs().max() > 0):
                raise CaptureError(
                    f"parameter '{name}' received a retain gradient, but no module that owns it saw the retain "
                    "forward: it is used outside its module's forward. Route the use through a module, or freeze it."
                )

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def project_(self) -> dict:
        """Replace every trainable ``.grad`` (= u) by ``alpha * gbar_r - (1 - alpha) * P_perp(u)``.

        ``p -= lr * .grad`` (plain SGD) is then the paper's OrthoGrad step; any optimizer applies it.
        Parameters with no gradient (u is None) count as u = 0. Returns a small stats dict.
        """
        if self._in_retain:
            raise OrthoGradError("og.project_() was called inside og.retain(); call it after the block")
        if self._projected:
            raise OrthoGradError(
                "og.project_() was already applied to this retain pass; run a new `with og.retain():` pass "
                "before projecting again (project_vectors() can reuse the factors)."
            )
        self._disarm()  # the armed unlearn capture's factors join the span; its hooks go
        if not self._blocks:
            self._build_terms()  # raises the no-retain error
        for _, p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        vecs = {p: p.grad for _, p in self._params}
        nblocks = len(self._blocks)
        a = self.alpha
        # Lean retain: gbar_r = (1/nblocks) sum_i g_i from the factors. With
        # d = -(1-a) (u - sum_i (c_i + s) g_i), s = a / (nblocks (1-a)), it rides in the update GEMM.
        if a == 1.0:  # no projection at all: .grad = gbar_r
            gbar = self.retain_gradient()
            for name, p in self._params:
                p.grad.copy_(gbar[name])
            self._projected = True
            self.stats = {"B": self.retain_size, "backend": self._backend_used, "scope": self.scope, "tensors": 0}
            return self.stats
        shift = {p: a / (nblocks * (1.0 - a)) for p in self._lean} if a > 0 else {}
        # in place: .grad becomes P_perp(u), then the direction, without copies of the model's size
        perp = self._project(vecs, check_sum=not self._capture_checked, inplace=True, shift=shift, scale=-(1.0 - a))
        self._capture_checked = True
        for _, p in self._params:
            d = perp[p]  # -(1 - a) P_perp(u) (- the lean part of a gbar_r)
            if a > 0 and p not in self._lean:
                gs = self._gsum.get(p)
                if gs is not None:
                    d.add_(gs.to(d.dtype), alpha=a / nblocks)
        self._projected = True
        return self.stats

    @torch.no_grad()
    def retain_gradient(self) -> Dict[str, Tensor]:
        """gbar_r of the captured span, {parameter name: tensor}: the mean over ``retain()`` blocks
        of each block's retain gradient (what ``alpha`` weighs). Under lean retain it is formed from
        the factors (the retain backward left no weight gradients); other parameters use the retain
        gradient kept aside, which is kept when ``alpha > 0``."""
        terms = self._build_terms()
        n = len(self._blocks)
        out = {}
        for name, p in self._params:
            if p in self._lean:
                g = torch.zeros_like(p)
                if p in terms:
                    terms[p].apply_(g, torch.full((terms[p].B,), -1.0 / n, dtype=torch.float64, device=g.device))
            elif self._gsum.get(p) is not None:
                g = self._gsum[p].to(p.dtype) / n
            elif self.alpha == 0:
                raise OrthoGradError(
                    f"retain_gradient(): the retain gradient of '{name}' was not kept (alpha == 0 and it is not "
                    "formed from factors); create the OrthoGrad with alpha > 0, or lean_retain=True."
                )
            else:
                g = torch.zeros_like(p)  # no retain gradient reached it
            out[name] = g
        return out

    def prepare(self) -> "OrthoGrad":
        """Validate and freeze the projector built from the captured factors.

        After this, the parameters may change (e.g. a base optimizer step) and
        :meth:`project_vectors` still projects against the retain pass as captured.
        """
        self._build_terms()
        return self

    @torch.no_grad()
    def project_vectors(self, vectors: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """P_perp (same retain factors, same scope) applied to {parameter name: tensor}.

        Returns new tensors; names are those of ``model.named_parameters()``. Useful to project an
        optimizer's step instead of the gradient (:meth:`wrap`).
        """
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
