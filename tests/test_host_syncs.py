"""``project_()`` waits for the device a fixed number of times per step, however many parameter
tensors the model has: every Python-level read of a tensor value (``.item()``, ``bool()``,
``.tolist()``, ``float()``, ...) is counted while it runs, on a model and the same model with
several times the tensors. On a GPU each such read is a host synchronisation; on the CPU the count
is the same, so the CPU suite guards it. (Syncs inside a library call, e.g. eigh's error check,
are one per batched call, not per tensor.)"""

import collections

import pytest
import torch

from benchmarks.host_overhead import Stack
from benchmarks.zoo import build_model, per_sample_loss
from models import ce
from orthograd_fast import OrthoGrad

@pytest.fixture(autouse=True)
def no_held_rows(monkeypatch):
    # held float32 rows (orthograd_fast.engine.held_rows) are a CPU-only route (PerSampleGrads.can_hold) that
    # reads K's eigenvalues per term; on the CPU such reads wait for nothing. The device path is off.
    from orthograd_fast.engine import held_rows

    monkeypatch.setattr(held_rows, "MAX_BYTES", 0)


READS = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero"]
MAX_SYNCS = 6


@pytest.fixture
def count_reads(monkeypatch):
    counts = collections.Counter()
    for name in READS:
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            counts[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return counts


def _reads_in_project(model, loss, retain, unlearn, counts, **kw):
    """Reads in the first ``project_()`` (it also runs the capture check) and in the second
    (plans cached: the steady state)."""
    og = OrthoGrad(model, **kw)
    out = []
    for _ in range(2):
        with og.retain():
            loss(model(retain[0]), retain[1]).mean().backward()
        loss(model(unlearn[0]), unlearn[1]).mean().neg().backward()
        counts.clear()
        og.project_()
        out.append(sum(counts.values()))
        model.zero_grad(set_to_none=True)
    return tuple(out)


def _stack(depth, g):
    torch.manual_seed(depth)
    return Stack(d=7, depth=depth), (torch.randn(6, 5, generator=g), torch.randint(0, 4, (6,), generator=g)), (
        torch.randn(3, 5, generator=g),
        torch.randint(0, 4, (3,), generator=g),
    )


@pytest.mark.parametrize("lean", [True, False])
def test_reads_do_not_grow_with_tensors_small_terms(count_reads, lean):
    g = torch.Generator().manual_seed(0)
    n = []
    for depth in (2, 10):
        model, retain, unlearn = _stack(depth, g)
        n.append(_reads_in_project(model, ce, retain, unlearn, count_reads, lean_retain=lean))
    assert n[0] == n[1] and max(n[0]) <= MAX_SYNCS, n


@pytest.mark.parametrize("name,key", [("transformer", "layers"), ("gpt2", "n_layer")])
def test_reads_do_not_grow_with_layers(count_reads, name, key):
    got = []
    for layers in (1, 3):
        model, make_batch = build_model(name, size="cpu", **{key: layers})
        g = torch.Generator().manual_seed(1)
        retain, unlearn = make_batch(8, generator=g), make_batch(4, generator=g)
        got.append(_reads_in_project(model, per_sample_loss(name), retain, unlearn, count_reads, lean_retain=False))
    assert got[0] == got[1] and max(got[0]) <= MAX_SYNCS, got
