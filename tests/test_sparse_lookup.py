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
