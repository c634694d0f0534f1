"""Exceptions raised by orthograd-fast (each message names the module or argument at fault)."""


class CaptureError(RuntimeError):
    """The captured retain pass cannot give per-sample gradients (layout, missed use, no backward)."""


class UnsupportedModule(RuntimeError):
    """A module whose per-sample gradients are not defined or not supported."""


class ReplayMismatch(RuntimeError):
    """The torch.func replay of a fallback module did not reproduce the captured call's output."""


class DistributedError(RuntimeError):
    """Ranks disagree (sizes, parameter lists) or the process group cannot do what a step needs."""


class OrthoGradError(RuntimeError):
    """Misuse of the OrthoGrad API (order of calls, changed model, bad values)."""
