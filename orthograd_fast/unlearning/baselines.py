"""Baseline unlearning steps (run through the same loop and budget as OrthoGrad by
:func:`orthograd_fast.unlearning.unlearn`) and plain training for the original model and the
retrain-from-scratch oracle.

Each step function gets a :class:`StepContext` and one retain batch ``(xr, yr)`` and one forget
batch ``(xf, yf)``, leaves ``.grad`` set and calls ``ctx.step()``. ``f`` is the forget
objective (:func:`orthograd_fast.unlearning.losses.forget_objective`): something to *increase*.

- ``neggrad``: ascent on ``f`` over forget batches only (the retain batch is unused).
- ``neggrad+``: descent on ``alpha * L_retain - (1 - alpha) * f`` -- the same weighted combination
  OrthoGrad uses, without the projection, on the same retain batches.
- ``finetune``: descent on ``L_retain`` only (forgetting only through drift).
- ``random_labels``: descent on ``CE(forget, random wrong labels) + L_retain`` (SalUn's RL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .data import as_dataset

__all__ = ["StepContext", "BASELINE_STEPS", "train_model", "retrain"]


@dataclass
class StepContext:
    model: torch.nn.Module
    opt: Any
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    forget_obj: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    alpha: float
    generator: torch.Generator
    og: Any = None
    num_classes: Optional[int] = None
    max_grad_norm: Optional[float] = None

    def step(self) -> None:
        """Clip the global gradient norm (if asked) and take the optimizer step.

        Clipping scales every ``.grad`` by one common factor, so a projected direction stays
        orthogonal to the retain gradients.
        """
        if self.max_grad_norm is not None:
            params = [p for group in self.opt.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.opt.step()


def _neggrad(ctx: StepContext, xr, yr, xf, yf) -> None:
    ctx.opt.zero_grad()
    (-ctx.forget_obj(ctx.model(xf), yf)).backward()
    ctx.step()


def _neggrad_plus(ctx: StepContext, xr, yr, xf, yf) -> None:
    ctx.opt.zero_grad()
    # Two backward passes (not one summed loss) so peak memory matches OrthoGrad's step.
    (ctx.alpha * ctx.loss_fn(ctx.model(xr), yr)).backward()
    (-(1.0 - ctx.alpha) * ctx.forget_obj(ctx.model(xf), yf)).backward()
    ctx.step()


def _finetune(ctx: StepContext, xr, yr, xf, yf) -> None:
    ctx.opt.zero_grad()
    ctx.loss_fn(ctx.model(xr), yr).backward()
    ctx.step()


def _random_labels(ctx: StepContext, xr, yr, xf, yf) -> None:
    ctx.opt.zero_grad()
    logits = ctx.model(xf)
    k = ctx.num_classes if ctx.num_classes is not None else logits.shape[-1]
    # A uniformly random *wrong* label: the true label plus an offset in 1..k-1, modulo k.
    offset = torch.randint(1, k, yf.shape, generator=ctx.generator).to(yf.device)
    ctx.loss_fn(logits, (yf + offset) % k).backward()
    ctx.loss_fn(ctx.model(xr), yr).backward()
    ctx.step()


BASELINE_STEPS = {
    "neggrad": _neggrad,
    "neggrad+": _neggrad_plus,
    "finetune": _finetune,
    "random_labels": _random_labels,
}


def train_model(
    model: torch.nn.Module,
    data,
    *,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
    loss_fn: Callable = torch.nn.functional.cross_entropy,
    progress: bool = False,
    desc: str = "train",
) -> torch.nn.Module:
    """Train ``model`` in place with Adam on ``data`` (Dataset or ``(X, y)``) for ``epochs``.

    Shuffling uses a generator seeded by ``seed``; the caller's global RNG state is left alone.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs!r}")
    ds = as_dataset(data, "data")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, generator=gen)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    model.train()
    it = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, leave=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in it:
            for xb, yb in loader:
                opt.zero_grad()
                loss_fn(model(xb.to(device)), yb.to(device)).backward()
                opt.step()
    return model


def retrain(model_fn: Callable[[], torch.nn.Module], retain, **train_kwargs) -> torch.nn.Module:
    """The oracle: a fresh ``model_fn()`` trained from scratch on the full ``retain`` set.

    ``train_kwargs`` go to :func:`train_model` (use the original model's recipe).
    """
    return train_model(model_fn(), retain, **train_kwargs)

