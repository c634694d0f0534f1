"""The public API: :class:`OrthoGrad`.

    og = OrthoGrad(model, scope="tensor", alpha=0.0, backend="auto", rtol=None)
    opt.zero_grad()
    with og.retain():                                  # hooks on: per-layer factors captured
        retain_loss_fn(model(x_r), y_r).backward()     # any sum or mean of per-sample losses
    unlearn_loss_fn(model(x_u), y_u).backward()        # .grad = u
    og.project_()                                      # .grad = alpha*gbar_r - (1-alpha)*P_perp(u)
    opt.step()
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import blocks as _blocks
from . import distributed as _distributed
from .capture import Capture, CaptureError, find_units
from .gram import ParamTerm
from .solve import resolve_rtol, solve_psd

SCOPES = ("tensor", "global")
BACKENDS = ("auto", "torch", "triton")
# Retain spans beyond one batch: cap on the total number of retain samples before project_().
MAX_RETAIN_SAMPLES = 4096


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
        # DDP/FSDP (issue 6): refuse sharded parameters; under DDP the factors are all-gathered.
        _distributed.check_supported(model)
        self._group = _distributed.ddp_group(model)
        self.model = model
        self.scope = scope
        self.alpha = alpha
        self.backend = backend
        self.rtol = rtol
        self.max_retain = int(max_retain)
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
        self.stats: dict = {}

    # ------------------------------------------------------------------------------------------
    @property
    def parameters(self) -> List[Tuple[str, Tensor]]:
        """(name, parameter) for every trainable parameter OrthoGrad manages."""
        return list(self._params)

    @property
    def retain_size(self) -> int:
        """Retain samples captured since the last project_() (B_total over retain() blocks)."""
        return sum(B for B, _ in self._blocks)

    def _resolve_backend(self) -> str:
        if self.backend == "torch":
            return "torch"
        on_cuda = any(p.is_cuda for _, p in self._params)
        try:
            from .triton_ops import triton_available
        except ImportError:  # pragma: no cover - only when the package is broken
            def triton_available():
                return False

        if self.backend == "auto":
            return "triton" if on_cuda and triton_available() else "torch"
        if not triton_available():
            raise OrthoGradError('OrthoGrad(backend="triton"): triton is not installed; pip install triton, or use backend="torch"')
        from .triton_ops import kernels_interpreted

        if not on_cuda and not kernels_interpreted():
            raise OrthoGradError(
                'OrthoGrad(backend="triton"): the parameters are on the CPU; the Triton kernels need CUDA '
                'tensors (or TRITON_INTERPRET=1 for the slow CPU interpreter). Use backend="torch" on CPU.'
            )
        return "triton"

    # ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def retain(self) -> Iterator["OrthoGrad"]:
        """Capture the per-layer factors of the retain backward run inside the block.

        On leaving the block (normally or by an exception) the hooks are removed and every
        ``.grad`` is exactly what it was before the block; the retain gradient gbar_r is kept
        aside for ``alpha``. Several blocks before one ``project_()`` accumulate: the projection
        is then against the per-sample gradients of all of them (B_total = the sum), and gbar_r
        is the mean of the blocks' retain gradients.
        """
        if self._in_retain:
            raise OrthoGradError("og.retain() blocks cannot be nested")
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
        saved = {p: p.grad for _, p in self._params}
        # DDP (issue 6): with gradient_as_bucket_view=True the reducer writes the retain gradient
        # into the bucket that a saved .grad is a view of; keep the values to put them back.
        saved_vals = {p: g.clone() for p, g in saved.items() if g is not None} if self._group is not None else {}
        for _, p in self._params:
            p.grad = None
        cap = Capture(self.model, self._units)
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
            self._blocks.append((B, uses))
            keep_retain_grad = self.alpha > 0 or not self._capture_checked
            for _, p in self._params:
                g = p.grad if keep_retain_grad else None
                if g is not None and self._group is not None:
                    # DDP (issue 6): with gradient_as_bucket_view the next backward reuses this storage
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

    def _reset_span(self) -> None:
        self._blocks.clear()
        self._gsum.clear()
        self._versions.clear()
        self._terms = None
        self._projected = False
        self.stats = {}

    def reset(self) -> None:
        """Drop captured factors (free their memory) without projecting."""
        self._reset_span()

    # ------------------------------------------------------------------------------------------
    def _build_terms(self) -> Dict[Tensor, ParamTerm]:
        if self._terms is not None:
            return self._terms
        if not self._blocks:
            raise OrthoGradError(
                "og.project_(): no retain pass was captured. Run the retain loss backward inside "
                "`with og.retain():` before project_()."
            )
        for name, p in self._params:
            if p in self._versions and p._version != self._versions[p]:
                raise OrthoGradError(
                    f"parameter '{name}' was modified after the retain pass (optimizer.step() between "
                    "og.retain() and og.project_()?): the captured factors describe the old weights. Run the "
                    "retain pass again."
                )
        uses = _blocks.concat_blocks(self._blocks)
        # autocast (issue 6): remember whether any captured factor is half precision (_check_capture).
        self._half_factors = any(
            t is not None and t.dtype in (torch.float16, torch.bfloat16)
            for us in uses.values() for u in us for t in (getattr(u, "G", None), getattr(u, "A", None), getattr(u, "D", None))
        )
        if self._group is not None:  # DDP (issue 6): the union of every rank's retain samples
            names_ = {p: n for n, p in self._params}
            uses = _distributed.gather_uses(uses, [p for _, p in self._params], names_, self.retain_size, self._group)
        backend = self._resolve_backend()
        names = {p: n for n, p in self._params}
        terms = {}
        for _, p in self._params:
            if p in uses and uses[p]:
                terms[p] = ParamTerm(names[p], p, uses[p], backend)
        self._terms = terms
        self._backend_used = backend
        return terms

    def _factor_dtype(self, term: ParamTerm) -> torch.dtype:
        return term.param.dtype if term.use is None else term.use.A.dtype

    def _project(self, vectors: Dict[Tensor, Tensor], check_sum: bool, inplace: bool = False) -> Dict[Tensor, Tensor]:
        """P_perp applied to {param: tensor}; new tensors unless ``inplace`` (then written through)."""
        terms = self._build_terms()
        active = [p for p in terms if p in vectors]
        out = {p: (v.detach() if inplace else v.detach().clone()) for p, v in vectors.items()}
        if not active:
            return out
        Ks, bs, rtols = [], [], []
        for p in active:
            K, b = terms[p].gram_coef(out[p])
            Ks.append(K)
            bs.append(b)
            t = terms[p]
            rtols.append(resolve_rtol(self.rtol, self._factor_dtype(t), t.approx))
        K = torch.stack(Ks)
        b = torch.stack(bs)
        finite = torch.isfinite(K).all() & torch.isfinite(b).all()
        if not bool(finite):
            self._raise_nonfinite(active, Ks, bs, out)
        if check_sum:
            self._check_capture(active, bs, out)
        if self.scope == "global":
            rt = max(rtols)
            c = solve_psd(K.sum(0), b.sum(0), rt).unsqueeze(0).expand(len(active), -1)
            Kg = K.sum(0)
        else:
            rt = torch.tensor(rtols, dtype=torch.float64, device=K.device).unsqueeze(-1)
            c = solve_psd(K, b, rt)
        for k, p in enumerate(active):
            terms[p].apply_(out[p], c[k])
        if any(terms[p].approx for p in active):
            # Float32-accumulated Gram (Triton): project the residual once more ("twice is enough").
            b2 = torch.stack([terms[p].coef(out[p]) for p in active])
            c2 = solve_psd(Kg, b2.sum(0), rt).unsqueeze(0).expand(len(active), -1) if self.scope == "global" else solve_psd(K, b2, rt)
            for k, p in enumerate(active):
                terms[p].apply_(out[p], c2[k])
        # terms[...].B: under DDP the union of every rank's retain samples (retain_size is local)
        self.stats = {"B": terms[active[0]].B, "backend": self._backend_used, "scope": self.scope, "tensors": len(active)}
        return out

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

    def _check_capture(self, active, bs, vecs) -> None:
        """sum_i <g_i, u> must equal <sum of the retain gradients, u>: a use the hooks missed (a
        parameter used outside its module's forward) breaks it. Scalar per tensor, no extra pass."""
        names = {p: n for n, p in self._params}
        for p, b in zip(active, bs):
            gs = self._gsum.get(p)
            if gs is None:
                continue
            u = vecs[p]
            lhs = b.sum()
            # DDP (issue 6): .grad is the rank average, the gathered rows sum every rank's local gradient.
            world = _distributed.world_size(self._group)
            # float32 dots are enough for the tolerance and avoid float64 copies of big tensors
            rhs = torch.dot(gs.reshape(-1), u.reshape(-1).to(gs.dtype)).double() * world
            scale = torch.linalg.vector_norm(gs).double() * torch.linalg.vector_norm(u).double() * world
            # autocast (issue 6): half factors (bf16/fp16 activations and output gradients) with an fp32
            # .grad still carry half-precision rounding: use the half tolerance for them too.
            half = gs.dtype in (torch.float16, torch.bfloat16) or self._half_factors
            tol = (3e-2 if half else 2e-3) * scale + 1e-30
            if (lhs - rhs).abs() > tol:
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
        if not self._blocks:
            self._build_terms()  # raises the no-retain error
        for _, p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        vecs = {p: p.grad for _, p in self._params}
        nblocks = len(self._blocks)
        # in place: .grad becomes P_perp(u), then the direction, without copies of the model's size
        perp = self._project(vecs, check_sum=not self._capture_checked, inplace=True)
        self._capture_checked = True
        a = self.alpha
        for _, p in self._params:
            r = perp[p]
            d = r.mul_(-(1.0 - a))
            if a > 0:
                gs = self._gsum.get(p)
                if gs is not None:
                    d.add_(gs.to(d.dtype), alpha=a / nblocks)
        self._projected = True
        return self.stats

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
