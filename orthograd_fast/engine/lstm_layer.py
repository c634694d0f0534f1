"""One LSTM layer and direction for the retain pass: a forward without an autograd graph per step
and a hand-written backward through time that keeps the gates' gradients.

The per-sample gradients of both weights need the pre-activation gradients D [B, T, 4H] of every
step (:mod:`orthograd_fast.engine.recurrent`). An unrolled forward under autograd records about
ten nodes per step and runs them one by one in the backward; here the forward saves the gates, the
backward precomputes every elementwise factor for all steps at once and runs five operations per
step (the recurrence itself; the next step's output gradient rides in the step's product), writing
D straight into one [B, T, 4H] tensor. Both loops take their per-step views from one ``unbind``
per tensor: made per step, the views cost about as much as the steps' small ops (measured, B = 32,
T = 32, H = 256, 2 cores: the layer's forward and backward 4.5% faster, the LSTM's OrthoGrad step
4-7%). Gate order and formulas are PyTorch's (i, f, g, o; c = f c + i g; h = o tanh(c)); the
forward takes tanh(g) as 2 sigmoid(2 g) - 1 from the step's one sigmoid over its gates (g's
weight rows doubled, exact), which drops a tanh per step. On the CPU the gates, states and
gradients live in buffers kept from step to step (:mod:`orthograd_fast.engine.layer_buffers`;
the output handed back is fresh).

On the CPU both recurrences run in batch parts side by side, one intra-op thread each
(:func:`batch_parts`): the samples' recurrences are independent, and a step's ops (a [B, H] x
[H, 4H] product and a few [B, H] maps) are too small to gain from the intra-op pool, whose wake-up
per op they pay (measured on 2 cores, B = 32, T = 32, H = 256: the forward's steps 33 ms in one
piece, 21 ms in two parts; the fused module's forward 20 to 22 ms). Each part also forms its own
rows of the input's products, straight into its gates (each step then adds its product in place),
and of the input's gradient: no pool wake-up for those GEMMs, no copy of the input's products per
step (paired, the layer's forward and backward 0.964x-0.986x in three runs of 60).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import threads
from .layer_buffers import take

# samples per part below which the steps are not split further
MIN_PART_ROWS = 8


def batch_parts(B: int, device: torch.device) -> List[Tuple[int, int]]:
    """[(b0, b1)]: the batch rows each part's recurrence runs on: one part per intra-op thread on
    the CPU (at least MIN_PART_ROWS samples each), one part elsewhere."""
    n = min(torch.get_num_threads(), B // MIN_PART_ROWS) if device.type == "cpu" else 1
    n = max(1, n)
    return [(B * k // n, B * (k + 1) // n) for k in range(n)]


def _by_parts(fn: Callable[[int, int], Tuple[Tensor, Tensor]], B: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """fn(b0, b1) -> (state rows [b1 - b0, H], ...) of each part (:func:`batch_parts`), side by
    side (threads.side_by_side); the parts' states concatenated in batch order."""
    parts = batch_parts(B, device)
    if len(parts) == 1:
        return fn(*parts[0])
    ends = threads.side_by_side(lambda p: fn(*p), parts, [b1 - b0 for b0, b1 in parts], device)
    return torch.cat([e[0] for e in ends]), torch.cat([e[1] for e in ends])


class GateGrads:
    """Filled by the backward: ``g`` = D [B, T, 4H] (summed over backward visits); filled by the
    forward: ``h_prev`` [B, T, H], the hidden state each position's step started from."""

    def __init__(self):
        self.g: Optional[Tensor] = None
        self.h_prev: Optional[Tensor] = None


class LSTMLayer(torch.autograd.Function):
    """(out [B, T, H], h_n [B, H], c_n [B, H]) of one layer and direction over x [B, T, I] from
    h0, c0 [B, H], w_ih [4H, I], w_hh [4H, H] and ``bias`` [4H] (both biases summed, or None);
    ``reverse``: the steps run from the last position to the first (outputs stay in time order).
    ``anchors``: parameters that make the outputs part of the graph when the weights were handed
    out detached (lean retain); they get no gradient. Inputs and weights share one dtype, autocast
    off (the caller's part: recurrent.full_precision; its state is per thread, and the parts run
    on worker threads)."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, bias, sink: GateGrads, reverse: bool, *anchors):
        B, T, I = x.shape
        H = w_hh.shape[1]
        # g's rows doubled (exact in floating point): one sigmoid over a step's whole row then
        # gives sigmoid(2 g) in g's slot, and tanh(g) = 2 sigmoid(2 g) - 1 rides in c's update
        # (a step's tanh of [B, H] costs about five of its multiplies)
        g2 = slice(2 * H, 3 * H)
        w_ih2, w2 = take("w_ih", w_ih.shape, w_ih).copy_(w_ih), take("w_hh", w_hh.shape, w_hh).copy_(w_hh)
        b2 = bias.clone() if bias is not None else None
        for w in (w_ih2, w2, b2):
            if w is not None:
                w[g2] *= 2
        x2 = x.reshape(B * T, I)
        # sigmoid(i f . o) with sigmoid(2 g) in g's slot; tanh(g); c_t; tanh(c_t); h_t (the
        # layer's buffers come from the thread's pool, layer_buffers; the output only is fresh)
        gates, gg, cs, tc = take("gates", (B, T, 4 * H), x), take("gg", (B, T, H), x), take("cs", (B, T, H), x), take("tc", (B, T, H), x)
        out = torch.empty(B, T, H, dtype=x.dtype, device=x.device)
        wt, wit = w2.t(), w_ih2.t()
        steps = range(T - 1, -1, -1) if reverse else range(T)

        def run(b0, b1):  # the steps of samples b0 .. b1 - 1, into their rows of the outputs
            h, c = h0[b0:b1], c0[b0:b1]
            # the part's input products, on its own thread, straight into its gates
            rows, xs = gates[b0:b1].view((b1 - b0) * T, 4 * H), x2[b0 * T : b1 * T]
            torch.addmm(b2, xs, wit, out=rows) if b2 is not None else torch.mm(xs, wit, out=rows)
            # every step's views made at once (one op per tensor, not one per step: the steps are
            # small enough that making views per step costs as much as their arithmetic)
            S = gates[b0:b1].unbind(1)
            SI, SF, SG, SO = (gates[b0:b1, :, k * H : (k + 1) * H].unbind(1) for k in range(4))
            C, TC, OUT = cs[b0:b1].unbind(1), tc[b0:b1].unbind(1), out[b0:b1].unbind(1)
            for t in steps:
                S[t].addmm_(h, wt)  # pre-activations: the step's product added to the input's
                torch.sigmoid(S[t], out=S[t])
                # c = f c + i tanh(g) = f c + 2 i sigmoid(2 g) - i
                c = torch.mul(SF[t], c, out=C[t]).addcmul_(SI[t], SG[t], value=2).sub_(SI[t])
                h = torch.mul(SO[t], torch.tanh(c, out=TC[t]), out=OUT[t])
            torch.mul(gates[b0:b1, :, g2], 2, out=gg[b0:b1]).sub_(1)  # tanh(g) of every step
            return h, c

        h, c = _by_parts(run, B, x.device)
        # the state each position's step started from: the neighbour's in step order, h0 / c0 first
        h_prev, c_prev = take("h_prev", (B, T, H), x), take("c_prev", (B, T, H), x)
        if reverse:
            torch.cat([out[:, 1:], h0[:, None]], 1, out=h_prev), torch.cat([cs[:, 1:], c0[:, None]], 1, out=c_prev)
        else:
            torch.cat([h0[:, None], out[:, :-1]], 1, out=h_prev), torch.cat([c0[:, None], cs[:, :-1]], 1, out=c_prev)
        sink.h_prev = h_prev
        ctx.sink, ctx.reverse = sink, reverse
        ctx.save_for_backward(x, w_ih, w_hh, gates, gg, c_prev, h_prev, tc)
        return out, h.clone(), c.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dh_n, dc_n):
        x, w_ih, w_hh, gates, g, c_prev, h_prev, tc = ctx.saved_tensors
        B, T, H = tc.shape
        i, f, _, o = gates.split(H, dim=2)
        # the factors and D in buffers of the thread's pool (layer_buffers; tmp: each product's
        # intermediate)
        tmp, P, Q, R = take("tmp", (B, T, H), tc), take("P", (B, T, H), tc), take("Q", (B, T, 3, H), tc), take("R", (B, T, H), tc)
        D = take("D", (B, T, 4 * H), tc)
        steps = range(T) if ctx.reverse else range(T - 1, -1, -1)

        def factors(rows):
            """Every elementwise factor of the recurrence for all steps of the samples ``rows``:
            dc += dh * P; D_{i,f,g} = dc * Q; D_o = dh * R; dc <- dc * f; dh <- D_t w_hh (two
            passes over [B, T, H] each, Q written in place: these passes are memory-bound, and the
            plainer 13 products and a stack took 2.2 ms of the layer's ~10 ms backward; per part
            on its own thread, no wake-up of the intra-op pool per product)."""
            o_, tc_, i_, f_, g_, cp_, tm = (v[rows] for v in (o, tc, i, f, g, c_prev, tmp))
            torch.addcmul(o_, torch.mul(o_, tc_, out=tm), tc_, value=-1, out=P[rows])  # o (1 - tc^2)
            torch.mul(g_, torch.addcmul(i_, i_, i_, value=-1, out=tm), out=Q[rows, :, 0])  # g i (1 - i)
            torch.mul(cp_, torch.addcmul(f_, f_, f_, value=-1, out=tm), out=Q[rows, :, 1])  # c_prev f (1 - f)
            torch.addcmul(i_, torch.mul(i_, g_, out=tm), g_, value=-1, out=Q[rows, :, 2])  # i (1 - g^2)
            torch.mul(tc_, torch.addcmul(o_, o_, o_, value=-1, out=tm), out=R[rows])  # tc o (1 - o)

        def run(b0, b1):  # the steps of samples b0 .. b1 - 1, into their rows of D
            factors(slice(b0, b1))
            dh, dc = dh_n[b0:b1].clone(), dc_n[b0:b1].clone()
            dc3 = dc.unsqueeze(1)
            # every step's views made at once, as in the forward
            DO, Pt, Qt, Rt, Ft = (v[b0:b1].unbind(1) for v in (dout, P, Q, R, f))
            Dt = D[b0:b1].unbind(1)
            D3 = D[b0:b1, :, : 3 * H].unflatten(2, (3, H)).unbind(1)
            Do = D[b0:b1, :, 3 * H :].unbind(1)
            order = list(steps)
            if order:
                dh += DO[order[0]]
            for k, t in enumerate(order):
                dc.addcmul_(dh, Pt[t])
                torch.mul(dc3, Qt[t], out=D3[t])
                torch.mul(dh, Rt[t], out=Do[t])
                dc.mul_(Ft[t])
                # the next step's output gradient rides in the product (the last: none)
                dh = torch.addmm(DO[order[k + 1]], Dt[t], w_hh) if k + 1 < len(order) else torch.mm(Dt[t], w_hh)
            if dx is not None:  # the part's input gradient, on its own thread
                torch.mm(D[b0:b1].view(-1, 4 * H), w_ih, out=dx[b0:b1].view(-1, x.shape[2]))
            return dh, dc

        need = ctx.needs_input_grad
        dx = torch.empty(x.shape, dtype=D.dtype, device=x.device) if need[0] else None
        dh, dc = _by_parts(run, B, x.device)
        sink = ctx.sink
        sink.g = D if sink.g is None else sink.g + D
        D2 = D.view(B * T, 4 * H)
        dw_ih = D2.t() @ x.reshape(B * T, -1) if need[3] else None
        dw_hh = D2.t() @ h_prev.reshape(B * T, H) if need[4] else None
        db = D2.sum(0) if need[5] else None
        return (dx, dh if need[1] else None, dc if need[2] else None, dw_ih, dw_hh, db, None, None) + (None,) * (len(need) - 8)
