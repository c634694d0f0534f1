"""Position-bias tables (T5, Swin): a table of parameters looked up with ids shared by all samples,
then copied, masked or shifted by constants before it meets the batched attention scores.

The per-sample rows of such a bias map back to the table by its lookup (an embedding use), with the
elementwise steps in between taken off as a mask or a sign (``ParamSpace._peel``), and a
``table[index]`` with a constant index is a lookup like ``F.embedding``'s. Steps with no such rule
(a scale, a broadcast) still go through the vector-Jacobian product of the recomputation. Every
case against the float64 per-sample loop.
"""

import pytest
import torch
from torch import nn

import orthograd_fast.engine.param_space as param_space
from engine_helpers import compare
from models import ce

REL = 1e-4
T = 5


class BiasAttention(nn.Module):
    """Attention whose scores get a bias from a table [buckets, H]: ``lookup`` by nn.Embedding
    (T5) or by indexing with a constant index, negative entries included (Swin); ``steps`` what
    happens to the bias [1, H, T, T] before it is added."""

    def __init__(self, lookup, steps, d=6, heads=2, buckets=5):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.heads, self.lookup, self.steps = heads, lookup, steps
        self.table = nn.Embedding(buckets, heads) if lookup == "embedding" else nn.Parameter(torch.randn(buckets, heads))
        rel = torch.arange(T)[None, :] - torch.arange(T)[:, None]
        self.register_buffer("ids", rel.clamp(-2, 2) + 2)
        self.register_buffer("causal", torch.ones(T, T, dtype=torch.bool).tril())
        self.register_buffer("shift", torch.randn(1, heads, T, T))

    def bias(self):
        if self.lookup == "embedding":
            b = self.table(self.ids)  # [T, T, H]
        else:  # ids 3 and 4 written as -2 and -1: indexing counts them from the end
            idx = torch.where(self.ids > 2, self.ids - 5, self.ids)
            b = self.table[idx.reshape(-1)].reshape(T, T, self.heads)
        b = b.permute(2, 0, 1).unsqueeze(0)  # [1, H, T, T]
        for s in self.steps:
            if s == "mask":  # T5's causal bias: where(mask, bias, min), then contiguous
                b = torch.where(self.causal, b, torch.finfo(b.dtype).min / 4).contiguous()
            elif s == "flipped_mask":
                b = torch.where(~self.causal, -1.0, b)
            elif s == "shift":
                b = b + self.shift
            elif s == "rsub":
                b = 0.25 - b
            elif s == "sub_alpha":
                b = torch.sub(self.shift, b, alpha=2.0)
            elif s == "scale":  # no rule: the vector-Jacobian product of the recomputation
                b = b * 0.5
            elif s == "broadcast":  # a bias [1, H, 1, T] spread over the rows: summed, no rule either
                b = b[:, :, :1, :] + self.shift
        return b

    def forward(self, x):
        B, n, d = x.shape
        q, k, v = self.qkv(x).reshape(B, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) + self.bias(), -1)
        return (att @ v).transpose(1, 2).reshape(B, n, d)


PEELED = [["mask"], ["flipped_mask"], ["shift", "rsub"], ["sub_alpha", "mask"], []]
NOT_PEELED = [["scale"], ["broadcast"], ["mask", "scale"]]


def _run(lookup, steps, B, scope, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 6), BiasAttention(lookup, steps), nn.Flatten(), nn.Linear(6 * T, 4))
    r = lambda b: (torch.randn(b, T, 3, generator=g), torch.randint(0, 4, (b,), generator=g))
    return compare(model, ce, r(B), r(3), scope=scope, alpha=alpha, backend="torch")


def _vjp_calls(monkeypatch):
    calls = []
    orig = param_space.ParamSpace._value

    def spy(self, t, env, *rest):
        calls.append(tuple(t.shape))
        return orig(self, t, env, *rest)

    monkeypatch.setattr(param_space.ParamSpace, "_value", spy)
    return calls


@pytest.mark.parametrize("scope,alpha", [("tensor", 0.0), ("global", 0.3)])
@pytest.mark.parametrize("steps", PEELED, ids=lambda s: "+".join(s) or "plain")
@pytest.mark.parametrize("lookup", ["embedding", "index"])
def test_bias_table_maps_back_as_a_lookup(lookup, steps, scope, alpha, monkeypatch):
    calls = _vjp_calls(monkeypatch)
    err, orth, og = _run(lookup, steps, T + 2, scope, alpha, seed=len(steps) + 7)
    assert err <= REL, f"{lookup}/{steps}: relative error {err:.2e}"
    assert orth is None or orth <= 1e-5, orth
    assert og.stats["fallback"] == [], og.stats["fallback"]
    assert calls == [], f"{lookup}/{steps}: recomputed {calls}"


@pytest.mark.parametrize("steps", NOT_PEELED, ids=lambda s: "+".join(s))
@pytest.mark.parametrize("lookup", ["embedding", "index"])
def test_bias_steps_without_a_rule_stay_exact(lookup, steps, monkeypatch):
    calls = _vjp_calls(monkeypatch)
    err, _, og = _run(lookup, steps, T, "tensor", 0.0, seed=11)
    assert err <= REL, f"{lookup}/{steps}: relative error {err:.2e}"
    assert og.stats["fallback"] == [], og.stats["fallback"]
    assert calls, "expected the vector-Jacobian product of the recomputation"


class _ScoresPlusBias(nn.Module):
    """Attention that adds a given bias [B, H, T, T] to its scores in place (MPNet's
    ``attention_scores += position_bias``); the bias's table belongs to the caller."""

    def __init__(self, d=6, heads=2):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.heads = heads

    def forward(self, x, bias):
        B, n, d = x.shape
        q, k, v = self.qkv(x).reshape(B, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2)
        scores += bias
        return (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, n, d)


class EncoderWithBias(nn.Module):
    """MPNet's encoder: the position bias looked up once, expanded to the batch and made
    contiguous (``copy``: "contiguous" or "clone", B equal rows of parameters), then handed to
    each layer."""

    def __init__(self, copy, heads=2, buckets=5):
        super().__init__()
        self.copy = copy
        self.inp = nn.Linear(3, 6)
        self.table = nn.Embedding(buckets, heads)
        self.layers = nn.ModuleList([_ScoresPlusBias(heads=heads) for _ in range(2)])
        self.head = nn.Linear(6 * T, 4)
        rel = torch.arange(T)[None, :] - torch.arange(T)[:, None]
        self.register_buffer("ids", rel.clamp(-2, 2) + 2)

    def forward(self, x):
        h = self.inp(x)
        b = self.table(self.ids).permute(2, 0, 1).unsqueeze(0).expand(x.shape[0], -1, -1, -1)
        b = b.contiguous() if self.copy == "contiguous" else b.clone()
        for layer in self.layers:
            h = layer(h, b)
        return self.head(h.flatten(1))


@pytest.mark.parametrize("copy", ["contiguous", "clone"])
@pytest.mark.parametrize("B", [1, 4])
def test_bias_expanded_to_the_batch_and_copied(copy, B):
    # the copy of the expanded bias holds B equal rows of parameters: each sample's rows of the
    # added bias map back to the table (it was refused: an add with no rule outside its owner)
    g = torch.Generator().manual_seed(20 + B)
    torch.manual_seed(20 + B)
    model = EncoderWithBias(copy).double()
    r = lambda b: (torch.randn(b, T, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (b,), generator=g))
    err, orth, og = compare(model, ce, r(B), r(3), alpha=0.2, backend="torch")
    assert err <= 1e-9, f"relative error {err:.2e}"
    assert orth <= 1e-9, orth
    assert og.stats["fallback"] == [], og.stats["fallback"]


class GatedHeadBias(nn.Module):
    """WavLM's gated relative position bias: the bias per head [H, T, T] repeated along the batch
    and viewed with the heads folded into dim 0 ([B * H, T, T]: each sample's H rows the same),
    times a gate computed from the data per (sample, head)."""

    def __init__(self, d=6, heads=2, buckets=5):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.gate = nn.Linear(d, heads)
        self.table = nn.Embedding(buckets, heads)
        rel = torch.arange(T)[None, :] - torch.arange(T)[:, None]
        self.register_buffer("ids", rel.clamp(-2, 2) + 2)

    def forward(self, x):
        B, n, d = x.shape
        H = self.heads
        bias = self.table(self.ids).permute(2, 0, 1).unsqueeze(0).repeat(B, 1, 1, 1).view(B * H, n, n)
        g = torch.sigmoid(self.gate(x)).permute(0, 2, 1).reshape(B * H, n, 1)
        q, k, v = self.qkv(x).reshape(B, n, 3, H, -1).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) + (g * bias).view(B, H, n, n), -1)
        return (att @ v).transpose(1, 2).reshape(B, n, d)


@pytest.mark.parametrize("B", [2, 5])
def test_bias_per_head_folded_with_the_batch(B):
    # k = H rows per sample on dim 0, equal across samples: handed out as [1, H, ...] expanded
    # along the batch (it was refused: a fold of k rows was taken only for one repeated row)
    g = torch.Generator().manual_seed(30 + B)
    torch.manual_seed(30 + B)
    model = nn.Sequential(nn.Linear(3, 6), GatedHeadBias(), nn.Flatten(), nn.Linear(6 * T, 4)).double()
    r = lambda b: (torch.randn(b, T, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (b,), generator=g))
    err, orth, og = compare(model, ce, r(B), r(3), alpha=0.2, backend="torch")
    assert err <= 1e-9, f"relative error {err:.2e}"
    assert orth <= 1e-9, orth
    assert og.stats["fallback"] == [], og.stats["fallback"]
