"""Rules for normalizations (layer, group, batch with running statistics, RMS) and PReLU: their
per-sample rows are sums over tokens or positions (docs/math.md section 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import UnsupportedModule
from .common import arg, as_tuple, explicit, merge


def _norm(ctx, func, args, kwargs, x, weight, bias, xhat_fn, channel_first, stats=None):
    """``stats``: (mean, 1 / std) per channel, float64, of an eval-mode batch norm: x-hat is then
    affine in x, and the weight's rows are (sum x g - mean sum g) / std without forming x-hat
    (one product over the input instead of three full-size passes)."""
    if not ctx.is_data(x) or ctx.seq_first or (channel_first and ctx.fold(x) != 1):
        return NotImplemented  # channels-first statistics are per image: batch-first only
    a = list(args)
    kw = dict(kwargs)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        for i, v in enumerate(a):
            if v is t:
                a[i] = ctx.use(t)
        if kw.get(name) is t:
            kw[name] = ctx.use(t)
    out = func(*a, **kw)
    B, xd, space = ctx.B, x.detach(), ctx.space

    def build(gy):
        xf = xd.float() if xd.dtype in (torch.float16, torch.bfloat16) else xd
        g = gy.to(xf.dtype)
        ref = weight if weight is not None else bias
        n = ref.numel()
        uses = {}
        need_sum = stats is not None or (bias is not None and space.base(bias) is not None)
        gsum = (g.reshape(B, n, -1).sum(-1) if channel_first else g.reshape(B, -1, n).sum(1)) if need_sum else None
        if weight is not None and space.base(weight) is not None:
            if stats is not None:
                mean, inv = stats
                rows = ((xf * g).reshape(B, n, -1).sum(-1).double() - mean * gsum.double()) * inv
            else:
                prod = xhat_fn(xf) * g
                rows = prod.reshape(B, n, -1).sum(-1) if channel_first else prod.reshape(B, -1, n).sum(1)
            uses = explicit(space, weight, rows)
        if bias is not None and space.base(bias) is not None:
            merge(uses, explicit(space, bias, gsum))
        return uses

    return ctx.record(func, out, [weight, bias], build)


def layer_norm(ctx, func, args, kwargs):
    x, shape = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "normalized_shape")
    w, b, eps = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias"), arg(args, kwargs, 4, "eps", 1e-5)
    return _norm(ctx, func, args, kwargs, x, w, b, lambda xf: F.layer_norm(xf, shape, None, None, eps), False)


def group_norm(ctx, func, args, kwargs):
    x, groups = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "num_groups")
    w, b, eps = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias"), arg(args, kwargs, 4, "eps", 1e-5)
    return _norm(ctx, func, args, kwargs, x, w, b, lambda xf: F.group_norm(xf, groups, None, None, eps), True)


def batch_norm(ctx, func, args, kwargs):
    x, rm, rv = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "running_mean"), arg(args, kwargs, 2, "running_var")
    w, b = arg(args, kwargs, 3, "weight"), arg(args, kwargs, 4, "bias")
    training, eps = arg(args, kwargs, 5, "training", False), arg(args, kwargs, 7, "eps", 1e-5)
    if training or rm is None or rv is None:
        if not ctx.is_data(x) and not ctx.is_activation(x):
            # statistics of parameters only (timm's StdConv2d / ScaledStdConv2d standardize their
            # weight this way): a computation on parameters, mapped back where it meets the batch
            return NotImplemented
        raise UnsupportedModule(
            f"{ctx.where()}: batch_norm uses batch statistics (training mode or no running statistics): samples "
            "share the batch mean and variance, so per-sample gradients do not exist. Put the module in eval mode "
            "(module.eval()) for the retain pass, or use GroupNorm/LayerNorm."
        )
    return _norm(ctx, func, args, kwargs, x, w, b, None, True, _running_stats(rm, rv, eps))


def _running_stats(rm, rv, eps):
    """(mean, 1 / sqrt(var + eps)) of running statistics, float64 copies taken now (the buffers
    are the module's): two ops each, on C entries."""
    return rm.detach().to(torch.float64, copy=True), rv.detach().to(torch.float64, copy=True).add_(eps).rsqrt_()


def instance_norm(ctx, func, args, kwargs):
    """Per-sample, per-channel statistics (``use_input_stats``): x-hat is per sample; with running
    statistics instead (eval mode, ``track_running_stats``) it is affine in x, as for batch norm."""
    x, rm, rv = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "running_mean"), arg(args, kwargs, 2, "running_var")
    w, b = arg(args, kwargs, 3, "weight"), arg(args, kwargs, 4, "bias")
    use_input, eps = arg(args, kwargs, 5, "use_input_stats", True), arg(args, kwargs, 7, "eps", 1e-5)
    if use_input or rm is None or rv is None:
        return _norm(ctx, func, args, kwargs, x, w, b, lambda xf: F.instance_norm(xf, eps=eps), True)
    return _norm(ctx, func, args, kwargs, x, w, b, None, True, _running_stats(rm, rv, eps))


def rms_norm(ctx, func, args, kwargs):
    x, shape = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "normalized_shape")
    w, eps = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "eps")
    dims = tuple(range(-len(as_tuple(shape, 1)), 0))

    def xhat(xf):
        e = eps if eps is not None else torch.finfo(xf.dtype).eps
        return xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + e)

    return _norm(ctx, func, args, kwargs, x, w, None, xhat, False)


def prelu(ctx, func, args, kwargs):
    x, w = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight")
    if not ctx.is_data(x) or ctx.fold(x) != 1 or ctx.seq_first or x.dim() < 2:
        return NotImplemented
    out = func(x, ctx.use(w))
    B, xd, space = ctx.B, x.detach(), ctx.space

    def build(gy):
        prod = gy * xd.clamp(max=0)
        rows = prod.reshape(B, -1).sum(1, keepdim=True) if w.numel() == 1 else prod.reshape(B, w.numel(), -1).sum(-1)
        return explicit(space, w, rows)

    return ctx.record(func, out, [w], build)
