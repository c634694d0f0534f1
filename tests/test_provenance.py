"""Which tensors carry the retain batch is decided by where they come from, not by their shape.

Each model here has a tensor whose dim 0 equals the retain batch size B by coincidence (positions,
a coordinates table) or by construction (a fill, an explicit expand). Judged by shape alone, a
layer fed with positions [T, ...] when T == B takes positions for samples and attributes each
position's gradient to a different sample: a wrong direction that still sums to the right retain
gradient (no capture check can see it). Every case is compared with the float64 per-sample loop.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine_helpers import compare
from models import ce
from orthograd_fast.engine.batch_layout import Provenance

REL = 1e-4
T = 5  # sequence length; the retain batch below is T samples


class RelTable(nn.Module):
    """Attention with a T5-style relative-position table: an nn.Embedding looked up with [T, T]
    bucket ids built from arange (not from the batch), added to batched scores."""

    def __init__(self, d=6, heads=2, buckets=5):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.rel = nn.Embedding(buckets, heads)
        self.heads = heads

    def forward(self, x):
        B, n, d = x.shape
        q, k, v = self.qkv(x).reshape(B, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        pos = torch.arange(n)
        ids = (pos[None, :] - pos[:, None]).clamp(-2, 2) + 2  # [T, T]
        bias = self.rel(ids).permute(2, 0, 1).unsqueeze(0)  # [1, H, T, T]
        att = torch.softmax(q @ k.transpose(-1, -2) + bias, -1)
        return (att @ v).transpose(1, 2).reshape(B, n, d)


class CoordMLP(nn.Module):
    """A continuous position bias (Swin-v2 style): a small MLP of stock nn.Linear layers applied to a
    coordinates table [T, 2] (a buffer), broadcast into batched features."""

    def __init__(self, d=6):
        super().__init__()
        self.register_buffer("coords", torch.linspace(-1, 1, 2 * T).reshape(T, 2))
        self.mlp = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):  # x [B, T, d]
        return self.norm(x + self.mlp(self.coords))


class SharedPositions(nn.Module):
    """GPT-2 style position ids [1, T] looked up by an nn.Embedding and a tied head."""

    def __init__(self, V=9, d=6):
        super().__init__()
        self.tok = nn.Embedding(V, d)
        self.pos = nn.Embedding(T, d, padding_idx=0)
        self.lin = nn.Linear(d, d)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1])[None])
        return torch.tanh(self.lin(h))


class ZeroStateLoop(nn.Module):
    """A hand-written recurrence whose state starts as torch.zeros(B, H): a fill carries the batch."""

    def __init__(self, d=3, H=4):
        super().__init__()
        self.inp = nn.Linear(d, 4)
        self.rec = nn.Linear(4, 4)
        self.H = H

    def forward(self, x):  # [B, T, d]
        h = torch.zeros(x.shape[0], self.H, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
        return h


class ExpandedIds(nn.Module):
    """Decoder-style ids: a buffer [1, n] expanded to the batch, looked up per sample."""

    def __init__(self, V=9, d=6):
        super().__init__()
        self.register_buffer("dec", torch.tensor([[1, 4, 2]]))
        self.emb = nn.Embedding(V, d)
        self.lin = nn.Linear(d, d)

    def forward(self, x):  # [B, T, d]
        e = self.emb(self.dec.expand(x.shape[0], -1))  # [B, 3, d]
        return self.lin(x).mean(1, keepdim=True) * e


def _make(name, B, g):
    r = lambda *s: torch.randn(*s, generator=g)
    if name == "rel_table":
        m = nn.Sequential(nn.Linear(3, 6), RelTable(), nn.Flatten(), nn.Linear(6 * T, 4))
        x = lambda b: r(b, T, 3)
    elif name == "coord_mlp":
        m = nn.Sequential(nn.Linear(3, 6), CoordMLP(), nn.Flatten(), nn.Linear(6 * T, 4))
        x = lambda b: r(b, T, 3)
    elif name == "shared_positions":
        m = nn.Sequential(SharedPositions(), nn.Flatten(), nn.Linear(6 * T, 4))
        x = lambda b: torch.randint(0, 9, (b, T), generator=g)
    elif name == "zero_state":
        m = nn.Sequential(ZeroStateLoop(), nn.Linear(4, 4))
        x = lambda b: r(b, T, 3)
    elif name == "expanded_ids":
        m = nn.Sequential(ExpandedIds(), nn.Flatten(), nn.Linear(18, 4))
        x = lambda b: r(b, T, 6)
    else:
        raise KeyError(name)
    y = lambda b: torch.randint(0, 4, (b,), generator=g)
    return m, (x(B), y(B)), (x(3), y(3))


MODELS = ["rel_table", "coord_mlp", "shared_positions", "zero_state", "expanded_ids"]


@pytest.mark.parametrize("scope,alpha", [("tensor", 0.0), ("global", 0.3)])
@pytest.mark.parametrize("B", [T, T + 2])
@pytest.mark.parametrize("name", MODELS)
def test_batch_judged_by_origin_not_shape(name, B, scope, alpha):
    g = torch.Generator().manual_seed(B)
    torch.manual_seed(B)
    model, retain, unlearn = _make(name, B, g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback use warns: fail on it
        err, _, og = compare(model, ce, retain, unlearn, scope=scope, alpha=alpha, backend="torch")
    assert err <= REL, f"{name}/B={B}/{scope}/{alpha}: relative error {err:.2e}"
    assert og.stats["fallback"] == [], og.stats["fallback"]


@pytest.mark.parametrize("lean", [True, False])
def test_table_lookup_exact_without_lean_retain(lean):
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model, retain, unlearn = _make("rel_table", T, g)
    err, _, _ = compare(model, ce, retain, unlearn, alpha=0.3, backend="torch", lean_retain=lean, forget=True)
    assert err <= REL, f"lean={lean}: relative error {err:.2e}"


def test_provenance_rules():
    B = 4
    prov = Provenance()
    x = torch.randn(B, 3)
    prov.mark(x)
    y = x * 2
    prov.propagate(torch.mul, (x, 2), {}, [x, 2], y, B)
    assert prov.batched(y)
    pos = torch.arange(B)  # dim 0 == B, but positions
    prov.propagate(torch.arange, (B,), {}, [B], pos, B)
    assert not prov.batched(pos)
    z = torch.zeros(B, 2)
    prov.propagate(torch.zeros, (B, 2), {}, [B, 2], z, B)
    assert prov.batched(z)
    row = torch.randn(1, 3)
    e = row.expand(B, 3)
    prov.propagate(torch.Tensor.expand, (row, B, 3), {}, [row, B, 3], e, B)
    assert prov.batched(e)
    t = torch.randn(B, 3)  # a table with dim 0 == B, expanded along another dim
    t2 = t[:, None].expand(B, 2, 3)
    prov.propagate(torch.Tensor.expand, (t[:, None], B, 2, 3), {}, [t[:, None], B, 2, 3], t2, B)
    assert not prov.batched(t)
    assert not prov.batched(F.relu(t))


def _op(prov, B, func, *args):
    out = func(*args)
    leaves = [a for a in args if not isinstance(a, (tuple, list))] + [v for a in args if isinstance(a, (tuple, list)) for v in a]
    prov.propagate(func, args, {}, leaves, out, B)
    return out


def test_layout_rules():
    """Folds (k rows per sample on dim 0) through reshapes, transposes, rolls and mixing ops."""
    B, prov = 3, Provenance()
    x = torch.randn(B, 4, 6, 5)
    prov.mark(x)
    w = _op(prov, B, torch.Tensor.reshape, x, (B * 2, 2, 6, 5))  # windows: 2 rows per sample
    assert prov.fold(w, B) == 2
    w = _op(prov, B, torch.Tensor.transpose, w, 1, 2)
    assert prov.fold(w, B) == 2
    w = _op(prov, B, torch.roll, w, (1, 1), (1, 2))
    assert prov.fold(w, B) == 2
    assert prov.fold(_op(prov, B, torch.Tensor.flip, w, 0), B) is None  # mixes samples
    assert prov.fold(_op(prov, B, torch.roll, w, 1, 0), B) is None
    back = _op(prov, B, torch.Tensor.reshape, w, (B, -1))
    assert prov.fold(back, B) == 1
    # sequence-first: the batch moves to dim 1 and back; with T == B dim 0 is not the batch
    s = torch.randn(B, B, 5)
    prov.mark(s)
    t = _op(prov, B, torch.Tensor.transpose, s, 0, 1)
    assert prov.batched(t) and prov.fold(t, B) is None and prov.layout(t, B) == (1, 1)
    assert prov.fold(_op(prov, B, torch.tanh, t), B) is None
    assert prov.fold(_op(prov, B, torch.Tensor.transpose, t, 1, 0), B) == 1
    p = _op(prov, B, torch.Tensor.permute, s, (1, 0, 2))
    assert prov.layout(p, B) == (1, 1)
    # a reshape of a tensor whose batch is not on dim 0 has no known layout
    assert prov.fold(_op(prov, B, torch.Tensor.reshape, t, (B * B, 5)), B) is None


def test_repeat_interleave_along_the_batch_folds_it():
    # GCViT's global query (one per image) repeated for each of the image's windows: sample-major
    B, prov = 3, Provenance()
    q = torch.randn(B, 4, 5)
    prov.mark(q)
    w = _op(prov, B, torch.Tensor.repeat_interleave, q, 2, 0)
    assert prov.fold(w, B) == 2
    assert prov.fold(_op(prov, B, torch.repeat_interleave, w, 3, 0), B) == 6
    assert prov.fold(_op(prov, B, torch.Tensor.repeat_interleave, q, 2, 1), B) == 1  # another dim
    # a plain repeat tiles the batch sample-minor: no known layout; so do tensor repeats and the
    # flattening form (no dim)
    assert prov.fold(_op(prov, B, torch.Tensor.repeat, q, 2, 1, 1), B) is None
    assert prov.fold(_op(prov, B, torch.Tensor.repeat_interleave, q, torch.tensor([1, 2, 1]), 0), B) is None
    assert prov.fold(_op(prov, B, torch.Tensor.repeat_interleave, q, 2), B) is None


def test_reductions_move_the_batch_dim():
    # a sequence-first [T, B, F] reduced over time: the batch moves to dim 0; reduced over the
    # batch (or everything): no batch; with T == B the shape alone would mislead
    B, prov = 3, Provenance()
    x = torch.randn(B, 4, 5)
    prov.mark(x)
    t = _op(prov, B, torch.Tensor.transpose, x, 0, 1)  # [4, B, 5]: (1, 1)
    assert prov.layout(_op(prov, B, torch.Tensor.sum, t, 0), B) == (1, 0)
    assert prov.layout(_op(prov, B, torch.mean, t, (0, 2)), B) == (1, 0)
    assert prov.layout(_op(prov, B, torch.Tensor.mean, t, 0, True), B) == (1, 1)  # keepdim
    assert prov.layout(_op(prov, B, torch.amax, t, -1), B) == (1, 1)
    assert prov.layout(_op(prov, B, torch.Tensor.max, t, 0)[0], B) == (1, 0)
    assert prov.layout(_op(prov, B, torch.max, t, t), B) == (1, 1)  # elementwise
    assert prov.layout(_op(prov, B, torch.Tensor.sum, t, 1), B) is None  # over the samples
    s = torch.randn(B, B, 5)
    prov.mark(s)
    assert prov.layout(_op(prov, B, torch.Tensor.sum, s, 0), B) is None  # [B, 5]: not the batch
    assert prov.layout(_op(prov, B, torch.Tensor.sum, s, 1), B) == (1, 0)
    assert prov.layout(_op(prov, B, torch.Tensor.logsumexp, s, -1), B) == (1, 0)


def test_unpacked_sequences_are_batched():
    # nn.utils.rnn.pad_packed_sequence's padded output: one sequence per sample on dim 0 or 1,
    # whatever the packed data's tag
    B, prov = 3, Provenance()
    x = torch.randn(B, 4, 2)
    lengths = torch.tensor([4, 2, 3])
    prov.mark(x)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    for first in (True, False):
        out = _op(prov, B, torch._pad_packed_sequence, packed.data, packed.batch_sizes, first, 0.0, 4)
        assert prov.layout(out[0], B) == (1, 0 if first else 1)
