"""CI smoke test of the benchmark suite (benchmarks/): every zoo model at a tiny size, every CPU
provider once at B=4 through the same code path as the suite (memory measurement, float64-oracle
check, timing with one round), and the report on a small synthetic JSON. No timings are asserted.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import sys
import time

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import zoo  # noqa: E402
from benchmarks.oracle import compare, oracle_direction  # noqa: E402
from benchmarks.providers import PROVIDERS  # noqa: E402
from benchmarks.runner import BenchSession, CaseFailed, CaseSkipped, Settings  # noqa: E402

TINY = {
    "mlp": dict(d_in=16, hidden=32, depth=2),
    "cnn": dict(img=8, widths=(4, 8), hidden=16),
    "resnet18": dict(width=4, img=8),
    "vit_tiny": dict(img=8, patch=4, d=16, depth=1, heads=2),
    "gpt2": dict(vocab=64, n_layer=1, d=16, heads=2, T=8),
    "whisper_tiny": dict(n_mels=8, n_frames=16, d=16, heads=2, layers=1),
    "transformer": dict(vocab=32, T=8, d=16, heads=2, layers=1),
}
CPU_PROVIDERS = [p for p in PROVIDERS if p != "triton"]
B = 4


def test_tiny_configs_cover_the_zoo():
    assert set(TINY) == set(zoo.MODEL_NAMES)


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_zoo_model_builds_deterministically(name):
    m1, mb1 = zoo.build_model(name, "cpu", **TINY[name])
    m2, mb2 = zoo.build_model(name, "cpu", **TINY[name])
    assert not m1.training
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    x, y = mb1(B, torch.Generator().manual_seed(3))
    x2, y2 = mb2(B, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    losses = zoo.per_sample_loss(name)(m1(x), y)
    assert losses.shape == (B,) and torch.isfinite(losses).all()
    # a sample's loss does not depend on the rest of the batch (eval mode: per-sample gradients exist)
    alone = zoo.per_sample_loss(name)(m1(x[:1]), y[:1])
    torch.testing.assert_close(alone, losses[:1], rtol=1e-4, atol=1e-5)


def _gpt2_params(c):
    d, L = c["d"], c["n_layer"]
    return c["vocab"] * d + c["n_positions"] * d + L * (12 * d * d + 13 * d) + 2 * d


def test_gpt2_head_is_tied_and_full_size_is_124m():
    m, _ = zoo.build_model("gpt2", "cpu", **TINY["gpt2"])
    assert m.lm_head.weight is m.wte.weight
    assert zoo.count_params(m) == _gpt2_params(zoo.config("gpt2", "cpu", **TINY["gpt2"]))
    full = zoo.config("gpt2", "gpu")
    assert full["d"] == 768 and full["T"] == 256 and _gpt2_params(full) == 124_439_808  # GPT-2 small


def test_oracle_is_orthogonal_to_every_retain_gradient_and_the_checker_can_fail():
    model, mb = zoo.build_model("mlp", "cpu", **TINY["mlp"])
    g = torch.Generator().manual_seed(0)
    retain, unlearn = mb(B, g), mb(B, g)
    loss_fn = zoo.per_sample_loss("mlp")
    o = oracle_direction(model, loss_fn, retain, unlearn)
    m64 = __import__("copy").deepcopy(model).double()
    for i in range(B):
        li = loss_fn(m64(retain[0][i : i + 1].double()), retain[1][i : i + 1]).sum()
        gi = torch.autograd.grad(li, list(m64.parameters()))
        for (n, _), gt in zip(m64.named_parameters(), gi):
            cos = (gt.flatten() @ o.direction[n].flatten()) / (gt.norm() * o.u[n].norm())
            assert abs(float(cos)) < 1e-10, n
    assert compare(o.direction, o).ok
    # the unprojected unlearn gradient is not the OrthoGrad direction: the check must reject it
    bad = compare({n: -o.u[n] for n in o.checked}, o)
    assert not bad.ok and bad.max_err > 1e-2
    assert not compare({}, o).ok


# no speed is measured here: one intra-op thread keeps it quick on a loaded 2-core box
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def session():
    s = Settings(
        set_name="smoke",
        device="cpu",
        size="cpu",
        providers=list(CPU_PROVIDERS),
        case_budget=0.0,
        max_rounds=1,
        min_rounds=1,
        paired_rounds=0,
        paired_ref_rounds=0,
        step_timeout=60.0,
        overrides=TINY,
    )
    return BenchSession(s)


def _one_round(fn, rounds, warmup_rounds):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_provider_matches_float64_oracle(session, name, provider):
    try:
        row = session.run_case(name, B, provider, _one_round)
    except CaseSkipped as e:
        row = session.rows[-1]
        # a tiny case that times out or is (predicted) out of memory is a bug here (a hang, a
        # runaway allocation), not a limit of the machine: only an unavailable provider may skip
        if row["status"] in ("timeout", "OOM"):
            pytest.fail(f"{name} {provider} at B={B}: {row['status']} ({row['reason']})", pytrace=False)
        assert row["status"] == "skipped" and row["reason"], row
        pytest.skip(str(e))
    except CaseFailed as e:
        pytest.fail(f"{name} {provider}: {e}\n{session.rows[-1].get('traceback', '')}", pytrace=False)
    assert row["status"] == "ok"
    assert row["check"]["ok"] is True and row["check"]["n_checked"] == row["check"]["n_total"]
    assert row["median_s"] > 0 and row["peak_mem_bytes"] > 0


def test_opacus_row_is_skipped_with_reason_on_batchnorm(session):
    pytest.importorskip("opacus", reason="opacus not installed (extras [bench] and [test])")
    with pytest.raises(CaseSkipped, match="BatchNorm"):
        session.run_case("resnet18", B, "opacus", _one_round)


def _synthetic_json():
    def bench(model, Bv, prov, med, mem):
        return {
            "group": f"{model} B={Bv}",
            "stats": {"median": med, "rounds": 5, "iqr": 0.0},
            "extra_info": {"model": model, "B": Bv, "provider": prov, "peak_mem_bytes": mem, "check": {"ok": True, "max_err": 1e-6, "n_checked": 4, "n_total": 4}},
        }

    rows = [
        {"model": "mlp", "B": 128, "provider": "reference-qr", "status": "timeout", "reason": "first step > 20 s", "median_s": None},
        {"model": "mlp", "B": 128, "provider": "opacus", "status": "OOM", "reason": "predicted", "median_s": None},
    ]
    return {
        "machine_info": {"python_version": "3.x"},
        "datetime": "2026-01-01T00:00:00",
        "benchmarks": [
            bench("mlp", 64, "plain", 0.010, 100 * 2**20),
            dict(bench("mlp", 64, "torch", 0.012, 110 * 2**20), extra_info=dict(
                bench("mlp", 64, "torch", 0.012, 110 * 2**20)["extra_info"], ref_qr_paired=97.5, ref_qr_paired_rounds=3)),
            bench("mlp", 64, "reference-qr", 1.5, 900 * 2**20),
            bench("mlp", 128, "plain", 0.020, 120 * 2**20),
            bench("mlp", 128, "torch", 0.030, 150 * 2**20),
        ],
        "orthograd": {
            "settings": {"set_name": "synthetic", "device": "cpu", "size": "cpu", "alpha": 0.0, "scope": "tensor", "tol": 1e-3},
            "machine": {"cpu_model": "Test CPU", "cpu_count": 2, "torch_version": torch.__version__, "date": "2026-01-01"},
            "rows": rows,
        },
    }


def test_report_on_synthetic_json(tmp_path):
    pytest.importorskip("matplotlib", reason="the report's plots need matplotlib")
    from benchmarks import report

    path = tmp_path / "synthetic.json"
    path.write_text(json.dumps(_synthetic_json()))
    md_path = report.main([str(path), "--out", str(tmp_path / "out")])
    md = open(md_path).read()
    assert "Test CPU" in md and "2026-01-01" in md and torch.__version__ in md
    assert "| 64 | torch | 12 ms | 1.20x |" in md
    assert "1.10x" in md  # memory ratio at B=64
    assert "| mlp | reference-qr / torch >= 100 (medians) | 125.0x | PASS |" in md
    assert "| mlp | reference-qr / torch >= 100 (paired, 3 pairs) | 97.5x | MISS |" in md
    assert "| mlp | torch step / plain <= 1.3 (medians) | 1.20x | PASS |" in md
    assert "**timeout**" in md and "**OOM**" in md
    png = tmp_path / "out" / "synthetic-mlp.png"
    assert png.exists() and png.stat().st_size > 1000


def test_host_probe_is_measured_and_reported():
    from benchmarks import report
    from benchmarks.runner import host_probe, machine_info_end

    n = torch.get_num_threads()
    hp = host_probe()
    assert hp["sgemm_gflops"] > 0.1 and hp["copy_gbs"] > 0.01, hp
    assert torch.get_num_threads() == n  # the probe's one thread is given back
    assert hp["sgemm_gflops_all_threads"] > 0.1
    start = {"loadavg_start": [0.5, 0.5, 0.5], "host_probe_start": hp}
    end = machine_info_end(start)  # the end of a run reads the probe again, the start is kept
    assert end["host_probe_end"]["sgemm_gflops"] > 0.1 and end["host_probe_start"] is hp and "host_probe_end" not in start
    assert "host_probe_end" not in machine_info_end({"loadavg_start": None})  # (no probe at the start: none at the end)
    t0, t1 = [10, 0, 5, 80, 0, 0, 0, 5, 0, 0], [30, 0, 10, 140, 0, 0, 0, 20, 0, 0]  # steal 15 of 100 ticks
    data = {"orthograd": {"machine": {
        "torch_threads": 2,
        "host_probe_start": {"sgemm_gflops": 81.2, "sgemm_gflops_all_threads": 160.3, "copy_gbs": 16.0, "cpu_ticks": t0},
        "host_probe_end": {"sgemm_gflops": 40.5, "sgemm_gflops_all_threads": 70.1, "copy_gbs": 9.1, "cpu_ticks": t1}}}}
    lines = report.machine_lines(data)
    want = ("- Host probe (start / end): float32 512 x 512 GEMM 81.2 / 40.5 GFLOP/s on one thread, 160.3 / 70.1 on 2; "
            "64 MiB copy 16.0 / 9.1 GB/s; steal time during the run 15.0% of CPU time")
    assert want in lines, lines


def test_report_marks_noisy_medians():
    from benchmarks import report

    row = dict(model="mlp", B=64, provider="torch", status="ok", median_s=0.05, mem_ratio=1.1)
    agree = report.targets_table([dict(row, time_ratio=1.2, paired_ratio=1.25)])
    noisy = report.targets_table([dict(row, time_ratio=0.98, paired_ratio=1.41)])
    assert "| mlp | torch step / plain <= 1.3 (medians) | 1.20x | PASS |" in agree
    assert "| mlp | torch step / plain <= 1.3 (medians) | 0.98x | PASS (noisy: median and paired ratios differ by > 25%) |" in noisy
    assert "| mlp | torch step / plain <= 1.3 (paired) | 1.41x | MISS |" in noisy


def test_qr_semantics_on_rank_deficient_tensors():
    from benchmarks.oracle import OracleResult

    # one tensor of 3 entries, B=4 retain samples spanning only 2 directions (rank-deficient)
    u = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    exact = torch.tensor([0.0, 0.0, -3.0], dtype=torch.float64)  # -P_perp(u) with span{e0, e1}
    o = OracleResult(
        direction={"w": exact}, u={"w": u}, gbar={"w": torch.zeros(3, dtype=torch.float64)}, rank={"w": 2},
        checked=["w"], all_names=["w"], alpha=0.0, scope="tensor", B=4, numel={"w": 3},
    )
    qr_dir = {"w": torch.zeros(3)}  # QR of the 3x4 G^T is a complete basis: everything removed
    assert compare({"w": exact.float()}, o).ok
    assert not compare(qr_dir, o).ok and "rank-deficient" in compare(qr_dir, o).message
    assert compare(qr_dir, o, qr_semantics=True).ok
    assert not compare({"w": exact.float()}, o, qr_semantics=True).ok


def test_order_memory_unlearn_first_is_lighter():
    # benchmarks/order_memory.py: the retain factors held through the unlearn pass (retain first)
    # cost more than capturing them after it (unlearn first); the README quotes this table
    from benchmarks import order_memory

    got = {o: order_memory.peak("transformer", 8, o) for o in order_memory.ORDERS}
    assert got["unlearn first"] < got["retain first"], got
    assert got["plain"] < got["unlearn first"], got


def test_host_overhead_states_differ_in_the_singular_grams(capsys, monkeypatch):
    # benchmarks/host_overhead.py: at init (LayerNorm bias 0) the 16 x 16 column Grams of the
    # LayerNorm-fed width-4 Linears are singular and go to eigh; in the 'trained' state only the
    # head's still does (its output gradients, softmax rows, sum to zero), as does the head bias's
    # 4 x 4 Gram in both states
    from benchmarks import host_overhead
    from orthograd_fast.engine import solve

    batches = []
    orig = solve._eigh

    def spy(K):
        batches.append(tuple(K.shape))
        return orig(K)

    monkeypatch.setattr(solve, "_eigh", spy)
    for state, want16 in (("init", 3 + 1), ("trained", 1)):
        batches.clear()
        [(_, _, n)] = host_overhead.measure([host_overhead.build(4, 3, state)], 24, 5, 2)
        assert n == 3 * 4 + 4  # 3 blocks of LayerNorm + Linear, the input and head layers
        last = batches[-2:]  # the last projection's eigh batches
        assert sorted(last) == sorted([(1, 4, 4), (want16, 16, 16)]), (state, batches)
    host_overhead.main(["--depth", "2", "--steps", "2"])
    out = capsys.readouterr().out
    assert "[trained] project_()" in out and "[init   ] project_()" in out, out


def test_profile_step_runs_and_attributes_every_route(capsys):
    # benchmarks/profile_step.py wraps the core's PerSampleGrads methods at run time; a signature change
    # in the core must not break it (it did once: results carried a TypeError traceback)
    from benchmarks import profile_step

    profile_step.main(["mlp", "--B", "6", "--steps", "2", "--top", "3"])
    out = capsys.readouterr().out
    assert "| **step** |" in out and "paired ratio" in out
    assert "| tensor | route | gram_coef ms/step | apply_ ms/step |" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and "numel=" in ln]
    assert rows, out


def test_wgrad_cost_reports_the_floors_credit(capsys):
    # benchmarks/wgrad_cost.py: the retain weight gradients' cost against the floor's credit for them
    from benchmarks import wgrad_cost

    r = wgrad_cost.measure("lstm", rounds=1, B=4, Bu=2)
    assert r["plain_ms"] > 0 and r["floor"] > 1.0
    # the credit: 2 B T numel per LSTM weight over the plain step's flops, a share well inside (0, 1)
    assert 0.05 < r["credit_share"] < 0.5, r
    wgrad_cost.main(["--models", "lstm", "--rounds", "1"])
    assert "| lstm |" in capsys.readouterr().out


def test_profile_step_schedule_lists_every_term_and_restores_the_core(capsys):
    # --schedule times one projection's jobs per thread by wrapping the core's methods at run
    # time: every term of the MLP has a job, each thread's busy + idle time spans the jobs, and
    # the core's methods are put back
    from benchmarks import profile_step, zoo
    from orthograd_fast.engine import gram as core_gram
    from orthograd_fast.engine.routes.explicit import ExplicitGroup

    def methods():
        return core_gram.PerSampleGrads.gram_coef, core_gram.PerSampleGrads.project_held_, ExplicitGroup.gram_coef

    before = methods()
    profile_step.main(["mlp", "--B", "6", "--steps", "2", "--top", "3", "--schedule"])
    assert methods() == before
    lines = capsys.readouterr().out.splitlines()

    def table(header):  # the rows under a markdown header line, split into cells
        k = lines.index(header) + 2
        rows = []
        while k < len(lines) and lines[k].startswith("| "):
            rows.append([c.strip() for c in lines[k].strip("|").split("|")])
            k += 1
        return rows

    jobs = table("| start ms | end ms | thread | job |")
    span = max(float(r[1]) for r in jobs) - min(float(r[0]) for r in jobs)
    names = {name for name, _ in zoo.build_model("mlp", "cpu")[0].named_parameters()}
    assert {r[3].split(" (")[0] for r in jobs} == names, jobs
    for th, busy, idle in table("| thread | busy ms | idle ms between the first and the last job |"):
        assert float(busy) > 0 and abs(float(busy) + float(idle) - span) <= 0.02 + 0.01 * span, (th, busy, idle, span)


def test_autocast_error_separates_the_two_error_sources():
    # benchmarks/autocast_error.py (the precision table): the direction under autocast is off
    # fp32 by the autocast unlearn gradient's error plus the half retain span's, to first order
    from benchmarks import autocast_error

    from engine_helpers import autocast_ok

    if not autocast_ok(torch.bfloat16):
        pytest.skip("CPU autocast to bfloat16 is not supported by this torch build")
    r = autocast_error.measure("transformer", 6, torch.bfloat16)
    parts = [r[k] for k in ("u_err", "P32(uh)", "Ph(u32)", "Ph(uh)")]
    assert all(0.0 < v < 0.5 for v in parts), r  # bf16 rounding: present, and not garbage
    assert r["Ph(uh)"] <= 1.5 * (r["P32(uh)"] + r["Ph(u32)"]), r
    assert r["u_over_d"] >= 1.0 - 1e-6, r  # a projection never lengthens u


def test_batched_oracle_matches_the_sample_loop_on_a_smooth_model():
    # benchmarks/oracle.py batched=True (the runner's last diagnosis of a failed check): per-sample
    # gradients through one forward of the whole batch must equal the one-forward-per-sample loop
    # where no ReLU kink can tell them apart (tanh, float64)
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4)).double()
    g = torch.Generator().manual_seed(4)
    retain = (torch.randn(7, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (7,), generator=g))
    unlearn = (torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (5,), generator=g))
    loss_fn = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    one = oracle_direction(model, loss_fn, retain, unlearn)
    bat = oracle_direction(model, loss_fn, retain, unlearn, batched=True)
    assert "batched" in bat.loop_dtype
    for n in one.direction:
        ref = one.direction[n]
        assert (bat.direction[n] - ref).abs().max() <= 1e-12 * (ref.abs().max() + one.u[n].abs().max())
        assert (bat.gbar[n] - one.gbar[n]).abs().max() <= 1e-12 * one.gbar[n].abs().max()


def test_failed_check_is_diagnosed_by_the_float32_and_batched_oracles(session, monkeypatch):
    # benchmarks/runner.py: a direction that fails the float64 check passes only if it matches an
    # independent float32 oracle (one-sample loop, then through the batched forward), and says
    # which; a wrong direction fails all of them and the message names each
    name, Bd = "mlp", 5
    model, mb = session.build(name)
    loss_fn = zoo.per_sample_loss(name)
    retain, unlearn = mb(Bd, torch.Generator().manual_seed(8)), mb(Bd, torch.Generator().manual_seed(9))
    orc = oracle_direction(model, loss_fn, retain, unlearn)
    good = dict(orc.direction)
    session._first_step[(name, "plain")] = (Bd, 0.01)  # the batched oracle's budget estimate
    skewed = oracle_direction(model, loss_fn, retain, unlearn)
    n0 = skewed.checked[0]
    skewed.direction[n0] = skewed.direction[n0] + 0.1 * skewed.u[n0]  # a float64 oracle that is off
    failed = compare(good, skewed)
    assert not failed.ok
    chk, f64 = session._diagnose(failed, good, name, Bd, loss_fn, retain, unlearn, orc.checked, "torch", False)
    assert chk.ok and f64 == failed.max_err and "float32 and float64" in chk.message
    # the float32 one-sample oracle unavailable: the batched one decides
    real = session.oracle_same_precision
    monkeypatch.setattr(session, "oracle_same_precision",
                        lambda *a, batched=False: real(*a, batched=batched) if batched else RuntimeError("off"))
    chk, f64 = session._diagnose(compare(good, skewed), good, name, Bd, loss_fn, retain, unlearn, orc.checked, "torch", False)
    assert chk.ok and "through the batched forward" in chk.message
    # a wrong direction: every oracle disagrees, and the failure says so
    wrong = {n: -orc.u[n] for n in orc.checked}
    monkeypatch.setattr(session, "oracle_same_precision", real)
    chk, f64 = session._diagnose(compare(wrong, orc), wrong, name, Bd, loss_fn, retain, unlearn, orc.checked, "torch", False)
    assert not chk.ok and f64 is None
    assert "float32-loop oracle disagrees" in chk.message and "batched forward disagrees" in chk.message


def test_reference_qr_paired_with_torch():
    """The >= 100x target's paired ratio: reference-qr and torch steps alternate on two copies."""
    s = Settings(
        set_name="smoke-paired", device="cpu", size="cpu", providers=["plain", "torch", "reference-qr"],
        case_budget=0.0, max_rounds=1, min_rounds=1, paired_rounds=0, paired_ref_rounds=2, step_timeout=60.0, overrides=TINY,
    )
    sess = BenchSession(s)
    for prov in ("plain", "reference-qr", "torch"):  # the suite's order (PROVIDERS)
        row = sess.run_case("mlp", B, prov, _one_round)
        assert row["status"] == "ok", row
    assert row["ref_qr_paired_rounds"] == 2 and row["ref_qr_paired"] > 0
    assert row["ratio_to_plain"] is not None


def test_ab_rev_orders_balance_positions_and_predecessors():
    # every side at every position, and after every side (itself too, across rounds), equally often
    from collections import Counter

    from benchmarks.ab_rev import ORDERS

    assert sorted(ORDERS) == sorted(itertools.permutations(range(3)))
    flat = [i for order in ORDERS for i in order]
    pairs = Counter(zip(flat, flat[1:] + flat[:1]))
    assert len(pairs) == 9 and set(pairs.values()) == {2}, pairs
    for side in range(3):
        assert sorted(order.index(side) for order in ORDERS) == [0, 0, 1, 1, 2, 2]


def test_ab_rev_compares_the_working_tree_with_a_revision(capsys):
    # the A/B tool imports a revision's package under another name beside the current one
    import shutil
    import subprocess

    if shutil.which("git") is None or subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("benchmarks.ab_rev needs git and a git checkout of the project")
    from benchmarks import ab_rev

    ab_rev.main(["--rev", "HEAD", "--model", "mlp", "--B", "4", "--rounds", "2", "--order", "contract"])
    out = capsys.readouterr().out
    assert "current / HEAD" in out and "plain" in out, out
    assert "ogf_rev" in sys.modules and sys.modules["ogf_rev"].OrthoGrad is not None
    # a real-zoo model, with its own loss; and the host benchmark's paired mode
    ab_rev.main(["--rev", "HEAD", "--model", "lstm", "--B", "4", "--Bu", "2", "--rounds", "1", "--order", "contract"])
    assert "lstm B=4" in capsys.readouterr().out
    from benchmarks import host_overhead

    host_overhead.main(["--rev", "HEAD", "--depth", "2", "--steps", "2", "--state", "trained"])
    out = capsys.readouterr().out
    assert "[trained] this tree" in out and "paired median this tree / HEAD" in out, out


def test_oracle_loop_survives_the_one_sample_batch_norm_backward():
    # torch's CPU batch norm backward at N = 1, given an output gradient in channels-last stride
    # order (the norm's output transposed to tokens), returns a wrong weight gradient; the loop
    # evaluates each sample beside a copy of itself. Checked against the same norm written as
    # arithmetic (no batch norm kernel).
    from benchmarks.oracle import per_sample_grads

    class Net(nn.Module):
        def __init__(self, manual):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 3)
            self.manual = manual

        def forward(self, x):
            h = self.conv(x)
            if self.manual:
                bn = self.bn
                inv = (bn.running_var + bn.eps).rsqrt()
                h = ((h - bn.running_mean[:, None, None]) * inv[:, None, None]) * bn.weight[:, None, None] + bn.bias[:, None, None]
            else:
                h = self.bn(h)
            return self.head(h.flatten(2).transpose(1, 2).mean(1))

    torch.manual_seed(0)
    native = Net(False).eval().double()
    with torch.no_grad():
        native.bn.running_mean.normal_()
        native.bn.running_var.uniform_(0.5, 2.0)
        native.bn.weight.normal_()
    manual = copy.deepcopy(native)
    manual.manual = True
    manual.bn = copy.deepcopy(native.bn)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g)
    loss = lambda o, t: nn.functional.cross_entropy(o, t, reduction="none")  # noqa: E731
    Gn = per_sample_grads(native, loss, x, y, [native.bn.weight, native.conv.weight], 3)
    Gm = per_sample_grads(manual, loss, x, y, [manual.bn.weight, manual.conv.weight], 3)
    torch.testing.assert_close(Gn[id(native.bn.weight)], Gm[id(manual.bn.weight)], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Gn[id(native.conv.weight)], Gm[id(manual.conv.weight)], rtol=1e-10, atol=1e-12)


def test_timm_sweep_stub_serves_torchvision_names():
    # the sweep's stand-in for torchvision (timm's wheel requires it; its wheels pull a CUDA torch):
    # any submodule imports, names are inert, FrozenBatchNorm2d is an eval-mode batch norm. In a
    # child process: the finder stays installed in the process that called it
    import subprocess

    code = (
        "import torch\n"
        "from benchmarks.timm_sweep import stub_torchvision\n"
        "stub_torchvision()\n"
        "from torchvision.ops.misc import FrozenBatchNorm2d\n"
        "from torchvision.datasets import CIFAR10\n"
        "from torchvision.transforms import InterpolationMode\n"
        "assert InterpolationMode.NEAREST == 'NEAREST' and CIFAR10() is not None\n"
        "bn = FrozenBatchNorm2d(3)\n"
        "bn.running_mean.fill_(0.5); bn.running_var.fill_(4.0); bn.weight.fill_(2.0); bn.bias.fill_(1.0)\n"
        "x = torch.randn(2, 3, 4, 4)\n"
        "ref = torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)\n"
        "torch.testing.assert_close(bn(x), ref)\n"
        "print('stub ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert r.returncode == 0 and "stub ok" in r.stdout, r.stderr[-2000:]
