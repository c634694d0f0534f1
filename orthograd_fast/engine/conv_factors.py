"""Per-sample gradients of a Conv1d/Conv2d weight (groups=1) kept as the layer's input and output
gradient, evaluated with the convolution kernels themselves instead of im2col.

The token form of a convolution (:class:`~orthograd_fast.engine.factors.OuterFactors` with A = the unfolded
input patches) costs a B x L x C k copy of the input on every retain pass; on a CPU that copy and
the GEMMs over it cost more than the convolution (measured on a 64 x 32 x 16 x 16 input: im2col
17 ms, the conv 4 ms). Here:

* per-sample tiles: the weight gradient of a grouped convolution with the samples folded into
  channels (groups = samples x the layer's groups), in slabs of output channels; the Gram and the coefficients
  ``<g_i, U>`` both come from them (:class:`orthograd_fast.engine.routes.conv.ConvRoute`), so they match exactly
* ``U -= sum c_i g_i`` = weight gradient of (x, c * gy)                  one weight-gradient conv

The ghost route and the Triton kernels need the token form: :meth:`ConvFactors.outer` builds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .factors import OuterFactors, _compute_dtype


@dataclass
class ConvFactors:
    """x: the input [B, C, *S]; gy: the output gradient [B, O, *L]; the weight [O, C / groups, *k]
    with ``stride``, ``padding`` (zeros; other modes and asymmetric padding are applied to x by the
    rule, then padding is 0), ``dilation`` and ``groups``; nd in 1, 2.
    ``A`` / ``D`` name x / gy for code that only inspects factor dtypes."""

    x: Tensor
    gy: Tensor
    kernel: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    groups: int = 1

    @property
    def A(self) -> Tensor:
        return self.x

    @property
    def D(self) -> Tensor:
        return self.gy

    @property
    def B(self) -> int:
        return self.x.shape[0]

    @property
    def nd(self) -> int:
        return self.x.dim() - 2

    @property
    def shape(self) -> tuple:  # (G, O, I) like OuterFactors: per group
        G = self.groups
        return (G, self.gy.shape[1] // G, self.x.shape[1] // G * math.prod(self.kernel))

    @property
    def out_channels(self) -> int:
        return self.gy.shape[1]

    @property
    def row(self) -> int:
        """Weight entries per output channel (C / groups x prod(k))."""
        return self.x.shape[1] // self.groups * math.prod(self.kernel)

    @property
    def channel_step(self) -> int:
        """Slabs of output channels start and end on multiples of this (whole groups)."""
        return self.gy.shape[1] // self.groups

    @property
    def tokens(self) -> int:
        return math.prod(self.gy.shape[2:])

    def _dt(self) -> torch.dtype:
        return _compute_dtype(self.x, self.gy)

    def _wgrad(self, gy: Tensor, x: Tensor, weight_shape, groups: int = 1, dt=None) -> Tensor:
        dt = dt or self._dt()
        w = torch.empty(weight_shape, dtype=dt, device=x.device)  # shape/dtype carrier only
        zeros = [0] * self.nd
        return torch.ops.aten.convolution_backward(
            gy.to(dt), x.to(dt), w, None, list(self.stride), list(self.padding), list(self.dilation), False, zeros, groups,
            [False, True, False],
        )[1]

    # --- update, tiles, token form -------------------------------------------------------------
    def apply_(self, U: Tensor, c: Tensor) -> None:
        """U -= sum_i c_i g_i: the weight gradient of (x, c * gy), one convolution (in float64 when
        U is float64: the engine's exact update)."""
        dt = torch.promote_types(self._dt(), U.dtype)
        scaled = self.gy.to(dt) * c.to(dt).reshape((-1,) + (1,) * (self.gy.dim() - 1))
        U.sub_(self._wgrad(scaled, self.x, U.shape, groups=self.groups, dt=dt).to(U.dtype))

    def tiles(self, o0: int, o1: int, b0: int = 0, b1: int = -1) -> Tensor:
        """Per-sample gradients of output channels o0:o1 (multiples of :attr:`channel_step` when
        groups > 1) for samples b0:b1, [b1 - b0, (o1 - o0) * C / groups * prod(k)] in the compute
        dtype: a grouped weight-gradient convolution with (sample, group) pairs as groups."""
        b1 = self.B if b1 < 0 else b1
        B = b1 - b0
        og = self.channel_step
        g0, g1 = o0 // og, -(-o1 // og)
        cg = self.x.shape[1] // self.groups
        if cg == 1 and self.groups > 1:
            return self._depthwise_tiles(o0, o1, b0, b1)
        if self.groups == 1 and all(k == 1 for k in self.kernel) and not any(self.padding):
            return self._pointwise_tiles(o0, o1, b0, b1)
        x = self.x[b0:b1, g0 * cg : g1 * cg].reshape(1, B * (g1 - g0) * cg, *self.x.shape[2:])
        gy = self.gy[b0:b1, o0:o1].reshape(1, B * (o1 - o0), *self.gy.shape[2:])
        g = self._wgrad(gy, x, (B * (o1 - o0), cg, *self.kernel), groups=B * (g1 - g0))
        return g.reshape(B, -1)

    def _depthwise_tiles(self, o0: int, o1: int, b0: int, b1: int) -> Tensor:
        """tiles() for one input channel per group (depthwise, with or without a channel
        multiplier): a forward depthwise convolution of each (sample, channel) input with its
        output gradients as the kernel, stride and dilation swapped (out[k] = sum_h x[k d + h s]
        gy[h]), cropped to the kernel size. The weight-gradient form runs one group per (sample,
        channel) pair, which CPU kernels handle slowly (7 x 7 depthwise, 32 x 32 x 16 x 16: 12 ms
        against 1 ms here)."""
        dt = self._dt()
        B, og = b1 - b0, self.channel_step
        g0, g1 = o0 // og, -(-o1 // og)  # o0, o1 are multiples of og here (whole groups)
        x = self.x[b0:b1, g0:g1].to(dt).reshape(1, B * (g1 - g0), *self.x.shape[2:])
        gy = self.gy[b0:b1, o0:o1].to(dt).reshape(B * (o1 - o0), 1, *self.gy.shape[2:])
        conv = F.conv2d if self.nd == 2 else F.conv1d
        pad = self.padding
        if any(p >= n for p, n in zip(pad, self.gy.shape[2:])):
            # padding as wide as the output gradient (a late stage: ConvNeXt's 7 x 7 on 2 x 2
            # maps) sends the grouped convolution to a slow CPU kernel (measured, 32 x 256 groups:
            # 2.1 ms against 0.47 ms with x padded here; below that width padding in the call is
            # faster, 0.17 ms against 0.39 ms on 4 x 4 maps)
            x = F.pad(x, [q for p in reversed(pad) for q in (p, p)])
            pad = (0,) * self.nd
        out = conv(x, gy, padding=pad, stride=self.dilation, dilation=self.stride, groups=B * (g1 - g0))
        out = out[(0, slice(None)) + tuple(slice(0, k) for k in self.kernel)]
        return out.reshape(B, -1)

    def _pointwise_tiles(self, o0: int, o1: int, b0: int, b1: int) -> Tensor:
        """tiles() for a 1 x 1 convolution without padding: per sample, gy [O, L] times the input
        at the strided positions [C, L] transposed, one batched GEMM (the weight-gradient form
        runs a convolution with a group per sample)."""
        dt = self._dt()
        L = self.gy.shape[2:]
        x = self.x[b0:b1]
        x = x[(slice(None), slice(None)) + tuple(slice(0, s * (n - 1) + 1, s) for s, n in zip(self.stride, L))]
        B, C = x.shape[0], x.shape[1]
        gy = self.gy[b0:b1, o0:o1].to(dt).reshape(B, o1 - o0, -1)
        return torch.bmm(gy, x.to(dt).reshape(B, C, -1).transpose(1, 2)).reshape(B, -1)

    def sample_chunk(self, budget: int) -> int:
        """Samples per tiles() call that keep the convolution's own unfolded copy of the input
        (C prod(k) x positions per sample) under ``budget`` bytes."""
        per = self.row * self.groups * self.tokens * self.x.element_size()
        return max(1, budget // max(1, per))

    def explicit(self) -> Tensor:
        return self.tiles(0, self.gy.shape[1]).double()

    def outer_later(self) -> "ConvOuter":  # noqa: F821 - defined below
        """The token form, unfolded on first use of its factors (:class:`ConvOuter`)."""
        return ConvOuter(self)

    def outer(self) -> OuterFactors:
        """The token form (im2col), for the ghost route, the Triton kernels and DDP gathering."""
        xp = self.x if self.nd == 2 else self.x.unsqueeze(2)

        def two(t, lead):  # a 1-d conv as a 1 x k 2-d one
            return tuple(t) if self.nd == 2 else (lead, t[0])

        cols = F.unfold(
            xp, two(self.kernel, 1), dilation=two(self.dilation, 1), padding=two(self.padding, 0), stride=two(self.stride, 1)
        )
        G, B = self.groups, self.B
        A = cols.reshape(B, G, self.row, -1).permute(0, 3, 1, 2)  # [B, L, G, C / G k]
        D = self.gy.reshape(B, G, self.channel_step, -1).permute(0, 3, 1, 2)
        return OuterFactors(A, D, None, self.shape)


class ConvOuter(OuterFactors):
    """:meth:`ConvFactors.outer`, unfolded when A or D is first read: a ghost or tile term's
    im2col then runs in its own Gram job, on a projection thread beside the other terms, instead
    of while the terms are built, one after another on the caller's thread (ResNet, B = 32: 12 ms
    of serial unfolds per step). Shape, dtypes, device and sample count are known without
    unfolding."""

    def __init__(self, conv: ConvFactors):  # noqa: D107 - not the dataclass's fields
        self._conv, self._form = conv, None
        self.ids, self.shape, self.transposed = None, conv.shape, False

    def _formed(self) -> OuterFactors:
        if self._form is None:
            self._form = self._conv.outer()
        return self._form

    @property
    def A(self) -> Tensor:
        return self._formed().A

    @property
    def D(self) -> Tensor:
        return self._formed().D

    @property
    def B(self) -> int:
        return self._conv.B

    @property
    def a_shape(self) -> torch.Size:
        c = self._conv
        return torch.Size((c.B, c.tokens, c.groups, c.row))

    @property
    def a_dtype(self) -> torch.dtype:
        return self._conv.x.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._conv._dt()

    @property
    def device(self) -> torch.device:
        return self._conv.x.device
