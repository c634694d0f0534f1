"""nn.EmbeddingBag with flat ids and offsets (one bag per sample, ``og.retain(batch_size=B)``) and
in mode max, against a float64 oracle that runs each sample's bag alone."""

import copy

import pytest
import torch
from torch import nn

import orthograd_fast.engine.gram as gram
from oracle import project_out
from orthograd_fast import CaptureError, OrthoGrad

REL = 1e-4
ORTH = 1e-6


class TextClassifier(nn.Module):
    """A bag of token embeddings into a linear head: ``forward(text, offsets)``, flat ids (or ids
    [B, L] and no offsets)."""

    def __init__(self, mode, padding_idx=None, last=False, V=60, d=12, classes=4):
        super().__init__()
        self.bag = nn.EmbeddingBag(V, d, mode=mode, padding_idx=padding_idx, include_last_offset=last)
        self.head = nn.Linear(d, classes)

    def forward(self, text, offsets, weights=None):
        return self.head(torch.tanh(self.bag(text, offsets, per_sample_weights=weights)))


def _bags(gen, B, V=60, weighted=False, empty=True, small_ids=False):
    """(flat ids, per-bag lengths, per-token weights or None): ragged bags, one empty (unless
    ``empty`` is False); ``small_ids``: ids 0..4 (repeats within and across bags)."""
    lens = torch.randint(1, 7, (B,), generator=gen)
    if empty and B > 2:
        lens[1] = 0
    hi = 5 if small_ids else V
    text = torch.randint(0, hi, (int(lens.sum()),), generator=gen)
    w = torch.rand(text.shape, generator=gen) + 0.5 if weighted else None
    return text, lens, w


def _offsets(lens, last):
    starts = torch.cat([lens.new_zeros(1), lens.cumsum(0)[:-1]])
    return torch.cat([starts, lens.sum().reshape(1)]) if last else starts


def _call(model, text, lens, w, last):
    return model(text, _offsets(lens, last), w)


def _oracle(model, retain, unlearn, y_r, y_u, last, alpha):
    """{name: alpha * gbar - (1 - alpha) * P_perp(u)}, float64, each retain sample's bag run alone."""
    m = copy.deepcopy(model).double()
    names = [n for n, p in m.named_parameters()]
    params = [p for _, p in m.named_parameters()]
    ce = nn.CrossEntropyLoss()
    text, lens, w = retain
    starts = _offsets(lens, False)
    rows = []
    for i in range(lens.shape[0]):
        s, n = int(starts[i]), int(lens[i])
        wi = None if w is None else w[s : s + n].double()
        out = _call(m, text[s : s + n], lens[i : i + 1], wi, last)
        gs = torch.autograd.grad(ce(out, y_r[i : i + 1]), params, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)])
    text_u, lens_u, w_u = unlearn
    out = _call(m, text_u, lens_u, None if w_u is None else w_u.double(), last)
    us = torch.autograd.grad(ce(out, y_u), params, allow_unused=True)
    ref = {}
    for k, (n, p) in enumerate(zip(names, params)):
        G = torch.stack([r[k].reshape(-1) for r in rows])
        u = (torch.zeros_like(p) if us[k] is None else us[k]).reshape(-1)
        ref[n] = (alpha * G.mean(0) - (1 - alpha) * project_out(G, u), G, u)
    return ref


def _run(model, retain, unlearn, y_r, y_u, last, alpha, order):
    og = OrthoGrad(model, alpha=alpha, backend="torch")
    ce = nn.CrossEntropyLoss()
    text, lens, w = retain

    def retain_pass():
        with og.retain(batch_size=lens.shape[0]):
            ce(_call(model, text, lens, w, last), y_r).backward()

    def unlearn_pass():
        ce(_call(model, *unlearn, last), y_u).backward()

    if order == "contract":
        retain_pass()
        unlearn_pass()
    else:
        with og.forget():
            unlearn_pass()
        retain_pass()
    og.project_()
    return og


@pytest.mark.parametrize(
    "mode,padding_idx,last,weighted",
    [
        ("mean", None, False, False),
        ("mean", 0, True, False),
        ("sum", None, True, True),
        ("sum", 2, False, True),
        ("max", None, False, False),
        ("max", 1, True, False),
    ],
)
@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("routes", ["default", "factored"])
def test_offsets_match_oracle(mode, padding_idx, last, weighted, B, routes, monkeypatch):
    if routes == "factored":
        monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)  # the small table on its lookup routes
    seed = 31 * B + len(mode) + (padding_idx or 0) + 5 * last
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TextClassifier(mode, padding_idx, last)
    # small ids for padding tests: padding ids, and bags made of them, occur
    retain = _bags(gen, B, weighted=weighted, small_ids=padding_idx is not None)
    unlearn = _bags(gen, 3, weighted=weighted, empty=False)
    y_r, y_u = torch.randint(0, 4, (B,), generator=gen), torch.randint(0, 4, (3,), generator=gen)
    alpha = 0.25
    ref = _oracle(model, retain, unlearn, y_r, y_u, last, alpha)
    og = _run(model, retain, unlearn, y_r, y_u, last, alpha, order="contract" if B == 7 else "forget")
    assert og.stats["fallback"] == []
    for n, p in model.named_parameters():
        d_ref, G, u = ref[n]
        got = p.grad.reshape(-1).double()
        scale = d_ref.norm() + (1 - alpha) * u.norm() + alpha * G.mean(0).norm() + 1e-30
        err = float((got - d_ref).norm() / scale)
        assert err <= REL, f"{n}: relative error {err:.2e}"
        # the P_perp part is orthogonal to every retain sample's gradient
        perp = (got - alpha * G.mean(0)) / -(1 - alpha)
        for i in range(G.shape[0]):
            if float(G[i].norm()) > 0:
                cos = float((G[i] @ perp).abs() / (G[i].norm() * u.norm() + 1e-30))
                assert cos <= ORTH, f"{n}: sample {i} cos {cos:.2e}"


def test_max_mode_2d_ids_needs_no_fallback():
    # ids [B, L]: mode max on the lookup route (no per-sample replay)
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    model = TextClassifier("max", V=40, d=8)
    B, L = 6, 5
    x = torch.randint(0, 40, (B, L), generator=gen)
    xu = torch.randint(0, 40, (3, L), generator=gen)
    y, yu = torch.randint(0, 4, (B,), generator=gen), torch.randint(0, 4, (3,), generator=gen)
    ce = nn.CrossEntropyLoss()
    og = OrthoGrad(model, alpha=0.0, backend="torch")
    with og.retain():
        ce(model(x, None), y).backward()
    ce(model(xu, None), yu).backward()
    og.project_()
    assert og.stats["fallback"] == []
    # oracle: the same bags through the offsets form, one sample at a time
    lens, lens_u = torch.full((B,), L), torch.full((3,), L)
    ref = _oracle(model, (x.reshape(-1), lens, None), (xu.reshape(-1), lens_u, None), y, yu, False, 0.0)
    for n, p in model.named_parameters():
        d_ref, G, u = ref[n]
        err = float((p.grad.reshape(-1).double() - d_ref).norm() / (d_ref.norm() + u.norm()))
        assert err <= REL, f"{n}: relative error {err:.2e}"


def test_offsets_without_batch_size_says_what_to_do():
    gen = torch.Generator().manual_seed(4)
    model = TextClassifier("mean")
    text, lens, _ = _bags(gen, 5)
    og = OrthoGrad(model)
    with pytest.raises(CaptureError, match=r"batch_size=len\(offsets\)"):
        with og.retain():
            model(text, _offsets(lens, False)).sum().backward()
    # the block's hooks are gone and .grad is as it was
    assert all(p.grad is None for p in model.parameters())
    with og.retain(batch_size=5):
        model(text, _offsets(lens, False)).sum().backward()
    assert og.retain_size == 5
    og.reset()


def test_batch_size_that_is_not_the_bags_is_refused():
    gen = torch.Generator().manual_seed(5)
    model = TextClassifier("sum", last=True)
    text, lens, _ = _bags(gen, 4)
    og = OrthoGrad(model)
    with pytest.raises(CaptureError, match="makes 4 bags"):
        with og.retain(batch_size=3):
            model(text, _offsets(lens, True)).sum().backward()


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "4"])
def test_batch_size_must_be_a_positive_int(bad):
    og = OrthoGrad(TextClassifier("mean"))
    with pytest.raises(ValueError, match="batch_size"):
        with og.retain(batch_size=bad):
            pass
