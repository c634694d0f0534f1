"""Run the real-model table: every real-zoo model, plain against the OrthoGrad step in the API
contract's order, oracle check first, paired ratio, peak memory, fallback share, FLOP floor.

    python -m benchmarks.real_zoo_run --out benchmarks/results/real-cpu-$(date +%F)
    python -m benchmarks.real_zoo_run --set real-gpu --out $OUT/real-gpu      # on a CUDA machine
    python -m benchmarks.real_zoo_run --models hf_vit,lstm --budget 0.5 --out /tmp/real-dry

Writes ``<out>.json`` (the rows, in the pytest-benchmark JSON's ``orthograd`` structure),
``<out>.md`` and ``<out>-ratios.png`` / ``<out>-times.png`` (``benchmarks.real_report``). The
same cases run under pytest-benchmark with ``pytest benchmarks/ --benchmark-only --og-set=real-cpu``.
Run it on a quiet machine: the ratios are paired, but the medians are not.
"""

from __future__ import annotations

import os
import sys

if "torch" not in sys.modules:  # as benchmarks/conftest.py: passive OpenMP waits (recorded)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from datetime import datetime, timezone  # noqa: E402


def median_timer(fn, rounds: int, warmup_rounds: int) -> float:
    """Median seconds of ``rounds`` calls after ``warmup_rounds`` untimed ones."""
    for _ in range(warmup_rounds):
        fn()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def run(set_name: str = "real-cpu", models=None, budget=None, paired_rounds=None, overrides=None, providers=None, log=print,
        time_limit=None) -> dict:
    """Run the set's cases; returns the JSON structure (``orthograd``: settings, machine, rows).
    ``time_limit``: seconds after which no new case starts (the rows so far are returned)."""
    from .runner import BenchSession, CaseFailed, CaseSkipped, Settings, machine_info_end, set_cases

    kw = {}
    if budget is not None:
        kw["case_budget"] = budget
    if paired_rounds is not None:
        kw["paired_rounds"] = paired_rounds
    s = Settings.from_set(set_name, **kw)
    if models:
        s.cases = [c for c in s.cases if c[0] in models]
        unknown = set(models) - {c[0] for c in s.cases}
        if unknown:
            raise SystemExit(f"--models: not in set {set_name}: {sorted(unknown)}")
    if providers:  # e.g. plain,torch-contract,torch: the forget() order beside the contract's
        s.cases = [(c[0], c[1], tuple(providers)) for c in s.cases]
        s.providers = [p for p in s.providers if p in providers]
    s.overrides.update(overrides or {})
    sess = BenchSession(s)
    t0 = time.perf_counter()
    for model, B, provider in set_cases(s):
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            log(f"time limit {time_limit:.0f} s reached: {model} B={B} {provider} and later cases not run")
            break
        t = time.perf_counter()
        try:
            row = sess.run_case(model, B, provider, median_timer)
            what = f"{row['median_s'] * 1e3:.1f} ms"
            if row.get("paired_ratio"):
                what += f", paired {row['paired_ratio']:.2f}x"
        except (CaseSkipped, CaseFailed) as e:
            what = str(e)[:160]
        log(f"{model} B={B} {provider}: {what} ({time.perf_counter() - t:.1f} s)")
    settings = asdict(s)
    settings["cases"] = [[c[0], c[1], list(c[2]) if len(c) > 2 and c[2] else None] for c in settings["cases"]]
    machine = machine_info_end(sess.machine)
    machine["run_seconds"] = round(time.perf_counter() - t0, 1)
    return {
        "datetime": datetime.now(timezone.utc).isoformat(),
        "commit_info": _commit_info(),
        "benchmarks": [],
        "orthograd": {"settings": settings, "machine": machine, "rows": sess.rows},
    }


def _commit_info() -> dict:
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip())
        return {"id": sha, "dirty": dirty} if sha else {}
    except Exception:  # noqa: BLE001
        return {}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output path prefix: writes <out>.json, <out>.md, <out>-*.png")
    ap.add_argument("--set", default="real-cpu", help="real-cpu (default) or real-gpu")
    ap.add_argument("--models", default=None, help="comma-separated subset of the real zoo")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timed rounds per case (default: the set's)")
    ap.add_argument("--paired-rounds", type=int, default=None, help="alternating plain / step pairs (default: the set's)")
    ap.add_argument("--providers", default=None, help="comma-separated providers (default plain,torch-contract; "
                    "add torch for the forget() order)")
    ap.add_argument("--override", action="append", default=[], help="model:key=value[,key=value] config override")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds after which no new case starts")
    args = ap.parse_args(argv)
    from .real_report import write

    from .runner import parse_overrides

    overrides = parse_overrides(args.override)
    data = run(args.set, args.models.split(",") if args.models else None, args.budget, args.paired_rounds, overrides,
               args.providers.split(",") if args.providers else None, time_limit=args.time_limit)
    out_dir, name = os.path.dirname(os.path.abspath(args.out)), os.path.basename(args.out)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(data, f, indent=2, default=str)
    md = write(data, out_dir, name)
    print(md)
    return md


if __name__ == "__main__":
    main()
