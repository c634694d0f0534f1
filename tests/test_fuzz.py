"""Hypothesis fuzzing over small random architectures against the float64 oracle, plus the
bad-input contract cases of issue 6 (empty batch, a module called twice, retain-span cap, blocks of
different sequence lengths).

Default run: 50 examples (tiny sizes). ``-m slow``: 300 more. Both are reproducible: hypothesis
derives the examples from the test's name (``derandomize``), not from a fresh random draw. To
explore other examples, reproducibly, set ORTHOGRAD_FUZZ_SEED to an integer (the same value
draws the same examples again): ``ORTHOGRAD_FUZZ_SEED=7 python -m pytest tests/test_fuzz.py -m slow``.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from torch import nn

import orthograd_fast.gram as gram
from engine_helpers import compare, og_direction
from models import TinyLM, ce, make
from oracle import oracle_direction, oracle_grads, oracle_unlearn_grad, orthogonality, project_out
from orthograd_fast import OrthoGrad
from orthograd_fast.api import OrthoGradError
from orthograd_fast.capture import CaptureError

REL = 1e-4
ORTH = 1e-5
# EXPLICIT_MAX = 0 forces tiny tensors (numel ~ B: a 2x2 conv kernel with B = 4) through the tile
# route, whose per-sample tiles are formed in fp32 (then reduced in fp64); on such nearly square,
# ill-conditioned G the fp32 tile rounding is amplified to ~1.3e-4 (orthogonality ~2e-5), found by
# the 300-example run. The default configuration materializes these tensors in fp64 (gram.py,
# orthograd-math.md section 4), so the factored examples get 10x looser bounds.
REL_FACTORED = 1e-3
ORTH_FACTORED = 1e-4
# The oracle runs a float64 copy of the model, the engine the float32 model. Some random
# architectures make the direction itself sensitive to float32 rounding: per-sample gradients
# nearly collinear (two samples whose softmax rows agree to 1e-4: singular values 1.2 and 1e-4, so
# eps32 / 1e-4 ~ 6e-4 of the small direction is noise), or a tensor whose gradient is a
# near-cancellation (a conv bias in front of a GroupNorm). The same exact projection computed from the
# float32 model's own per-sample gradients (oracle dtype=float32) measures that; a tensor is held to
# max(bound, NOISE_FACTOR x that float32 deviation), which only relaxes where float32 is shown to move
# the exact answer (the mixed-precision tests use the same rule).
NOISE_FACTOR = 10.0
# ORTHOGRAD_FUZZ_SEED: explore with this seed instead of the derandomized examples
FUZZ_SEED = os.environ.get("ORTHOGRAD_FUZZ_SEED")


def reproducible(max_examples):
    """hypothesis settings for the fuzz: derandomized, or seeded by ORTHOGRAD_FUZZ_SEED; no example
    database (a failure saved by one run must not change what the next run draws)."""

    def deco(fn):
        fn = settings(
            max_examples=max_examples,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            derandomize=FUZZ_SEED is None,
            database=None,
        )(fn)
        return fn if FUZZ_SEED is None else seed(int(FUZZ_SEED))(fn)

    return deco


# max error seen over every fuzz example of the session, per route (printed by the summary test);
# "relaxed": examples that passed only by the float32-deviation allowance (NOISE_FACTOR)
SEEN = {"examples": 0, "factored": 0, "relaxed": 0, "routes": set(), "err": 0.0, "orth": 0.0, "err_factored": 0.0, "orth_factored": 0.0}


class Twice(nn.Module):
    """One nn.Linear applied twice in a forward (shared weights): both calls add to g_i."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class Seq(nn.Module):
    def __init__(self, body, head, pool, emb=None):
        super().__init__()
        self.emb = emb
        self.body = body
        self.head = head
        self.pool = pool

    def forward(self, x):
        h = self.emb(x) if self.emb is not None else x
        h = self.body(h)
        if self.pool == "mean":
            h = h.mean(1)
        elif self.pool == "flatten":
            h = h.flatten(1)
        return self.head(h)


def _seq_layer(draw, d, rank3):
    kind = draw(st.sampled_from(["linear", "layernorm", "rmsnorm", "twice", "act"]))
    if kind == "linear":
        return nn.Linear(d, d, bias=draw(st.booleans()))
    if kind == "layernorm":
        return nn.LayerNorm(d, elementwise_affine=True, bias=draw(st.booleans()))
    if kind == "rmsnorm":
        # explicit eps: with eps=None torch uses finfo(dtype).eps, so the fp32 model and the fp64
        # oracle compute different functions on an all-zero input (a padding embedding row through
        # a LayerNorm gives one), with Jacobians 1/sqrt(eps) apart. eps=None is covered by TinyLM.
        return nn.RMSNorm(d, eps=1e-6)
    if kind == "twice":
        return Twice(nn.Linear(d, d))
    return nn.Tanh()


def build(draw):
    """(model, retain (x, y), unlearn (x, y)) for a random small architecture."""
    fam = draw(st.sampled_from(["mlp", "seq", "tokens", "conv1d", "conv2d"]))
    B = draw(st.integers(1, 5))
    Bu = draw(st.integers(1, 4))
    C = draw(st.integers(2, 4))  # classes
    seed = draw(st.integers(0, 2**31 - 1))
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if fam in ("mlp", "seq"):
        # d >= 3: LayerNorm/RMSNorm over 2 features is degenerate (xhat = +-1, a Jacobian ~ eps), so
        # an fp32 model and the fp64 oracle disagree at 1e-3 on the layers below it: not an engine error.
        d = draw(st.integers(3, 6))
        T = draw(st.integers(1, 4)) if fam == "seq" else None
        layers = [nn.Linear(d, d)] + [_seq_layer(draw, d, T is not None) for _ in range(draw(st.integers(0, 3)))]
        model = Seq(nn.Sequential(*layers), nn.Linear(d, C), "mean" if T else None)
        shape = (d,) if T is None else (T, d)
        mk = lambda n: (torch.randn(n, *shape, generator=g), torch.randint(0, C, (n,), generator=g))
    elif fam == "tokens":
        V = draw(st.integers(3, 9))
        d = draw(st.integers(3, 6))  # see above (norms over 2 features)
        T = draw(st.integers(1, 4))
        pad = draw(st.sampled_from([None, 0]))
        emb = nn.Embedding(V, d, padding_idx=pad)
        layers = [_seq_layer(draw, d, True) for _ in range(draw(st.integers(0, 2)))]
        tied = draw(st.integers(0, 2)) > 0  # tied in 2 of 3 examples
        head = nn.Linear(d, V, bias=not tied)
        if tied:
            head.weight = emb.weight
        model = Seq(nn.Sequential(*layers), head, None, emb=emb)
        mk = lambda n: (torch.randint(0, V, (n, T), generator=g), torch.randint(0, V, (n, T), generator=g))
    else:
        nd = 1 if fam == "conv1d" else 2
        G = draw(st.integers(1, 2))
        cin, cout = G * draw(st.integers(1, 2)), G * draw(st.integers(1, 3))
        k = draw(st.integers(1, 3))
        s = draw(st.integers(1, 2))
        dil = draw(st.integers(1, 2))
        # zero padding and input length per dimension; a 2-d conv's height and width padding differ
        p0 = draw(st.integers(0, 2))
        p = (p0,) if nd == 1 else (p0, (p0 + draw(st.integers(1, 2))) % 3)
        L = tuple(dil * (k - 1) + 1 + draw(st.integers(0, 3)) for _ in range(nd))
        Conv = nn.Conv1d if nd == 1 else nn.Conv2d
        conv = Conv(cin, cout, k, stride=s, padding=p, dilation=dil, groups=G, bias=draw(st.booleans()))
        layers = [conv, nn.Tanh()]
        shape = (cin,) + L
        with torch.no_grad():
            # elements per group that depend on the input: positions whose window lies entirely in
            # the padding are constants, and a group with fewer than 3 live values is degenerate
            # for GroupNorm (see the d >= 3 note): e.g. [0, t, 0] normalizes to a constant, whose
            # Jacobian ~ eps differs between the fp32 model and the fp64 oracle.
            probe = Conv(cin, cout, k, stride=s, padding=p, dilation=dil, groups=G, bias=False)
            probe.weight.fill_(1.0)
            per_group = int((probe(torch.ones(1, *shape)) != 0).sum()) // G
        if draw(st.booleans()) and per_group >= 3:  # >= 3 live elements per group
            layers.append(nn.GroupNorm(G, cout))
        body = nn.Sequential(*layers)
        with torch.no_grad():
            flat = body(torch.zeros(1, *shape)).numel()
        model = Seq(body, nn.Linear(flat, C), "flatten")
        mk = lambda n: (torch.randn(n, *shape, generator=g), torch.randint(0, C, (n,), generator=g))
    # frozen parts: freeze a random subset of modules, keep at least one trainable tensor
    mods = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    for m in mods:
        if draw(st.integers(0, 4)) == 0:
            m.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        model.head.requires_grad_(True)
    return fam, model, mk(B), mk(Bu)


def _run(data):
    fam, model, retain, unlearn = build(data.draw)
    scope = data.draw(st.sampled_from(["tensor", "global"]))
    # "factored": no materialization, so the tile/ghost/token routes run; "lookup": the same, but
    # embedding tables take the slab-wise lookup route wherever it is cheaper than the token route
    routes = data.draw(st.sampled_from(["default", "factored", "lookup", "factored", "lookup"]))
    factored = routes != "default"
    old = gram.EXPLICIT_MAX, gram.LOOKUP_ROUTE
    if routes == "factored":
        gram.EXPLICIT_MAX, gram.LOOKUP_ROUTE = 0, False
    elif routes == "lookup":
        gram.EXPLICIT_MAX, gram.LOOKUP_ROUTE = 1, True
    # alpha > 0 also checks gbar_r: from the factors (lean retain) or from the kept retain gradient
    alpha = data.draw(st.sampled_from([0.0, 0.0, 0.3]))
    lean = data.draw(st.booleans())
    try:
        og, got = og_direction(model, ce, retain, unlearn, scope=scope, backend="torch", alpha=alpha, lean_retain=lean)
    finally:
        gram.EXPLICIT_MAX, gram.LOOKUP_ROUTE = old
    ref, G, u = oracle_direction(model, ce, retain, unlearn, scope=scope, alpha=alpha)
    # engine_helpers.compare's per-tensor scale (||d*_t|| + ||u_t||), floored at 1e-9 of the whole
    # model's: random architectures produce tensors with u_t == 0 exactly (a head behind a conv whose
    # output is all padding), where d*_t is fp64 rounding noise and a pure ratio is meaningless.
    whole = sum(float(ref[n].norm() + u[n].norm()) for n in ref)
    # global scope couples every tensor through one solve: a tensor with u_t == 0 still receives the
    # whole model's float32 rounding (5e-10 to 2e-9 of a unit u, found by the slow fuzz), so its
    # floor there is 1e-3 of the whole model's scale: with REL, an absolute error of 1e-7 of the
    # model's direction, float32 rounding level (the orthogonality check stays model-wide)
    floor = (1e-3 if scope == "global" else 1e-9) * whole
    scale = {n: float(ref[n].norm() + u[n].norm()) + floor + 1e-30 for n in ref}
    # the exact projection of the float32 model's own gradients against the float64 one (see NOISE_FACTOR)
    ref32, _, _ = oracle_direction(model, ce, retain, unlearn, scope=scope, dtype=torch.float32, alpha=alpha)
    noise = {n: float((ref32[n] - ref[n]).norm()) / scale[n] for n in ref}
    # the P_perp part of a direction d = alpha * gbar_r - (1 - alpha) * P_perp(u)
    perp = lambda d: {n: (alpha * G[n].mean(0) - d[n]) / (1 - alpha) for n in d}
    orth_noise = orthogonality(G, perp(ref32), u, scope) if whole > 0 else 0.0
    rel, ortho = (REL_FACTORED, ORTH_FACTORED) if factored else (REL, ORTH)
    errs = {n: float((got[n] - ref[n]).norm()) / scale[n] for n in ref}
    bad = {n: f"{e:.2e} (float32 deviation {noise[n]:.1e})" for n, e in errs.items() if e > max(rel, NOISE_FACTOR * noise[n])}
    err = max(errs.values())
    if whole == 0:  # nothing to unlearn: the direction must be exactly zero
        orth = max(float(got[n].abs().max()) for n in got)
    else:
        orth = orthogonality(G, perp(got), u, scope)
    SEEN["examples"] += 1
    SEEN["routes"] |= {t.mode for t in og._terms.values()}
    SEEN["factored"] += int(factored)
    relaxed = any(errs[n] > rel for n in errs) or orth > ortho
    SEEN["relaxed"] += int(relaxed)
    sfx = "_factored" if factored else ""
    if not relaxed:  # the summary reports the examples held to the fixed bounds
        SEEN["err" + sfx] = max(SEEN["err" + sfx], err)
        SEEN["orth" + sfx] = max(SEEN["orth" + sfx], orth)
    where = f"{fam}/{scope}/factored={factored}/alpha={alpha}/lean={lean}"
    assert not bad, f"{where}: relative error {bad}\n{model}"
    assert orth <= max(ortho, NOISE_FACTOR * orth_noise), (
        f"{where}: orthogonality {orth:.2e} (float32 deviation {orth_noise:.1e})\n{model}"
    )


@reproducible(50)
@given(st.data())
def test_fuzz_random_architectures(data):
    _run(data)


@pytest.mark.slow
@reproducible(300)
@given(st.data())
def test_fuzz_random_architectures_slow(data):
    _run(data)


def test_fuzz_summary():
    """Prints the max errors seen (run after the fuzz tests, same session: pytest -s to see it)."""
    if SEEN["examples"] == 0:
        pytest.skip("no fuzz example ran in this session (fuzz tests deselected)")
    print(f"\nfuzz: {SEEN}")
    assert SEEN["err"] <= REL and SEEN["orth"] <= ORTH
    assert SEEN["err_factored"] <= REL_FACTORED and SEEN["orth_factored"] <= ORTH_FACTORED
    # the float32-noise allowance is for rare near-cancelling tensors, not a general escape
    assert SEEN["relaxed"] <= max(2, 0.03 * SEEN["examples"]), SEEN
    if SEEN["examples"] >= 50 and FUZZ_SEED is None:  # the CI set (derandomized) reaches every route
        assert {"explicit", "tile", "ghost", "tokens", "lookup", "conv"} <= SEEN["routes"], SEEN["routes"]


# ---- bad-input contract (issue 6) -----------------------------------------------------------
def test_empty_retain_batch_is_clear_error():
    model, (xr, yr), _ = make("mlp")
    og = OrthoGrad(model)
    before = {n: p.grad for n, p in model.named_parameters()}
    with pytest.raises(CaptureError, match=r"empty \(B=0"):
        with og.retain():
            ce(model(xr[:0]), yr[:0]).mean().backward()
    assert all(p.grad is before[n] for n, p in model.named_parameters())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("factored", [False, True])
def test_module_called_twice_is_correct(scope, factored, monkeypatch):
    """Shared weights: the per-sample gradient sums over both calls (not an error)."""
    if factored:
        monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), Twice(nn.Linear(6, 6)), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(4)
    retain = (torch.randn(4, 2, 5, generator=g), torch.randint(0, 3, (4, 2), generator=g))
    unlearn = (torch.randn(3, 2, 5, generator=g), torch.randint(0, 3, (3, 2), generator=g))
    err, orth, _ = compare(model, ce, retain, unlearn, scope=scope, backend="torch")
    assert err <= REL and orth <= ORTH, (err, orth)


def test_max_retain_error_is_clear():
    model, (xr, yr), _ = make("mlp")
    og = OrthoGrad(model, max_retain=len(xr) + 1)
    with og.retain():
        ce(model(xr), yr).mean().backward()
    with pytest.raises(OrthoGradError) as e:
        with og.retain():
            ce(model(xr), yr).mean().backward()
    msg = str(e.value)
    # names the cap, the count that broke it, the memory/solve cost and what to do
    assert f"{2 * len(xr)} samples" in msg and f"max_retain={len(xr) + 1}" in msg
    assert "memory" in msg and "project_()" in msg and "OrthoGrad(max_retain" in msg
    assert og.retain_size == len(xr), "the refused block must not be kept"


@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_blocks_of_different_sequence_lengths(factored, scope, monkeypatch):
    """Retain span over blocks with T = 5, 3, 1 (tied-embedding TinyLM): equal to the oracle on the union."""
    if factored:
        monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)
    torch.manual_seed(5)
    model = TinyLM()
    g = torch.Generator().manual_seed(6)
    blocks = [(torch.randint(0, 23, (n, T), generator=g), torch.randint(0, 23, (n, T), generator=g)) for n, T in ((3, 5), (2, 3), (2, 1))]
    unlearn = (torch.randint(0, 23, (3, 4), generator=g), torch.randint(0, 23, (3, 4), generator=g))
    og = OrthoGrad(model, scope=scope, backend="torch")
    model.zero_grad(set_to_none=True)
    for x, y in blocks:
        with og.retain():
            ce(model(x), y).mean().backward()
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    assert og.project_()["B"] == 7
    got = {n: p.grad.reshape(-1).double() for n, p in model.named_parameters()}
    Gs = [oracle_grads(model, ce, x, y) for x, y in blocks]
    G = {n: torch.cat([q[n] for q in Gs]) for n in Gs[0]}
    u = oracle_unlearn_grad(model, ce, *unlearn)
    names = list(G)
    if scope == "tensor":
        ref = {n: -project_out(G[n], u[n]) for n in names}
    else:
        r = -project_out(torch.cat([G[n] for n in names], 1), torch.cat([u[n] for n in names]))
        ref, k = {}, 0
        for n in names:
            ref[n] = r[k : k + u[n].numel()]
            k += u[n].numel()
    err = max(float((got[n] - ref[n]).norm() / (ref[n].norm() + u[n].norm())) for n in names)
    assert err <= REL, err
    assert orthogonality(G, {n: -got[n] for n in got}, u, scope) <= ORTH
