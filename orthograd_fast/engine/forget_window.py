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

Each kept call also tries to *certify* its weight's accumulations, so that later projections need
no numeric check of the factors against ``.grad`` (:meth:`ForgetWindow.certified`). From the call's
output node the autograd graph must be: reshapes, then the layer's GEMM (addmm / mm), then from its
weight operand only transposes and autocast's cast down to the weight's accumulator; and the GEMM
must have read the call's input itself (its saved operand). A post-hook on
the output node takes the output gradient the GEMM consumes (the factor D, so a later hook that
changes it is seen); one on the node that hands the weight its gradient keeps that tensor and its
version. An accumulation is certified when the tensor the weight's accumulator receives *is* one of
those, unchanged (any other consumer of the weight, such as a penalty term, makes autograd sum into a
new tensor or bump the version) and the window's pre-hook is the weight's last. A weight is
certified when every accumulation in the window was and every output gradient a call took was
handed on in one of them.

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
    """One kept call: its input, the output gradient its GEMM consumed (summed over backwards) and
    the certificate's counts (``taken``: output gradients taken; ``certified``: weight gradients
    of this call that reached the accumulator unchanged; ``handed``: the last weight gradient its
    producer node gave and that gradient's version, until an accumulation takes it)."""

    __slots__ = ("x", "gy", "taken", "certified", "handed")

    def __init__(self, x: Tensor):
        self.x = x
        self.gy: Optional[Tensor] = None
        self.taken = 0
        self.certified = 0
        self.handed: Optional[tuple] = None

    def take_hook(self, nr: int):
        """Post-hook of the output's node: the output gradient it consumed."""

        def hook(grad_inputs, grad_outputs):
            g = grad_outputs[nr]
            if g is not None:
                self.gy = g.detach() if self.gy is None else self.gy + g.detach()
                self.taken += 1

        return hook

    def hand_hook(self, slot: int):
        """Post-hook of the node that hands the weight its gradient (its input ``slot``)."""

        def hook(grad_inputs, grad_outputs):
            g = grad_inputs[slot]
            self.handed = None if g is None else (g, g._version)

        return hook


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
        self.uncertain: set = set()  # weights with an accumulation the certificate could not explain
        self.overflow = False
        self._held = 0
        self._handles: list = []
        self._pre_ids: Dict[Tensor, int] = {}  # weight -> id of its pre-hook (must run last)
        # weight -> its layer's calls (the same lists: start() gives each weight one layer)
        self._calls_of: Dict[Tensor, List[_Call]] = {w: self.calls[id(m)] for m, w, _ in layers}

    # --- hooks -------------------------------------------------------------------------------
    def attach(self) -> None:
        self._handles.append(nn.modules.module.register_module_forward_hook(self._forward_hook))
        for p in self.weights:
            h = p.register_hook(self._pre_acc(p))
            self._pre_ids[p] = h.id
            self._handles.append(h)
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
        top = output.grad_fn
        if top is None:  # (an output that is a leaf: no node to take its gradient from)
            self.partial.add(layer[1])
            return None
        # (a strided view, e.g. a class token's column, is copied: it would keep its whole base alive)
        call = _Call(x.detach() if x.is_contiguous() else x.detach().clone())
        top.register_hook(call.take_hook(output.output_nr))
        hand = weight_producer(top, layer[1])
        if hand is None or not _gemm_reads(hand[2], x):
            self.uncertain.add(layer[1])
        else:
            hand[0].register_hook(call.hand_hook(hand[1]))
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
            if p not in self.uncertain and not self._certify(p, grad):
                self.uncertain.add(p)
            if p in self.uncertain:  # (the weight gradients handed on are not needed any more)
                for c in self._calls_of[p]:
                    c.handed = None
            return None

        return hook

    def _certify(self, p: Tensor, grad: Tensor) -> bool:
        """Whether ``grad``, about to be accumulated into ``p.grad``, is exactly the weight gradient
        one kept call's producer node handed on (the certificate: see the module docstring)."""
        hooks = getattr(p, "_backward_hooks", None)
        if not hooks or next(reversed(hooks)) != self._pre_ids[p]:
            return False  # a hook after this one could still change what is accumulated
        for c in self._calls_of[p]:
            h = c.handed
            if h is not None and h[0] is grad and h[1] == grad._version:
                c.handed = None  # (no reference kept: the accumulator may take the tensor over)
                c.certified += 1
                return True
        return False

    def certified(self, p: Tensor) -> bool:
        """Every accumulation into ``p.grad`` in this window was one kept call's weight gradient,
        unchanged, and every output gradient a call took reached the accumulator that way: then
        ``p.grad`` gained exactly sum_k d_k a_k^T over the kept calls (what :meth:`uses` gives)."""
        return p not in self.uncertain and all(c.taken == c.certified and c.handed is None for c in self._calls_of[p])

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


# The certificate's graph between a dense layer's output and its weight's accumulator: reshapes of
# the output (a call over tokens), the GEMM with the weight as its last operand (its slot), then
# transposes (nn.Linear's w.t()) and autocast's cast of the weight.
_RESHAPES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})
_GEMM_SLOT = {"AddmmBackward0": 2, "MmBackward0": 1}
_WEIGHT_SIDE = frozenset({"TBackward0", "ToCopyBackward0"})


def weight_producer(top, w: Tensor) -> Optional[Tuple[object, int, object]]:
    """(node, slot, gemm): the node whose input ``slot`` is the weight gradient of ``w`` from this
    call, found along the graph that ``top`` (the call output's grad_fn) must have for the
    certificate, and the GEMM's node on the way; None where the graph is any other (the call's
    weight gradient is then checked numerically)."""
    try:
        acc = torch.autograd.graph.get_gradient_edge(w).node
    except (AttributeError, RuntimeError):  # (a torch without it; a weight that needs no grad)
        return None
    n = top
    for _ in range(3):
        name = type(n).__name__ if n is not None else ""
        if name in _GEMM_SLOT:
            break
        if name not in _RESHAPES:
            return None
        n = n.next_functions[0][0]
    else:
        return None
    slot = _GEMM_SLOT[name]
    if len(n.next_functions) <= slot:
        return None
    gemm = node = n
    m = n.next_functions[slot][0]
    for _ in range(3):
        if m is acc:
            return node, slot, gemm
        if m is None or type(m).__name__ not in _WEIGHT_SIDE:
            return None
        node, slot, m = m, 0, m.next_functions[0][0]
    return None


def _gemm_reads(gemm, x: Tensor) -> bool:
    """Whether the GEMM of ``gemm`` (a node of :data:`_GEMM_SLOT`) multiplied the call's input ``x``
    itself: its saved data operand is ``x``'s memory (up to a reshape), or, where autocast cast it,
    equal to ``x`` in that dtype. A module whose forward changes its input before the GEMM in some
    calls (one the retain capture saw as one dense op) fails it."""
    try:
        a = gemm._saved_mat1 if type(gemm).__name__ == "AddmmBackward0" else gemm._saved_self
    except (AttributeError, RuntimeError):  # (not saved, or already freed)
        return False
    if not isinstance(a, Tensor) or a.numel() != x.numel() or a.shape[-1] != x.shape[-1]:
        return False
    if a.dtype != x.dtype:  # autocast: the cast copy the GEMM read
        return bool(torch.equal(a, x.detach().to(a.dtype).reshape(a.shape)))
    if x.is_contiguous():
        return a.is_contiguous() and a.data_ptr() == x.data_ptr()
    return a.data_ptr() == x.data_ptr() and a.shape == x.shape and a.stride() == x.stride()
