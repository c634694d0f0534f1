"""Layer rules: one captured call (input x, output gradient gy) -> factored per-sample uses.

Every rule receives tensors whose dim 0 is the retain batch (batch-first layouts) and returns
``{param: use}`` for the trainable parameters the module owns. See docs/math.md section 2.
Modules without a class rule that own trainable parameters are captured by operation
(:mod:`orthograd_fast.engine.op_capture`).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conv_factors import ConvUse
from .factors import ExplicitUse, OuterUse


from ..errors import UnsupportedModule  # noqa: E402  (re-exported)


def _tokens(t: Tensor, B: int, last: int) -> Tensor:
    return t.reshape(B, -1, last)


def _trainable(p: Optional[Tensor]) -> bool:
    return p is not None and p.requires_grad


def _dense_uses(weight, bias, x: Tensor, gy: Tensor, B: int, out: int, inp: int, transposed: bool) -> dict:
    """y = x W^T + b over tokens (nn.Linear; transformers' Conv1D stores W transposed)."""
    A = _tokens(x, B, inp)
    D = _tokens(gy, B, out)
    D4 = D[:, :, None, :]
    uses = {}
    if _trainable(weight):
        uses[weight] = OuterUse(A[:, :, None, :], D4, None, (1, out, inp), transposed=transposed)
    if _trainable(bias):
        # one token per sample: the bias's rows are the weight's D (gram.share_bias_grams shares D D^T)
        uses[bias] = ExplicitUse(_token_sum(D), weight_D=D4 if D.shape[1] == 1 and _trainable(weight) else None)
    return uses


def _token_sum(D: Tensor) -> Tensor:
    """[B, T, O] -> [B, O] summed over tokens; a view for one token (a reduction over a size-1 dim
    still launches a parallel kernel: ~0.2 ms for 64 x 1024 on 2 CPU cores, 8 per MLP step)."""
    return D[:, 0] if D.shape[1] == 1 else D.sum(1)


def linear_uses(m: nn.Module, x: Tensor, gy: Tensor, B: int) -> dict:
    out, inp = m.weight.shape
    return _dense_uses(m.weight, m.bias, x, gy, B, out, inp, transposed=False)


def hf_conv1d_uses(m: nn.Module, x: Tensor, gy: Tensor, B: int) -> dict:
    """transformers' Conv1D: y = x @ W + b with W stored [in, out] (a transposed Linear)."""
    inp, out = m.weight.shape
    return _dense_uses(m.weight, getattr(m, "bias", None), x, gy, B, out, inp, transposed=True)


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
        return ConvUse(x, gy, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), G)
    pad = [q for p in reversed(tuple(padding)) for q in (p, p)]
    patches = _unfold_nd(F.pad(x, pad) if any(pad) else x, kernel, stride, dilation)  # [B, C, L..., k...]
    Lprod = math.prod(patches.shape[2 : 2 + nd])
    kprod = math.prod(kernel)
    # -> [B, L, G, Cg * kprod], columns ordered (c_in_g, k1, ..., knd) like the weight
    A = patches.reshape(B, G, C // G, Lprod, kprod).permute(0, 3, 1, 2, 4).reshape(B, Lprod, G, (C // G) * kprod)
    D = gy.reshape(B, G, O // G, Lprod).permute(0, 3, 1, 2)
    return OuterUse(A, D, None, (G, O // G, (C // G) * kprod))


def conv_uses(m: nn.modules.conv._ConvNd, x: Tensor, gy: Tensor, B: int) -> dict:
    nd = x.dim() - 2
    uses = {}
    if _trainable(m.weight):
        if m.padding_mode == "zeros" and not isinstance(m.padding, str):
            pad = tuple(m.padding)
        else:  # other modes and "same" (maybe asymmetric): pad explicitly, then padding 0
            x = F.pad(x, list(m._reversed_padding_repeated_twice), mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
            pad = (0,) * nd
        uses[m.weight] = conv_weight_use(x, gy, B, m.kernel_size, m.stride, pad, m.dilation, m.groups, m.out_channels)
    if _trainable(m.bias):
        uses[m.bias] = ExplicitUse(gy.reshape(B, m.out_channels, -1).sum(-1))
    return uses


def embedding_uses(m: nn.Embedding, ids: Tensor, gy: Tensor, B: int) -> dict:
    if not _trainable(m.weight):
        return {}
    if m.scale_grad_by_freq:
        raise UnsupportedModule(
            f"{type(m).__name__} has scale_grad_by_freq=True: its gradient depends on token counts of the "
            "whole batch, so per-sample gradients are not defined. Build it with scale_grad_by_freq=False."
        )
    V, d = m.weight.shape
    ids = ids.reshape(B, -1)
    rows = _tokens(gy, B, d)
    if m.padding_idx is not None:
        # padding tokens get no gradient in nn.Embedding's backward
        rows = rows * (ids != m.padding_idx).unsqueeze(-1).to(rows.dtype)
    return {m.weight: OuterUse(rows[:, :, None, :], None, ids, (1, V, d))}


def _norm_uses(m: nn.Module, xhat: Tensor, gy: Tensor, B: int, numel: int, channel_first: bool) -> dict:
    gy = gy.to(xhat.dtype)
    if channel_first:  # [B, C, *] -> sum over spatial
        gw = (xhat * gy).reshape(B, numel, -1).sum(-1)
        gb = gy.reshape(B, numel, -1).sum(-1)
    else:  # [B, ..., *normalized_shape] -> sum over leading tokens
        gw = (xhat * gy).reshape(B, -1, numel).sum(1)
        gb = gy.reshape(B, -1, numel).sum(1)
    uses = {}
    if _trainable(getattr(m, "weight", None)):
        uses[m.weight] = ExplicitUse(gw)
    if _trainable(getattr(m, "bias", None)):
        uses[m.bias] = ExplicitUse(gb)
    return uses


def layernorm_uses(m: nn.LayerNorm, x: Tensor, gy: Tensor, B: int) -> dict:
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    # x-hat by the fused kernel without an affine part: one pass (mean, var, sub, mul as separate
    # ops cost ~4 ms per call on a 64 x 64 x 128 input on 2 CPU cores, the fused one ~0.4 ms)
    xhat = F.layer_norm(xf, m.normalized_shape, None, None, m.eps)
    return _norm_uses(m, xhat, gy, B, math.prod(m.normalized_shape), channel_first=False)


def rmsnorm_uses(m: nn.Module, x: Tensor, gy: Tensor, B: int) -> dict:
    dims = tuple(range(-len(m.normalized_shape), 0))
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    eps = m.eps if m.eps is not None else torch.finfo(x.dtype).eps
    xhat = xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)
    return _norm_uses(m, xhat, gy, B, math.prod(m.normalized_shape), channel_first=False)


def groupnorm_uses(m: nn.GroupNorm, x: Tensor, gy: Tensor, B: int) -> dict:
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    xhat = F.group_norm(xf, m.num_groups, None, None, m.eps)  # fused, like layernorm_uses
    return _norm_uses(m, xhat, gy, B, m.num_channels, channel_first=True)


def batchnorm_uses(m: nn.modules.batchnorm._BatchNorm, x: Tensor, gy: Tensor, B: int) -> dict:
    check_batchnorm(m)
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    shape = (1, -1) + (1,) * (x.dim() - 2)
    xhat = (xf - m.running_mean.reshape(shape)) * torch.rsqrt(m.running_var.reshape(shape) + m.eps)
    return _norm_uses(m, xhat, gy, B, m.num_features, channel_first=True)


def check_batchnorm(m: nn.Module) -> None:
    if m.training or not m.track_running_stats or m.running_mean is None:
        raise UnsupportedModule(
            f"{type(m).__name__} uses batch statistics (training mode or track_running_stats=False): "
            "samples share the batch mean and variance, so per-sample gradients do not exist. "
            "Put it in eval mode (module.eval()) for the retain pass, or use GroupNorm/LayerNorm."
        )


def _is_hf_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None and m.weight.dim() == 2


def rule_for(m: nn.Module) -> Optional[Callable[[nn.Module, Tensor, Tensor, int], Dict]]:
    """The factored rule for a module type, or None (then: captured by operation)."""
    # A subclass that overrides forward computes something else with the same parameters
    # (e.g. a positional table returning weight slices): leave it to operation capture.
    for base, rule in _RULES:
        if isinstance(m, base):
            return rule if type(m).forward is base.forward else None
    if _is_hf_conv1d(m):
        return hf_conv1d_uses
    return None


def _rules():
    out = [
        (nn.Linear, linear_uses),
        (nn.Conv1d, conv_uses),
        (nn.Conv2d, conv_uses),
        (nn.Conv3d, conv_uses),
        (nn.Embedding, embedding_uses),
        (nn.LayerNorm, layernorm_uses),
        (nn.GroupNorm, groupnorm_uses),
        (nn.BatchNorm1d, batchnorm_uses),
        (nn.BatchNorm2d, batchnorm_uses),
        (nn.BatchNorm3d, batchnorm_uses),
    ]
    if hasattr(nn, "RMSNorm"):
        out.append((nn.RMSNorm, rmsnorm_uses))
    return out


_RULES = _rules()


# Rules over tokens: they read x and gy as [B, tokens, features], so a batch folded sample by
# sample into dim 0 (k rows per sample) is k times more tokens per sample.
TOKEN_RULES = (linear_uses, hf_conv1d_uses, embedding_uses, layernorm_uses, rmsnorm_uses)


# Modules captured by operation with all their parameters (their forward uses sub-module
# parameters directly, e.g. MultiheadAttention reads out_proj.weight without calling out_proj).
WHOLE_UNITS = (nn.MultiheadAttention,)

def refuse_reason(m: nn.Module) -> Optional[str]:
    if isinstance(m, nn.MultiheadAttention) and not m.batch_first:
        return (
            "nn.MultiheadAttention with batch_first=False: per-sample gradients need batch-first layouts "
            "(the retain batch on dim 0 of every layer's input). Build it with batch_first=True."
        )
    if isinstance(m, nn.Embedding) and m.sparse:
        return "nn.Embedding with sparse=True: OrthoGrad needs dense gradients. Build it with sparse=False."
    return None
