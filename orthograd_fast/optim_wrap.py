"""Project the optimizer's *step* instead of the gradient.

Orthogonality to the retain per-sample gradients holds for whatever vector is projected. With SGD
the step is ``-lr * grad``, so projecting the gradient (``og.project_()``, the paper) already makes
the parameter change orthogonal. Adam (and any optimizer with per-coordinate scaling or momentum)
rescales coordinates, so a projected gradient gives a step that is *not* orthogonal to the retain
gradients any more. :func:`wrap` fixes that: it lets the base optimizer take its step, measures the
change ``delta = p_new - p_old``, and replaces it by ``P_perp(delta)`` computed from the same retain
factors (``og.project_vectors``), so the applied change is orthogonal to the current retain batch's
per-sample gradients (to first order, their losses do not move).

The optimizer's internal state (Adam moments) still sees the unprojected gradient; only the applied
update is projected. Note that ``P_perp`` removes everything in the span of the retain gradients,
including a retain-descent term ``alpha * gbar_r`` in ``.grad``; with ``project="step"`` that term
only survives through the optimizer's momentum from earlier batches.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

__all__ = ["wrap", "StepProjectedOptimizer"]


class StepProjectedOptimizer:
    """A thin wrapper around a torch optimizer whose applied update is projected by ``P_perp``.

    Use exactly like the base optimizer::

        opt = wrap(og, torch.optim.Adam(model.parameters(), lr=1e-3))
        opt.zero_grad()
        with og.retain():
            retain_loss.backward()
        (-forget_loss).backward()      # .grad = the direction to *descend*; no og.project_() here
        opt.step()                      # Adam step, then P_perp on the parameter change

    Parameters of the optimizer that ``og`` does not manage are stepped unprojected.
    """

    def __init__(self, og: Any, optimizer: torch.optim.Optimizer):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.og = og
        self.optimizer = optimizer

    # --- the optimizer protocol -------------------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        """Base step, then replace each managed parameter's change by its projection."""
        managed = [(n, p) for n, p in self.og.parameters]
        # Build the projector from the retain factors *before* the base step changes the weights:
        # the engine refuses factors whose parameters were modified since the retain pass.
        self.og.prepare()
        before = {n: p.detach().clone() for n, p in managed}
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        deltas = {n: p.detach() - before[n] for n, p in managed}
        projected = self.og.project_vectors(deltas)
        for n, p in managed:
            p.copy_(before[n] + projected[n].to(p.dtype))
        # The captured retain factors describe the weights before this step: drop them so the
        # next retain() block starts a fresh span instead of accumulating onto stale factors.
        reset = getattr(self.og, "reset", None)
        if reset is not None:
            reset()
        return loss

    def __repr__(self) -> str:
        return f"StepProjectedOptimizer({self.optimizer!r})"


def wrap(og: Any, optimizer: torch.optim.Optimizer) -> StepProjectedOptimizer:
    """Return ``optimizer`` wrapped so that each step's parameter change is projected by ``og``.

    ``og`` is an :class:`~orthograd_fast.OrthoGrad` whose ``retain()`` block has run for the
    current step (its factors define ``P_perp``). See :class:`StepProjectedOptimizer`.
    """
    return StepProjectedOptimizer(og, optimizer)
