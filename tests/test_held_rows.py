"""Held float32 rows (orthograd_fast.engine.held_rows): tile and conv terms form their per-sample rows once
in float32, take K from a float32 GEMM and re-project the residual; against the float64 oracle,
with the orthogonality read directly, on the shapes and layouts that route serves."""

import pytest
import torch
from torch import nn

import orthograd_fast.engine.gram as gram
import orthograd_fast.engine.held_rows as held_rows
from engine_helpers import compare, og_direction
from models import ce
from oracle import oracle_direction, oracle_grads, orthogonality, project_out
from orthograd_fast import OrthoGrad
from tolerance import assert_close

REL = 1e-4
ORTH = 1e-5


class Tokens(nn.Module):
    """Linear layers over T tokens (tile route), one weight used transposed (x @ W, W [I, O])."""

    def __init__(self, I=13, H=11, C=4):
        super().__init__()
        self.fc = nn.Linear(I, H)
        self.W = nn.Parameter(torch.randn(H, H) / H**0.5)
        self.head = nn.Linear(H, C)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        h = torch.tanh(h @ self.W)
        return self.head(h).mean(1)


class Convs(nn.Module):
    """A dense and a depthwise convolution (conv route), odd channel counts."""

    def __init__(self, C=3, H=5, K=4):
        super().__init__()
        self.c1 = nn.Conv2d(C, H, 3, padding=1)
        self.dw = nn.Conv2d(H, H, 3, padding=1, groups=H)
        self.head = nn.Linear(H, K)

    def forward(self, x):
        h = torch.relu(self.dw(torch.relu(self.c1(x))))
        return self.head(h.mean((2, 3)))


class TiedLM(nn.Module):
    """An embedding table tied to the output head (lookup route: one-hot and dense uses)."""

    def __init__(self, V=37, d=6, C=4):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, V, bias=False)
        self.out.weight = self.emb.weight
        self.head = nn.Linear(V, C)

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids)))
        return self.head(torch.tanh(self.out(h))).mean(1)


def _data(name, g, B=7, Bu=3):
    classes = 4
    if name == "tied":
        x = (torch.randint(0, 37, (B, 5), generator=g), torch.randint(0, 37, (Bu, 5), generator=g))
    else:
        shape = (5, 13) if name in ("tokens", "wide") else (3, 6, 5)
        x = (torch.randn(B, *shape, generator=g), torch.randn(Bu, *shape, generator=g))
    return (
        (x[0], torch.randint(0, classes, (B,), generator=g)),
        (x[1], torch.randint(0, classes, (Bu,), generator=g)),
    )


@pytest.fixture
def tile(monkeypatch):
    # small tensors on the factored routes (tile for tokens, conv for images)
    monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)
    monkeypatch.setattr(gram, "choose_route", lambda *a: gram.TILE)


@pytest.mark.parametrize("name", ["tokens", "wide", "convs", "tied"])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_held_rows_match_the_oracle(tile, name, alpha):
    g = torch.Generator().manual_seed(sum(map(ord, name)) + int(10 * alpha))
    torch.manual_seed(int(torch.randint(0, 1000, (1,), generator=g)))
    # "wide": the first layer has more outputs than inputs
    model = {"tokens": Tokens, "wide": lambda: Tokens(I=13, H=19), "convs": Convs, "tied": TiedLM}[name]()
    retain, unlearn = _data(name, g)
    err, orth, og = compare(model, ce, retain, unlearn, scope="tensor", alpha=alpha, backend="torch")
    # three weights on the tile/conv/lookup routes (the biases are explicit rows); a small, badly
    # conditioned one (the 45-entry depthwise weight at B = 7) may go back to float64
    assert og.stats["held_rows"] >= 2, og.stats
    if name == "tied":
        assert og._terms[model.emb.weight].mode == "lookup" and og._terms[model.emb.weight].hold
    assert err <= REL, err
    assert orth <= ORTH, orth


def test_held_rows_off_gives_the_same_direction(tile, monkeypatch):
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = Tokens()
    retain, unlearn = _data("tokens", g)
    og, held = og_direction(model, ce, retain, unlearn, backend="torch")
    assert og.stats["held_rows"] >= 3
    monkeypatch.setattr(held_rows, "MAX_BYTES", 0)
    og, f64 = og_direction(model, ce, retain, unlearn, backend="torch")
    assert og.stats["held_rows"] == 0
    for n in held:
        assert float((held[n] - f64[n]).norm() / f64[n].norm()) < 1e-5, n


def collinear(spread, seed, B=8, I=31, O=9, T=3):
    """A bias-free Linear over T tokens with retain inputs x_i = x0 + spread * r_i and output
    gradients v_i = v (a loss linear in the output): B float32-exact rows whose singular values
    run from ~1 down to ~spread."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(T, I, generator=g)
    xr = x0 + spread * torch.randn(B, T, I, generator=g)
    v = torch.randn(O, generator=g)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Linear(I, O, bias=False)
    return model, (xr, v.expand(B, T, O).clone()), (torch.randn(4, T, I, generator=g), torch.randn(4, T, O, generator=g))


def linear_loss(out, v):
    return (out * v).sum((-1, -2))


def _orth(model, retain, unlearn):
    og, got = og_direction(model, linear_loss, retain, unlearn, backend="torch")
    ref, G, u = oracle_direction(model, linear_loss, retain, unlearn)
    s = torch.linalg.svdvals(G["weight"])
    err = float((got["weight"] - ref["weight"]).norm() / (ref["weight"].norm() + u["weight"].norm()))
    return og, err, orthogonality(G, {"weight": -got["weight"]}, u), float((s[0] / s[-1]) ** 2)


@pytest.mark.parametrize("seed", [1, 2])
def test_the_passes_remove_what_the_float32_gram_leaves(tile, seed):
    # cond(K) ~ 7e4: the float32 Gram alone (K32^-1, no pass) leaves 2e-5 to 4e-5 of the direction
    # along the weak rows; the engine, with its passes, 4e-7 to 7e-7 (measured). The rows are exact
    # in float32, so the oracle sees the engine's own rows: any error is the engine's.
    model, retain, unlearn = collinear(2e-2, seed=seed)
    og, err, orth, cond = _orth(model, retain, unlearn)
    assert 3e4 < cond < 1e5, cond
    assert og.stats["held_rows"] == 1
    assert err <= 3e-6 and orth <= 1e-7, (err, orth)
    # the same rows and u projected with the float32 Gram and no pass: the thresholds tell it apart
    ref, G, u = oracle_direction(model, linear_loss, retain, unlearn)
    Y, uw = G["weight"].float(), u["weight"].float()
    K32 = (Y @ Y.t()).double()
    naive = (uw - Y.t() @ (torch.linalg.solve(K32, (Y @ uw).double())).float()).double()
    err_naive = float((-naive - ref["weight"]).norm() / (ref["weight"].norm() + u["weight"].norm()))
    assert err_naive > 1e-5, err_naive


def test_slow_passes_fall_back_to_float64(tile, monkeypatch):
    # planted: every pass counts as too slow; the term goes back to the float64 route with its
    # vector as it was, and the result is still exact
    monkeypatch.setattr(held_rows, "SLOW", 1e-9)
    model, retain, unlearn = collinear(2e-2, seed=1)
    og, err, orth, _ = _orth(model, retain, unlearn)
    assert og.stats["held_rows"] == 0
    assert err <= 3e-6 and orth <= 1e-7, (err, orth)


def test_too_ill_conditioned_takes_the_float64_route(tile):
    # cond(K) ~ 1e10: no pass could fix a float32 Gram; the term stays on float64
    model, retain, unlearn = collinear(1e-5 * 3, seed=2)
    og, err, orth, cond = _orth(model, retain, unlearn)
    assert cond > 1e9, cond
    assert og.stats["held_rows"] == 0
    assert orth <= ORTH and err <= REL, (orth, err)


def test_usable():
    n = 10_000
    assert held_rows.usable(n, 1.0, 1e3, 1e-6)
    assert not held_rows.usable(n, 1.0, 1e9, 1e-6)  # estimated contraction per pass above RHO_MAX
    assert not held_rows.usable(n, 0.0, 1.0, 1e-6)  # singular
    assert not held_rows.usable(n, 1e-3, 1.0, 1e-2)  # the rank cutoff could act
    assert not held_rows.usable(n, 1.0, float("nan"), 1e-6)


def _tokens(seed):
    """(model, retain, unlearn, a fresh OrthoGrad, the data generator) of the Tokens model."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Tokens()
    retain, unlearn = _data("tokens", g)
    return model, retain, unlearn, OrthoGrad(model, backend="torch"), g


def test_grad_untouched_when_the_projection_raises(tile):
    # a held term projects inside its job; .grad must not change when another tensor's check raises
    model, retain, unlearn, og, _ = _tokens(5)
    for step in range(2):
        model.zero_grad(set_to_none=True)
        with og.retain():
            ce(model(retain[0]), retain[1]).mean().backward()
        ce(model(unlearn[0]), unlearn[1]).mean().backward()
        if step == 0:
            og.project_()
            assert og.stats["held_rows"] >= 3
    model.head.bias.grad[0] = float("nan")
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match="head.bias"):
        og.project_()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, before[n]) or n == "head.bias", n


def test_project_vectors_twice_in_a_step(tile):
    # a second projection in the same step forms the rows again (the first dropped them)
    model, retain, unlearn, og, g = _tokens(6)
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    G = oracle_grads(model, ce, *retain)
    for _ in range(2):
        vecs = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
        got = og.project_vectors(vecs)
        assert og.stats["held_rows"] >= 3
        for n in vecs:
            ref = project_out(G[n], vecs[n].reshape(-1).double())
            assert float((got[n].reshape(-1).double() - ref).norm() / vecs[n].norm()) < REL, n


def test_rows_alive_on_one_thread_do_not_share_its_scratch(tile):
    # the thread's scratch serves one live set of rows; a second term formed meanwhile gets its own
    from orthograd_fast.engine.factors import OuterFactors

    g = torch.Generator().manual_seed(8)
    terms, Us, refs = [], [], []
    for B, T, I, O in [(6, 5, 17, 9), (6, 3, 11, 13)]:
        A, D = torch.randn(B, T, 1, I, generator=g), torch.randn(B, T, 1, O, generator=g)
        t = gram.PerSampleGrads("w", nn.Parameter(torch.randn(O, I)), [OuterFactors(A, D, None, (1, O, I))])
        assert t.mode == gram.TILE
        t.hold, t.hold_rtol = True, 1e-6
        U = torch.randn(O, I, generator=g)
        Grows = torch.einsum("bto,bti->boi", D[:, :, 0].double(), A[:, :, 0].double()).reshape(B, -1)
        refs.append(U.reshape(-1).double() - Grows.t() @ torch.linalg.lstsq(Grows.t(), U.reshape(-1).double()).solution)
        terms.append(t)
        Us.append(U)
    bs = [t.gram_coef(U)[1] for t, U in zip(terms, Us)]  # both sets of rows alive at once
    assert all(t.rows is not None for t in terms)
    for t, U, b, ref in zip(terms, Us, bs, refs):
        t.project_held_(U, b)
        assert float((U.reshape(-1).double() - ref).norm() / ref.norm()) < 1e-5
    held_rows.release()


def test_half_factors_hold_rows_like_the_float64_route(tile, monkeypatch):
    # autocast: bf16 factors, float32 tiles; the held route must give the float64 route's direction
    # from the same factors (their rank cutoff, 1e-3, is far below every kept eigenvalue here)
    from engine_helpers import autocast_ok

    if not autocast_ok(torch.bfloat16):
        pytest.skip("this torch build's CPU autocast does not produce bfloat16")
    model, retain, unlearn, _, _ = _tokens(9)

    def direction():
        og = OrthoGrad(model, backend="torch")
        model.zero_grad(set_to_none=True)
        with og.retain(), torch.autocast("cpu", dtype=torch.bfloat16):
            ce(model(retain[0]), retain[1]).mean().backward()
        ce(model(unlearn[0]), unlearn[1]).mean().backward()
        og.project_()
        return og.stats["held_rows"], {n: p.grad.clone() for n, p in model.named_parameters()}

    held, d_held = direction()
    monkeypatch.setattr(held_rows, "MAX_BYTES", 0)
    none, d_f64 = direction()
    assert held >= 3 and none == 0, (held, none)
    for n in d_f64:  # (a tensor with fewer entries than samples projects to exactly 0 in both)
        assert float((d_held[n] - d_f64[n]).norm()) <= 1e-4 * float(d_f64[n].norm()), n


@pytest.mark.parametrize("name", ["tokens", "convs", "tied"])
def test_blocks_of_a_term_alone_run_side_by_side(tile, name, monkeypatch):
    # a held term that runs alone (every intra-op thread) forms, multiplies and sweeps its column
    # blocks side by side on one thread each: the oracle's direction, and the same values as the
    # blocks in order on one thread
    from orthograd_fast.engine import threads as og_threads

    monkeypatch.setattr(held_rows, "BLOCK_BYTES", 7 * 4 * 11)  # several small blocks per term
    monkeypatch.setattr(gram.PerSampleGrads, "spreadable", lambda self: False)  # every term runs alone
    g = torch.Generator().manual_seed(len(name))
    torch.manual_seed(7)
    model = {"tokens": Tokens, "convs": Convs, "tied": TiedLM}[name]()
    retain, unlearn = _data(name, g)
    spread = []
    orig = og_threads.map_balanced

    def spy(fn, items, cost, n):
        name = getattr(fn, "__qualname__", "")
        if name.startswith("HeldRows"):  # the blocks of a held term: formed and Gram, then swept
            spread.append((name.split(".")[1], n, len(items)))
        return orig(fn, items, cost, n)

    monkeypatch.setattr(og_threads, "map_balanced", spy)
    n0 = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        err, orth, og = compare(model, ce, retain, unlearn, scope="tensor", backend="torch")
        assert og.stats["held_rows"] >= 2, og.stats
        for step in ("gram_coef", "_map"):  # some term's blocks were spread in both
            assert any(s == step and n == 2 and k > 1 for s, n, k in spread), (step, spread)
        assert err <= REL and orth <= ORTH, (err, orth)
        _, two = og_direction(model, ce, retain, unlearn, backend="torch")
        torch.set_num_threads(1)
        _, one = og_direction(model, ce, retain, unlearn, backend="torch")
    finally:
        torch.set_num_threads(n0)
    scale = sum(float(v.norm()) ** 2 for v in one.values()) ** 0.5  # a tensor inside the span has ~0
    for k in one:
        assert float((two[k] - one[k]).norm()) < 1e-6 * scale, k


@pytest.mark.parametrize("n", [1, 6, 7, 8, 23])
def test_chunked_gemv_matches_float64_on_ragged_lengths(n, monkeypatch):
    # Y r over column chunks of 7 (one partial chunk, exact multiples, fewer columns than a chunk),
    # on a column block of a wider row-major buffer, as the held blocks are
    monkeypatch.setattr(held_rows, "MV_CHUNK", 7)
    g = torch.Generator().manual_seed(n)
    wide = torch.randn(5, n + 9, generator=g)
    Y, r = wide[:, 4 : 4 + n], torch.randn(n, generator=g)
    b = held_rows._mv(Y, r)
    assert b.dtype == torch.float64 and b.shape == (5,)
    assert_close(b, Y.double() @ r.double(), dtype=torch.float32, reduction_len=n)


def test_chunked_gemv_of_long_rows_is_accurate_to_float32_resolution():
    # The first update inherits b's rounding as a span component (docs/math.md section 11). One
    # float32 GEMV over 2^18 columns rounded b by 2.4e-7 to 3.2e-7 of |y_i| |r| here (measured);
    # the chunks summed in float64, 1e-8 to 3e-8.
    g = torch.Generator().manual_seed(3)
    n = (1 << 18) + 1234
    Y = (torch.randn(8, n + 40, generator=g) + 0.3)[:, 17 : 17 + n]
    r = torch.randn(n, generator=g) + 0.3
    exact = Y.double() @ r.double()
    rel = (held_rows._mv(Y, r) - exact).abs() / (Y.double().norm(dim=1) * r.double().norm())
    assert float(rel.max()) <= held_rows.EPS32, float(rel.max())


def test_held_gram_inverse_and_amplification_match_float64():
    # make(): K^-1 from a Cholesky factor once the extreme eigenvalues pass the screen;
    # amplification(): routes.base.update_amplification read on the host, cancelling terms included
    from orthograd_fast.engine.routes.base import update_amplification

    g = torch.Generator().manual_seed(21)
    Y = torch.randn(7, 301, generator=g) + 0.5 * torch.randn(1, 301, generator=g)
    K = Y.double() @ Y.double().t()
    rows = held_rows.HeldRows.make([(0, Y)], K, 1e-6, None)
    assert rows is not None
    assert_close(K @ rows.Kinv, torch.eye(7, dtype=torch.float64), dtype=torch.float32, reduction_len=7)
    c = torch.randn(7, generator=g, dtype=torch.float64)
    assert rows.amplification(c) == pytest.approx(float(update_amplification(K, c)), rel=1e-12)
    assert rows.amplification(torch.zeros(7, dtype=torch.float64)) == 0.0
    # rank-deficient rows: a combination with a zero update and nonzero terms
    Y2 = torch.cat([Y[:6], (Y[0] - Y[1]).unsqueeze(0)]).double()
    K2 = Y2 @ Y2.t()
    assert held_rows.HeldRows.make([(0, Y2.float())], K2, 1e-6, None) is None  # refused: singular
    r2 = held_rows.HeldRows([(0, Y2.float())], K2, torch.eye(7, dtype=torch.float64), None)  # (K^-1 unused here)
    cancel = torch.tensor([1.0, -1.0, 0, 0, 0, 0, -1.0], dtype=torch.float64)
    assert float(update_amplification(K2, cancel)) > 1e6 and r2.amplification(cancel) > 1e6


@pytest.mark.parametrize("layout", ["own", "copied"])
@pytest.mark.parametrize("O, I", [(10, 13), (17, 6)])
@pytest.mark.parametrize("write_between", [False, True])
def test_a_transposed_weight_updates_the_gradient_it_is_handed(write_between, O, I, layout):
    """A weight stored transposed (W [I, O]) has its rows held in its own layout ("own"); held as
    [O, I] tiles ("copied") its gradient is copied to the rows' layout for b and again for the
    update only when it was written in between. Either way the update projects the gradient it is
    handed, written back in W's layout (float64 per-sample oracle)."""
    from orthograd_fast.engine.factors import OuterFactors
    from orthograd_fast.engine.routes.tile import TileRoute

    g = torch.Generator().manual_seed(11 + write_between + O)
    B, T = 6, 7
    A, D = torch.randn(B, T, 1, I, generator=g), torch.randn(B, T, 1, O, generator=g)
    route = TileRoute(torch.zeros(I, O), B, OuterFactors(A, D, None, (1, O, I), True), 1 << 20)
    if layout == "copied":
        route._flipped = lambda: False
    route.hold = True
    route.prepare_held(torch.empty(B * O * I))
    assert route.rows is not None
    U = torch.randn(I, O, generator=g)
    b = route.coef(U)
    if write_between:  # the gradient scaled after its coefficients, and b with it
        U.mul_(-1.5)
        b = b * -1.5
    u = U.double().reshape(-1).clone()
    assert route.project_held_(U, b)
    Gs = torch.einsum("bto,bti->bio", D[:, :, 0].double(), A[:, :, 0].double()).reshape(B, -1)  # g_i as W [I, O]
    expect = project_out(Gs, u).view(I, O)
    assert_close(U, expect, dtype=torch.float32, reduction_len=T * B, scale=float(expect.abs().max()))
    assert orthogonality({"W": Gs}, {"W": U.double().reshape(-1)}, {"W": u}) <= ORTH


@pytest.mark.parametrize("layout", ["own", "copied"])
def test_a_transposed_weight_is_copied_at_most_once_per_projection(tile, monkeypatch, layout):
    """A transposed weight's rows are held in its own layout: b and the update read its gradient
    without a copy. Held as [O, I] tiles, the copy b was taken from serves the update: one copy per
    step (with the passes' result still the oracle's: test_held_rows_match_the_oracle)."""
    from orthograd_fast.engine.routes.held import HeldRoute
    from orthograd_fast.engine.routes.tile import TileRoute

    if layout == "copied":
        monkeypatch.setattr(TileRoute, "_flipped", lambda self: False)
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = Tokens()
    retain, unlearn = _data("tokens", g)
    copies = []
    flat = HeldRoute._flat

    def counted(self, U):
        r, back = flat(self, U)
        copies.append(back is not None)
        return r, back

    monkeypatch.setattr(HeldRoute, "_flat", counted)
    og, _ = og_direction(model, ce, retain, unlearn, backend="torch")
    assert og._terms[model.W].hold and og.stats["held_rows"] >= 3
    assert sum(copies) == (1 if layout == "copied" else 0), copies  # W's: one copy for b and the update


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("O, I", [(23, 5), (5, 23), (9, 9)])
def test_held_tiles_in_either_orientation_project_exactly(O, I, transposed, monkeypatch):
    """Tiles held as [O, I] or, for a weight stored [I, O], as their transposes (the weight's own
    layout), in ragged blocks of a few rows: K, b and the update against the float64 per-sample
    oracle, orthogonality read directly."""
    from orthograd_fast.engine.factors import OuterFactors
    from orthograd_fast.engine.routes.tile import TileRoute

    g = torch.Generator().manual_seed(O * 31 + I + transposed)
    B, T = 7, 4
    A, D = torch.randn(B, T, 1, I, generator=g), torch.randn(B, T, 1, O, generator=g)
    shape = rows, cols = (I, O) if transposed else (O, I)  # the parameter: the held tiles' rows, their length
    monkeypatch.setattr(held_rows, "BLOCK_BYTES", 4 * B * cols * 3)  # 3 rows per block, a ragged last
    route = TileRoute(torch.zeros(shape), B, OuterFactors(A, D, None, (1, O, I), transposed), 1 << 20)
    assert route._flipped() == transposed
    route.hold = True
    U = torch.randn(shape, generator=g)
    K, b = route.gram_coef(U)
    assert route.rows is not None and len(route.rows.blocks) == -(-rows // 3)
    Go = torch.einsum("bto,bti->boi", D[:, :, 0].double(), A[:, :, 0].double())  # g_i as [O, I]
    Gs = (Go.transpose(1, 2) if transposed else Go).reshape(B, -1)  # in the parameter's layout
    u = U.double().reshape(-1).clone()
    assert_close(K, Gs @ Gs.T, dtype=torch.float32, reduction_len=O * I, scale=float((Gs @ Gs.T).abs().max()))
    assert_close(b, Gs @ u, dtype=torch.float32, reduction_len=O * I, scale=float(Gs.norm(dim=1).max() * u.norm()))
    assert route.project_held_(U, b)
    expect = project_out(Gs, u).view(shape)
    assert_close(U, expect, dtype=torch.float32, reduction_len=T * B, scale=float(expect.abs().max()))
    assert orthogonality({"W": Gs}, {"W": U.double().reshape(-1)}, {"W": u}) <= ORTH
