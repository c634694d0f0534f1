"""Kernel tests: run the Triton kernels compiled on CUDA, or in the Triton interpreter on CPU.

TRITON_INTERPRET must be set before the kernel modules are imported (Triton decides per kernel at
decoration time). tests/conftest.py already sets it on CPU-only machines before any test module
is imported; it is repeated here for runs that start in this folder. Whether it took effect is
checked on the kernels themselves (the `kdev` fixture), and the tests skip with the reason if not.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # for `import kernel_oracles` under any pytest import mode
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402


def _interpreter_broken():
    """None if the Triton interpreter runs a loop whose bound is computed in the kernel (every
    kernel here has one), else the error. Known failure: triton 3.6 with numpy 2.4 (2.2 works)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(X, N):
        hi = tl.minimum(tl.program_id(0).to(tl.int64) * 2 + N, 4)
        acc = tl.zeros((1,), dtype=tl.float32)
        for i in range(0, hi):
            acc += tl.load(X + i + tl.arange(0, 1))
        tl.store(X + tl.arange(0, 1), acc)

    x = torch.ones(4)
    try:
        _probe[(1,)](x, 4)
    except Exception as e:  # noqa: BLE001 - reported as the skip reason
        return f"{type(e).__name__}: {str(e)[:120]}"
    if x[0].item() != 4.0:
        return f"the probe kernel computed {x[0].item()} instead of 4"
    return None


@pytest.fixture(scope="session")
def kdev() -> str:
    """'cuda' (compiled kernels) or 'cpu' (interpreter); skips with the reason otherwise."""
    from orthograd_fast.engine import triton_ops

    if not triton_ops.triton_available():
        pytest.skip("triton is not installed (pip install 'orthograd-fast[triton]')")
    interp = triton_ops.kernels_interpreted()
    if interp:
        broken = _interpreter_broken()
        if broken:
            import numpy
            import triton

            pytest.skip(f"triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} "
                        f"({broken}: loop bounds computed in the kernel are 1-element arrays, and newer "
                        "numpy refuses int() of them: 2.2 works, 2.4 does not); install numpy<2.3 or a newer "
                        "triton (3.9 works)")
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("no CUDA and the Triton kernels were built in compiled mode: something imported "
                "orthograd_fast.kernels before TRITON_INTERPRET=1 was set (or it is set to 0); "
                "run `TRITON_INTERPRET=1 pytest tests/kernels`")


@pytest.fixture(scope="session")
def gpu() -> str:
    """For @pytest.mark.gpu tests: a CUDA device running compiled (not interpreted) kernels."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (GPU test)")
    from orthograd_fast.engine import triton_ops

    if not triton_ops.triton_available():
        pytest.skip("triton is not installed")
    if triton_ops.kernels_interpreted():
        pytest.skip("TRITON_INTERPRET=1 is set: GPU tests check the compiled kernels")
    return "cuda"
