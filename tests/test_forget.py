"""og.forget(): coefficients from the unlearn pass's factors, against the float64 oracle, and the
cases where the factors must not be used (modified .grad, accumulated .grad, tied to a module the
block does not capture) or where they are wrong and the first use must say so."""

import pytest
import torch
from torch import nn

from engine_helpers import compare
from models import WideMLP, ce, make
from models import wide_mlp_data as _data
from oracle import oracle_grads, oracle_unlearn_grad, project_out
from orthograd_fast import CaptureError, OrthoGrad, OrthoGradError

REL = 1e-4
ORTH = 1e-5


@pytest.mark.parametrize("unlearn_first", [False, True])
@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_forget_matches_oracle(scope, alpha, unlearn_first, factored, unlearn_coef_calls):
    calls = unlearn_coef_calls
    gen = torch.Generator().manual_seed(7)
    model = WideMLP()
    retain, unlearn = _data(gen)
    err, orth, og = compare(model, ce, retain, unlearn, scope=scope, alpha=alpha, forget=True, unlearn_first=unlearn_first)
    assert sorted(set(calls)) == ["net.0.weight", "net.2.weight", "net.4.weight"], calls
    assert og._unlearn.checked
    assert err <= REL, f"relative error {err:.2e}"
    assert orth <= ORTH


@pytest.mark.parametrize("unlearn_first", [False, True])
@pytest.mark.parametrize("name", ["lm", "speech", "cnn"])
def test_forget_on_other_models_matches_oracle(name, unlearn_first, factored):
    # sequence / conv layers keep the GEMM coefficients; the block must not change the result
    model, retain, unlearn = make(name, torch.Generator().manual_seed(3))
    err, orth, _ = compare(model, ce, retain, unlearn, forget=True, unlearn_first=unlearn_first)
    assert err <= REL and orth <= ORTH, (err, orth)


def _step(model, og, retain, unlearn, between=None, blocks=1):
    model.zero_grad(set_to_none=True)
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    for k in range(blocks):
        with og.forget():
            xs, ys = unlearn[0][k::blocks], unlearn[1][k::blocks]
            (ce(model(xs), ys).sum() / unlearn[0].shape[0]).backward()
    if between:
        between(model)
    og.project_()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _plain_step(model, retain, unlearn, between=None):
    og = OrthoGrad(model)
    model.zero_grad(set_to_none=True)
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    if between:
        between(model)
    og.project_()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _close(a, b):
    # over the whole model: a tensor fully inside the span (the 5-element head bias, B = 6) has a
    # direction at rounding level, meaningless on its own
    a = {n: t.reshape(-1).double() for n, t in a.items()}
    b = {n: t.reshape(-1).double() for n, t in b.items()}
    num = sum(float((a[n] - b[n]).square().sum()) for n in a)
    return (num / sum(float(b[n].square().sum()) for n in a)) ** 0.5


def _oracle_grad(model, retain, unlearn=None, u_scale=1.0, u=None):
    """.grad after project_() with alpha = 0, -P_perp(u), from the float64 oracle (explicit
    per-sample loop): u is the oracle's unlearn gradient times ``u_scale``, or the given tensors."""
    G = oracle_grads(model, ce, *retain)
    if u is None:
        u = {n: u_scale * g for n, g in oracle_unlearn_grad(model, ce, *unlearn).items()}
    return {n: -project_out(G[n], u[n].reshape(-1).double()) for n in G}


# float32 engine against the float64 oracle, over the whole model (see _close)
ORACLE_REL = 1e-5


@pytest.mark.parametrize(
    "case", ["clip", "replace", "two_blocks"]
)
def test_forget_factors_follow_grad(case, factored, unlearn_coef_calls):
    calls = unlearn_coef_calls
    gen = torch.Generator().manual_seed(11)
    model = WideMLP()
    retain, unlearn = _data(gen, Bu=4)
    between, blocks = None, 1
    if case == "clip":  # in place: the factors no longer describe .grad
        def between(m):
            nn.utils.clip_grad_norm_(m.parameters(), 1e-3)
    elif case == "replace":
        def between(m):
            for p in m.parameters():
                p.grad = p.grad * 0.5
    else:
        blocks = 2  # gradient accumulation over two forget() blocks
    got = _step(model, OrthoGrad(model), retain, unlearn, between, blocks)
    ref = _plain_step(model, retain, unlearn, between)
    assert _close(got, ref) <= 1e-5
    assert (len(calls) > 0) == (case == "two_blocks"), calls
    # both paths against the oracle: u as .grad held it (clipped, halved or accumulated)
    u64 = oracle_unlearn_grad(model, ce, *unlearn)
    scale = {"clip": min(1.0, 1e-3 / (sum(float(g.square().sum()) for g in u64.values()) ** 0.5 + 1e-6)),
             "replace": 0.5, "two_blocks": 1.0}[case]
    want = _oracle_grad(model, retain, unlearn, u_scale=scale)
    assert _close(got, want) <= ORACLE_REL, _close(got, want)


def test_forget_ignored_when_grad_was_not_none(factored, unlearn_coef_calls):
    calls = unlearn_coef_calls
    gen = torch.Generator().manual_seed(12)
    model = WideMLP()
    retain, unlearn = _data(gen)
    og = OrthoGrad(model)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)  # something already in .grad before the unlearn pass
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    with og.forget():
        ce(model(unlearn[0]), unlearn[1]).mean().backward()
    u = {n: p.grad.clone() for n, p in model.named_parameters()}
    # the projector of the same retain batch, built independently of the forget() factors
    ref_og = OrthoGrad(model)
    with ref_og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    want = ref_og.project_vectors(u)  # P_perp(u) with u = what .grad held (old + unlearn)
    og.project_()
    assert calls == []  # the factors do not describe .grad (it held more than the unlearn pass)
    got = {n: -p.grad for n, p in model.named_parameters()}
    assert _close(got, want) <= 1e-5
    # and both against the oracle's projection of the same u
    oracle = _oracle_grad(model, retain, u=u)
    assert _close({n: -g for n, g in got.items()}, oracle) <= ORACLE_REL, _close({n: -g for n, g in got.items()}, oracle)


def test_forget_detects_loss_term_outside_modules(factored):
    gen = torch.Generator().manual_seed(13)
    model = WideMLP()
    retain, unlearn = _data(gen)
    og = OrthoGrad(model)
    model.zero_grad(set_to_none=True)
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    with og.forget():
        penalty = sum((p * p).sum() for p in model.parameters())
        (ce(model(unlearn[0]), unlearn[1]).mean() + 0.1 * penalty).backward()
    with pytest.raises(CaptureError, match="og.forget"):
        og.project_()


def test_forget_order_and_hooks():
    model = WideMLP()
    og = OrthoGrad(model)
    x = torch.randn(3, 17, generator=torch.Generator().manual_seed(15))
    with og.forget():  # the unlearn pass may come first, but a retain pass is still needed
        model(x).sum().backward()
    with pytest.raises(OrthoGradError, match="no retain pass"):
        og.project_()
    with og.retain():
        with pytest.raises(OrthoGradError, match="inside og.retain"):
            with og.forget():
                pass
        model(x).sum().backward()
    with pytest.raises(RuntimeError, match="boom"):
        with og.forget():
            model(x).sum().backward()
            raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_forget_first_starts_next_step(factored, unlearn_coef_calls):
    # after a projection, an unlearn pass under forget() starts the next step's span: its factors
    # (not the previous step's) give the coefficients of the next projection
    calls = unlearn_coef_calls
    gen = torch.Generator().manual_seed(14)
    model = WideMLP()
    og = OrthoGrad(model)
    got = []
    for _ in range(2):
        retain, unlearn = _data(gen)
        model.zero_grad(set_to_none=True)
        with og.forget():
            ce(model(unlearn[0]), unlearn[1]).mean().backward()
        with og.retain():
            ce(model(retain[0]), retain[1]).mean().backward()
        og.project_()
        got.append({n: p.grad.clone() for n, p in model.named_parameters()})
        want = _plain_step(model, retain, unlearn)
        assert _close(got[-1], want) <= 1e-5
        assert _close(got[-1], _oracle_grad(model, retain, unlearn)) <= ORACLE_REL
    assert len(calls) >= 6  # three weights, both steps


class _LinearF(nn.Linear):
    """An nn.Linear subclass whose forward is still one F.linear: its unlearn factors count."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


class _Scaled(nn.Linear):
    """Not one dense op from input to output: the module output is the linear output times 2."""

    def forward(self, x):
        return 2.0 * nn.functional.linear(x, self.weight, self.bias)


class _Judged(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = _LinearF(17, 29), _Scaled(29, 23), nn.Linear(23, 5)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


# (forget, unlearn_first): og.forget() either side of retain(), or the armed capture after it
@pytest.mark.parametrize("forget,unlearn_first", [(True, True), (True, False), (False, False)])
def test_dense_layers_judged_by_their_call(forget, unlearn_first, factored, unlearn_coef_calls):
    # the unlearn factors are used for a module whose calls the retain capture saw to be one dense
    # op from its input to its output, whatever its class; a module whose output is not the dense
    # op's output keeps the GEMM coefficients; both stay exact against the float64 oracle
    calls = unlearn_coef_calls
    gen = torch.Generator().manual_seed(31)
    torch.manual_seed(31)
    model = _Judged()
    retain = (torch.randn(7, 17, generator=gen), torch.randint(0, 5, (7,), generator=gen))
    unlearn = (torch.randn(5, 17, generator=gen), torch.randint(0, 5, (5,), generator=gen))
    err, orth, og = compare(model, ce, retain, unlearn, forget=forget, unlearn_first=unlearn_first)
    assert "a.weight" in calls and "b.weight" not in calls, calls
    assert id(model.b.weight) in og._unlearn.not_dense and id(model.a.weight) in og._unlearn.dense
    assert err <= REL and orth <= ORTH, (err, orth)


@pytest.mark.parametrize("fuses", [1, 2])
def test_row_check_reads_random_rows_against_the_factors(fuses, factored):
    # the per-step check of og.forget()'s factors (GhostRoute.unlearn_rows_error), against the
    # same rows formed in float64 here: small where U is the factors' sum, the perturbation's
    # size where U's rows were changed (a loss term the factors do not see)
    import threading

    from orthograd_fast.engine.factors import OuterFactors
    from orthograd_fast.engine.gram import PerSampleGrads

    g = torch.Generator().manual_seed(41 + fuses)
    O, I, B = 13, 9, 5
    retain = OuterFactors(torch.randn(B, 1, 1, I, generator=g), torch.randn(B, 1, 1, O, generator=g), None, (1, O, I))
    term = PerSampleGrads("w", torch.zeros(O, I), [retain])
    assert term.mode == "ghost", term.mode
    fu = [OuterFactors(torch.randn(n, 1, 1, I, generator=g), torch.randn(n, 1, 1, O, generator=g), None, (1, O, I)) for n in (3, 4)[:fuses]]
    U64 = sum(f.D[:, 0, 0].double().t() @ f.A[:, 0, 0].double() for f in fu)
    scale = sum(f.D[:, 0, 0].double().abs().t() @ f.A[:, 0, 0].double().norm(dim=1) for f in fu)
    rows = 6

    def check(U):
        seed = int(torch.randint(0, 2**31, (1,), generator=g))
        got = float(term.unlearn_rows_error(fu, U.float(), rows, torch.Generator().manual_seed(seed), threading.Lock()))
        idx = torch.randint(0, O, (rows,), generator=torch.Generator().manual_seed(seed))
        want = float(((U.double()[idx] - U64[idx]).norm(dim=1) / scale[idx]).max())
        return got, want

    got, _ = check(U64)  # (U64's own rows: only the float32 rounding of U is left)
    assert got <= 1e-6, got
    bumped = U64.clone()
    bumped += 0.05 * scale[:, None] * torch.randn(O, I, generator=g).sign() / I**0.5
    got, want = check(bumped)
    assert want > 1e-2 and abs(got - want) <= 1e-5 * want + 1e-6, (got, want)
