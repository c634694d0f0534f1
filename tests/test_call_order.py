"""The contract's call order (retain block, then the unlearn backward, then project_()) takes the
og.forget() factors from the capture armed on leaving retain(): the same direction as the float64
oracle, the factor coefficients actually used, and every case where they must not be (an eval
forward, clipping, a loss term outside the modules, too much held) handled without a wrong result
or a hook left behind."""

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

from engine_helpers import compare, judge
from models import WideMLP, ce
from models import wide_mlp_data as _data
from orthograd_fast import OrthoGrad, OrthoGradError
from orthograd_fast.engine import unlearn_factors

REL = 1e-4
ORTH = 1e-5


def _hooks_left(model):
    mods = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    params = any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
    glob = bool(nn.modules.module._global_forward_hooks)
    return mods or params or glob


def _reference(model, retain, unlearn, between=None, unlearn_loss=None):
    """The same step with arming off: coefficients from the GEMM over .grad."""
    og = OrthoGrad(model, arm_forget=False)
    model.zero_grad(set_to_none=True)
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    (unlearn_loss or (lambda: ce(model(unlearn[0]), unlearn[1]).mean()))().backward()
    if between:
        between(model)
    og.project_()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _close(a, b):
    num = sum(float((a[n] - b[n]).square().sum()) for n in a)
    return (num / sum(float(b[n].square().sum()) for n in a)) ** 0.5


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_contract_order_uses_factors_and_matches_oracle(scope, alpha, factored, unlearn_coef_calls):
    gen = torch.Generator().manual_seed(21)
    model = WideMLP()
    retain, unlearn = _data(gen)
    err, orth, og = compare(model, ce, retain, unlearn, scope=scope, alpha=alpha)  # no og.forget()
    assert sorted(set(unlearn_coef_calls)) == ["net.0.weight", "net.2.weight", "net.4.weight"], unlearn_coef_calls
    assert err <= REL, f"relative error {err:.2e}"
    assert orth <= ORTH
    assert not _hooks_left(model)


def test_arm_forget_off_uses_gemm(factored, unlearn_coef_calls):
    gen = torch.Generator().manual_seed(22)
    model = WideMLP()
    retain, unlearn = _data(gen)
    err, orth, _ = compare(model, ce, retain, unlearn, arm_forget=False)
    assert unlearn_coef_calls == [] and err <= REL and orth <= ORTH


def test_eval_forwards_record_nothing_and_steps_repeat(factored, unlearn_coef_calls):
    gen = torch.Generator().manual_seed(23)
    model = WideMLP()
    og = OrthoGrad(model)
    for step in range(3):
        retain, unlearn = _data(gen, B=5 + step, Bu=2 + step)
        model.zero_grad(set_to_none=True)
        with og.retain():
            ce(model(retain[0]), retain[1]).mean().backward()
        with torch.no_grad():
            model(torch.randn(7, 17, generator=gen))  # an eval forward: nothing kept
        assert all(len(v) == 0 for v in og._unlearn.window.calls.values())
        model(torch.randn(4, 17, generator=gen))  # a forward with grad but no backward: allowed
        ce(model(unlearn[0]), unlearn[1]).mean().backward()
        og.project_()
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert not _hooks_left(model)
        assert _close(got, _reference(model, retain, unlearn)) <= 1e-5
    assert len(unlearn_coef_calls) == 9  # three weights, every step


@pytest.mark.parametrize("case", ["clip", "replace", "not_none", "two_backwards", "overflow"])
def test_armed_factors_follow_grad(case, factored, unlearn_coef_calls, monkeypatch):
    gen = torch.Generator().manual_seed(24)
    model = WideMLP()
    retain, unlearn = _data(gen, Bu=4)
    between = None
    if case == "clip":
        def between(m):
            nn.utils.clip_grad_norm_(m.parameters(), 1e-3)
    elif case == "replace":
        def between(m):
            for p in m.parameters():
                p.grad = p.grad * 0.5
    elif case == "overflow":
        monkeypatch.setattr(unlearn_factors, "MAX_BYTES", 64)
    og = OrthoGrad(model)
    model.zero_grad(set_to_none=True)
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    if case == "not_none":
        for q in model.parameters():  # zeros, not None: the factors cannot know what .grad held
            q.grad = torch.zeros_like(q)
    halves = [slice(0, 2), slice(2, 4)] if case == "two_backwards" else [slice(0, 4)]
    for s in halves:  # gradient accumulation over two backwards
        (ce(model(unlearn[0][s]), unlearn[1][s]).sum() / 4).backward()
    if between:
        between(model)
    og.project_()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert not _hooks_left(model)
    assert _close(got, _reference(model, retain, unlearn, between)) <= 1e-5
    assert (len(unlearn_coef_calls) > 0) == (case == "two_backwards"), unlearn_coef_calls


@pytest.mark.parametrize("when", [0, 1])
def test_loss_term_outside_modules_falls_back_with_warning(when, factored):
    # a weight penalty in the unlearn loss: from the first step (caught against the GEMM) or
    # switched on at the second (caught by the per-step row check)
    gen = torch.Generator().manual_seed(25)
    model = WideMLP()
    og = OrthoGrad(model)
    for step in range(3):
        retain, unlearn = _data(gen)
        lam = 0.1 if step >= when else 0.0

        def unlearn_loss():
            return ce(model(unlearn[0]), unlearn[1]).mean() + lam * sum((p * p).sum() for p in model.parameters())

        model.zero_grad(set_to_none=True)
        with og.retain():
            ce(model(retain[0]), retain[1]).mean().backward()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            unlearn_loss().backward()
            og.project_()
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert (len([x for x in w if "no longer armed" in str(x.message)]) == 1) == (step == when), [str(x.message) for x in w]
        assert _close(got, _reference(model, retain, unlearn, unlearn_loss=unlearn_loss)) <= 1e-5
    assert og._unlearn.arm_off is not None and og._unlearn.window is None


def test_explicit_forget_disarms_and_accumulates(factored, unlearn_coef_calls):
    gen = torch.Generator().manual_seed(26)
    model = WideMLP()
    retain, unlearn = _data(gen, Bu=4)
    og = OrthoGrad(model)
    model.zero_grad(set_to_none=True)
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    (ce(model(unlearn[0][:2]), unlearn[1][:2]).sum() / 4).backward()  # armed window
    with og.forget():  # ends the armed window (its factors kept), adds its own
        (ce(model(unlearn[0][2:]), unlearn[1][2:]).sum() / 4).backward()
    og.project_()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert len(unlearn_coef_calls) == 3
    assert _close(got, _reference(model, retain, unlearn)) <= 1e-5
    assert not _hooks_left(model)


def test_hooks_removed_after_errors_reset_close_and_deletion(factored):
    # factored: the layers keep their factors, so leaving retain() arms a window on them
    gen = torch.Generator().manual_seed(27)
    model = WideMLP()
    retain, unlearn = _data(gen)
    og = OrthoGrad(model)
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    assert _hooks_left(model)  # armed
    with pytest.raises(RuntimeError, match="boom"):
        ce(model(unlearn[0]), unlearn[1]).mean().backward()
        raise RuntimeError("boom")
    og.reset()
    assert not _hooks_left(model)
    with pytest.raises(OrthoGradError, match="no retain pass"):
        og.project_()
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    og.close()
    assert not _hooks_left(model)
    with og.retain():  # a new retain() after close() works and re-arms
        ce(model(retain[0]), retain[1]).mean().backward()
    ref = weakref.ref(og)
    del og
    gc.collect()
    assert ref() is None
    assert not _hooks_left(model)


def test_deepcopy_while_armed_carries_no_hooks(factored, unlearn_coef_calls):
    # an armed window must not leak into a copy of the model (an EMA or evaluation copy)
    import copy

    gen = torch.Generator().manual_seed(29)
    model = WideMLP()
    retain, unlearn = _data(gen)
    og = OrthoGrad(model)
    model.zero_grad(set_to_none=True)
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    twin = copy.deepcopy(model)
    ce(twin(unlearn[0]), unlearn[1]).mean().backward()  # the copy's pass: not the model's .grad
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    og.project_()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert not _hooks_left(model) and not _hooks_left(twin)
    assert len(unlearn_coef_calls) == 3
    assert _close(got, _reference(model, retain, unlearn)) <= 1e-5


def test_next_retain_block_ends_the_window(factored, unlearn_coef_calls):
    # two retain blocks with the unlearn pass between them: the span accumulates both blocks, the
    # factors of the unlearn pass are kept
    gen = torch.Generator().manual_seed(28)
    model = WideMLP()
    retain, unlearn = _data(gen, B=8)
    og = OrthoGrad(model)
    model.zero_grad(set_to_none=True)
    with og.retain():
        ce(model(retain[0][:4]), retain[1][:4]).mean().backward()
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    with og.retain():
        ce(model(retain[0][4:]), retain[1][4:]).mean().backward()
    og.project_()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref_og = OrthoGrad(model, arm_forget=False)
    model.zero_grad(set_to_none=True)
    for s in (slice(0, 4), slice(4, 8)):
        with ref_og.retain():
            ce(model(retain[0][s]), retain[1][s]).mean().backward()
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    ref_og.project_()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert len(unlearn_coef_calls) == 3
    assert _close(got, want) <= 1e-5


def _draw(module: nn.Module, seed: int, scale: float) -> None:
    """Every parameter of ``module`` drawn from N(0, scale^2), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


class _TokensThenHead(nn.Module):
    """A dense layer over 5 tokens per sample, then a head on the pooled features."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Linear(7, 24)
        self.head = nn.Linear(24, 20)  # B_u (I + O) < O I: its factors are cheaper than the GEMM
        _draw(self, 3, 0.5)

    def forward(self, x):
        return self.head(torch.tanh(self.tok(x)).mean(1))


def _armed(p):
    return bool(getattr(p, "_post_accumulate_grad_hooks", None))


def _batch(gen, *shape):
    """Inputs of ``shape`` and labels of 20 classes."""
    return torch.randn(*shape, generator=gen), torch.randint(0, 20, (shape[0],), generator=gen)


def _armed_then_exact(model, retain, unlearn, armed, not_armed, alpha=0.0, steps=1, scope="tensor"):
    """``steps`` contract-order steps of one OrthoGrad (the model unchanged between them: the
    first projection checks the factors' b against the GEMM's, later ones rows of .grad): leaving
    the first retain() arms windows on ``armed`` and not on ``not_armed``; every direction matches
    the oracle; no hook is left."""
    og = OrthoGrad(model, alpha=alpha, scope=scope, backend="torch")
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        with og.retain():
            ce(model(retain[0]), retain[1]).mean().backward()
        if step == 0:
            assert all(_armed(p) for p in armed) and not any(_armed(p) for p in not_armed)
        ce(model(unlearn[0]), unlearn[1]).mean().backward()
        og.project_()
        got = {n: p.grad.reshape(-1).double() for n, p in model.named_parameters()}
        err, orth = judge(model, got, ce, retain, unlearn, scope=scope, alpha=alpha)
        assert err <= REL and orth <= ORTH, (step, err, orth)
    og.close()
    assert not _hooks_left(model)


def test_armed_window_only_on_layers_whose_factors_can_be_used(factored, unlearn_coef_calls):
    # the token layer (B T (I + O) > O I: its factors cost more than the GEMM) gets no hooks, the
    # head does; the direction is the oracle's either way
    gen = torch.Generator().manual_seed(31)
    model = _TokensThenHead()
    _armed_then_exact(model, _batch(gen, 11, 5, 7), _batch(gen, 6, 5, 7), [model.head.weight], [model.tok.weight])
    assert set(unlearn_coef_calls) == {"head.weight"}, unlearn_coef_calls


class _FewTokens(nn.Module):
    """A dense layer over 2 x 2 positions per sample (a late ConvNeXt stage, channels last) whose
    B T (I + O) < O I, then a head on the pooled features."""

    def __init__(self):
        super().__init__()
        self.mid = nn.Linear(96, 128)
        self.head = nn.Linear(128, 20)
        _draw(self, 5, 0.2)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(x)).mean((1, 2)))


@pytest.mark.parametrize("alpha,grid,scope", [(0.0, (2, 2), "tensor"), (0.4, (2, 2), "tensor"), (0.0, (3, 2), "tensor"), (0.4, (2, 2), "global")])
def test_few_token_layer_armed_and_exact(alpha, grid, scope, factored, unlearn_coef_calls):
    # the few-token layer keeps its calls over several tokens, and its coefficients come from them
    # (also when the unlearn inputs have another number of positions than the retain block's)
    gen = torch.Generator().manual_seed(41)
    model = _FewTokens()
    retain, unlearn = _batch(gen, 11, 2, 2, 96), _batch(gen, 6, *grid, 96)
    _armed_then_exact(model, retain, unlearn, [model.mid.weight, model.head.weight], [], alpha=alpha, steps=2, scope=scope)
    assert sorted(unlearn_coef_calls) == ["head.weight", "head.weight", "mid.weight", "mid.weight"], unlearn_coef_calls


class _ClassToken(nn.Module):
    """Tokens, then a dense layer on the class token's column ``h[:, 0]`` (a strided view: BERT's
    pooler, ViT's head), then a head."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Linear(7, 48)
        self.pool = nn.Linear(48, 48)
        self.head = nn.Linear(48, 20)
        _draw(self, 6, 0.3)

    def forward(self, x):
        h = torch.tanh(self.tok(x))
        return self.head(torch.tanh(self.pool(h[:, 0])))


def test_class_token_layer_armed_and_exact(factored, unlearn_coef_calls):
    # the pooler's input is a strided view of the tokens: still one dense op from its input
    gen = torch.Generator().manual_seed(43)
    model = _ClassToken()
    _armed_then_exact(model, _batch(gen, 11, 5, 7), _batch(gen, 6, 5, 7), [model.pool.weight], [model.tok.weight], steps=2)
    assert unlearn_coef_calls.count("pool.weight") == 2, unlearn_coef_calls  # both steps


def test_window_picks_layers_by_tokens():
    # one token: always; a few: where B T (I + O) < O I; many: never
    assert unlearn_factors.worth_a_window(32, [1, 1], (8, 8)) == "one"
    assert unlearn_factors.worth_a_window(32, [4], (1024, 256)) == "many"  # 128 * 1280 < 262144
    assert unlearn_factors.worth_a_window(32, [2, 2], (1024, 256)) == "many"
    assert unlearn_factors.worth_a_window(32, [16], (512, 128)) is None  # 512 * 640 > 65536
    assert unlearn_factors.worth_a_window(32, [1, 4], (64, 64)) is None


def test_no_window_when_no_layer_can_use_factors():
    # small layers take float64 rows (the explicit route), which never use unlearn factors
    gen = torch.Generator().manual_seed(37)
    model = WideMLP()
    retain, _ = _data(gen)
    og = OrthoGrad(model)
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    assert not _hooks_left(model)
    og.reset()  # the window closed (the prefetch gives back its thread)
