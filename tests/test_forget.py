"""og.forget(): coefficients from the unlearn pass's factors, against the float64 oracle, and the
cases where the factors must not be used (modified .grad, accumulated .grad, tied to a module the
block does not capture) or where they are wrong and the first use must say so."""

import contextlib
import warnings

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


def _gemm_coef_names(monkeypatch):
    """Names of the tensors whose coefficients <g_i, u> were formed by the GEMM over .grad."""
    from orthograd_fast.engine.gram import PerSampleGrads

    names = []
    orig = PerSampleGrads.coef

    def spy(self, U):
        names.append(self.name)
        return orig(self, U)

    monkeypatch.setattr(PerSampleGrads, "coef", spy)
    return names


class _Shared(nn.Module):
    """A dense layer called twice in one forward: two weight gradients reach its accumulator."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            self.a, self.b, self.c = nn.Linear(17, 40), nn.Linear(40, 40), nn.Linear(40, 5)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.b(torch.tanh(self.a(x)))))))


def _run_steps(model, og, gen, forget, steps=3, before_backward=None, unlearn_loss=None):
    """OrthoGrad steps, the retain block first, the unlearn pass under og.forget() or armed; yields
    (step, retain, unlearn, .grad after project_(), warnings)."""
    for step in range(steps):
        retain, unlearn = _data(gen)
        model.zero_grad(set_to_none=True)
        with og.retain():
            ce(model(retain[0]), retain[1]).mean().backward()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            with og.forget() if forget else contextlib.nullcontext():
                loss = (unlearn_loss or (lambda s, u: ce(model(u[0]), u[1]).mean()))(step, unlearn)
                undo = before_backward(step) if before_backward else None
                loss.backward()
            try:
                og.project_()
            finally:
                if undo is not None:
                    undo.remove()
        yield step, retain, unlearn, {n: q.grad.clone() for n, q in model.named_parameters()}, [str(x.message) for x in w]


@pytest.mark.parametrize("forget", [True, False])
def test_certified_factors_need_no_check_after_the_first_projection(forget, factored, unlearn_coef_calls, monkeypatch):
    # each window certifies that its weights' accumulations were exactly their layers' weight
    # gradients: after the first projection (checked against the GEMM) no factored weight forms
    # the GEMM; a tensor hook on a layer's output that changes its gradient (registered after the
    # window's, by a forward hook) is what the GEMM consumed, so the factors stay exact
    gemm = _gemm_coef_names(monkeypatch)
    gen = torch.Generator().manual_seed(43)
    model = WideMLP()
    og = OrthoGrad(model)
    weights = {"net.0.weight", "net.2.weight", "net.4.weight"}

    def doubled(step, u):  # the unlearn forward only (the retain capture does not allow it)
        h = model.net[2].register_forward_hook(lambda m, a, out: out.register_hook(lambda g: 2.0 * g) and None)
        try:
            return ce(model(u[0]), u[1]).mean()
        finally:
            h.remove()

    for step, retain, unlearn, got, _ in _run_steps(model, og, gen, forget, unlearn_loss=doubled):
        assert set(unlearn_coef_calls) == weights, unlearn_coef_calls
        assert weights & set(gemm) == (weights if step == 0 else set()), (step, gemm)
        assert not og._unlearn.uncertified
        # against the oracle's u with the output gradient of net.2 doubled: its weight and bias,
        # and every layer below it
        u = oracle_unlearn_grad(model, ce, *unlearn)
        for n in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"):
            u[n] = 2.0 * u[n]
        assert _close(got, _oracle_grad(model, retain, u=u)) <= ORACLE_REL
        unlearn_coef_calls.clear()
        gemm.clear()


@pytest.mark.parametrize("forget", [True, False])
@pytest.mark.parametrize("case", ["row_penalty", "hook_after", "called_twice"])
def test_uncertified_factors_are_checked_against_the_gemm(case, forget, factored, unlearn_coef_calls, monkeypatch):
    # what the certificate cannot explain is checked against the GEMM at every projection:
    # a penalty on one row of one weight switched on at the second step (a few random rows of
    # .grad would miss it), a hook on a weight registered after the window's that halves its
    # gradient: the factors do not describe .grad (an error under og.forget(), a warning and the
    # GEMM when armed); a layer called twice in one backward: exact, checked, no warning
    gemm = _gemm_coef_names(monkeypatch)
    gen = torch.Generator().manual_seed(44)
    model = _Shared() if case == "called_twice" else WideMLP()
    og = OrthoGrad(model)
    target = model.b.weight if case == "called_twice" else model.net[2].weight
    name = "b.weight" if case == "called_twice" else "net.2.weight"

    def loss(step, u):
        pen = 0.3 * model.net[2].weight[7].square().sum() if case == "row_penalty" and step >= 1 else 0.0
        return ce(model(u[0]), u[1]).mean() + pen

    def before_backward(step):
        return target.register_hook(lambda g: 0.5 * g) if case == "hook_after" and step >= 1 else None

    steps = _run_steps(model, og, gen, forget, before_backward=before_backward, unlearn_loss=loss)
    raises = forget and case != "called_twice"  # (under og.forget(): at the second step, below)
    for step, retain, unlearn, got, msgs in () if raises else steps:
        if not forget and case != "called_twice" and step >= 2:  # arming stopped at step 1
            assert not unlearn_coef_calls and og._unlearn.window is None, unlearn_coef_calls
        else:  # the factors, checked against the GEMM
            assert name in unlearn_coef_calls and name in gemm, (step, unlearn_coef_calls, gemm)
        warned = [m for m in msgs if "no longer armed" in m]
        assert len(warned) == (1 if step == 1 and case != "called_twice" else 0), msgs
        if case == "called_twice":
            assert target in og._unlearn.uncertified
        u = oracle_unlearn_grad(model, ce, *unlearn)  # u as .grad holds it, in float64
        if case == "row_penalty" and step >= 1:
            pen = torch.zeros(target.shape, dtype=torch.float64)
            pen[7] = 0.6 * target[7].detach().double()
            u[name] = u[name].reshape(target.shape) + pen
        elif case == "hook_after" and step >= 1:
            u[name] = 0.5 * u[name]
        assert _close(got, _oracle_grad(model, retain, u=u)) <= ORACLE_REL
        unlearn_coef_calls.clear()
        gemm.clear()
    if raises:
        assert next(steps)[0] == 0
        with pytest.raises(CaptureError, match=name):
            next(steps)
    elif case != "called_twice":  # armed: the GEMM replaced the factors; the steps stay exact
        assert og._unlearn.arm_off == name


class _Branchy(nn.Module):
    """Its middle layer scales its input when told to: one dense op from input to output in the
    retain block, another computation in some unlearn passes."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(17, 40), nn.Linear(33, 5)
        self.b = _ScaledWhenTold(40, 33)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


class _ScaledWhenTold(nn.Linear):
    scale = False

    def forward(self, x):
        return nn.functional.linear(2.0 * x if self.scale else x, self.weight, self.bias)


@pytest.mark.parametrize("forget", [True, False])
def test_certificate_reads_the_gemm_input(forget, factored, unlearn_coef_calls):
    # a module confirmed as one dense op by the retain capture whose unlearn pass, at the second
    # step, feeds the GEMM another tensor than its input: the certificate sees that the GEMM did
    # not read the input the window kept, and the GEMM check finds the factors wrong
    gen = torch.Generator().manual_seed(46)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        model = _Branchy()
    og = OrthoGrad(model)

    def loss(step, u):
        model.b.scale = step >= 1
        try:
            return ce(model(u[0]), u[1]).mean()
        finally:
            model.b.scale = False

    steps = _run_steps(model, og, gen, forget, unlearn_loss=loss)
    assert next(steps)[0] == 0 and "b.weight" in unlearn_coef_calls and not og._unlearn.uncertified
    if forget:
        with pytest.raises(CaptureError, match="b.weight"):
            next(steps)
    else:  # armed: a warning, the GEMM, and the step exact against u as .grad holds it
        step, retain, unlearn, got, msgs = next(steps)
        assert [m for m in msgs if "no longer armed" in m] and og._unlearn.arm_off == "b.weight", msgs
        assert model.b.weight in og._unlearn.uncertified
        u = oracle_unlearn_grad(model, ce, *unlearn)
        model.b.scale = True
        u_scaled = oracle_unlearn_grad(model, ce, *unlearn)
        model.b.scale = False
        assert _close(got, _oracle_grad(model, retain, u=u_scaled)) <= ORACLE_REL
        assert _close(got, _oracle_grad(model, retain, u=u)) > 1e-2  # (the scaling did change u)


@pytest.mark.parametrize(
    "form,found",
    [
        ("linear", True),  # AddmmBackward0 -> TBackward0 -> the accumulator
        ("linear_nobias", True),  # MmBackward0 -> TBackward0
        ("linear_tokens", True),  # ViewBackward0 -> AddmmBackward0 -> TBackward0
        ("linear_bf16", True),  # ... -> TBackward0 -> ToCopyBackward0 (autocast's cast of the weight)
        ("addmm_in_out", True),  # transformers' Conv1D: the weight [I, O] is addmm's mat2 itself
        ("scaled_weight", False),  # F.linear(x, 2 w): a MulBackward0 on the way: no certificate
        ("weight_first", False),  # w @ x: the weight is not the GEMM's last operand
    ],
)
def test_weight_producer_follows_only_the_dense_graph(form, found):
    # the node whose output is the weight gradient of one dense call, found only along the graph
    # the certificate trusts; the gradient it hands on is what reaches the accumulator
    from orthograd_fast.engine.forget_window import weight_producer

    g = torch.Generator().manual_seed(45)
    I, O = 7, 5
    w = nn.Parameter(torch.randn((I, O) if form == "addmm_in_out" else (O, I), generator=g))
    b = nn.Parameter(torch.randn(O, generator=g))
    x = torch.randn(3, 4, I, generator=g) if form == "linear_tokens" else torch.randn(3, I, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=form == "linear_bf16"):
        y = {
            "linear": lambda: nn.functional.linear(x, w, b),
            "linear_nobias": lambda: nn.functional.linear(x, w),
            "linear_tokens": lambda: nn.functional.linear(x, w, b),
            "linear_bf16": lambda: nn.functional.linear(x, w, b),
            "addmm_in_out": lambda: torch.addmm(b, x, w),
            "scaled_weight": lambda: nn.functional.linear(x, 2 * w, b),
            "weight_first": lambda: (w @ x.t()).t(),
        }[form]()
    hand = weight_producer(y.grad_fn, w)
    assert (hand is not None) == found, (form, y.grad_fn)
    seen = {}
    if found:
        hand[0].register_hook(lambda gi, go: seen.update(handed=gi[hand[1]]) or None)
        assert type(hand[2]).__name__ in ("AddmmBackward0", "MmBackward0")
    w.register_hook(lambda gr: seen.update(received=gr) or None)
    y.float().square().sum().backward()
    assert "received" in seen
    if found:
        assert seen["received"] is seen["handed"]
