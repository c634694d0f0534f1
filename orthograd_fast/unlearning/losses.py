"""Forget losses for the unlearning loop.

Sign convention (shared with :meth:`OrthoGrad.project_`): the loop backpropagates a *forget
objective* ``f`` and ``project_()`` turns its gradient ``u`` into the step ``p -= lr * (alpha *
gbar_r - (1 - alpha) * P_perp(u))``, i.e. gradient **ascent** on ``f``. So a forget objective is
something to be *increased*:

- ``"ascent"``: ``f = CE(logits, y)`` -- the paper's choice; unbounded, the forget loss can run
  away once the forget samples are misclassified.
- ``"uniform"``: ``f = -CE(logits, uniform)`` -- ascent on it is descent on the cross-entropy
  toward the uniform distribution, which is bounded below by ``log K`` and reached when the model
  outputs ``1/K`` for every class: forgetting stops at "no information" instead of pushing the
  forget samples to confidently wrong classes.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["uniform_cross_entropy", "forget_objective", "FORGET_LOSSES"]

FORGET_LOSSES = ("ascent", "uniform")


def uniform_cross_entropy(logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy from the uniform distribution over the last dim to ``softmax(logits)``.

    Per sample: ``-(1/K) * sum_k log softmax(logits)_k``; its minimum ``log K`` is reached at
    uniform predictions and its gradient w.r.t. the logits, ``softmax - 1/K``, is bounded.
    ``reduction`` is ``"mean"``, ``"sum"`` or ``"none"`` over the leading dims.
    """
    per = -F.log_softmax(logits, dim=-1).mean(dim=-1)
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    if reduction == "none":
        return per
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def forget_objective(
    forget_loss: str, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return ``f(logits, y)``: the quantity whose gradient the loop *ascends* on forget batches.

    ``"ascent"`` -> ``loss_fn(logits, y)``; ``"uniform"`` -> ``-uniform_cross_entropy(logits)``
    (negated so that the same ascent sign of ``project_()`` minimizes the bounded loss).
    """
    if forget_loss == "ascent":
        return loss_fn
    if forget_loss == "uniform":
        return lambda logits, y: -uniform_cross_entropy(logits)
    raise ValueError(f"forget_loss must be one of {FORGET_LOSSES}, got {forget_loss!r}")
