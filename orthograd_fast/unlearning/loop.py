"""The unlearning loop: OrthoGrad (and its variants) and the baselines under one budget.

    from orthograd_fast import unlearn
    res = unlearn(model, forget=(Xf, yf), retain=(Xr, yr), steps=100, lr=0.05,
                  stop_forget_acc=test_acc, eval_sets={"test": (Xt, yt)})
    res.history[-1], res.seconds, res.stopped_early

One step = one retain batch + one forget batch + one optimizer step, for every method, so methods
compared at the same ``steps`` and ``retain_batch_size`` see the same retain data budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from ..api import OrthoGrad
from ..optim_wrap import wrap
from .baselines import BASELINE_STEPS, StepContext
from .data import as_dataset
from .losses import FORGET_LOSSES, forget_objective
from .metrics import accuracy

__all__ = ["unlearn", "UnlearnResult", "METHODS"]

METHODS = ("orthograd",) + tuple(BASELINE_STEPS)
PROJECT_MODES = ("grad", "step")


@dataclass
class UnlearnResult:
    """What :func:`unlearn` returns.

    Attributes:
        model: the unlearned model (the same object that was passed in, modified in place).
        method: the method that ran.
        steps: optimizer steps taken.
        stopped_early: True when ``stop_forget_acc`` was reached before ``steps``.
        seconds: RTE -- wall-clock seconds of the unlearning steps and the stopping checks,
            excluding the history evaluations.
        history: one dict per evaluation (step 0, every ``eval_every`` steps, the last step):
            ``{"step", "forget_acc", "<name>_acc" for each eval set, **eval_fn(model)}``.
        config: the arguments of the run (JSON-serializable values only).
    """

    model: torch.nn.Module
    method: str
    steps: int
    stopped_early: bool
    seconds: float
    history: List[Dict[str, float]] = field(default_factory=list)
    config: Dict[str, Any] = field(default_factory=dict)


class _BatchStream:
    """Endless seeded batches: a fresh permutation per pass, batches never straddle two passes."""

    def __init__(self, ds, batch_size: int, generator: torch.Generator, device):
        self.ds, self.bs, self.gen, self.device = ds, min(batch_size, len(ds)), generator, device
        # TensorDataset: index the tensors directly instead of collating sample by sample.
        self.tensors = ds.tensors if isinstance(ds, torch.utils.data.TensorDataset) else None
        self.perm, self.pos = None, 0

    def next(self):
        if self.perm is None or self.pos + self.bs > len(self.perm):
            self.perm, self.pos = torch.randperm(len(self.ds), generator=self.gen), 0
        idx = self.perm[self.pos : self.pos + self.bs]
        self.pos += self.bs
        if self.tensors is not None:
            batch = [t[idx] for t in self.tensors]
        else:
            batch = torch.utils.data.default_collate([self.ds[int(i)] for i in idx])
        return [b.to(self.device) if torch.is_tensor(b) else b for b in batch]


def _make_optimizer(optimizer, params, lr, momentum, weight_decay):
    if callable(optimizer) and not isinstance(optimizer, str):
        opt = optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer factory must return a torch.optim.Optimizer, got {type(opt).__name__}"
            )
        return opt
    if lr is None or not lr > 0:
        raise ValueError(f"lr must be a positive float when optimizer={optimizer!r}, got {lr!r}")
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd', 'adam' or a callable(params) -> Optimizer, got {optimizer!r}")


def _orthograd_grad_step(ctx: StepContext, xr, yr, xf, yf) -> None:
    """The paper's step: .grad = alpha * gbar_r - (1 - alpha) * P_perp(u), then any optimizer."""
    ctx.opt.zero_grad()
    # unlearn pass first: the retain factors then never coexist with its activations (lower
    # peak memory); forget(): cheaper coefficients on T = 1 layers, same result
    with ctx.og.forget():
        ctx.forget_obj(ctx.model(xf), yf).backward()
    with ctx.og.retain():
        ctx.loss_fn(ctx.model(xr), yr).backward()
    ctx.og.project_()
    ctx.step()


def _orthograd_step_step(ctx: StepContext, xr, yr, xf, yf) -> None:
    """Project the optimizer's step: .grad = alpha * gbar_r - (1 - alpha) * u (unprojected), the
    base optimizer computes its update, and the wrapped optimizer applies P_perp(update)."""
    ctx.opt.zero_grad()
    with ctx.og.retain():
        ctx.loss_fn(ctx.model(xr), yr).backward()
    # gbar_r from the captured span (under lean retain the backward formed no retain .grad)
    gbar = ctx.og.retain_gradient() if ctx.alpha != 0.0 else None
    (-(1.0 - ctx.alpha) * ctx.forget_obj(ctx.model(xf), yf)).backward()
    if gbar is not None:
        for name, p in ctx.og.parameters:
            g = gbar[name]
            p.grad = ctx.alpha * g if p.grad is None else p.grad.add_(g, alpha=ctx.alpha)
    ctx.step()


def unlearn(
    model: torch.nn.Module,
    forget,
    retain,
    *,
    method: str = "orthograd",
    steps: int = 100,
    lr: Optional[float] = None,
    alpha: Optional[float] = None,
    optimizer: Union[str, Callable[[list], torch.optim.Optimizer]] = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    retain_batch_size: int = 32,
    forget_batch_size: int = 64,
    stop_forget_acc: Optional[float] = None,
    eval_every: int = 0,
    eval_sets: Optional[Mapping[str, Any]] = None,
    eval_fn: Optional[Callable[[torch.nn.Module], Mapping[str, float]]] = None,
    seed: int = 0,
    project: str = "grad",
    forget_loss: str = "ascent",
    scope: str = "tensor",
    backend: str = "auto",
    rtol: Optional[float] = None,
    max_grad_norm: Optional[float] = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    num_classes: Optional[int] = None,
    progress: Union[bool, str] = False,
) -> UnlearnResult:
    """Unlearn ``forget`` from ``model`` (in place) using ``retain`` as the retain budget.

    Args:
        model: a classifier ``model(x) -> logits``; its trainable parameters are updated in place.
            It runs in its current train/eval mode (use eval mode for BatchNorm models: per-sample
            gradients are only defined when samples do not interact).
        forget, retain: torch Datasets yielding ``(x, y)`` or ``(X, y)`` tensor pairs. ``retain`` is
            the retain data the method may use (e.g. 1% of the training set).
        method: ``"orthograd"`` or a baseline: ``"neggrad"``, ``"neggrad+"``, ``"finetune"``,
            ``"random_labels"`` (see :mod:`orthograd_fast.unlearning.baselines`).
        steps: step budget: at most this many steps (one retain + one forget batch each).
        lr: learning rate for ``optimizer="sgd"|"adam"`` (required then).
        alpha: retain weight in ``alpha * gbar_r - (1 - alpha) * P_perp(u)`` (orthograd) and in
            ``alpha * L_r - (1 - alpha) * f`` (neggrad+). Default 0.0 for orthograd, 0.5 for
            neggrad+; must be in [0, 1); ignored by the other baselines.
        optimizer: ``"sgd"``, ``"adam"`` or a factory ``callable(params) -> torch.optim.Optimizer``
            (then ``lr``, ``momentum``, ``weight_decay`` are the factory's business).
        momentum, weight_decay: for the built-in optimizers.
        retain_batch_size, forget_batch_size: per-step batch sizes (capped at the set sizes). The
            retain batch size is the ``B`` of the projection.
        stop_forget_acc: stop as soon as forget-set accuracy (percent, checked on the whole forget
            set before each step) is ``<= stop_forget_acc``; e.g. the test accuracy for random
            forgetting, or 0 for class forgetting. ``None`` runs the full ``steps``.
        eval_every: record a history entry every this many steps (0: only at the start and end).
        eval_sets: ``{name: data}`` whose accuracy is recorded in the history as ``name_acc``.
        eval_fn: ``callable(model) -> {metric: value}`` merged into each history entry.
        seed: seeds batch order, random labels and (inside a forked RNG, so the caller's global
            state is untouched) any randomness in the model's forward such as dropout.
        project: orthograd only. ``"grad"`` projects the gradient (the paper; with SGD the step is
            orthogonal to the retain gradients). ``"step"`` lets the optimizer compute its update
            from the unprojected direction and projects the update (use with Adam, whose
            coordinate scaling breaks the orthogonality of a projected gradient); see
            :mod:`orthograd_fast.optim_wrap`.
        forget_loss: ``"ascent"`` (gradient ascent on ``loss_fn`` over the forget batch, the paper)
            or ``"uniform"`` (descent on the cross-entropy toward the uniform distribution, a bounded
            loss); see :mod:`orthograd_fast.unlearning.losses`.
        max_grad_norm: clip the global norm of the final ``.grad`` (after the projection) to this
            before each optimizer step, for every method. Gradient ascent on a fitted model starts
            on a plateau (the forget cross-entropy is saturated, its gradient tiny) and then
            accelerates; clipping lets a large ``lr`` cross the plateau without overshooting.
            One common factor scales all tensors, so projected directions stay orthogonal.
        scope, backend, rtol: passed to :class:`orthograd_fast.OrthoGrad`.
        loss_fn: ``loss_fn(logits, y)``, a mean or sum of per-sample losses (default cross-entropy).
        num_classes: for ``random_labels`` (default: the logits' last dim).
        progress: show a tqdm progress bar (a string: the bar's label; default the method).

    Returns:
        :class:`UnlearnResult`.
    """
    # ---- argument checks (each names the argument) ------------------------------------------
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if project not in PROJECT_MODES:
        raise ValueError(f"project must be one of {PROJECT_MODES}, got {project!r}")
    if project != "grad" and method != "orthograd":
        raise ValueError(f"project={project!r} applies to method='orthograd' only, got method={method!r}")
    if forget_loss not in FORGET_LOSSES:
        raise ValueError(f"forget_loss must be one of {FORGET_LOSSES}, got {forget_loss!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(eval_every, int) or eval_every < 0:
        raise ValueError(f"eval_every must be an int >= 0, got {eval_every!r}")
    for name, v in (("retain_batch_size", retain_batch_size), ("forget_batch_size", forget_batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
    if alpha is None:
        alpha = 0.5 if method == "neggrad+" else 0.0
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha!r}")
    forget_ds = as_dataset(forget, "forget")
    retain_ds = as_dataset(retain, "retain")
    if len(forget_ds) == 0:
        raise ValueError("forget is empty")
    if len(retain_ds) == 0 and method != "neggrad":
        raise ValueError(f"retain is empty (method {method!r} needs retain samples)")
    eval_sets = {k: as_dataset(v, f"eval_sets[{k!r}]") for k, v in (eval_sets or {}).items()}

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    og = None
    if method == "orthograd":
        og = OrthoGrad(model, scope=scope, alpha=alpha, backend=backend, rtol=rtol)
        params = [p for _, p in og.parameters]
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    opt = _make_optimizer(optimizer, params, lr, momentum, weight_decay)
    if method == "orthograd" and project == "step":
        opt = wrap(og, opt)
        step_fn = _orthograd_step_step
    elif method == "orthograd":
        step_fn = _orthograd_grad_step
    else:
        step_fn = BASELINE_STEPS[method]
    ctx = StepContext(
        model=model,
        opt=opt,
        loss_fn=loss_fn,
        forget_obj=forget_objective(forget_loss, loss_fn),
        alpha=float(alpha),
        generator=gen,
        og=og,
        num_classes=num_classes,
        max_grad_norm=max_grad_norm,
    )
    retain_stream = _BatchStream(retain_ds, retain_batch_size, gen, device) if len(retain_ds) else None
    forget_stream = _BatchStream(forget_ds, forget_batch_size, gen, device)

    history: List[Dict[str, float]] = []

    def record(step: int) -> None:
        entry = {"step": step, "forget_acc": accuracy(model, forget_ds)}
        for name, ds in eval_sets.items():
            entry[f"{name}_acc"] = accuracy(model, ds)
        if eval_fn is not None:
            entry.update(eval_fn(model))
        history.append(entry)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=progress if isinstance(progress, str) else method, leave=False)

    seconds = 0.0
    step = 0
    stopped = False
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        record(0)
        while step < steps:
            t0 = time.perf_counter()
            if stop_forget_acc is not None and accuracy(model, forget_ds) <= stop_forget_acc:
                stopped = True
                seconds += time.perf_counter() - t0
                break
            xr, yr = retain_stream.next() if retain_stream is not None else (None, None)
            xf, yf = forget_stream.next()
            step_fn(ctx, xr, yr, xf, yf)
            step += 1
            seconds += time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
            if eval_every and step % eval_every == 0 and step < steps:
                record(step)
        if history[-1]["step"] != step:
            record(step)
    if bar is not None:
        bar.close()

    config = {
        "method": method,
        "steps": steps,
        "lr": lr,
        "alpha": alpha,
        "optimizer": optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", "custom"),
        "momentum": momentum,
        "weight_decay": weight_decay,
        "retain_batch_size": retain_batch_size,
        "forget_batch_size": forget_batch_size,
        "stop_forget_acc": stop_forget_acc,
        "seed": seed,
        "project": project,
        "forget_loss": forget_loss,
        "scope": scope,
        "backend": backend,
        "rtol": rtol,
        "max_grad_norm": max_grad_norm,
    }
    return UnlearnResult(model, method, step, stopped, seconds, history, config)
