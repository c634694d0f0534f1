"""The retain batch folded into dim 0 (k rows per sample, sample by sample): window attention's
``(B, H, W, C) -> (B * windows, N, C)``, heads folded into the batch. Token layers (Linear,
LayerNorm, einsum / matmul with a weight, attention biases, convolutions over k images per
sample) are exact on such inputs: each sample's gradient sums over its k rows. A channels-first
norm over folded images (rows per image) is refused by name, and a tensor whose batch is not on
dim 0 (sequence-first)
is never taken for batch-first data, also when its dim 0 happens to equal B.
Every case is compared with the float64 per-sample loop.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine_helpers import compare
from models import ce
from orthograd_fast import OrthoGrad
from orthograd_fast.errors import CaptureError

REL = 1e-4
T, D = 6, 6  # tokens per sample, features


class ChannelsLastNorm(nn.LayerNorm):
    """A LayerNorm subclass with its own forward (captured by operation)."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class Windows(nn.Module):
    """Windows of W tokens folded into dim 0, attention inside each window with a learned relative
    bias (a raw parameter [W, W] broadcast into the folded scores), a stock Linear, a norm
    subclass, a raw-parameter einsum and a raw bias, then the windows merged back."""

    def __init__(self, W=2):
        super().__init__()
        self.W = W
        self.qkv = nn.Linear(D, 3 * D)
        self.rel = nn.Parameter(torch.randn(W, W) * 0.5)
        self.norm = ChannelsLastNorm(D)
        self.mix = nn.Parameter(torch.randn(D, D) / D**0.5)
        self.shift = nn.Parameter(torch.randn(1, 1, D) * 0.1)

    def forward(self, x):  # [B, T, D]
        B = x.shape[0]
        w = x.reshape(B * (T // self.W), self.W, D)  # windows: T / W rows per sample
        q, k, v = self.qkv(w).chunk(3, -1)
        att = torch.softmax(q @ k.transpose(-1, -2) + self.rel, -1)
        h = self.norm(att @ v + self.shift)
        h = torch.einsum("wnd,de->wne", h, self.mix)
        return torch.roll(h, 1, 1).reshape(B, T, D)


class HeadsFold(nn.Module):
    """Heads folded into the batch: [B, T, H*dh] -> [B*H, T, dh]; a raw weight by matmul and
    scaled_dot_product_attention with a learned mask [T, T] (a raw parameter)."""

    def __init__(self, H=2):
        super().__init__()
        self.H = H
        self.w = nn.Parameter(torch.randn(D // H, D // H) / 2)
        self.mask = nn.Parameter(torch.randn(T, T) * 0.3)
        self.out = nn.Linear(D, D)

    def forward(self, x):
        B = x.shape[0]
        h = x.reshape(B, T, self.H, D // self.H).transpose(1, 2).reshape(B * self.H, T, D // self.H)
        q = torch.tanh(h @ self.w)
        o = F.scaled_dot_product_attention(q, h, h, attn_mask=self.mask)
        return self.out(o.reshape(B, self.H, T, D // self.H).transpose(1, 2).reshape(B, T, D))


class FoldedConv(nn.Module):
    """Two halves of each image folded into dim 0 in front of a stock Conv2d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x):  # [B, 2, 4, 6]
        B = x.shape[0]
        y = self.conv(x.reshape(B, 2, 2, 2, 6).transpose(1, 2).reshape(B * 2, 2, 2, 6))
        return y.reshape(B, -1)


class SeqFirst(nn.Module):
    """Sequence-first Linear: the batch on dim 1 of the layer's input."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):  # [B, T, D]
        return self.lin(x.transpose(0, 1)).transpose(0, 1)


def _data(B, g, shape):
    return torch.randn(B, *shape, generator=g), torch.randint(0, 4, (B,), generator=g)


def _model(name):
    if name == "windows":
        return nn.Sequential(nn.Linear(3, D), Windows(), nn.Flatten(), nn.Linear(T * D, 4)), (T, 3)
    if name == "heads":
        return nn.Sequential(nn.Linear(3, D), HeadsFold(), nn.Flatten(), nn.Linear(T * D, 4)), (T, 3)
    raise KeyError(name)


@pytest.mark.parametrize("scope,alpha", [("tensor", 0.0), ("global", 0.3)])
@pytest.mark.parametrize("B", [3, 5])  # B == 3: dim 0 of the folded tensors is 3 * B = 9 (T / W = 3)
@pytest.mark.parametrize("name", ["windows", "heads"])
def test_folded_batch_exact(name, B, scope, alpha):
    g = torch.Generator().manual_seed(10 + B)
    torch.manual_seed(10 + B)
    model, shape = _model(name)
    retain, unlearn = _data(B, g, shape), _data(4, g, shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback use warns: fail on it
        err, _, og = compare(model, ce, retain, unlearn, scope=scope, alpha=alpha, backend="torch")
    assert err <= REL, f"{name}/B={B}/{scope}/{alpha}: relative error {err:.2e}"
    assert og.stats["fallback"] == [], og.stats["fallback"]


@pytest.mark.parametrize("lean,forget", [(False, False), (True, True)])
def test_folded_batch_exact_other_paths(lean, forget):
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    model, shape = _model("windows")
    retain, unlearn = _data(4, g, shape), _data(3, g, shape)
    err, _, og = compare(model, ce, retain, unlearn, alpha=0.3, backend="torch", lean_retain=lean, forget=forget)
    assert err <= REL, f"lean={lean} forget={forget}: relative error {err:.2e}"


def _retain_grads_restored(model, B, shape, match):
    g = torch.Generator().manual_seed(5)
    x, y = _data(B, g, shape)
    og = OrthoGrad(model)
    with pytest.raises(CaptureError, match=match):
        with og.retain():
            ce(model(x), y).mean().backward()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("where", ["module", "parent"])
def test_folded_conv_exact(where, B):
    # k images per sample folded into dim 0: each sample's images' positions are its tokens
    g = torch.Generator().manual_seed(20 + B)
    torch.manual_seed(20 + B)
    model = nn.Sequential(FoldedConv(), nn.Linear(72, 4)) if where == "module" else ParentFoldedConv()
    retain, unlearn = _data(B, g, (2, 4, 6)), _data(3, g, (2, 4, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback use warns: fail on it
        err, _, og = compare(model, ce, retain, unlearn, alpha=0.2, backend="torch")
    assert err <= REL, f"{where}/B={B}: relative error {err:.2e}"
    assert og.stats["fallback"] == [], og.stats["fallback"]


class FoldedLayers(nn.Module):
    """MViTv2's pooling (a depthwise conv over heads folded into dim 0) and a transposed conv over
    two halves of each image folded into dim 0."""

    def __init__(self):
        super().__init__()
        self.pool = nn.Conv2d(2, 2, 3, stride=2, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(2, 3, 2, stride=2)
        self.head = nn.Linear(3 * 4 * 6 * 2 // 2, 4)

    def forward(self, x):  # [B, 2, 4, 6]
        B = x.shape[0]
        h = x.reshape(B, 2, 2, 2, 6).transpose(1, 2).reshape(B * 2, 2, 2, 6)
        y = self.up(self.pool(h))  # [B * 2, 3, 2, 2]
        return self.head(y.reshape(B, -1))


@pytest.mark.parametrize("B", [1, 4])
def test_folded_depthwise_and_transposed_conv_exact(B):
    g = torch.Generator().manual_seed(30 + B)
    torch.manual_seed(30 + B)
    model = FoldedLayers()
    retain, unlearn = _data(B, g, (2, 4, 6)), _data(3, g, (2, 4, 6))
    err, _, og = compare(model, ce, retain, unlearn, alpha=0.2, backend="torch")
    assert err <= REL, f"B={B}: relative error {err:.2e}"
    assert og.stats["fallback"] == [], og.stats["fallback"]


class FoldedGroupNorm(nn.Module):
    """A channels-first norm over images folded into dim 0: refused (its rows are per image)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(1, 2)

    def forward(self, x):  # [B, 2, 4, 6]
        B = x.shape[0]
        return self.norm(x.reshape(B, 2, 2, 2, 6).transpose(1, 2).reshape(B * 2, 2, 2, 6)).reshape(B, -1)


def test_folded_channels_first_norm_refused_by_name():
    model = nn.Sequential(FoldedGroupNorm(), nn.Linear(48, 4))
    _retain_grads_restored(model, 3, (2, 4, 6), r"module '0.norm' \(GroupNorm\).*2 rows per sample")


@pytest.mark.parametrize("B", [T, T + 1])  # B == T: dim 0 of the transposed input equals B
def test_sequence_first_input_refused(B):
    model = nn.Sequential(SeqFirst(), nn.Flatten(), nn.Linear(T * D, 4))
    _retain_grads_restored(model, B, (T, D), r"module '0.lin'.*dim 0|leading dimension")


class Holder(nn.Module):
    """Owns a raw conv weight that its parent uses (no forward of its own runs)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 2, 3, 3) * 0.3)


class ParentFoldedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.holder = Holder()
        self.head = nn.Linear(72, 4)

    def forward(self, x):  # [B, 2, 4, 6] -> two halves of each image folded into dim 0
        B = x.shape[0]
        y = F.conv2d(x.reshape(B * 2, 2, 2, 6), self.holder.w, padding=1)
        return self.head(y.reshape(B, -1))

