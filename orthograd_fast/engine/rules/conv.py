"""Rules for convolutions and transposed convolutions (docs/math.md section 2).

A transposed convolution's weight gradient is the convolution weight gradient with the input and
the output gradient swapped.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from ..conv_factors import ConvFactors
from ..factors import OuterFactors
from .common import arg, as_tuple, bias_uses, merge, weight_use

def _unfold_nd(x: Tensor, kernel, stride, dilation) -> Tensor:
    """Patches of x (already padded) as [B, C, *L, *k] for any conv dimensionality."""
    nd = x.dim() - 2
    for d in range(nd):
        k, s, dil = kernel[d], stride[d], dilation[d]
        span = dil * (k - 1) + 1
        x = x.unfold(2 + d, span, s)[..., ::dil]
    return x


def conv_weight_use(x: Tensor, gy: Tensor, B: int, kernel, stride, padding, dilation, groups: int, out_channels: int):
    """The per-sample use of a convolution weight [O, C / groups, *kernel]; ``padding``: zeros
    on both sides of each spatial dim (other padding is applied to x by the caller)."""
    nd = x.dim() - 2
    G, C, O = groups, x.shape[1], out_channels
    if nd in (1, 2):
        # kept as (input, output gradient), evaluated by (grouped) convolutions (conv_factors.py):
        # a depthwise k x k conv is never unfolded (that is k^2 copies of its input)
        return ConvFactors(x, gy, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), G)
    pad = [q for p in reversed(tuple(padding)) for q in (p, p)]
    patches = _unfold_nd(F.pad(x, pad) if any(pad) else x, kernel, stride, dilation)  # [B, C, L..., k...]
    Lprod = math.prod(patches.shape[2 : 2 + nd])
    kprod = math.prod(kernel)
    # -> [B, L, G, Cg * kprod], columns ordered (c_in_g, k1, ..., knd) like the weight
    A = patches.reshape(B, G, C // G, Lprod, kprod).permute(0, 3, 1, 2, 4).reshape(B, Lprod, G, (C // G) * kprod)
    D = gy.reshape(B, G, O // G, Lprod).permute(0, 3, 1, 2)
    return OuterFactors(A, D, None, (G, O // G, (C // G) * kprod))


def _conv_padding(x, padding, kernel, dilation, nd):
    if isinstance(padding, str):
        if padding == "valid":
            return x, (0,) * nd
        pad = []
        for d in reversed(range(nd)):  # "same": total d (k - 1), the extra one on the right
            total = dilation[d] * (kernel[d] - 1)
            pad += [total // 2, total - total // 2]
        return F.pad(x, pad), (0,) * nd
    return x, as_tuple(padding, nd)


def _conv_call(ctx, func, args, kwargs):
    """(x, w, b, out) of a convolution or transposed convolution run with its weight and bias in
    use, or None where x is not batch-first data (one image per sample, or k images per sample
    folded into dim 0 sample by sample)."""
    x, w, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    if not ctx.is_data(x) or ctx.seq_first:
        return None
    rest = {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}
    return x, w, b, func(x, ctx.use(w), ctx.use(b), *args[3:], **rest)


def _conv_rule(ctx, func, args, kwargs, transposed: bool):
    """conv1d/2d/3d, or (``transposed``) conv_transpose1d/2d/3d, whose dilation comes after
    output_padding; a transposed convolution y = C^T x has the weight gradient of the convolution C
    with input and output gradient swapped."""
    got = _conv_call(ctx, func, args, kwargs)
    if got is None:
        return NotImplemented
    x, w, b, out = got
    nd = x.dim() - 2
    stride = as_tuple(arg(args, kwargs, 3, "stride", 1), nd)
    padding = arg(args, kwargs, 4, "padding", 0)
    groups = arg(args, kwargs, 6, "groups", 1)
    dilation = as_tuple(arg(args, kwargs, 7 if transposed else 5, "dilation", 1), nd)
    B, xd, space = ctx.B, x.detach(), ctx.space
    k = ctx.fold(x)  # images per sample
    kernel = tuple(w.shape[2:])

    def build(gy):
        uses = {}
        if space.base(w) is not None:
            if transposed:
                use = conv_weight_use(gy, xd, B * k, kernel, stride, as_tuple(padding, nd), dilation, groups, w.shape[0])
            else:
                xp, pad = _conv_padding(xd, padding, kernel, dilation, nd)
                use = conv_weight_use(xp, gy, B * k, kernel, stride, pad, dilation, groups, w.shape[0])
            uses = weight_use(space, w, _images_as_tokens(use, B, k))
        # the bias: each sample's output gradient summed over its images' positions (a view for
        # one image per sample; k images: their positions concatenated, one copy)
        O = gy.shape[1]
        tok = gy.reshape(B, O, -1).transpose(1, 2) if k == 1 else gy.reshape(B, k, O, -1).transpose(2, 3).reshape(B, -1, O)
        return merge(uses, bias_uses(space, b, tok))

    return ctx.record(func, out, [w, b], build)


def _images_as_tokens(use, B: int, k: int):
    """The use of k images per sample (folded into dim 0 sample by sample) as one use per sample
    over all its images' positions: the token form (im2col) with each sample's k images' positions
    as its tokens (exact: a per-sample gradient sums over tokens). k = 1: ``use`` as it is."""
    if k == 1:
        return use
    f = use.outer() if isinstance(use, ConvFactors) else use
    A, D = f.A, f.D  # [B k, L, G, .]
    return OuterFactors(A.reshape(B, -1, *A.shape[2:]), D.reshape(B, -1, *D.shape[2:]), None, f.shape, transposed=f.transposed)


def conv(ctx, func, args, kwargs):
    return _conv_rule(ctx, func, args, kwargs, transposed=False)


def conv_transpose(ctx, func, args, kwargs):
    return _conv_rule(ctx, func, args, kwargs, transposed=True)
