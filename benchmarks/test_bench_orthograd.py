"""The benchmark suite: one test per (model, retain batch B, provider), grouped per (model, B).

    pytest benchmarks/ --benchmark-only --og-set=cpu-quick --benchmark-json=benchmarks/results/run.json

A provider whose direction disagrees with the float64 oracle fails its test (and is not timed);
OOM / timeout / unavailable providers are skipped with the reason and recorded as rows in the
JSON ("orthograd" key). See benchmarks/README.md.
"""

from __future__ import annotations

import gc

import pytest

from benchmarks.conftest import settings_from_config
from benchmarks.runner import CaseFailed, CaseSkipped, set_cases


def pytest_generate_tests(metafunc):
    if "og_case" not in metafunc.fixturenames:
        return
    s = settings_from_config(metafunc.config)
    cases = set_cases(s)
    metafunc.parametrize("og_case", cases, ids=[f"{m}-B{B}-{p}" for m, B, p in cases])


def test_step(benchmark, og_session, og_case):
    model, B, provider = og_case
    benchmark.group = f"{model} B={B}"
    benchmark.extra_info.update(model=model, B=B, provider=provider)

    def timer(fn, rounds, warmup_rounds):
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
        return benchmark.stats.stats.median

    outcome = row = None
    try:
        row = og_session.run_case(model, B, provider, timer)
    except CaseSkipped as e:
        outcome = ("skip", f"{model} B={B} {provider}: {e}")
    except CaseFailed as e:
        outcome = ("fail", f"{model} B={B} {provider}: {e}")
    if outcome is not None:
        # outside the except block: the exception (and the frames holding the model and, after
        # a CUDA OOM, its tensors) is gone before pytest keeps the skip / failure
        gc.collect()
        if outcome[0] == "skip":
            pytest.skip(outcome[1])
        pytest.fail(outcome[1], pytrace=False)
    benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("traceback",)})
