"""The ``orthograd-fast`` command: an end-to-end demo run on a small budget, help, bad arguments."""

import json
import os
import subprocess
import sys

import pytest

from orthograd_fast.unlearning.cli import main

pytest.importorskip("sklearn", reason="scikit-learn is not installed (extra [demo])")
pytest.importorskip("matplotlib", reason="matplotlib is not installed (extra [demo])")


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "orthograd_fast", "demo", "--steps", "5", "--seeds", "1", "--epochs", "10",
           "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # the table: a header and one row per method, original and retrain included
    for name in ("method", "original", "retrain", "orthograd", "orthograd-adam-step", "orthograd-uniform",
                 "neggrad", "neggrad+", "finetune", "random_labels", "Avg. Gap", "UIS", "RTE"):
        assert name in proc.stdout, name
    res = json.loads((out / "results.json").read_text())
    assert len(res["runs"]) == 1 and res["config"]["steps"] == 5
    run = res["runs"][0]
    assert set(run["split"]) >= {"train_idx", "test_idx", "forget_idx", "retain_budget_idx"}
    for name, m in run["methods"].items():
        assert set(m["metrics"]) >= {"UA", "RA", "TA", "MIA", "UIS", "Avg. Gap", "RTE"}, name
        if name not in ("original", "retrain"):
            assert m["steps"] <= 5 and m["history"][0]["step"] == 0
    assert run["methods"]["retrain"]["metrics"]["Avg. Gap"] == 0.0
    for png in ("curves.png", "avg_gap.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    # the trained models were cached: a second run loads them instead of training
    assert len(os.listdir(out / "cache")) == 2
    from orthograd_fast.unlearning.demo import DemoConfig, run_demo

    cfg = DemoConfig(seeds=1, steps=2, epochs=10, methods=("orthograd",))
    res2 = run_demo(cfg, cache_dir=str(out / "cache"), progress=False, log=lambda s: None)
    orig2 = res2["runs"][0]["methods"]["original"]
    assert orig2["cached"] is True and orig2["seconds"] == 0.0
    for k in ("UA", "RA", "TA", "MIA"):
        assert orig2["metrics"][k] == run["methods"]["original"]["metrics"][k], k


def test_help_documents_everything(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--dataset", "--scenario", "--retain-frac", "--seeds", "--out", "--steps", "--cache-dir",
                "--methods", "--lr", "--alpha", "--stop-acc", "digits", "mnist5k", "mislabeled"):
        assert opt in text, opt


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--dataset", "cifar"], "--dataset"),
        (["demo", "--scenario", "nope"], "--scenario"),
        (["demo", "--steps", "0"], "--steps"),
        (["demo", "--seeds", "two"], "--seeds"),
        (["demo", "--retain-frac", "1.5"], "--retain-frac"),
        (["demo", "--alpha", "1"], "--alpha"),
        (["demo", "--lr", "-1"], "--lr"),
        (["demo", "--stop-acc", "120"], "--stop-acc"),
        (["demo", "--hidden", "0,4"], "--hidden"),
        (["demo", "--methods", "orthograd,magic"], "--methods"),
        (["demo", "--scenario", "class", "--forget-class", "12"], "--forget-class"),
        (["demo", "--bogus"], "--bogus"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_arguments_exit_nonzero_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "a command is required" in err and "demo" in err
