"""Hugging Face ``transformers`` integration: :class:`OrthoGradTrainer`.

A :class:`transformers.Trainer` whose every training step is an OrthoGrad unlearning step::

    trainer = OrthoGradTrainer(
        model=model, args=TrainingArguments(..., optim="sgd", learning_rate=1e-3),
        forget_dataset=forget_ds,          # the Trainer's train_dataset: one forget batch per step
        retain_dataset=retain_ds,          # one retain batch per step, same data_collator
        data_collator=collator, alpha=0.0,
    )
    trainer.train()

Per (micro-)step: the forget batch's loss is backpropagated (``.grad = u``), a retain batch runs
forward + backward inside ``og.retain()`` (factors captured, ``.grad`` untouched), and
``og.project_()`` turns it into ``alpha * gbar_r - (1 - alpha) * P_perp(u)``: the Trainer's
optimizer then takes gradient *ascent* on the forget loss orthogonally to every retain sample's
gradient. Losses are the model's own (``outputs.loss``, e.g. the token-mean LM loss, a weighted
sum of per-sample losses, which the projection does not mind).

Only trainable parameters are managed: with a PEFT (LoRA) model only the adapter weights are
projected and stepped; the frozen base weights never change.

Gradient accumulation works: each micro-batch is projected against its own retain batch before it
is added to what earlier micro-batches accumulated. The Trainer's gradient clipping
(``max_grad_norm``) scales all gradients by one factor and keeps the orthogonality; optimizers
that rescale coordinates (AdamW, the Trainer's default) do not: use ``optim="sgd"`` for the
paper's step, or see :mod:`orthograd_fast.optim_wrap` for projecting the optimizer step.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Union

import torch

try:
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "orthograd_fast.integrations.hf needs transformers: pip install \"orthograd-fast[hf]\""
    ) from e

from ..unlearning.losses import uniform_cross_entropy

__all__ = ["OrthoGradTrainer", "uniform_forget_objective"]


def uniform_forget_objective(model: torch.nn.Module, inputs: Dict[str, Any]) -> torch.Tensor:
    """``-CE(uniform, softmax(logits))`` over the positions that carry a label.

    Ascending it (as the trainer does with every forget objective) drives the predictions at the
    labelled positions toward the uniform distribution: the bounded forget loss of
    :mod:`orthograd_fast.unlearning.losses`. Causal LMs predict position ``t+1`` from ``t``, so
    their logits are shifted by one against the labels; encoder-decoder models
    (``config.is_encoder_decoder``, e.g. Whisper) are not. Positions labelled ``-100`` are ignored.
    """
    outputs = model(**inputs)
    logits, labels = outputs.logits, inputs["labels"]
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    mask = labels != -100
    if not bool(mask.any()):
        raise ValueError("uniform_forget_objective: the forget batch has no labelled position (all labels are -100)")
    return -uniform_cross_entropy(logits[mask].float())


class OrthoGradTrainer(Trainer):
    """``transformers.Trainer`` that unlearns ``forget_dataset`` with OrthoGrad.

    Args (besides the Trainer's own):
        forget_dataset: the data to forget; it becomes the Trainer's ``train_dataset`` (passing
            ``train_dataset=`` instead works too). Its batches use ``per_device_train_batch_size``.
        retain_dataset: the retain data; one batch of ``retain_batch_size`` per step (shuffled,
            seeded by ``args.seed``, cycled), collated with the Trainer's ``data_collator``.
        retain_batch_size: default ``args.per_device_train_batch_size``. It is the ``B`` of the
            projection.
        alpha, scope, backend, rtol: passed to :class:`orthograd_fast.OrthoGrad`.
        forget_objective: what the step ascends on a forget batch: ``"ascent"`` (the model's loss;
            the paper), ``"uniform"`` (:func:`uniform_forget_objective`, bounded), or a callable
            ``(model, inputs) -> scalar`` to be *increased*.

    After ``train()``, ``trainer.og`` is the :class:`~orthograd_fast.OrthoGrad` used, and
    ``trainer.og.stats`` describes the last projection.
    """

    def __init__(
        self,
        *args,
        forget_dataset=None,
        retain_dataset=None,
        retain_batch_size: Optional[int] = None,
        alpha: float = 0.0,
        scope: str = "tensor",
        backend: str = "auto",
        rtol: Optional[float] = None,
        forget_objective: Union[str, Callable[[torch.nn.Module, Dict[str, Any]], torch.Tensor]] = "ascent",
        **kwargs,
    ):
        if forget_dataset is not None:
            if kwargs.get("train_dataset") is not None:
                raise ValueError("OrthoGradTrainer: pass the forget set as forget_dataset or train_dataset, not both")
            kwargs["train_dataset"] = forget_dataset
        if retain_dataset is None:
            raise ValueError("OrthoGradTrainer: retain_dataset is required (the retain samples to stay orthogonal to)")
        if retain_batch_size is not None and (not isinstance(retain_batch_size, int) or retain_batch_size < 1):
            raise ValueError(f"OrthoGradTrainer: retain_batch_size must be an int >= 1, got {retain_batch_size!r}")
        if isinstance(forget_objective, str):
            if forget_objective not in ("ascent", "uniform"):
                raise ValueError(
                    f"OrthoGradTrainer: forget_objective must be 'ascent', 'uniform' or a callable, got {forget_objective!r}"
                )
        elif not callable(forget_objective):
            raise TypeError("OrthoGradTrainer: forget_objective must be 'ascent', 'uniform' or a callable")
        super().__init__(*args, **kwargs)
        self.retain_dataset = retain_dataset
        self.retain_batch_size = retain_batch_size or self.args.per_device_train_batch_size
        self.og_kwargs = dict(alpha=alpha, scope=scope, backend=backend, rtol=rtol)
        self.forget_objective = forget_objective
        self.og = None
        self._retain_iter = None
        self._retain_loader = None

    # ------------------------------------------------------------------------------------------
    def _retain_batch(self) -> Dict[str, Any]:
        if self._retain_loader is None:
            collator = self.data_collator
            # The Trainer drops dataset columns the model's forward does not accept; do the same.
            drop = getattr(self, "_get_collator_with_removed_columns", None)
            if drop is not None:
                collator = drop(collator, description="retain")
            gen = torch.Generator().manual_seed(int(self.args.seed))
            self._retain_loader = torch.utils.data.DataLoader(
                self.retain_dataset, batch_size=self.retain_batch_size, shuffle=True,
                collate_fn=collator, generator=gen, drop_last=False,
            )
        for _ in range(2):  # a fresh pass when the current one is exhausted
            if self._retain_iter is None:
                self._retain_iter = iter(self._retain_loader)
            try:
                return self._prepare_inputs(next(self._retain_iter))
            except StopIteration:
                self._retain_iter = None
        raise ValueError("OrthoGradTrainer: retain_dataset is empty")

    def _forget_value(self, model, inputs) -> torch.Tensor:
        if self.forget_objective == "ascent":
            return self.compute_loss(model, inputs)
        if self.forget_objective == "uniform":
            return uniform_forget_objective(model, inputs)
        return self.forget_objective(model, inputs)

    def training_step(self, model: torch.nn.Module, inputs: Dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """One OrthoGrad step's gradients: forget pass, retain pass (captured), projection.

        ``num_items_in_batch`` is not used: each micro-batch's losses are batch means, scaled by
        1/(gradient accumulation steps) like the Trainer's own loss.
        """
        from ..api import OrthoGrad

        model.train()
        if self.og is None:
            self.og = OrthoGrad(model, **self.og_kwargs)
        og = self.og
        inputs = self._prepare_inputs(inputs)
        retain_inputs = self._retain_batch()
        ga = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        params = [p for _, p in og.parameters]
        # What earlier micro-batches accumulated must not enter this micro-batch's projection.
        stash = [p.grad for p in params]
        for p in params:
            p.grad = None
        # forget pass first (lower peak memory: the retain factors never coexist with its
        # activations), under og.forget() (cheaper coefficients on T = 1 layers; same result)
        with og.forget():
            with self.compute_loss_context_manager():
                forget_value = self._forget_value(model, inputs) / ga
            self.accelerator.backward(forget_value)
        with og.retain():
            with self.compute_loss_context_manager():
                retain_loss = self.compute_loss(model, retain_inputs) / ga
            self.accelerator.backward(retain_loss)
        og.project_()
        for p, g in zip(params, stash):
            if g is not None:
                p.grad.add_(g)
        return forget_value.detach()
