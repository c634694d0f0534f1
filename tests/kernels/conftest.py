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


@pytest.fixture(scope="session")
def kdev() -> str:
    """'cuda' (compiled kernels) or 'cpu' (interpreter); skips with the reason otherwise."""
    from orthograd_fast import triton_ops

    if not triton_ops.triton_available():
        pytest.skip("triton is not installed (pip install 'orthograd-fast[triton]')")
    interp = triton_ops.kernels_interpreted()
    if interp:
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
    from orthograd_fast import triton_ops

    if not triton_ops.triton_available():
        pytest.skip("triton is not installed")
    if triton_ops.kernels_interpreted():
        pytest.skip("TRITON_INTERPRET=1 is set: GPU tests check the compiled kernels")
    return "cuda"
