"""The unlearning application, built on the engine's :class:`orthograd_fast.OrthoGrad`: the
unlearning loop (:func:`unlearn`, in :mod:`.loop`: OrthoGrad and the baselines under one step and
retain budget), the baseline steps and plain training (:mod:`.baselines`), the forget objectives
(:mod:`.losses`), the metrics (:mod:`.metrics`), the datasets and forgetting scenarios
(:mod:`.data`), the demo experiment (:mod:`.demo`) and the ``orthograd-fast`` command line
(:mod:`.cli`). The engine does not import this subpackage.
"""

from .loop import unlearn

__all__ = ["unlearn"]
