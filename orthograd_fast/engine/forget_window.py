"""The hooks behind ``og.forget()`` and the armed unlearn capture: one *window* of unlearn passes.

A window keeps, for one-token calls of dense layers (a module whose call is one F.linear / addmm
from its input to its output, as the retain capture confirms: nn.Linear, transformers' Conv1D; a
call whose input has one row per sample, as in an MLP or a classifier head), the layer input and
output gradient: the unlearn gradient of the weight is then ``sum_k d_k a_k^T`` over those calls.
Layers the window is told to (``many``: a few tokens per sample) also keep calls over several
tokens, as one row per token (the sum over rows is the same however they group into samples). It also
follows every tracked weight's ``.grad`` through the backward:

* a pre-hook sees ``.grad`` just before each accumulation: it must be None (first pass of the
  step) or exactly the tensor and version the previous accumulation left, else the factors cannot
  describe ``.grad`` (something else wrote into it) and the weight is marked bad;
* a post-accumulate hook records ``(.grad, ._version)`` after each accumulation, so any later
  change (clipping, replacement) is seen at ``project_()`` as a version or identity mismatch.

The layer hook is a process-wide module forward hook (filtered to the window's layers), not one
stored on the modules: a ``copy.deepcopy`` or pickle of the model while a window is open carries
no hook of it. Forwards without grad record nothing; forwards of any batch size may follow each
other. The layer inputs held stay under ``max_bytes``; past that the window gives up (its weights
fall back to the coefficient GEMM) and drops what it held.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .factors import OuterFactors


class _Call:
    __slots__ = ("x", "gy")

    def __init__(self, x: Tensor):
        self.x = x
        self.gy: Optional[Tensor] = None

    def grad_hook(self, g: Tensor) -> None:
        self.gy = g.detach() if self.gy is None else self.gy + g.detach()


class ForgetWindow:
    """One ``og.forget()`` block, or the capture armed between ``retain()`` and ``project_()``.

    ``layers``: (module, weight, transposed) of the dense layers (transposed: the weight is stored
    [in, out]; None: not known yet, read from the shapes where the weight is not square).
    ``expected``: per weight, the (.grad, version) an earlier window left (the first accumulation
    here must start from it; a weight without one must start from None). ``many``: id() of the
    weights whose calls over several tokens are kept too."""

    def __init__(self, layers: List[Tuple[nn.Module, Tensor, bool]], expected: Dict[Tensor, tuple], max_bytes: int, many: frozenset = frozenset()):
        self.layers = {id(m): (m, w, tr) for m, w, tr in layers}
        self.many = many
        self.weights = list({id(w): w for _, w, _ in layers}.values())
        self.expected = expected
        self.max_bytes = int(max_bytes)
        self.calls: Dict[int, List[_Call]] = {k: [] for k in self.layers}
        self.partial: set = set()  # weights of a layer with a call that was not kept (several tokens)
        self.seen: Dict[Tensor, Tuple[Tensor, int]] = {}  # weight -> (.grad, version) after its last accumulation
        self.bad: set = set()
        self.overflow = False
        self._held = 0
        self._handles: list = []

    # --- hooks -------------------------------------------------------------------------------
    def attach(self) -> None:
        self._handles.append(nn.modules.module.register_module_forward_hook(self._forward_hook))
        for p in self.weights:
            self._handles.append(p.register_hook(self._pre_acc(p)))
            self._handles.append(p.register_post_accumulate_grad_hook(self._post_acc))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(self, module, args, output):
        layer = self.layers.get(id(module))
        if layer is None or self.overflow or not torch.is_grad_enabled():
            return None
        if not isinstance(output, Tensor) or not output.requires_grad:
            return None
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if (
            x is None
            or not x.is_floating_point()
            or x.dim() < 2
            or output.shape[:-1] != x.shape[:-1]
            or (x[0].numel() != x.shape[-1] and id(layer[1]) not in self.many)
        ):
            self.partial.add(layer[1])
            return None
        # (a strided view, e.g. a class token's column, is copied: it would keep its whole base alive)
        call = _Call(x.detach() if x.is_contiguous() else x.detach().clone())
        output.register_hook(call.grad_hook)
        self.calls[id(module)].append(call)
        self._held += x.numel() * x.element_size() + output.numel() * output.element_size()
        if self._held > self.max_bytes:
            self.give_up()
        return None

    def give_up(self) -> None:
        """Too much held: drop the recorded calls; every weight falls back to the GEMM."""
        self.overflow = True
        for v in self.calls.values():
            v.clear()
        self._held = 0

    def _pre_acc(self, p: Tensor):
        def hook(grad):
            exp = self.seen.get(p, self.expected.get(p))
            g = p.grad
            if not (g is None if exp is None else (g is exp[0] and g._version == exp[1])):
                self.bad.add(p)
            return None

        return hook

    def _post_acc(self, p: Tensor) -> None:
        if p.grad is not None:  # (an undefined gradient visits the accumulator without writing)
            self.seen[p] = (p.grad, p.grad._version)

    # --- factors -----------------------------------------------------------------------------
    def uses(self) -> Dict[Tensor, List[OuterFactors]]:
        """{weight: [one OuterFactors per call whose output gradient arrived]} (g = sum_k d_k a_k^T)."""
        out: Dict[Tensor, List[OuterFactors]] = {}
        for key, calls in self.calls.items():
            _, w, transposed = self.layers[key]
            if transposed is None and calls:
                transposed = _orientation(w, calls[0])
                if transposed is None:
                    self.partial.add(w)
                    continue
            I, O = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
            for c in calls:
                if c.gy is None:
                    continue  # a forward whose output never reached a backward
                n = c.x.numel() // max(1, I)  # rows: samples, or samples x tokens
                if c.x.shape[-1] != I or c.gy.shape != c.x.shape[:-1] + (O,):
                    self.partial.add(w)
                    continue
                out.setdefault(w, []).append(OuterFactors(c.x.reshape(n, 1, 1, I), c.gy.reshape(n, 1, 1, O), None, (1, O, I), transposed))
        return out


def _orientation(w: Tensor, call: _Call) -> Optional[bool]:
    """Whether ``w`` is stored [in, out] (True) or [out, in] (False), read from one call's input
    [..., I] and output gradient [..., O]; None where the shapes cannot tell (I == O)."""
    if call.gy is None:
        return None
    I, O = call.x.shape[-1], call.gy.shape[-1]
    if I == O:
        return None
    if tuple(w.shape) == (I, O):
        return True
    return False if tuple(w.shape) == (O, I) else None
