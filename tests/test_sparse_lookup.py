"""The sparse lookup route (tables used by lookups only) against the float64 oracle: repeated and
shared ids, a padding row, two lookups of one table, chunked pairs; and its Gram against explicit
per-sample rows."""

import pytest
import torch
from torch import nn

import orthograd_fast.engine.gram as gram
import orthograd_fast.engine.routes.sparse_lookup as sparse_lookup
from engine_helpers import compare
from models import ce
from orthograd_fast.engine.factors import OuterFactors
from orthograd_fast.engine.gram import PerSampleGrads

REL = 1e-4
ORTH = 1e-5


class TwoTables(nn.Module):
    """Token ids through an embedding (with a padding row) used twice (query and context ids),
    a second table, mean-pooled into a classifier."""

    def __init__(self, V=37, d=24, classes=5, padding_idx=0):
        super().__init__()
        self.emb = nn.Embedding(V, d, padding_idx=padding_idx)
        self.kind = nn.Embedding(7, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        ids, ctx, kind = x[:, :6], x[:, 6:9], x[:, 9:] % 7
        h = self.emb(ids).mean(1) + 0.5 * self.emb(ctx).mean(1) + self.kind(kind).mean(1)
        return self.head(torch.tanh(h))


def _data(gen, B, V=37, skew=False):
    if skew:  # a few frequent ids: long groups of pairs within a table row
        x = torch.randint(0, 4, (B, 11), generator=gen)
    else:
        x = torch.randint(0, V, (B, 11), generator=gen)
    return x, torch.randint(0, 5, (B,), generator=gen)


@pytest.fixture
def factored(monkeypatch):
    monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)  # the small test tables take the sparse route


@pytest.mark.parametrize("B", [1, 9, 23])
@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("chunk", [None, 5])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_sparse_route_matches_oracle(B, skew, chunk, scope, factored, monkeypatch):
    if chunk is not None:  # a handful of pairs per chunk: many chunks, entries never split
        monkeypatch.setattr(sparse_lookup, "PAIR_CHUNK", chunk)
    torch.manual_seed(B)
    model = TwoTables()
    gen = torch.Generator().manual_seed(100 + B)
    retain, unlearn = _data(gen, B, skew=skew), _data(gen, 4, skew=skew)
    modes = []
    orig = PerSampleGrads._choose

    def spy(self, uses):
        r = orig(self, uses)
        modes.append((self.name, r.name))
        return r

    monkeypatch.setattr(PerSampleGrads, "_choose", spy)
    err, orth, og = compare(model, ce, retain, unlearn, scope=scope, alpha=0.0)
    assert ("emb.weight", "sparse") in modes and ("kind.weight", "sparse") in modes, modes
    assert err <= REL, f"relative error {err:.2e}"
    assert orth is None or orth <= ORTH, orth


@pytest.mark.parametrize("chunk", [None, 3])
def test_sparse_gram_equals_explicit_rows(chunk, factored, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(sparse_lookup, "PAIR_CHUNK", chunk)
    gen = torch.Generator().manual_seed(7)
    B, V, d = 13, 11, 6
    uses = []
    for T in (5, 2):  # two lookups of one table, different token counts
        ids = torch.randint(0, V, (B, T), generator=gen)
        ids[::3, 0] = 4  # a row many samples share
        uses.append(OuterFactors(torch.randn(B, T, 1, d, generator=gen), None, ids, (1, V, d)))
    p = nn.Parameter(torch.empty(V, d))
    term = PerSampleGrads("emb", p, uses)
    assert term.mode == "sparse"
    U = torch.randn(V, d, generator=gen)
    K, b = term.gram_coef(U)
    # independent: each sample's [V, d] rows by a loop over its tokens, in float64
    rows = torch.zeros(B, V, d, dtype=torch.float64)
    for u in uses:
        for i in range(B):
            for t in range(u.ids.shape[1]):
                rows[i, u.ids[i, t]] += u.A[i, t, 0].double()
    G = rows.reshape(B, -1)
    torch.testing.assert_close(K, G @ G.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b, G @ U.double().reshape(-1), rtol=1e-12, atol=1e-12)
    U2 = torch.randn(V, d, generator=gen)  # a later b reuses the entries K was formed from
    torch.testing.assert_close(term.coef(U2), G @ U2.double().reshape(-1), rtol=1e-12, atol=1e-12)


class Bags(nn.Module):
    """nn.EmbeddingBag over [B, L] ids (one bag per sample): ``mode`` sum / mean, a padding row,
    per-sample weights from the input (sum)."""

    def __init__(self, mode, padding_idx, weighted, V=400, d=16, classes=4):
        super().__init__()
        self.bag = nn.EmbeddingBag(V, d, mode=mode, padding_idx=padding_idx)
        self.weighted = weighted
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        ids = x[:, :-1]
        dt = self.bag.weight.dtype
        w = torch.sigmoid(x[:, -1:].to(dt) - ids.to(dt) / 10) if self.weighted else None
        return self.head(torch.tanh(self.bag(ids, per_sample_weights=w)))


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("mode,padding_idx,weighted", [("sum", None, False), ("mean", None, False), ("mean", 0, False), ("sum", 0, True)])
def test_embedding_bag_is_a_lookup(mode, padding_idx, weighted, scope, monkeypatch):
    # each of a bag's ids carries the bag's output gradient (mean: over its non-padding ids; sum:
    # times its weight): a lookup on the sparse route, no torch.func fallback; repeated and padding
    # ids (a bag of padding only included)
    monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)  # factored routes for the small table too
    torch.manual_seed(10)
    g = torch.Generator().manual_seed(10)
    x = torch.randint(0, 5, (6, 8), generator=g)
    x[0, :-1] = 0  # a bag of padding (or of id 0) only
    retain = (x, torch.randint(0, 4, (6,), generator=g))
    unlearn = (torch.randint(0, 400, (3, 8), generator=g), torch.randint(0, 4, (3,), generator=g))
    model = Bags(mode, padding_idx, weighted)
    err, orth, og = compare(model, ce, retain, unlearn, scope=scope, alpha=0.3, backend="torch")
    assert err <= REL, f"{mode}/{padding_idx}/{weighted}/{scope}: relative error {err:.2e}"
    assert og.stats["fallback"] == []
    if scope == "tensor":
        assert og._terms[model.bag.weight].mode == "sparse"
