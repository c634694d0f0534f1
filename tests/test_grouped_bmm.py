"""Block-diagonal Linears written with torch.bmm / torch.baddbmm over a 3-D weight, the data's
batch folded into dim 1 (RecurrentGemma's RG-LRU gates: ``baddbmm(b[:, None, :], x, w)`` with x
[heads, B * T, width]), against the float64 oracle; and the generic fallback's replay failing
(an autograd.Function without ``setup_context``) as a CaptureError that names the module."""

import pytest
import torch
from torch import nn

from engine_helpers import compare
from models import ce

REL = 1e-6  # float64 models: exact up to rounding


class BlockGates(nn.Module):
    """tokens [B, T, H * W] -> per head a W x W gate (``how``: the weight stored [H, I, O] and
    used as is, stored [H, O, I] and used through ``.mT``, or scaled before the product)."""

    def __init__(self, heads=2, width=3, how="baddbmm", T=3, classes=4):
        super().__init__()
        self.heads, self.width, self.how, self.T = heads, width, how, T
        self.embed = nn.Linear(5, heads * width)
        self.w = nn.Parameter(torch.randn(heads, width, width) / width**0.5)
        self.b = nn.Parameter(torch.randn(heads, width))
        self.head = nn.Linear(heads * width, classes)

    def forward(self, x):
        B = x.shape[0]
        h = torch.tanh(self.embed(x))  # [B, T, H W]
        a = h.reshape(B * self.T, self.heads, self.width).permute(1, 0, 2)  # [H, B T, W]: batch on dim 1
        if self.how == "baddbmm":
            r = torch.baddbmm(self.b[:, None, :], a, self.w)
        elif self.how == "method":
            r = self.b[:, None, :].baddbmm(a, self.w)
        elif self.how == "transposed":
            r = torch.bmm(a, self.w.mT)
        else:  # a weight computed from the parameter: explicit per-sample rows
            r = torch.bmm(a, self.w * 0.5)
        g = torch.sigmoid(r.transpose(0, 1).reshape(B, self.T, -1))
        return self.head((h * g).mean(1))


def _data(gen, B, T=3):
    return torch.randn(B, T, 5, generator=gen, dtype=torch.float64), torch.randint(0, 4, (B,), generator=gen)


@pytest.mark.parametrize("how", ["baddbmm", "method", "transposed", "derived"])
@pytest.mark.parametrize("B", [1, 5])
def test_block_diagonal_gates(how, B):
    torch.manual_seed(3 + B)
    gen = torch.Generator().manual_seed(3 + B)
    model = BlockGates(how=how).double()
    err, orth, og = compare(model, ce, _data(gen, B), _data(gen, 3), alpha=0.2, backend="torch")
    assert err <= REL, f"relative error {err:.2e}"
    assert orth <= 1e-9, f"orthogonality {orth:.2e}"
    assert og.stats["fallback"] == []


class RowBias(nn.Module):
    """``baddbmm`` with a parameter bias per row of the batch ([H, B T, W]: one bias per token of
    each sample, the model's shape tied to B): not a bias shared by the tokens, so not this rule's
    form; the module goes to the torch.func fallback, whose per-sample replay cannot run it."""

    def __init__(self, B, T=3):
        super().__init__()
        self.T = T
        self.embed = nn.Linear(5, 6)
        self.w = nn.Parameter(torch.randn(2, 3, 3) / 3**0.5)
        self.rb = nn.Parameter(torch.randn(2, B * T, 3))
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        B, T = x.shape[0], self.T
        h = torch.tanh(self.embed(x))
        a = h.reshape(B * T, 2, 3).permute(1, 0, 2)
        r = torch.baddbmm(self.rb, a, self.w)
        return self.head(r.transpose(0, 1).reshape(B, T, -1).mean(1))


def test_a_bias_per_row_is_not_taken_as_a_shared_bias():
    from orthograd_fast import CaptureError, OrthoGrad

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = RowBias(4).double()
    x, y = _data(gen, 4)
    og = OrthoGrad(model)
    with pytest.warns(RuntimeWarning, match="torch.baddbmm"), pytest.raises(CaptureError, match=r"module '<root>' \(RowBias\).*torch\.baddbmm.*replay failed"):
        with og.retain():
            ce(model(x), y).mean().backward()
    assert all(p.grad is None for p in model.parameters()), ".grad not restored after the error"


class _OldStyleSqrt(torch.autograd.Function):
    """An autograd.Function with ``forward(ctx, x)`` and no ``setup_context``: torch.func cannot
    transform it (RecurrentGemma's SqrtBoundDerivative)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sqrt()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / (2 * x.sqrt())


class NoRuleWithOldFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.rand(3) + 0.5)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = _OldStyleSqrt.apply(self.lin(x).square() + 1.0)
        h = torch.atan2(h, self.scale.expand_as(h))  # no per-sample rule: this module falls back
        return self.head(h)


def test_fallback_replay_failure_names_the_module():
    from orthograd_fast import CaptureError, OrthoGrad

    torch.manual_seed(1)
    model = nn.Sequential(NoRuleWithOldFunction())
    og = OrthoGrad(model)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(CaptureError, match=r"module '0' \(NoRuleWithOldFunction\).*atan2.*fallback.*setup_context"):
        with og.retain():
            ce(model(x), y).mean().backward()
    assert all(p.grad is None for p in model.parameters()), ".grad not restored after the error"
