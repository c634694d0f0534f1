"""The capture check (per-sample gradients add up to the retain gradient): no false refusal where
a tensor's true gradient is exactly zero, and a real missed use is still refused."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine_helpers import og_direction
from models import HiddenMatmulT, ce
from oracle import oracle_direction, orthogonality
from orthograd_fast.engine.capture import CaptureError

REL = 1e-4
ORTH = 1e-5


class GroupNormF(nn.GroupNorm):
    """A GroupNorm subclass whose forward calls F.group_norm like the parent."""

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class PoolMixer(nn.Module):
    """PoolFormer-style token mixer x + pool(y) - y: pooling a constant returns it, so the norm's
    bias has a true gradient of exactly zero (every sample); float32 leaves rounding noise there."""

    def __init__(self, C):
        super().__init__()
        self.norm = GroupNormF(1, C)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

    def forward(self, x):
        y = self.norm(x)
        return x + self.pool(y) - y


class PoolNet(nn.Module):
    def __init__(self, C=16, depth=2, classes=4):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.mix = nn.Sequential(*[PoolMixer(C) for _ in range(depth)])
        self.head = nn.Linear(C, classes)

    def forward(self, x):
        return self.head(self.mix(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_poolformer_mixer_is_not_refused(scope, alpha, lean):
    # 16 channels on a 9 x 7 map, two mixers: the former tolerance (scaled by |sum_i g_i|) refused
    # this model for seed 0 (the noise of the first mixer's bias against its own noise)
    torch.manual_seed(0)
    model = PoolNet()
    g = torch.Generator().manual_seed(0)
    retain = (torch.randn(8, 3, 9, 7, generator=g), torch.randint(0, 4, (8,), generator=g))
    unlearn = (torch.randn(4, 3, 9, 7, generator=g), torch.randint(0, 4, (4,), generator=g))
    _, got = og_direction(model, ce, retain, unlearn, scope=scope, alpha=alpha, backend="torch", lean_retain=lean)
    ref, G, u = oracle_direction(model, ce, retain, unlearn, scope=scope, alpha=alpha)
    whole = sum(float(ref[n].norm() + u[n].norm()) for n in ref)
    # tensors whose exact gradient is zero (the mixers' biases): the float64 oracle gives ~1e-17 of
    # the model's scale, a float32 engine its own rounding (measured ~1e-8): judged absolutely
    zero = {n for n in ref if float(G[n].abs().max() + u[n].abs().max()) <= 1e-12 * whole}
    assert zero == {"mix.0.norm.bias", "mix.1.norm.bias"}, zero
    for n in zero:
        assert float(got[n].norm()) <= 1e-6 * whole, (n, float(got[n].norm()) / whole)
    errs = {n: float((got[n] - ref[n]).norm() / (ref[n].norm() + u[n].norm())) for n in ref if n not in zero}
    assert max(errs.values()) <= REL, errs
    rest = [n for n in ref if n not in zero]
    perp = {n: (alpha * G[n].mean(0) - got[n]) / (1 - alpha) for n in rest}
    assert orthogonality({n: G[n] for n in rest}, perp, {n: u[n] for n in rest}, scope) <= ORTH


class MissedUse(nn.Module):
    """b.weight is also used where the capture cannot see it (inside a custom autograd.Function)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(9, 12)
        self.b = nn.Linear(12, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h)) + 0.5 * torch.tanh(HiddenMatmulT.apply(h, self.b.weight))
        return self.head(h)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_missed_use_is_still_refused(scope, seed):
    # lean_retain=False: the retain gradient is formed and the sum check is what catches the miss
    torch.manual_seed(seed)
    model = MissedUse()
    g = torch.Generator().manual_seed(seed)
    retain = (torch.randn(8, 9, generator=g), torch.randint(0, 4, (8,), generator=g))
    unlearn = (torch.randn(5, 9, generator=g), torch.randint(0, 4, (5,), generator=g))
    with pytest.raises(CaptureError, match=r"'b\.weight'.*do not add up"):
        og_direction(model, ce, retain, unlearn, scope=scope, backend="torch", lean_retain=False)


def test_missed_use_refused_under_lean_retain():
    torch.manual_seed(3)
    model = MissedUse()
    g = torch.Generator().manual_seed(3)
    retain = (torch.randn(6, 9, generator=g), torch.randint(0, 4, (6,), generator=g))
    unlearn = (torch.randn(4, 9, generator=g), torch.randint(0, 4, (4,), generator=g))
    with pytest.raises(CaptureError, match=r"b\.weight"):
        og_direction(model, ce, retain, unlearn, backend="torch")


# --- og.forget() first: the first span keeps <retain gradient, u>, not the gradient -------------


def _forget_then_retain(model, og, retain, unlearn):
    with og.forget():
        ce(model(unlearn[0]), unlearn[1]).mean().backward()
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()


def _batches(seed, B=8, Bu=5):
    g = torch.Generator().manual_seed(seed)
    return (
        (torch.randn(B, 9, generator=g), torch.randint(0, 4, (B,), generator=g)),
        (torch.randn(Bu, 9, generator=g), torch.randint(0, 4, (Bu,), generator=g)),
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_unlearn_first_keeps_dots_and_still_refuses_a_missed_use(seed):
    from orthograd_fast import OrthoGrad

    torch.manual_seed(seed)
    model = MissedUse()
    retain, unlearn = _batches(seed)
    og = OrthoGrad(model)
    model.zero_grad(set_to_none=True)
    _forget_then_retain(model, og, retain, unlearn)
    lean = og._lean
    assert lean and not any(p in og._span.gsum for p in lean)  # no second model-sized gradient kept
    assert set(og._span.gdots) == lean
    with pytest.raises(CaptureError, match=r"'b\.weight'.*do not add up"):
        og.project_()


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_unlearn_first_dots_check_and_match_the_oracle(scope):
    from engine_helpers import compare

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(9, 13), nn.Tanh(), nn.Linear(13, 11), nn.Tanh(), nn.Linear(11, 4))
    retain, unlearn = _batches(4)
    err, orth, og = compare(model, ce, retain, unlearn, scope=scope, forget=True, unlearn_first=True)
    assert og._capture_checked and og._span.gdots and err <= REL and orth <= ORTH, (err, orth)


@pytest.mark.parametrize("missed", [False, True])
def test_u_changed_after_the_retain_pass_defers_the_check(missed):
    # another unlearn backward after the retain block changes u: the dots no longer apply, so the
    # check waits (no false refusal) and the next span keeps whole gradients and runs it
    from orthograd_fast import OrthoGrad

    torch.manual_seed(5)
    model = MissedUse() if missed else nn.Sequential(nn.Linear(9, 12), nn.Tanh(), nn.Linear(12, 4))
    retain, unlearn = _batches(5)
    og = OrthoGrad(model)
    model.zero_grad(set_to_none=True)
    _forget_then_retain(model, og, retain, unlearn)
    ce(model(unlearn[0][:2]), unlearn[1][:2]).mean().backward()  # .grad changes in place
    og.project_()
    assert not og._capture_checked and og._dots_deferred
    model.zero_grad(set_to_none=True)
    _forget_then_retain(model, og, retain, unlearn)
    assert not og._span.gdots and all(p in og._span.gsum for p in og._lean)  # whole gradients now
    if missed:
        with pytest.raises(CaptureError, match=r"b\.weight"):
            og.project_()
    else:
        og.project_()
        assert og._capture_checked


def test_dot_hooks_go_with_an_exception_and_grad_is_restored():
    from orthograd_fast import OrthoGrad

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(9, 12), nn.Tanh(), nn.Linear(12, 4))
    retain, unlearn = _batches(6)
    og = OrthoGrad(model)
    with og.forget():
        ce(model(unlearn[0]), unlearn[1]).mean().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        with og.retain():
            ce(model(retain[0]), retain[1]).mean().backward()
            raise RuntimeError("boom")
    for n, p in model.named_parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None), n  # no hook left behind
        assert torch.equal(p.grad, before[n]), n
    assert not og._span.gdots  # a failed block adds nothing
    # the same parameters' gradients accumulate as usual afterwards
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    for n, p in model.named_parameters():
        assert not torch.equal(p.grad, before[n]), n
