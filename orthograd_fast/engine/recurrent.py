"""nn.LSTM / nn.GRU / nn.RNN inside ``retain()``: an unrolled forward whose weights are Linear uses.

The fused recurrent kernel hides its per-step products, so inside ``retain()`` the module runs an
unrolled copy of its recurrence (checked against the module's own output on the first call). Per
layer and direction:

* input-to-hidden: one linear over all time steps, x [B, T, I] -> gates [B, T, G]: an OuterFactors with
  A = x and D = the gates' gradient (its bias: the token sum of D);
* hidden-to-hidden: per step h_{t-1} [B, H] -> [B, G]; stacked over steps it is one OuterFactors with
  A = [h_{t-1}]_t [B, T, H] and D = the per-step gradients [B, T, G]. For LSTM and RNN the step's
  pre-activation is gates_x[:, t] + W_hh h_{t-1} (+ both biases, folded into gates_x), so that
  gradient is the input-to-hidden one's token t: one gradient hook per layer and direction, and
  per step only the recurrence's own operations. An LSTM layer and direction is one autograd
  node with its own backward through time that writes D directly
  (:mod:`orthograd_fast.engine.lstm_layer`). (The capture runs the unrolled forward outside its
  operation mode and tags only the outputs.)

A PackedSequence input is padded (in the caller's batch order) and each sample's state stops at
its last step, both directions (PyTorch's packed semantics); the LSTM then takes the per-step path
with hooks, like GRU, and the outputs are packed again like the input.

Gate order and formulas are PyTorch's (LSTM i, f, g, o; GRU r, z, n with the hidden bias inside
r * (W_hn h + b_hn)).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .batch_layout import tensors_in
from .param_space import anchored
from ..errors import CaptureError, UnsupportedModule
from .factors import ExplicitRows, OuterFactors
from .lstm_layer import GateGrads, LSTMLayer
from .rules.cells import gru_gates, lstm_gates

# relative / absolute tolerance of the first-call check against the fused module (float32 rounding)
CHECK_RTOL, CHECK_ATOL = 1e-4, 1e-5


def refuse_reason(m: nn.RNNBase) -> str:
    if getattr(m, "proj_size", 0):
        return f"{type(m).__name__} with proj_size > 0 is not supported; build it with proj_size=0 or freeze it."
    if m.mode not in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"):
        return f"{type(m).__name__} (mode {m.mode}) is not supported."
    return ""


class _Grads:
    """Output gradients of one tensor, summed over backward visits."""

    def __init__(self):
        self.g = None

    def __call__(self, g):
        self.g = g.detach() if self.g is None else self.g + g.detach()


class RecurrentCall:
    """One call of a recurrent module: the unrolled forward and what it recorded."""

    def __init__(self, module: nn.RNNBase, name: str, lean: bool, dtype: Optional[torch.dtype] = None):
        self.module = module
        self.name = name
        self.lean = lean
        self.dtype = dtype  # the recurrence's dtype (compute_dtype): half weights are cast to it
        self.parts: List[tuple] = []  # (weight name, bias name, A [B, T, I], [grad holders per token])
        self.fold = 1  # sequences per sample: the batch folded into the sequences' dim, sample by sample

    def _w(self, name):
        p = getattr(self.module, name, None)
        if p is None:
            return None
        p = p.detach() if self.lean and p.requires_grad else p
        return p.to(self.dtype) if self.dtype is not None and p.dtype != self.dtype else p

    def _real(self):
        return [p for p in self.module.parameters() if p.requires_grad] if self.lean else []

    def _linear(self, x, wn, bn, A_rows: list, holders: list, bias=None):
        """F.linear(x, W[wn], b[bn]) with a hook for its output gradient; ``bias``: a bias tensor
        to use instead of b[bn] (LSTM / RNN: both biases, summed)."""
        y = anchored(F.linear(x, self._w(wn), self._w(bn) if bias is None else bias), self._real())
        A_rows.append(x.detach())
        h = _Grads()
        if y.requires_grad:
            y.register_hook(h)
        holders.append(h)
        return y

    def forward(self, input, hx=None):
        m = self.module
        packed = isinstance(input, nn.utils.rnn.PackedSequence)
        if not packed and input.dim() != 3:
            raise CaptureError(f"module '{self.name}' ({type(m).__name__}): the retain pass needs a batched input [B, T, I]")
        if m.dropout and m.training and m.num_layers > 1:
            raise UnsupportedModule(
                f"module '{self.name}' ({type(m).__name__}) applies dropout between layers in training mode; use "
                "module.eval() or dropout=0 for the retain pass."
            )
        mask = None  # [B, T]: the steps each sample has (a PackedSequence input)
        if packed:
            # the sequences padded in the caller's batch order (hx and h_n are in it too); a
            # sample's state stops at its last step (PyTorch's packed semantics, both directions)
            # (its data already in the recurrence's dtype: full_precision)
            x, lengths = nn.utils.rnn.pad_packed_sequence(input, batch_first=True)
            mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]
        else:
            x = input if m.batch_first else input.transpose(0, 1)
        B, T, _ = x.shape
        L, nd, H = m.num_layers, 2 if m.bidirectional else 1, m.hidden_size
        lstm = m.mode == "LSTM"
        if hx is None:
            z = x.new_zeros(L * nd, B, H)
            h0, c0 = z, z
        elif lstm:
            h0, c0 = hx
        else:
            h0, c0 = hx, None
        hn, cn = [], []
        layer_in = x
        for layer in range(L):
            outs = []
            for d in range(nd):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                wih, whh = "weight_ih" + sfx, "weight_hh" + sfx
                bih, bhh = ("bias_ih" + sfx, "bias_hh" + sfx) if m.bias else (None, None)
                h, c = h0[layer * nd + d], (c0[layer * nd + d] if lstm else None)
                steps = range(T) if d == 0 else reversed(range(T))
                hs = [None] * T
                A_ih, g_ih = [], []
                # the steps' gate inputs by one unbind: its backward stacks their gradients once,
                # where an index per step would fill a zero [B, T, G] gradient per step
                if m.mode == "GRU" or (lstm and mask is not None):
                    # GRU: the hidden bias sits inside r * (W_hn h + b_hn); an LSTM over packed
                    # sequences: a state that stops at each sample's last step. Per-step hooks.
                    A_hh, g_hh = [], []
                    gx = self._linear(layer_in, wih, bih, A_ih, g_ih).unbind(1)
                    for t in steps:
                        gh = self._linear(h, whh, bhh, A_hh, g_hh)
                        if lstm:
                            h_t, c_t = lstm_gates(gx[t], gh, c)
                            c = _masked(mask, t, c_t, c)
                        else:
                            h_t = gru_gates(gx[t], gh, h)
                        h = _masked(mask, t, h_t, h)
                        hs[t] = h
                    self.parts.append((wih, bih, A_ih, g_ih, False))
                    self.parts.append((whh, bhh, A_hh, g_hh, True))
                elif lstm:  # one autograd node per layer and direction (lstm_layer)
                    both = self._w(bih) + self._w(bhh) if m.bias else None
                    sink = GateGrads()
                    hs, h, c = LSTMLayer.apply(layer_in, h, c, self._w(wih), self._w(whh), both, sink, bool(d), *self._real())
                    self.parts.append((wih, bih, [layer_in.detach()], [sink], False))
                    self.parts.append((whh, bhh, [sink], [sink], False))
                else:
                    both = self._w(bih) + self._w(bhh) if m.bias else None
                    gx = self._linear(layer_in, wih, bih, A_ih, g_ih, bias=both).unbind(1)
                    Wt = self._w(whh).t()
                    prev = []  # h_{t-1} of each step, in step order
                    for t in steps:
                        prev.append(h)
                        h = _masked(mask, t, _rnn_step(m.mode, torch.addmm(gx[t], h, Wt)), h)
                        hs[t] = h
                    if d:  # tokens in time order, like gates_x
                        prev.reverse()
                    self.parts.append((wih, bih, A_ih, g_ih, False))
                    self.parts.append((whh, bhh, [torch.stack(prev, 1).detach()], g_ih, False))
                outs.append(hs if isinstance(hs, Tensor) else torch.stack(hs, 1))
                hn.append(h)
                cn.append(c)
            layer_in = torch.cat(outs, -1) if nd == 2 else outs[0]
            if m.dropout and layer < L - 1 and m.training:
                layer_in = F.dropout(layer_in, m.dropout, True)
        if packed:
            out = _repack(layer_in, input)
        else:
            out = layer_in if m.batch_first else layer_in.transpose(0, 1)
        h_n = torch.stack(hn)
        return (out, (h_n, torch.stack(cn))) if lstm else (out, h_n)

    def uses(self, B: int) -> Dict[Tensor, list]:
        """{param: [uses]} over the retain batch B: with ``fold`` k > 1 sequences per sample
        (timm's Sequencer runs its LSTMs over the rows and the columns of each image), a sample's
        k sequences' steps are its tokens."""
        m = self.module
        uses: Dict[Tensor, list] = {}
        k = self.fold
        tokens = (lambda t: t.reshape(B, k * t.shape[1], t.shape[2])) if k > 1 else (lambda t: t)  # noqa: E731
        # a bias's rows are its gates' gradients summed over the steps: an LSTM layer's and an
        # RNN's input and hidden biases share one D, so they share the sum (one read of D)
        sums: Dict[int, tuple] = {}  # id(D) -> (D, its sum): D kept, so no id is reused
        for wn, bn, A_rows, holders, per_step in self.parts:
            if all(h.g is None for h in holders):
                continue
            if per_step:  # one token per step: stack the steps as tokens
                A = torch.stack(A_rows, 1)
                D = torch.stack([h.g if h.g is not None else A_rows[0].new_zeros(A_rows[0].shape[0], getattr(m, wn).shape[0]) for h in holders], 1)
            else:  # A_rows[0]: the input, or the LSTM layer's GateGrads (the h each step started from)
                A = A_rows[0].h_prev if isinstance(A_rows[0], GateGrads) else A_rows[0]
                D = holders[0].g
            A, D = tokens(A), tokens(D)
            w = getattr(m, wn)
            G, I = w.shape
            if w.requires_grad:
                uses.setdefault(w, []).append(OuterFactors(A[:, :, None, :], D[:, :, None, :].to(A.dtype), None, (1, G, I)))
            b = getattr(m, bn) if bn else None
            if b is not None and b.requires_grad:
                got = sums.get(id(D))
                if got is None:
                    got = sums[id(D)] = (D, D.sum(1))
                uses.setdefault(b, []).append(ExplicitRows(got[1]))
        return uses


def compute_dtype(module: nn.RNNBase) -> Optional[torch.dtype]:
    """The dtype the retain pass runs the module's recurrence in: its weights' dtype, float32 for
    half-precision weights (None: no floating parameter)."""
    dt = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dt is not None and torch.finfo(dt).bits < 32:
        return torch.float32
    return dt


def full_precision(x, dtype: Optional[torch.dtype], args: tuple, kwargs: dict):
    """(args, kwargs, context) to run the unrolled recurrence in: the floating inputs cast to
    ``dtype`` (:func:`compute_dtype`) and, under autocast for the input's device, a context that
    turns autocast off.

    Per operation, autocast would run the unrolled steps partly in the half dtype, and the fused
    module rounds its own way (on the CPU under autocast: LSTM and RNN in the half dtype, GRU in
    float32; with bf16 weights its kernels' own accumulation), so neither reproduces the other.
    The retain pass computes the recurrence and its per-sample gradients in at least float32
    instead (the unlearn pass runs the module as the caller wrote it), checks it against the module
    run the same way (:func:`check_against_module`), and hands its outputs back in the input's
    dtype."""
    if isinstance(x, nn.utils.rnn.PackedSequence):
        x = x.data
    if dtype is None or not isinstance(x, Tensor):
        return args, kwargs, contextlib.nullcontext()

    def cast(v):
        if isinstance(v, Tensor) and v.is_floating_point() and v.dtype != dtype:
            return v.to(dtype)
        if isinstance(v, nn.utils.rnn.PackedSequence) and v.data.is_floating_point() and v.data.dtype != dtype:
            return nn.utils.rnn.PackedSequence(v.data.to(dtype), v.batch_sizes, v.sorted_indices, v.unsorted_indices)
        if isinstance(v, tuple) and not hasattr(v, "_fields"):  # hx = (h0, c0); not a PackedSequence
            return tuple(cast(w) for w in v)
        return v

    dev = x.device.type
    ctx = torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else contextlib.nullcontext()
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}, ctx


def as_dtype(out, dtype: torch.dtype):
    """The module's outputs (out, h_n) or (out, (h_n, c_n)) with their tensors in ``dtype``."""
    return tree_map(lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t, out)


def _masked(mask: Optional[Tensor], t: int, new: Tensor, old: Tensor) -> Tensor:
    """The state after step ``t``: ``new`` for the samples that have the step, else ``old``."""
    return new if mask is None else torch.where(mask[:, t, None], new, old)


def _repack(padded: Tensor, like: nn.utils.rnn.PackedSequence) -> nn.utils.rnn.PackedSequence:
    """``padded`` [B, T, F] (the caller's batch order) as a PackedSequence laid out like ``like``:
    time-major, each step's sequences in ``like``'s sorted order (the padded steps dropped)."""
    p = padded if like.sorted_indices is None else padded.index_select(0, like.sorted_indices)
    p = p.transpose(0, 1)
    data = torch.cat([p[t, :n] for t, n in enumerate(like.batch_sizes.tolist())])
    return nn.utils.rnn.PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


def _rnn_step(mode, pre):
    """One RNN step's hidden state from its pre-activation (both products and biases)."""
    return torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)


def _in_dtype(module: nn.RNNBase, dtype: Optional[torch.dtype]) -> nn.RNNBase:
    """The module itself, or where its weights are in another dtype a shallow copy holding copies
    of them in ``dtype`` (the module is not touched; a deep copy would also copy the retain block's
    capture, which its patched forward refers to)."""
    if dtype is None or all(p.dtype == dtype for p in module._parameters.values() if p is not None):
        return module
    ref = copy.copy(module)
    ref._parameters = {n: None if p is None else nn.Parameter(p.detach().to(dtype), requires_grad=False) for n, p in module._parameters.items()}
    ref._flat_weights = [ref._parameters.get(n) for n in module._flat_weights_names]
    return ref


def check_against_module(module: nn.RNNBase, name: str, got, args, kwargs, dtype: Optional[torch.dtype] = None) -> None:
    """The unrolled forward must reproduce the fused module (first call of each module), both in
    ``dtype`` (:func:`compute_dtype`; half weights: :func:`_in_dtype`)."""
    with torch.no_grad():
        ref = type(module).forward(_in_dtype(module, dtype), *args, **kwargs)
    flat_got = tensors_in(got)
    flat_ref = tensors_in(ref)
    ok = len(flat_got) == len(flat_ref) and all(
        a.shape == b.shape and torch.allclose(a.detach().float(), b.float(), rtol=CHECK_RTOL, atol=CHECK_ATOL)
        for a, b in zip(flat_got, flat_ref)
    )
    if not ok:
        raise CaptureError(
            f"module '{name}' ({type(module).__name__}): the unrolled recurrence used for per-sample gradients does not "
            "reproduce the module's output (a subclass with a changed forward, or randomness); freeze the module "
            "(requires_grad_(False)) or use the stock class in eval mode."
        )

