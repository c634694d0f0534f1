"""Suite-wide test setup.

1. On machines without CUDA, TRITON_INTERPRET=1 (setdefault) before any test module can import the
   Triton kernels: Triton picks interpreter vs compiler when a @triton.jit decorator runs, i.e. when
   orthograd_fast.kernels.* is first imported, so the variable must be set before that happens.
   Nothing can compile Triton without a GPU anyway; with CUDA present the kernels compile.
2. Fresh float allocations from torch.empty / torch.empty_like / torch.empty_strided are filled
   with NaN during every test, so a kernel (or any code) that leaves part of an output unwritten
   fails loudly instead of passing on leftover zeros. Opt out per test with
   @pytest.mark.no_nan_poison (e.g. torch.compile tests) or for a run with ORTHOGRAD_NAN_POISON=0.
3. tests/ is put on sys.path so `from tolerance import assert_close` works under any import mode.
4. Every test starts from the same global random state (torch, numpy, random: seed 0), whatever
   ran before it, so a draw without an explicit generator is still reproducible.
"""

import functools
import os
import random
import sys

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "no_nan_poison: keep torch.empty allocations unfilled (no NaN poisoning)")


def _poisoned(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = fn(*args, **kwargs)
        if t.layout == torch.strided and (t.is_floating_point() or t.is_complex()):
            with torch.no_grad():  # also fine on leaves created with requires_grad=True
                t.fill_(float("nan"))
        return t

    return wrapper


_ORIGINALS = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}


@pytest.fixture(autouse=True)
def _nan_poison_empty(request, monkeypatch):
    if request.node.get_closest_marker("no_nan_poison") or \
            os.environ.get("ORTHOGRAD_NAN_POISON", "1") == "0":
        yield
        return
    for name, fn in _ORIGINALS.items():
        monkeypatch.setattr(torch, name, _poisoned(fn))
    yield


@pytest.fixture(autouse=True)
def _fixed_seeds():
    random.seed(0)
    torch.manual_seed(0)
    try:
        import numpy
    except ImportError:
        pass
    else:
        numpy.random.seed(0)
    yield


@pytest.fixture(autouse=True)
def _thread_count_kept():
    """A test leaves torch's intra-op count as it found it (the prefetch lends one of the caller's
    threads until project_() / reset(): a test that leaves the window open must close it)."""
    n = torch.get_num_threads()
    yield
    left = torch.get_num_threads()
    if left != n:
        torch.set_num_threads(n)
        pytest.fail(f"the test left torch's intra-op thread count at {left} (found {n}); end an open og.retain() "
                    "window with og.project_() or og.reset()")


def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from threads and lose a lot to contention on
    a shared 2-core CI box (OpenMP's spin-waiting makes 2-thread runs 10x slower there)."""
    yield from _one_thread()


@pytest.fixture(scope="module")
def one_thread_module():
    """:func:`one_thread` for a whole module (smoke suites that measure no speed)."""
    yield from _one_thread()


@pytest.fixture
def factored(monkeypatch):
    """Small test weights take the factored routes (no float64 materialized rows)."""
    import orthograd_fast.engine.gram as gram

    monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)


@pytest.fixture
def unlearn_coef_calls(monkeypatch):
    """Names of the tensors whose coefficients came from the unlearn factors (og.forget() or the
    armed capture), one entry per projection."""
    import orthograd_fast.engine.gram as gram

    calls = []
    orig = gram.PerSampleGrads.unlearn_coef

    def spy(self, fuses):
        calls.append(self.name)
        return orig(self, fuses)

    monkeypatch.setattr(gram.PerSampleGrads, "unlearn_coef", spy)
    return calls
