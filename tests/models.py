"""Small models covering every layer rule and the generic fallback (ragged, odd sizes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def ce(out, y):
    """Per-sample cross-entropy; sequence outputs [B, T, V] are summed over positions."""
    if out.dim() == 3:
        return F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)
    return F.cross_entropy(out, y, reduction="none")


class HiddenMatmulT(torch.autograd.Function):
    """``h @ w.T`` inside a custom autograd.Function: the operation capture does not see the
    operations inside, so a parameter used here is a use the capture misses."""

    @staticmethod
    def forward(ctx, h, w):
        ctx.save_for_backward(h, w)
        return h @ w.t()

    @staticmethod
    def backward(ctx, g):
        h, w = ctx.saved_tensors
        return g @ w, g.reshape(-1, g.shape[-1]).t() @ h.reshape(-1, h.shape[-1])


class RawParam(nn.Module):
    """A custom module with raw nn.Parameters used in its own forward (generic fallback)."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d) * 0.5 + 1)
        self.mix = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x):
        return torch.tanh(x @ self.mix) * self.scale


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.RMSNorm(d) if hasattr(nn, "RMSNorm") else nn.LayerNorm(d, bias=False)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d + 1), nn.GELU(), nn.Linear(2 * d + 1, d))

    def forward(self, x):
        h = self.ln1(x)
        T = x.shape[1]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), 1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.ff(self.ln2(x))


class TinyLM(nn.Module):
    """Decoder with MultiheadAttention, LayerNorm/RMSNorm and an embedding tied to the head."""

    def __init__(self, vocab=23, d=12, heads=2, T=5, layers=1, pad=0):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=pad)
        self.pos = nn.Parameter(torch.randn(T, d) * 0.1)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids):
        x = self.emb(ids) + self.pos[: ids.shape[1]]
        return self.head(self.ln(self.blocks(x)))


class PosAdd(nn.Module):
    def __init__(self, T, d):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(T, d) * 0.1)

    def forward(self, x):
        return x + self.pos[: x.shape[1]]


class TinyLMModules(TinyLM):
    """TinyLM whose positional table lives in its own module (the root owns no raw parameter)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        T, d = self.pos.shape
        del self.pos
        self.posadd = PosAdd(T, d)

    def forward(self, ids):
        return self.head(self.ln(self.blocks(self.posadd(self.emb(ids)))))


class SpeechFront(nn.Module):
    """Whisper-style Conv1d front end + a LayerNorm + pooled classifier."""

    def __init__(self, mels=6, d=10, classes=4):
        super().__init__()
        self.c1 = nn.Conv1d(mels, d, 3, padding=1)
        self.c2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.ln = nn.LayerNorm(d)
        self.out = nn.Linear(d, classes)

    def forward(self, x):
        h = F.gelu(self.c2(F.gelu(self.c1(x)))).transpose(1, 2)
        return self.out(self.ln(h).mean(1))


class OddCNN(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(6, 6, (3, 2), dilation=(2, 1), groups=3, padding="same", bias=False)
        self.gn = nn.GroupNorm(3, 6)
        self.c3 = nn.Conv2d(6, 4, 2, stride=(1, 2), padding=(1, 0), padding_mode="reflect")
        self.bn = nn.BatchNorm2d(4)
        with torch.no_grad():  # eval-mode BatchNorm with non-trivial running statistics
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
        self.head = nn.Linear(4 * 7 * 2, classes)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = self.gn(self.c2(h))
        h = self.bn(self.c3(h))
        return self.head(h.flatten(1))


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv3d(2, 3, (2, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1), dilation=(1, 1, 2))
        self.head = nn.Linear(3 * 3 * 3 * 3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.c(x)).flatten(1))


class LoRALinear(nn.Module):
    def __init__(self, i, o, r=3):
        super().__init__()
        self.base = nn.Linear(i, o)
        self.base.requires_grad_(False)
        self.A = nn.Linear(i, r, bias=False)
        self.Bm = nn.Linear(r, o, bias=False)
        nn.init.normal_(self.Bm.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.Bm(self.A(x))


class LoRANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = LoRALinear(9, 14)
        self.l2 = LoRALinear(14, 5)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


class RawNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(7, 6)
        self.raw = RawParam(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.raw(self.inp(x)))


class PadCNN(nn.Module):
    """Zero padding that differs between height and width, on a non-square input (the conv route
    keeps padding per dimension; a swap changes every per-sample gradient)."""

    def __init__(self, classes=4):
        super().__init__()
        self.c1 = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(2, 0))
        self.c2 = nn.Conv2d(5, 4, 3, padding=(0, 1), dilation=(1, 2))
        self.c3 = nn.Conv1d(4, 3, 3, padding=2)
        self.head = nn.Linear(3 * 14, classes)

    def forward(self, x):  # x [B, 3, 9, 6]
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))  # [B, 4, 4, 3]
        h = torch.tanh(self.c3(h.flatten(2)))  # [B, 3, 14]
        return self.head(h.flatten(1))


class TiedTokens(nn.Module):
    """An embedding tied to its output head with no other layer between: the table's per-sample
    gradient is the sum of a lookup use and a dense use, whose cross terms the Gram must include."""

    def __init__(self, vocab=11, d=6, pad=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=pad)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def make(name, gen=None, seed=0):
    """(model, retain (x, y), unlearn (x, y)) with random inputs and ragged sizes, reproducible:
    the data come from ``gen`` (default: a generator seeded with ``seed``), the model's
    initialization from a fixed seed (``seed``, or ``gen``'s initial seed) without touching the
    global random state."""
    g = gen if gen is not None else torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(g.initial_seed() if gen is not None else seed)
        return _make(name, g)


def _make(name, g):
    r = lambda *s: torch.randn(*s, generator=g)
    ri = lambda hi, *s: torch.randint(0, hi, s, generator=g)
    if name == "mlp":
        m = nn.Sequential(nn.Linear(13, 31), nn.Tanh(), nn.Linear(31, 17), nn.GELU(), nn.Linear(17, 7))
        return m, (r(6, 13), ri(7, 6)), (r(5, 13), ri(7, 5))
    if name == "cnn":
        m = OddCNN().eval()
        return m, (r(5, 3, 11, 9), ri(5, 5)), (r(3, 3, 11, 9), ri(5, 3))
    if name == "conv3d":
        return Conv3dNet(), (r(4, 2, 4, 5, 5), ri(3, 4)), (r(3, 2, 4, 5, 5), ri(3, 3))
    if name == "lm":
        m = TinyLM()
        return m, (ri(23, 5, 5), ri(23, 5, 5)), (ri(23, 3, 5), ri(23, 3, 5))
    if name == "speech":
        return SpeechFront(), (r(5, 6, 9), ri(4, 5)), (r(4, 6, 9), ri(4, 4))
    if name == "lora":
        return LoRANet(), (r(6, 9), ri(5, 6)), (r(4, 9), ri(5, 4))
    if name == "raw":
        return RawNet(), (r(5, 7), ri(3, 5)), (r(4, 7), ri(3, 4))
    if name == "cnn_pad":
        return PadCNN(), (r(5, 3, 9, 6), ri(4, 5)), (r(3, 3, 9, 6), ri(4, 3))
    if name == "tied":
        return TiedTokens(), (ri(11, 6, 4), ri(11, 6, 4)), (ri(11, 4, 4), ri(11, 4, 4))
    raise KeyError(name)


MODELS = ["mlp", "cnn", "conv3d", "lm", "speech", "lora", "raw", "cnn_pad", "tied"]


def spectrum(sigmas, n=9, classes=3, dtype=torch.float32, seed=0):
    """(model, retain, unlearn): a bias-free Linear whose retain per-sample gradients have singular
    values proportional to ``sigmas``, exactly, in any precision: sample i is sigmas[i] times the
    unit vector of a coordinate of its own (orthogonal inputs: orthogonal rows, K diagonal on every
    route), and all logits are ~0 (weights ~1e-3), so |g_i| = sigmas[i] sqrt(1 - 1/classes) (1 + O(1e-3))."""
    B = len(sigmas)
    assert B <= n
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(n, classes, bias=False)).to(dtype)
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
    xr = torch.zeros(B, n, dtype=torch.float64)
    xr[torch.arange(B), torch.randperm(n, generator=g)[:B]] = torch.tensor(sigmas, dtype=torch.float64)
    retain = (xr.to(dtype), torch.randint(0, classes, (B,), generator=g))
    unlearn = (torch.randn(4, n, generator=g).to(dtype), torch.randint(0, classes, (4,), generator=g))
    return model, retain, unlearn


class WideMLP(nn.Module):
    """Sizes where og.forget()'s factor route is cheaper for every weight: B_u (I + O) < O I."""

    def __init__(self, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # a fixed initialization, the global state untouched
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(17, 40), nn.ReLU(inplace=True), nn.Linear(40, 33), nn.Tanh(), nn.Linear(33, 5))

    def forward(self, x):
        return self.net(x)


def wide_mlp_data(gen, B=6, Bu=3):
    """(retain, unlearn) batches for :class:`WideMLP`."""
    return (torch.randn(B, 17, generator=gen), torch.randint(0, 5, (B,), generator=gen)), (
        torch.randn(Bu, 17, generator=gen),
        torch.randint(0, 5, (Bu,), generator=gen),
    )
