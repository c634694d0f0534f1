"""Activation checkpointing inside ``og.retain()``.

``torch.utils.checkpoint`` recomputes a segment's forward during the backward, and the recompute
runs without the torch function mode that captures the retain pass (only a device context is
re-entered). Non-reentrant (``use_reentrant=False``): where the capture changed the forward (a
parameter expanded along the batch in a broadcasting op, e.g. an RMSNorm weight multiplied in)
the recomputed saved tensors differ and torch raises ``CheckpointError``; elsewhere the recompute
reproduces the forward and the step is exact. Reentrant: the segment's forward runs under
``no_grad``, so no module captures it, and its parameters' retain gradients come from an unseen
use (checks.py says so).

The capture holds the captured layers' inputs until the backward, so checkpointing saves little
memory inside the block: Hugging Face's per-module flag (``module.gradient_checkpointing``, set by
``gradient_checkpointing_enable()``) is turned off for the block and restored on leaving it; other
checkpointing that fails gets an error that names the cause.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from torch import nn
from torch.utils.checkpoint import CheckpointError

from ..errors import CaptureError

ADVICE = (
    "turn activation checkpointing off for the retain pass (inside og.retain() the capture holds the "
    "layers' inputs anyway, so it saves little there; the unlearn pass may keep it)"
)


def flag_modules(model: nn.Module) -> list:
    """The modules of ``model`` with Hugging Face's ``gradient_checkpointing`` attribute (its
    models set it, False, when they are built; ``gradient_checkpointing_enable()`` turns it on)."""
    return [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]


@contextlib.contextmanager
def hf_flags_off(modules: list) -> Iterator[int]:
    """Hugging Face's activation checkpointing off for the block in ``modules`` (the model's
    :func:`flag_modules`, found once), restored on leaving it, also by an exception; yields the
    number of modules whose flag was on."""
    on = [m for m in modules if getattr(m, "gradient_checkpointing", None) is True]
    for m in on:
        m.gradient_checkpointing = False
    try:
        yield len(on)
    finally:
        for m in on:
            m.gradient_checkpointing = True


def explain(err: BaseException) -> Optional[CaptureError]:
    """A CaptureError for torch's checkpoint error raised in the retain backward, else None."""
    if not isinstance(err, CheckpointError):
        return None
    return CaptureError(
        "activation checkpointing (torch.utils.checkpoint, use_reentrant=False) inside og.retain(): its "
        "recompute in the backward runs outside the capture, which changes some operations' saved tensors "
        f"(a parameter expanded along the batch in a broadcasting op); {ADVICE}."
    )
