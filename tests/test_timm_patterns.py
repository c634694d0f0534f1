"""Layer patterns of timm models, written out here (timm's wheel requires torchvision, whose wheels
pull a CUDA torch; the project installs the CPU one), against the float64 oracle: the weight
standardization of StdConv2d / ScaledStdConv2d (BiT ResNetV2, NFNets) through F.batch_norm over
the weight; XCiT's Fourier position encoding, a convolution of a constant grid repeated along
the batch; SigLIP's attention pooling, a learned query expanded along the batch and projected
before it meets the tokens in the attention; Sequencer's LSTMs over the rows of each image;
GCViT's global query, repeated (interleaved) for each window of its image."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine_helpers import compare
from models import ce

REL = 1e-6  # float64 models: exact up to rounding


class StdConv2d(nn.Conv2d):
    """timm.layers.StdConv2d: the weight standardized per output channel by a training-mode
    F.batch_norm over the weight itself."""

    def __init__(self, *args, eps=1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm.layers.ScaledStdConv2d (NFNets): standardized, times a learned gain per output channel."""

    def __init__(self, cin, cout, k, gamma=1.0, eps=1e-6, **kwargs):
        super().__init__(cin, cout, k, **kwargs)
        self.gain = nn.Parameter(torch.ones(cout, 1, 1, 1))
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x):
        gain = (self.gain * self.scale).reshape(-1)
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, weight=gain, training=True, momentum=0.0, eps=self.eps)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConvNet(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.stem = ScaledStdConv2d(3, 6, 3, padding=1)
        self.conv = StdConv2d(6, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, classes)
        with torch.no_grad():
            self.stem.gain.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.head(self.conv(F.gelu(self.stem(x))).mean((2, 3)))


class FourierPosition(nn.Module):
    """XCiT's PositionalEncodingFourier: a 1 x 1 convolution of a sine / cosine grid, repeated B times."""

    def __init__(self, hidden=4, dim=12):
        super().__init__()
        self.proj = nn.Conv2d(2 * hidden, dim, 1)
        self.hidden = hidden

    def forward(self, B, H, W, how):
        dt = self.proj.weight.dtype
        # (as timm builds it: [1, H, W] grids, so that no constant has B rows when H == B)
        y = torch.arange(1, H + 1, dtype=dt).unsqueeze(1).repeat(1, 1, W) / H * 2 * math.pi
        x = torch.arange(1, W + 1, dtype=dt).repeat(1, H, 1) / W * 2 * math.pi
        f = 10000 ** (torch.arange(self.hidden // 2, dtype=dt) * 2 / self.hidden)
        grid = torch.cat([(y[..., None] / f).sin(), (y[..., None] / f).cos(), (x[..., None] / f).sin(), (x[..., None] / f).cos()], -1)
        pos = self.proj(grid.permute(0, 3, 1, 2))  # [1, dim, H, W]
        if how == "repeat":
            return pos.repeat(B, 1, 1, 1)
        return torch.tile(pos, (B, 1, 1, 1))


class XCiTLike(nn.Module):
    """Patch tokens plus the repeated position encoding, a LayerNorm, mean-pooled into a head."""

    def __init__(self, how, dim=12, classes=4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.pos = FourierPosition(dim=dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.how = how

    def forward(self, img):
        x = self.patch(img)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        pos = self.pos(B, H, W, self.how).reshape(B, -1, H * W).permute(0, 2, 1)
        return self.head(self.norm(x + pos).mean(1))


def _data(gen, B, size=8):
    return torch.randn(B, 3, size, size, generator=gen, dtype=torch.float64), torch.randint(0, 4, (B,), generator=gen)


@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_weight_standardized_convolutions(B, scope):
    # the batch_norm over the weight has no batch: a computation on parameters (it once read as
    # batch statistics and was refused)
    torch.manual_seed(B)
    gen = torch.Generator().manual_seed(B)
    model = StdConvNet().double()
    err, orth, og = compare(model, ce, _data(gen, B), _data(gen, 3), scope=scope, alpha=0.2, backend="torch")
    assert err <= REL, f"relative error {err:.2e}"
    assert og.stats["fallback"] == []


def test_batch_norm_over_data_in_training_mode_is_still_refused():
    from orthograd_fast import OrthoGrad, UnsupportedModule

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))
    og = OrthoGrad(model.train())
    with pytest.raises(UnsupportedModule, match="batch statistics"):
        with og.retain():
            model(torch.randn(3, 3, 8, 8)).sum().backward()


@pytest.mark.parametrize("how", ["repeat", "tile"])
@pytest.mark.parametrize("B", [2, 6])
def test_position_encoding_repeated_along_the_batch(how, B):
    # pos.repeat(B, 1, 1, 1) of a [1, ...] tensor of parameters is the one row expanded along the
    # batch: each sample's rows of the projection's gradient
    torch.manual_seed(10 + B)
    gen = torch.Generator().manual_seed(10 + B)
    model = XCiTLike(how).double()
    err, orth, og = compare(model, ce, _data(gen, B), _data(gen, 3), alpha=0.3, backend="torch")
    assert err <= REL, f"{how}: relative error {err:.2e}"
    assert og.stats["fallback"] == []


class AttentionPoolLatent(nn.Module):
    """timm's AttentionPoolLatent (SigLIP's MAP head): a learned latent query, expanded along the
    batch, projected (and normalized) before the attention over the batch's tokens."""

    def __init__(self, dim=8, heads=2, latent_len=2, fused=True, qk_norm=False):
        super().__init__()
        self.heads, self.hd, self.latent_len, self.fused = heads, dim // heads, latent_len, fused
        self.latent = nn.Parameter(torch.randn(1, latent_len, dim) * 0.5)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.LayerNorm(self.hd) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, self.latent_len, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.q_norm(q)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = ((q * self.hd**-0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, self.latent_len, C)).mean(1)


class PooledTokens(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.pool = AttentionPoolLatent(**kw)
        self.head = nn.Linear(8, 4)

    def forward(self, img):
        return self.head(self.pool(self.patch(img).flatten(2).transpose(1, 2)))


@pytest.mark.parametrize("fused,qk_norm", [(True, False), (True, True), (False, False), (False, True)])
@pytest.mark.parametrize("B", [1, 4])
def test_latent_query_attention_pooling(fused, qk_norm, B):
    # the query's projection (and norm) of the expanded latent stay one row expanded along the
    # batch: the attention (fused, or written out with matmuls) hands out its per-sample rows
    torch.manual_seed(20 + B)
    gen = torch.Generator().manual_seed(20 + B)
    model = PooledTokens(fused=fused, qk_norm=qk_norm).double()
    err, orth, og = compare(model, ce, _data(gen, B), _data(gen, 3), alpha=0.25, backend="torch")
    assert err <= REL, f"fused={fused} qk_norm={qk_norm}: relative error {err:.2e}"
    assert og.stats["fallback"] == []


class LSTM2d(nn.Module):
    """timm's Sequencer2d block: bidirectional LSTMs over the rows and over the columns of each
    image, the batch folded into the LSTMs' batch dim (W or H sequences per sample)."""

    def __init__(self, c=6, hidden=4):
        super().__init__()
        self.rnn_v = nn.LSTM(c, hidden, batch_first=True, bidirectional=True)
        self.rnn_h = nn.LSTM(c, hidden, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(4 * hidden, c)

    def forward(self, x):
        B, H, W, C = x.shape
        v, _ = self.rnn_v(x.permute(0, 2, 1, 3).reshape(-1, H, C))
        v = v.reshape(B, W, H, -1).permute(0, 2, 1, 3)
        h, _ = self.rnn_h(x.reshape(-1, W, C))
        h = h.reshape(B, H, W, -1)
        return self.fc(torch.cat([v, h], dim=-1))


class Sequencer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 2, stride=2)
        self.mix = LSTM2d()
        self.head = nn.Linear(6, 4)

    def forward(self, img):
        x = self.stem(img).permute(0, 2, 3, 1)
        return self.head(self.mix(x).mean((1, 2)))


@pytest.mark.parametrize("B", [1, 3])
def test_lstm_over_the_rows_of_each_image(B):
    # each sample's W (H) sequences are its tokens; the input layout comes from the provenance
    torch.manual_seed(30 + B)
    gen = torch.Generator().manual_seed(30 + B)
    model = Sequencer().double()
    err, orth, og = compare(model, ce, _data(gen, B, size=6), _data(gen, 2, size=6), alpha=0.2, backend="torch")
    assert err <= REL, f"relative error {err:.2e}"
    assert og.stats["fallback"] == []


def test_lstm_over_a_dim_that_is_not_the_batch_is_refused():
    # the sequences on dim 0 are the images' rows across samples (time-first data read as
    # batch-first): no per-sample attribution, a clear error instead of a shape error later
    from orthograd_fast import CaptureError, OrthoGrad

    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 4, batch_first=True)

        def forward(self, x):  # x [B, T, 3]: run on [T, B, 3] as if batch-first
            return self.rnn(x.transpose(0, 1))[0].mean((0, 1)).sum(-1, keepdim=True).expand(x.shape[0], 1)

    model = Transposed()
    og = OrthoGrad(model)
    with pytest.raises(CaptureError, match="batch dim 0 holds 5 sequences"):
        with og.retain():
            model(torch.randn(3, 5, 3)).sum().backward()


class GlobalQueryWindows(nn.Module):
    """GCViT's window attention with a global query: per image, a query computed from the whole
    (pooled) image, repeat_interleave'd over the image's windows; keys and values from each window;
    a relative-position bias parameter added to the scores."""

    def __init__(self, c=6, heads=2, win=2):
        super().__init__()
        self.win, self.heads = win, heads
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.q_global = nn.Linear(c, c)
        self.kv = nn.Linear(c, 2 * c)
        self.rel = nn.Parameter(torch.randn(heads, win * win, win * win) * 0.1)
        self.head = nn.Linear(c, 4)

    def forward(self, img):
        x = self.stem(img).permute(0, 2, 3, 1)  # [B, H, W, C]
        B, H, W, C = x.shape
        w, hd = self.win, C // self.heads
        xw = x.reshape(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
        g = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), w).flatten(2).transpose(1, 2)  # [B, N, C]
        q = self.q_global(g).repeat_interleave(xw.shape[0] // B, dim=0)
        q = q.reshape(-1, w * w, self.heads, hd).transpose(1, 2)
        k, v = self.kv(xw).reshape(-1, w * w, 2, self.heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * hd**-0.5 + self.rel
        o = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, -1, C)
        return self.head(o.mean(1))


@pytest.mark.parametrize("B", [1, 3])
def test_global_query_interleaved_over_windows(B):
    torch.manual_seed(40 + B)
    gen = torch.Generator().manual_seed(40 + B)
    model = GlobalQueryWindows().double()
    err, orth, og = compare(model, ce, _data(gen, B), _data(gen, 2), alpha=0.2, backend="torch")
    assert err <= REL, f"relative error {err:.2e}"
    assert og.stats["fallback"] == []


class WrittenQuery(nn.Module):
    """A learned query expanded along the batch and scaled (``* 1.0``: equal rows of parameters),
    then maybe written in place before it meets the tokens."""

    def __init__(self, write):
        super().__init__()
        self.latent = nn.Parameter(torch.randn(1, 2, 4))
        self.head = nn.Linear(4, 4)
        self.write = write

    def forward(self, img):
        x = img.reshape(img.shape[0], 3, -1)[:, :2, :4]  # [B, 2, 4]
        q = self.latent.expand(x.shape[0], -1, -1) * 1.5
        if self.write:
            q.mul_(2.0)  # plain PyTorch allows it (q is a fresh tensor); the equal rows' mark goes
        return self.head((q * x).mean(1))


@pytest.mark.parametrize("write", [False, True])
def test_equal_rows_are_forgotten_after_a_write_in_place(write):
    # the capture computes what plain PyTorch computes (no expanded view that a write would
    # refuse); a write in place drops the rows' mark: then the product is not taken per sample
    # from one row (whose recipe the write left behind), and the step is exact by another way
    # (the module's replay). Two steps: the second runs without the first span's capture check.
    from engine_helpers import judge
    from orthograd_fast import OrthoGrad

    torch.manual_seed(50)
    gen = torch.Generator().manual_seed(50)
    model = WrittenQuery(write).double()
    retain, unlearn = _data(gen, 3), _data(gen, 2)
    og = OrthoGrad(model, alpha=0.2, backend="torch")
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with og.retain():
            ce(model(retain[0]), retain[1]).mean().backward()
        ce(model(unlearn[0]), unlearn[1]).mean().backward()
        og.project_()
    got = {n: p.grad.reshape(-1).double() for n, p in model.named_parameters()}
    err, _ = judge(model, got, ce, retain, unlearn, alpha=0.2)
    assert err <= REL, f"write={write}: relative error {err:.2e}"
    assert (og.stats["fallback"] != []) == write, og.stats["fallback"]
