"""The Triton kernels compile for sm_90 (H100/H200) at the launchers' default GPU configurations,
within the chip's shared memory and without spilling registers (benchmarks/gpu/compile_check.py).

The interpreter tests beside this one check the kernels' arithmetic; only a compile shows whether a
configuration fits the hardware (the former tile-Gram default needed 320 KiB of shared memory per
block, over Hopper's 227 KiB: it would have failed at its first launch on a GPU).

Each check runs in a subprocess: this session imports the kernels under TRITON_INTERPRET=1, and
Triton fixes interpreter vs compiler per kernel at import.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"_tile_gram_kernel", "_ghost_gram_kernel", "_coef_kernel", "_cgs_step_kernel"}


def _compiler_env():
    try:
        import triton.backends.nvidia as nv
    except Exception as e:  # noqa: BLE001 - any import failure means: nothing to compile with
        pytest.skip(f"triton's NVIDIA backend does not import here ({type(e).__name__}: {e})")
    bin_dir = Path(nv.__file__).parent / "bin"
    missing = [t for t in ("ptxas", "cuobjdump") if not (bin_dir / t).exists()]
    if missing:
        pytest.skip(f"this triton wheel ships no {', '.join(missing)} (looked in {bin_dir})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args, env, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_default_configurations_fit_sm90(tmp_path):
    env = _compiler_env()
    p = _run(["-m", "benchmarks.gpu.compile_check", "--quick", "--arch", "90", "--out", str(tmp_path)], env)
    assert p.returncode == 0, f"compile check failed (rc {p.returncode}):\n{p.stdout}\n{p.stderr[-3000:]}"
    results = json.loads((tmp_path / "compile_check.json").read_text())
    assert {r["kernel"] for r in results} == KERNELS
    for r in results:
        assert not r["error"] and not r["problems"], r
        assert 0 < r["shared"] <= 227 * 1024, r
        assert r["regs"] > 0, r  # the cubin was read back


NEGATIVE = r"""
import sys, torch
from benchmarks.gpu import compile_check as cc
from orthograd_fast.kernels import tile_gram as tg
A, D = torch.empty(64, 32, 768), torch.empty(64, 32, 768)
with cc.record_launches([tg._tile_gram_kernel]) as got:
    # the former default: SB 64 with 16 x 16 tiles, 3 stages
    tg.tile_gram(A, D, torch.empty(768, 768), block_b=64, block_o=16, block_i=16, block_t=16,
                 num_warps=8, num_stages=3)
r = cc.compile_launch("former default", got[0], 90)
print("PROBLEMS", r.problems, r.shared, r.stack)
sys.exit(0 if any("shared" in x for x in r.problems) else 1)
"""


def test_check_flags_a_configuration_over_the_shared_memory_limit():
    # the check itself can fail: the configuration that the defaults replaced must be flagged
    env = _compiler_env()
    p = _run(["-c", NEGATIVE], env)
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr[-3000:]}"
