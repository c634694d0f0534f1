"""Soak: many OrthoGrad steps with flat memory (no growth from hooks, captured calls or caches).

Measured at step 100 and at the last step: live torch.Tensor objects (gc), RSS, and the hooks left
on the modules (forward hooks, forward pre-hooks, and the tensor hooks' owners are the captured
outputs, which must be freed: the live tensor count catches them).
"""

import gc
import os
import time

import pytest
import torch
from torch import nn

from models import ce
from orthograd_fast import OrthoGrad


def _rss_bytes():
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors():
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def _soak(steps):
    if not os.path.exists(f"/proc/{os.getpid()}/statm"):
        pytest.skip("RSS is read from /proc (Linux only)")
    torch.manual_seed(0)
    # a tied embedding/head and a LayerNorm, so the token route and explicit terms are both cached
    emb = nn.Embedding(17, 8)
    head = nn.Linear(8, 17, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.LayerNorm(8), nn.Linear(8, 8), nn.Tanh(), head)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    og = OrthoGrad(model, scope="global", alpha=0.1, backend="torch")
    g = torch.Generator().manual_seed(1)
    xs = torch.randint(0, 17, (8, 4, 4), generator=g)
    marks = {}
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x = xs[step % 8]
        opt.zero_grad(set_to_none=True)
        with og.retain():
            ce(model(x), x).mean().backward()
        ce(model(x.flip(0)), x.flip(0)).mean().backward()
        og.project_()
        opt.step()
        assert _hooks(model) == 0, f"step {step}: hooks left on the model"
        if step in (100, steps):
            marks[step] = (_live_tensors(), _rss_bytes())
    elapsed = time.perf_counter() - t0
    (t100, r100), (tend, rend) = marks[100], marks[steps]
    print(f"\nsoak {steps} steps in {elapsed:.1f}s: live tensors {t100} -> {tend}, RSS {r100 / 2**20:.1f} -> {rend / 2**20:.1f} MiB")
    assert tend <= t100, f"live tensors grew from {t100} (step 100) to {tend} (step {steps})"
    # RSS: allocator noise is a few MiB; a per-step leak of even one factor set (~KiB) over 900
    # steps with tensors counted above would show in the tensor count, this bounds the rest
    assert rend - r100 <= 8 * 2**20, f"RSS grew by {(rend - r100) / 2**20:.1f} MiB between step 100 and {steps}"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_soak_200_steps(one_thread):
    _soak(200)


@pytest.mark.slow
def test_soak_1000_steps(one_thread):
    _soak(1000)


@pytest.mark.parametrize("name", ["mlp", "cnn", "lm", "tied", "raw"])
def test_step_leaves_no_tensor_in_reference_cycles(name):
    # what a step records (layer inputs, output gradients, factors, terms) goes when the step's
    # objects do, by reference counting: a reference cycle holding tensors would keep them until
    # the garbage collector runs, and the collections they trigger scan the whole heap
    import gc

    from models import make

    model, retain, unlearn = make(name, torch.Generator().manual_seed(2))
    og = OrthoGrad(model, alpha=0.2)

    def step():
        model.zero_grad(set_to_none=True)
        with og.retain():
            ce(model(retain[0]), retain[1]).mean().backward()
        ce(model(unlearn[0]), unlearn[1]).mean().backward()
        og.project_()

    step()
    step()
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        step()
        og.reset()
        gc.collect()
        cyclic = [tuple(o.shape) for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was:
            gc.enable()
    assert not cyclic, f"{len(cyclic)} tensors in reference cycles after a step: {cyclic[:8]}"
