"""pytest options for the benchmark suite and the JSON it leaves.

    pytest benchmarks/ --benchmark-only --og-set=cpu-quick --benchmark-json=benchmarks/results/run.json
    python -m benchmarks.report benchmarks/results/run.json

Options (each also readable from an environment variable ORTHOGRAD_BENCH_<NAME>):
  --og-set          cpu-quick (default) | cpu-full | gpu | real-cpu | real-gpu  (cases, budgets; real-*: benchmarks/real_zoo.py)
  --og-models       comma list: restrict the set's models
  --og-batches      comma list: replace the set's retain batch sizes
  --og-providers    comma list of plain,reference-qr,reference-svd,opacus,torch,triton
  --og-alpha, --og-scope, --og-unlearn-batch, --og-tol, --og-timeout, --og-budget
  --og-override     model:key=value[,key=value] zoo config override (repeatable), e.g. gpt2:T=128

Every case (timed or not) is also written into the pytest-benchmark JSON under the key
"orthograd": {"settings", "machine", "rows"}; OOM / timeout / skipped / wrong rows live only there.
"""

from __future__ import annotations

import os
import sys

# OpenMP's default (spinning) waits make two torch threads on two cores 10-30x slower as soon as
# any other process wants a core, which turns medians into noise on a shared machine. Passive
# waits cost little when the machine is idle. This must be set before torch (libgomp) loads;
# export OMP_WAIT_POLICY=ACTIVE to measure with spinning waits. The value used is recorded.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from benchmarks.runner import SETS, BenchSession, Settings, machine_info_end, parse_overrides  # noqa: E402

_OPTS = [
    ("set", "cpu-quick", "benchmark set: " + ", ".join(SETS)),
    ("models", None, "comma-separated zoo models (default: the set's)"),
    ("batches", None, "comma-separated retain batch sizes (default: the set's)"),
    ("providers", None, "comma-separated providers (default: all)"),
    ("alpha", None, "alpha of the direction (default 0.0)"),
    ("scope", None, "tensor | global (default tensor)"),
    ("unlearn-batch", None, "unlearn batch size (default: same as the retain batch)"),
    ("tol", None, "max scaled error vs the float64 oracle (default 1e-3)"),
    ("timeout", None, "per-step timeout in seconds (default: the set's)"),
    ("budget", None, "seconds of timed rounds per case (default: the set's)"),
]


def pytest_addoption(parser):
    group = parser.getgroup("orthograd-bench")
    for name, default, help_ in _OPTS:
        group.addoption(f"--og-{name}", default=None, help=help_ + f" [env ORTHOGRAD_BENCH_{name.upper().replace('-', '_')}]")
    group.addoption("--og-override", action="append", default=[], help="model:key=value[,key=value] zoo config override")


def _opt(config, name):
    v = config.getoption(f"--og-{name}")
    if v is None:
        v = os.environ.get(f"ORTHOGRAD_BENCH_{name.upper().replace('-', '_')}")
    return v


def settings_from_config(config) -> Settings:
    set_name = _opt(config, "set") or "cpu-quick"
    kw = {}
    if _opt(config, "timeout"):
        kw["step_timeout"] = float(_opt(config, "timeout"))
    if _opt(config, "budget"):
        kw["case_budget"] = float(_opt(config, "budget"))
    for key, cast in (("alpha", float), ("scope", str), ("unlearn-batch", int), ("tol", float)):
        if _opt(config, key) is not None:
            kw[key.replace("-", "_")] = cast(_opt(config, key))
    s = Settings.from_set(set_name, **kw)
    models = _opt(config, "models")
    batches = _opt(config, "batches")
    if models or batches:
        ms = models.split(",") if models else list(dict.fromkeys(c[0] for c in s.cases))
        if batches:  # explicit batch sizes: every provider at every B
            bs = [int(b) for b in batches.split(",")]
            s.cases = [(m, B, None) for m in ms for B in bs]
        else:
            s.cases = [c for c in s.cases if c[0] in ms]
    if _opt(config, "providers"):
        wanted = _opt(config, "providers").split(",")
        s.providers = [p for p in s.providers if p in wanted]
    overrides = list(config.getoption("--og-override") or [])
    if os.environ.get("ORTHOGRAD_BENCH_OVERRIDE"):
        overrides += os.environ["ORTHOGRAD_BENCH_OVERRIDE"].split(";")
    for model, kv in parse_overrides(overrides).items():
        s.overrides.setdefault(model, {}).update(kv)
    return s


def pytest_configure(config):
    config._og_session = None


def get_session(config) -> BenchSession:
    if config._og_session is None:
        config._og_session = BenchSession(settings_from_config(config))
    return config._og_session


def pytest_benchmark_update_machine_info(config, machine_info):  # pytest-benchmark hook
    from benchmarks.runner import machine_info as _mi

    machine_info["orthograd"] = _mi(settings_from_config(config).device)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    sess = config._og_session
    if sess is None:
        return
    from dataclasses import asdict

    settings = asdict(sess.s)
    settings["cases"] = [[c[0], c[1], list(c[2]) if len(c) > 2 and c[2] else None] for c in settings["cases"]]
    info = machine_info_end(sess.machine)
    output_json["orthograd"] = {"settings": settings, "machine": info, "rows": sess.rows}


@pytest.fixture(scope="session")
def og_session(request):
    return get_session(request.config)


def pytest_sessionfinish(session, exitstatus):
    """pytest-benchmark writes no JSON when nothing was timed (every case OOM / timeout / skipped);
    the rows are the result then, so write the same structure ourselves."""
    config = session.config
    sess = getattr(config, "_og_session", None)
    bs = getattr(config, "_benchmarksession", None)
    path = getattr(bs, "json", None) if bs is not None else None
    if sess is None or not sess.rows or not path or getattr(bs, "benchmarks", None):
        return
    import json
    from datetime import datetime, timezone

    output = {"machine_info": {}, "commit_info": {}, "benchmarks": [], "datetime": datetime.now(timezone.utc).isoformat()}
    try:
        output["commit_info"] = config.hook.pytest_benchmark_generate_commit_info(config=config)
    except Exception:  # noqa: BLE001
        pass
    pytest_benchmark_update_json(config, [], output)
    with open(path, "w") as f:
        json.dump(output, f, indent=2, default=str)
