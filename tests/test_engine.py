"""OrthoGrad(backend="torch") and the paper's reference against the float64 oracle."""

import pytest
import torch
from torch import nn

import orthograd_fast.engine.gram as gram
import orthograd_fast.engine.solve as solve
from engine_helpers import compare
from models import MODELS, ce, make
from oracle import oracle_direction, oracle_grads
from orthograd_fast import OrthoGrad
from orthograd_fast.reference import orthograd_direction

REL = 1e-4
ORTH = 1e-5


@pytest.fixture(params=["auto-route", "factored"])
def route(request, monkeypatch):
    # "factored" turns off materialization of small tensors so the tile/ghost/token routes run
    # (embeddings on the token route; the lookup route has its own tests).
    if request.param == "factored":
        monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)
        monkeypatch.setattr(gram, "LOOKUP_ROUTE", False)
    return request.param


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_matches_oracle(name, scope, route):
    model, retain, unlearn = make(name)
    err, orth, _ = compare(model, ce, retain, unlearn, scope=scope, backend="torch")
    assert err <= REL, f"{name}/{scope}/{route}: relative error {err:.2e}"
    assert orth <= ORTH, f"{name}/{scope}/{route}: orthogonality {orth:.2e}"


@pytest.mark.parametrize("alpha", [0.3, 1.0])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_alpha(alpha, scope):
    model, retain, unlearn = make("lm")
    err, orth, _ = compare(model, ce, retain, unlearn, scope=scope, alpha=alpha, backend="torch")
    assert err <= REL
    if orth is not None:
        assert orth <= ORTH


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("name,lean", [("raw", False), ("mlp", False), ("cnn", False), ("tied", False)])
def test_alpha_off_the_lean_path(name, lean, scope):
    # parameters whose retain gradient is kept (lean_retain=False):
    # alpha * gbar_r comes from that gradient, not from the factors
    model, retain, unlearn = make(name)
    err, orth, og = compare(model, ce, retain, unlearn, scope=scope, alpha=0.3, backend="torch", lean_retain=lean)
    assert any(p not in og._lean for _, p in og.parameters), "every parameter took the lean path"
    assert err <= REL, f"{name}/{scope}: relative error {err:.2e}"
    assert orth <= ORTH, f"{name}/{scope}: orthogonality {orth:.2e}"


def test_routes_were_exercised(monkeypatch):
    monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)
    monkeypatch.setattr(gram, "LOOKUP_ROUTE", False)
    modes = set()
    for name in ("mlp", "cnn", "lm", "tied", "cnn_pad"):
        model, retain, unlearn = make(name)
        err, orth, og = compare(model, ce, retain, unlearn, backend="torch")
        assert err <= REL and orth <= ORTH, f"{name}: relative error {err:.2e}, orthogonality {orth:.2e}"
        modes |= {t.mode for t in og._terms.values()}
    assert {"tile", "ghost", "tokens", "explicit", "conv"} <= modes, modes


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_lookup_route_in_slabs(scope, monkeypatch):
    # the tied embedding + head of TinyLM (23 x 12, padding row) on the lookup route, formed in
    # slabs of 5 table rows (the last one ragged), against the oracle
    monkeypatch.setattr(gram, "EXPLICIT_MAX", 20)
    monkeypatch.setattr(gram, "TILE_SLAB_BYTES", 5 * 5 * 12 * 8)
    model, retain, unlearn = make("lm")
    retain = (retain[0].clone(), retain[1])
    retain[0][0, :2] = 0  # padding tokens (no gradient to row 0 from them)
    err, orth, og = compare(model, ce, retain, unlearn, scope=scope, backend="torch")
    assert og._terms[model.emb.weight].mode == "lookup"
    assert err <= REL and orth <= ORTH, (err, orth)


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_conv_route_in_calls_slabs_and_sample_chunks(scope, monkeypatch):
    # OddCNN's first conv (6 output channels, 27 weights per channel, B = 5, 30 positions) on the
    # conv route with budgets that split everything: convolution calls of 4 + 2 channels, each
    # widened to float64 in slabs of 3 channels (4 = 3 + 1: ragged), one sample per call
    monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)
    monkeypatch.setattr(gram, "TILE_SLAB_BYTES", 3 * 5 * 27 * 8)
    monkeypatch.setattr(gram, "CONV_TILE_BYTES", 4 * 5 * 27 * 4)
    monkeypatch.setattr(gram, "choose_route", lambda *a: "tile")  # the conv route for every conv
    monkeypatch.setattr(gram, "UNFOLD_TILE_TOKENS", 0)  # not the unfolded input's tiles
    model, retain, unlearn = make("cnn")
    err, orth, og = compare(model, ce, retain, unlearn, scope=scope, backend="torch")
    term = og._terms[model.c1.weight]
    assert term.mode == "conv" and term.uses[0].sample_chunk(gram.TILE_SLAB_BYTES) == 1
    assert err <= REL and orth <= ORTH, (err, orth)


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_convs_over_few_positions_take_tiles_of_the_unfolded_input(scope, monkeypatch):
    # OddCNN's convolutions (30 positions or fewer) on the tile route, their im2col formed in the
    # term's job (not when the terms are built), against the oracle
    monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)
    monkeypatch.setattr(gram, "choose_route", lambda *a: "tile")
    model, retain, unlearn = make("cnn")
    err, orth, og = compare(model, ce, retain, unlearn, scope=scope, backend="torch")
    term = og._terms[model.c1.weight]
    assert term.mode == "tile" and type(term.use).__name__ == "ConvOuter"
    assert err <= REL and orth <= ORTH, (err, orth)
    monkeypatch.setattr(gram, "UNFOLD_TILE_TOKENS", 0)  # the same model on the grouped-convolution tiles
    err, orth, og = compare(model, ce, retain, unlearn, scope=scope, backend="torch")
    assert og._terms[model.c1.weight].mode == "conv" and err <= REL and orth <= ORTH, (err, orth)


class _OnePositionCNN(nn.Module):
    """A convolution over a 1 x 1 output map (one position, as a late stage's at a small image
    size) between a convolution and a Linear head with a bias."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 5, 4)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.c2(torch.relu(self.c1(x)))).flatten(1))


def test_one_position_conv_is_unfolded_in_its_job_not_when_terms_are_built(monkeypatch):
    # a one-position convolution on the ghost route looks like a one-token layer to the bias
    # pairing (gram.share_bias_grams); building the terms must not unfold it on the caller's
    # thread (its token form is formed in its Gram job), and the result stays exact
    monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)
    monkeypatch.setattr(gram, "choose_route", lambda *a: gram.GHOST)
    torch.manual_seed(4)
    model = _OnePositionCNN()
    gen = torch.Generator().manual_seed(9)
    retain = (torch.randn(7, 3, 4, 4, generator=gen), torch.randint(0, 3, (7,), generator=gen))
    unlearn = (torch.randn(5, 3, 4, 4, generator=gen), torch.randint(0, 3, (5,), generator=gen))
    og = OrthoGrad(model, backend="torch")
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    terms = og._build_terms()
    t = terms[model.c2.weight]
    assert t.mode == gram.GHOST and type(t.use).__name__ == "ConvOuter" and t.use.a_shape[1] == 1
    assert t.use._form is None, "the terms' construction unfolded the convolution's input"
    assert terms[model.head.bias].gram_source is terms[model.head.weight]  # the pairing still runs
    og.reset()
    err, orth, og = compare(model, ce, retain, unlearn, backend="torch")
    assert og._terms[model.c2.weight].use._form is not None  # formed by the projection
    assert err <= REL and orth <= ORTH, (err, orth)


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("T", [1, 3])
def test_nearly_collinear_rows_factored(scope, T, monkeypatch):
    # per-sample gradients that differ by ~1e-3 (near-duplicate samples): K^-1 amplifies any
    # mismatch between K and b, so b must be as exact as K on the factored routes too
    monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 4))
    g = torch.Generator().manual_seed(6)
    base = torch.randn(1, T, 7, generator=g)
    xr = base + 1e-3 * torch.randn(5, T, 7, generator=g)
    yr = torch.randint(0, 4, (5, T), generator=g)
    unlearn = (base + 1e-2 * torch.randn(3, T, 7, generator=g), torch.randint(0, 4, (3, T), generator=g))
    err, orth, _ = compare(model, ce, (xr, yr), unlearn, scope=scope, backend="torch")
    assert err <= REL and orth <= ORTH, (err, orth)


@pytest.mark.parametrize("route_", ["explicit", "factored"])
def test_rank_deficient_duplicates(route_, monkeypatch):
    if route_ == "factored":
        monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)
    model, (xr, yr), unlearn = make("mlp")
    xr = torch.cat([xr, xr[:3]])  # duplicated samples: G has rank B - 3
    yr = torch.cat([yr, yr[:3]])
    err, orth, _ = compare(model, ce, (xr, yr), unlearn, backend="torch")
    assert err <= REL and orth <= ORTH


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_batch_larger_than_tensor(scope, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))  # biases of 4 and 2 entries
    g = torch.Generator().manual_seed(1)
    xr, yr = torch.randn(11, 3, generator=g), torch.randint(0, 2, (11,), generator=g)
    xu, yu = torch.randn(5, 3, generator=g), torch.randint(0, 2, (5,), generator=g)
    sizes = []  # which tensors took the column solve (groups and single terms alike)
    real = solve.solve_columns_stacked
    monkeypatch.setattr(solve, "solve_columns_stacked", lambda G, *a: sizes.extend([G.shape[2]] * G.shape[0]) or real(G, *a))
    err, orth, _ = compare(model, ce, (xr, yr), (xu, yu), scope=scope, backend="torch")
    assert err <= REL and orth <= ORTH
    # tensor scope: the biases (4, 2) and the second weight (8) have fewer entries than the 11
    # samples; the first weight (12) does not
    assert sorted(sizes) == ([2, 4, 8] if scope == "tensor" else []), sizes
    if scope == "tensor":  # a tensor with numel <= rank loses its whole unlearn gradient (the definition)
        assert model[2].bias.grad.abs().max() < 1e-5


def _as_float64(model, *batches):
    # The reference is checked for algorithmic parity: run it in float64 so that float32 rounding
    # inside its own QR/SVD of ill-conditioned G does not decide the comparison.
    f64 = lambda t: t.double() if t.is_floating_point() else t
    return model.double(), [tuple(f64(t) for t in b) for b in batches]


@pytest.mark.parametrize("name", ["mlp", "lm", "raw"])
@pytest.mark.parametrize("method", ["qr", "svd"])
def test_reference_matches_oracle(name, method):
    model, retain, unlearn = make(name)
    model, (retain, unlearn) = _as_float64(model, retain, unlearn)
    compared = 0
    for scope in ("tensor", "global"):
        got = orthograd_direction(model, ce, retain, unlearn, scope=scope, method=method)
        ref, G, u = oracle_direction(model, ce, retain, unlearn, scope=scope)
        Gall = torch.cat(list(G.values()), 1)
        for n in ref:
            # QR has no tolerance: it equals the exact projector only where G has full row rank
            # (a dead-ReLU sample gives a zero row and QR then removes an arbitrary extra direction).
            Gn = G[n] if scope == "tensor" else Gall
            s = torch.linalg.svdvals(Gn)
            if method == "qr" and (Gn.shape[0] > Gn.shape[1] or s[-1] <= 1e-4 * s[0]):
                continue
            compared += 1
            scale = ref[n].norm() + u[n].norm()
            assert float((got[n].reshape(-1).double() - ref[n]).norm() / scale) <= REL, (name, scope, n)
    assert compared > 0


def test_reference_qr_differs_on_rank_deficient_but_svd_does_not():
    # QR without tolerance removes arbitrary extra directions on duplicated samples (paper parity);
    # the SVD projector with a rank tolerance is exact.
    model, (xr, yr), unlearn = make("mlp")
    xr, yr = torch.cat([xr, xr]), torch.cat([yr, yr])
    model, (retain, unlearn) = _as_float64(model, (xr, yr), unlearn)
    svd = orthograd_direction(model, ce, retain, unlearn, method="svd")
    qr = orthograd_direction(model, ce, retain, unlearn, method="qr")
    ref, _, u = oracle_direction(model, ce, retain, unlearn)
    err = lambda d, n: float((d[n].reshape(-1) - ref[n]).norm() / (ref[n].norm() + u[n].norm()))
    assert max(err(svd, n) for n in ref) <= REL
    assert max(err(qr, n) for n in ref) > 1e-3


def test_multiple_retain_blocks_equal_union():
    model, (xr, yr), (xu, yu) = make("lm")
    from orthograd_fast import OrthoGrad

    og = OrthoGrad(model, backend="torch")
    model.zero_grad()
    with og.retain():
        ce(model(xr[:2]), yr[:2]).mean().backward()
    with og.retain():
        ce(model(xr[2:]), yr[2:]).mean().backward()
    assert og.retain_size == xr.shape[0]
    ce(model(xu), yu).mean().backward()
    og.project_()
    got = {n: p.grad.reshape(-1).double() for n, p in model.named_parameters()}
    ref, _, u = oracle_direction(model, ce, (xr, yr), (xu, yu))
    for n in ref:
        assert float((got[n] - ref[n]).norm() / (ref[n].norm() + u[n].norm())) <= REL, n


def test_frozen_parameters_untouched():
    model, retain, unlearn = make("lora")
    err, orth, og = compare(model, ce, retain, unlearn, backend="torch")
    assert err <= REL and orth <= ORTH
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert {n for n, _ in og.parameters} == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("route_", ["explicit", "factored"])
def test_hf_gpt2_shared_position_ids(route_, monkeypatch):
    # GPT-2 looks positions up with position_ids [1, T] shared by the batch; transformers' Conv1D
    # stores weights [in, out]. Both must be exact without any change to the model call.
    transformers = pytest.importorskip("transformers", reason="transformers not installed (extra [hf])")
    if route_ == "factored":
        monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=37, n_positions=8,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(20)
    lm = transformers.GPT2LMHeadModel(cfg).eval()

    class Logits(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids).logits

    model = Logits(lm)
    g = torch.Generator().manual_seed(21)
    xr, xu = torch.randint(0, 37, (5, 6), generator=g), torch.randint(0, 37, (3, 6), generator=g)
    err, orth, _ = compare(model, ce, (xr, xr), (xu, xu), backend="torch")
    assert err <= REL and orth <= ORTH


@pytest.mark.parametrize("name", ["mlp", "cnn", "speech"])
def test_lean_retain_forms_no_weight_gradients(name):
    """Under lean retain the retain backward never accumulates into a captured parameter (the
    weight-gradient GEMMs are not run) once the first projection has checked the capture (that
    span runs the real tensors: its retain gradient is compared with the per-sample sums), and
    the direction still matches the oracle."""
    model, retain, unlearn = make(name, torch.Generator().manual_seed(5))
    og = OrthoGrad(model)
    with og.retain():  # the checked first span
        ce(model(retain[0]), retain[1]).mean().backward()
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    og.project_()
    assert og._capture_checked
    model.zero_grad(set_to_none=True)
    hits = []
    # (the first layer's parameters anchor its output to the graph: autograd visits their
    # accumulators with an undefined gradient, so count only accumulations that left a gradient)
    handles = [
        p.register_post_accumulate_grad_hook(lambda q, n=n: hits.append(n) if q.grad is not None else None)
        for n, p in model.named_parameters()
    ]
    try:
        with og.retain():
            ce(model(retain[0]), retain[1]).mean().backward()
    finally:
        for h in handles:
            h.remove()
    lean = {n for n, p in model.named_parameters() if p in og._lean}
    assert lean, "no parameter took the lean path"
    assert not (set(hits) & lean), f"retain gradients formed for {sorted(set(hits) & lean)}"
    err, orth, _ = compare(model, ce, retain, unlearn)
    assert err <= 1e-4 and orth <= 1e-5, (err, orth)


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("name", ["mlp", "lm", "cnn"])
def test_retain_gradient_matches_oracle(name, lean, monkeypatch):
    """og.retain_gradient(): the mean over retain() blocks of each block's mean-loss gradient,
    from the factors (lean retain) or the kept retain gradient, against a float64 loop."""
    monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)  # factored routes (apply_ of every kind)
    model, retain, _ = make(name, torch.Generator().manual_seed(8))
    og = OrthoGrad(model, alpha=0.4, lean_retain=lean)
    halves = [(retain[0][:3], retain[1][:3]), (retain[0][3:], retain[1][3:])]
    for x, y in halves:  # two blocks: gbar_r is the mean of the blocks' gradients
        with og.retain():
            ce(model(x), y).mean().backward()
    got = og.retain_gradient()
    refs = [oracle_grads(model, ce, x, y) for x, y in halves]
    for n, g in got.items():
        ref = sum(G[n].mean(0) for G in refs) / len(refs)
        err = float((g.reshape(-1).double() - ref).norm() / (ref.norm() + 1e-12))
        assert err <= 1e-5, f"{name} '{n}': {err:.2e}"


class Conv1D(nn.Module):
    """transformers' Conv1D (y = x @ W + b, W stored [in, out]) without the dependency, with its
    forward: one addmm, which the capture reads as a transposed dense layer."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * nx**-0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.nf,))


class _Biased(nn.Module):
    """One-token layers with biases (shared Gram; c is a transposed Conv1D), one without a bias and
    one with a frozen weight (no sharing possible there)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(11, 23)
        self.b = nn.Linear(23, 19, bias=False)
        self.c = Conv1D(14, 19)
        self.d = nn.Linear(14, 5)
        self.d.weight.requires_grad_(False)

    def forward(self, x):
        return self.d(torch.tanh(self.c(torch.relu(self.b(torch.tanh(self.a(x)))))))


@pytest.mark.parametrize("forget", [False, True])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_one_token_bias_rides_on_its_weight_gram(forget, scope, monkeypatch):
    monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)  # the test weights factored (biases are rows anyway)
    monkeypatch.setattr(gram, "choose_route", lambda *a: gram.GHOST)  # the pairing needs the ghost route
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(3)
    model = _Biased()
    retain = (torch.randn(9, 11, generator=gen), torch.randint(0, 5, (9,), generator=gen))
    unlearn = (torch.randn(6, 11, generator=gen), torch.randint(0, 5, (6,), generator=gen))
    err, orth, og = compare(model, ce, retain, unlearn, scope=scope, forget=forget, unlearn_first=True, backend="torch")
    terms = {t.name: t for t in og._terms.values()}
    assert terms["a.bias"].gram_source is terms["a.weight"] and terms["c.bias"].gram_source is terms["c.weight"]
    assert terms["d.bias"].gram_source is None  # its weight is frozen: no Gram to share
    assert err <= REL, f"relative error {err:.2e}"
    assert orth <= ORTH, f"orthogonality {orth:.2e}"
