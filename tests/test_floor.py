"""benchmarks/floor.py: the FLOP floor of an exact OrthoGrad step, against counts done by hand.

Each expected number below is written out from the layer shapes (forward 2 B T I O per layer,
backward the same for the weight gradient and again for the input gradient where one is needed;
the route costs of the module docstring), not computed by the code under test.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.floor import LOOKUP, ROWS, DENSE, flop_floor  # noqa: E402


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _batch(B, shape, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *shape, generator=g), torch.randint(classes, (B,), generator=g)


def test_mlp_counts_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    B, Bu = 5, 3
    before = [p.detach().clone() for p in model.parameters()]
    f = flop_floor(model, _ce, _batch(B, (4,), 3, 1), _batch(Bu, (4,), 3, 2))
    # plain: forward 2 B (4*6 + 6*3); backward: fc2 weight + fc2 input grad + fc1 weight (no input grad)
    assert f.plain_retain == 2 * 5 * 42 + (2 * 5 * 18) * 2 + 2 * 5 * 24 == 1020
    assert f.plain_unlearn == 2 * 3 * 42 + (2 * 3 * 18) * 2 + 2 * 3 * 24 == 612
    solve = 5**3 / 3
    by = {p.name: p for p in f.params}
    # fc1.weight (T = 1): ghost Gram 2 B^2 (4 + 6) = 500, coefficients min(GEMM 240, unlearn
    # factors 2 B Bu (4 + 6) = 300) = 240, update 240; minus the retain weight gradient 240
    assert by["0.weight"].route == "ghost"
    assert by["0.weight"].extra == pytest.approx(500 + 240 + 240 - 240 + solve)
    assert by["0.weight"].costs["tile"] == pytest.approx(240 + 2 * 25 * 24 + 2 * 5 * 24 * 2)
    # fc2.weight: Gram 2 B^2 (6 + 3) = 450, coefficients min(180, 2*5*3*9 = 270), update 180, minus 180
    assert by["2.weight"].extra == pytest.approx(450 + 180 + 180 - 180 + solve)
    # biases: rows, Gram 2 B^2 N, coefficients 2 B N, update 2 B N (rows cost = their gradient)
    assert by["0.bias"].route == "explicit"
    assert by["0.bias"].extra == pytest.approx(2 * 25 * 6 + 2 * 5 * 6 * 2 + solve)
    assert by["2.bias"].extra == pytest.approx(2 * 25 * 3 + 2 * 5 * 3 * 2 + solve)
    extra = 740 + 630 + 420 + 210 + 4 * solve
    assert f.extra == pytest.approx(extra)
    assert f.ratio == pytest.approx((1632 + extra) / 1632)
    # the model is untouched: no .grad, same weights
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(75, 4)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def test_conv_net_counts_by_hand():
    torch.manual_seed(0)
    model = ConvNet()
    B, Bu = 4, 2
    f = flop_floor(model, _ce, _batch(B, (2, 5, 5), 4, 3), _batch(Bu, (2, 5, 5), 4, 4))
    # conv: 25 output pixels x 3 outputs x (2 x 3 x 3) inputs per sample; fc: 75 -> 4
    conv, fc = 2 * 25 * 3 * 18, 2 * 75 * 4
    # forward conv + fc; backward: fc weight + fc input grad + conv weight (the input needs none)
    assert f.plain_retain == B * (conv + fc) + B * (2 * fc + conv) == 28800
    assert f.plain_unlearn == Bu * (conv + fc) + Bu * (2 * fc + conv) == 14400
    solve = 4**3 / 3
    by = {p.name: p for p in f.params}
    # conv.weight, T = 25: ghost 2 B^2 T^2 (18 + 3) = 420000 loses to tile: tiles (= the retain
    # weight gradient, credited back), Gram 2 B^2 54, coefficients 2 B 54, update 2 B 54
    assert by["conv.weight"].route == "tile"
    assert by["conv.weight"].costs["ghost"] == pytest.approx(420000 + 10800 + 10800)
    assert by["conv.weight"].extra == pytest.approx(2 * 16 * 54 + 2 * 4 * 54 * 2 + solve)
    # conv.bias: rows summed over the 25 pixels, then as any explicit tensor (N = 3)
    assert by["conv.bias"].extra == pytest.approx(2 * 16 * 3 + 2 * 4 * 3 * 2 + solve)
    # fc.weight, T = 1: ghost Gram 2 B^2 (75 + 4) = 2528, coefficients from the unlearn factors
    # 2 B Bu (75 + 4) = 1264 (< the 2400 GEMM), update 2400, minus the weight gradient 2400
    assert by["fc.weight"].route == "ghost"
    assert by["fc.weight"].extra == pytest.approx(2528 + 1264 + solve)
    assert by["fc.bias"].extra == pytest.approx(2 * 16 * 4 + 2 * 4 * 4 * 2 + solve)
    extra = 2592 + 144 + 3792 + 192 + 4 * solve
    assert f.extra == pytest.approx(extra)
    assert f.ratio == pytest.approx((43200 + extra) / 43200)


class TiedLM(nn.Module):
    def __init__(self, V=11, d=5):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids)))


def test_tied_embedding_and_norm_uses():
    # a tied table is one tensor with both uses (lookup + dense); a LayerNorm weight is rows over
    # the tokens; the floor never counts a tensor twice
    torch.manual_seed(0)
    model = TiedLM()
    g = torch.Generator().manual_seed(5)
    retain = (torch.randint(11, (3, 7), generator=g), torch.randint(11, (3, 7), generator=g))
    unlearn = (torch.randint(11, (2, 7), generator=g), torch.randint(11, (2, 7), generator=g))
    lm = lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)  # noqa: E731
    f = flop_floor(model, lm, retain, unlearn)
    by = {p.name: p for p in f.params}
    assert sorted(by) == ["emb.weight", "norm.bias", "norm.weight"]
    kinds = sorted(u.kind for u in by["emb.weight"].uses)
    assert kinds == sorted([LOOKUP, DENSE]) and all(u.T == 7 for u in by["emb.weight"].uses)
    assert [u.kind for u in by["norm.weight"].uses] == [ROWS] and by["norm.weight"].uses[0].T == 7
    # tile route of the tied table: tiles of both uses, then Gram 2 B^2 N and 2 x 2 B N
    N, B = 55, 3
    assert by["emb.weight"].costs["tile"] == pytest.approx(B * 7 * 5 + 2 * B * 7 * 5 * 11 + 2 * B * B * N + 4 * B * N)
    assert f.ratio > 1.0


class Bag(nn.Module):
    def __init__(self, V=13, d=4):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def test_untied_table_counts_the_sparse_route_from_its_ids():
    # ids chosen so the pairs are known: 3 samples of 4 tokens; row 1 in every sample (twice in the
    # first), row 2 in samples 0 and 2, six rows once: M = 3 + 4 + 4 (row, sample) entries, P = 3 + 1
    # pairs of entries that share a row
    model = Bag()
    ids = torch.tensor([[1, 1, 2, 5], [1, 6, 7, 8], [1, 2, 9, 10]])
    retain = (ids, torch.tensor([0, 1, 2]))
    unlearn = (torch.tensor([[3, 4, 5, 6]]), torch.tensor([1]))
    f = flop_floor(model, lambda out, y: F.cross_entropy(out, y, reduction="none"), retain, unlearn)
    by = {p.name: p for p in f.params}
    emb = by["emb.weight"]
    B, T, I, M, P = 3, 4, 4, 11, 4
    assert emb.costs["sparse"] == pytest.approx(B * T * I + 2 * (M + P) * I + 3 * B * T * I)
    assert emb.route == "sparse" and emb.costs["sparse"] < min(v for k, v in emb.costs.items() if k != "sparse")


def test_lstm_flops_are_counted():
    # FlopCounterMode does not see the fused recurrent kernel: the floor adds it by hand
    torch.manual_seed(0)

    class Rec(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    f = flop_floor(Rec(), _ce, _batch(2, (5, 3), 2, 6), _batch(2, (5, 3), 2, 7))
    lstm_fwd = 2 * 2 * 5 * (16 * 3 + 16 * 4)  # per weight: 2 B T numel
    head = 2 * 2 * 4 * 2
    assert f.plain_retain == pytest.approx(3 * lstm_fwd + head + 2 * head)
    by = {p.name: p for p in f.params}
    assert by["lstm.weight_hh_l0"].uses[0].kind == DENSE and by["lstm.weight_hh_l0"].uses[0].T == 5
    # the credit: each weight's retain gradient, 2 B T numel (input-to-hidden 16 x 3, hidden 16 x 4)
    assert by["lstm.weight_ih_l0"].credit == pytest.approx(2 * 2 * 5 * 16 * 3)
    assert by["lstm.weight_hh_l0"].credit == pytest.approx(2 * 2 * 5 * 16 * 4)
    assert f.as_dict()["retain_wgrad_credit_flops"] == pytest.approx(sum(p.credit for p in f.params))
