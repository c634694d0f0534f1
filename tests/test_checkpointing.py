"""Activation checkpointing inside og.retain() (engine/checkpointing.py): Hugging Face's flag is off
for the block and the step exact; other checkpointing that the capture cannot follow is an error
that names it."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine_helpers import compare
from models import ce
from oracle import oracle_direction
from orthograd_fast import OrthoGrad
from orthograd_fast.errors import CaptureError
from real_models import hf_model

REL = 1e-4


def _enable(hf, **kw):
    """Hugging Face's activation checkpointing on (the newer name where there is one)."""
    on = getattr(hf, "activation_checkpointing_enable", None)
    if on is not None:
        on(activation_checkpointing_kwargs=kw or None)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw or None)


def _flags(model):
    return [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", ["llama", "gpt2"])  # no dropout: train mode, where HF checkpoints
def test_hf_checkpointing_is_off_in_the_retain_block(name, reentrant):
    pytest.importorskip("transformers")
    model, retain, unlearn, loss = hf_model(name, seed=3)
    ref, _, u = oracle_direction(model, loss, retain, unlearn)  # (before checkpointing is on)
    _enable(model.hf, use_reentrant=reentrant)
    model.train()
    assert any(_flags(model))
    before = _flags(model)
    og = OrthoGrad(model, backend="torch")
    model.zero_grad(set_to_none=True)
    with og.retain():
        assert not any(_flags(model))  # off inside the block
        loss(model(retain[0]), retain[1]).mean().backward()
    assert _flags(model) == before  # back on for the unlearn pass
    loss(model(unlearn[0]), unlearn[1]).mean().backward()
    og.project_()
    got = {n: p.grad.reshape(-1).double() for n, p in model.named_parameters() if p.requires_grad}
    # per tensor relative to ||d*|| + ||u|| (as engine_helpers.judge)
    err = max(float((got[n] - ref[n]).norm()) / (float(ref[n].norm() + u[n].norm()) + 1e-30) for n in got)
    assert err <= REL, f"{name}/reentrant={reentrant}: relative error {err:.2e}"
    assert og.stats["fallback"] == []


def test_hf_checkpointing_flags_restored_after_an_error():
    pytest.importorskip("transformers")
    model, retain, _, loss = hf_model("llama", seed=4)
    _enable(model.hf)
    before = _flags(model)
    og = OrthoGrad(model)
    with pytest.raises(RuntimeError, match="boom"):
        with og.retain():
            loss(model(retain[0]), retain[1]).mean().backward()
            raise RuntimeError("boom")
    assert _flags(model) == before and any(before)


def test_hf_checkpointing_switched_on_after_the_first_block_is_off_too():
    # the modules carrying the flag are found once, on the first block, with the flag off: a
    # gradient_checkpointing_enable() between steps is still turned off inside the next block
    pytest.importorskip("transformers")
    model, retain, unlearn, loss = hf_model("gpt2", seed=5)
    model.train()
    og = OrthoGrad(model)
    for step in range(2):
        if step == 1:
            _enable(model.hf)
            assert any(_flags(model))
        before = _flags(model)
        model.zero_grad(set_to_none=True)
        with og.retain():
            assert not any(_flags(model))
            loss(model(retain[0]), retain[1]).mean().backward()
        assert _flags(model) == before
        loss(model(unlearn[0]), unlearn[1]).mean().backward()
        og.project_()


class RMSNorm(nn.Module):
    """A norm whose weight is multiplied in (captured by expanding it along the batch)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Checkpointed(nn.Module):
    def __init__(self, reentrant, d=6, classes=3):
        super().__init__()
        self.inp, self.norm, self.mid, self.head = nn.Linear(4, d), RMSNorm(d), nn.Linear(d, d), nn.Linear(d, classes)
        self.reentrant = reentrant

    def block(self, h):
        return torch.tanh(self.mid(self.norm(h)))

    def forward(self, x):
        h = self.inp(x)
        return self.head(checkpoint(self.block, h, use_reentrant=self.reentrant))


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)), (torch.randn(3, 4, generator=g), torch.randint(0, 3, (3,), generator=g))


def test_raw_checkpoint_non_reentrant_that_changes_saved_tensors_is_a_clear_error():
    torch.manual_seed(5)
    model = Checkpointed(reentrant=False)
    retain, _ = _data(5)
    og = OrthoGrad(model)
    with pytest.raises(CaptureError, match=r"activation checkpointing .*use_reentrant=False.*turn activation checkpointing off"):
        with og.retain():
            ce(model(retain[0]), retain[1]).mean().backward()


def test_raw_checkpoint_reentrant_is_a_clear_error():
    torch.manual_seed(6)
    model = Checkpointed(reentrant=True)
    retain, unlearn = _data(6)
    og = OrthoGrad(model)
    with og.retain():
        ce(model(retain[0].requires_grad_()), retain[1]).mean().backward()
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    with pytest.raises(CaptureError, match=r"no module that owns it saw the retain forward.*use_reentrant=True"):
        og.project_()


def test_raw_checkpoint_without_changed_ops_stays_exact():
    # a segment of Linear layers only: its recompute reproduces the forward, the step is exact
    class Plain(Checkpointed):
        def block(self, h):
            return torch.tanh(self.mid(h))

    torch.manual_seed(7)
    model = Plain(reentrant=False)
    model.norm.requires_grad_(False)
    retain, unlearn = _data(7)
    err, _, og = compare(model, ce, retain, unlearn, backend="torch")
    assert err <= REL
    assert og.stats["fallback"] == []
