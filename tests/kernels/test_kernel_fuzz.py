"""Random shapes and block sizes for the Gram and coefficient kernels, against the float64 loop.

The parametrized tests beside this one pin chosen ragged shapes; here hypothesis draws B, T, I, O
and the launchers' block sizes (powers of two on CPU in the interpreter; 16 and 32 on CUDA), so that
sample blocks, tiles and token chunks end at every possible offset. Default run: 6 examples per
kernel, derandomized (the interpreter pays per program and per loop trip); ``-m slow``: 60 more.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_oracles import coef_oracle, coef_tol, gram_oracle
from tolerance import assert_close

_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
CI = settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=_HEALTH)
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=_HEALTH)


def _blocks(draw, kdev, n):
    return [draw(st.sampled_from([2, 4, 8] if kdev == "cpu" else [16, 32])) for _ in range(n)]


@st.composite
def problems(draw, kdev):
    cpu = kdev == "cpu"
    B = draw(st.integers(1, 7 if cpu else 70))
    T = draw(st.integers(1, 4 if cpu else 40))
    I = draw(st.integers(1, 24 if cpu else 300))
    O = draw(st.integers(1, 24 if cpu else 300))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, T, I, O, dtype, seed


def _factors(B, T, I, O, dtype, seed, dev):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, T, I, generator=g).to(dtype)
    D = torch.randn(B, T, O, generator=g).to(dtype)
    U = torch.randn(O, I, generator=g)
    return A.to(dev), D.to(dev), U.to(dev)


def _tile_case(kdev, data):
    from orthograd_fast.kernels.tile_gram import tile_gram as launch

    B, T, I, O, dtype, seed = data.draw(problems(kdev))
    sb, bo, bi, bt = _blocks(data.draw, kdev, 4)
    det, with_u = data.draw(st.booleans()), data.draw(st.booleans())
    A, D, U = _factors(B, T, I, O, dtype, seed, kdev)
    K, b = launch(A, D, U if with_u else None, deterministic=det, num_programs=data.draw(st.integers(1, 6)),
                  block_b=sb, block_o=bo, block_i=bi, block_t=bt)
    Ko, bo_ = gram_oracle(A, D, U)
    assert_close(K, Ko, dtype=torch.float32, reduction_len=T * T * I * O)
    assert torch.equal(K, K.T)
    if with_u:
        assert_close(b, bo_, dtype=torch.float32, reduction_len=T * I * O)
    else:
        assert b is None


def _ghost_case(kdev, data):
    from orthograd_fast.kernels.ghost_gram import ghost_gram as launch

    B, T, I, O, dtype, seed = data.draw(problems(kdev))
    sb, bm, bn, bk = _blocks(data.draw, kdev, 4)
    A, D, _ = _factors(B, T, I, O, dtype, seed, kdev)
    K = launch(A, D, block_b=sb, block_m=bm, block_n=bn, block_k=bk, num_splits=data.draw(st.integers(1, 4)))
    assert_close(K, gram_oracle(A, D)[0], dtype=torch.float32, reduction_len=T * T * (I + O))
    assert torch.equal(K, K.T)


def _coef_case(kdev, data):
    from orthograd_fast.kernels.coef import coef as launch

    B, T, I, O, dtype, seed = data.draw(problems(kdev))
    bm, bo, bk = _blocks(data.draw, kdev, 3)
    A, D, U = _factors(B, T, I, O, dtype, seed, kdev)
    if dtype != torch.float32 and data.draw(st.booleans()):
        U = U.to(dtype)  # same-dtype operands: the dot runs in the factors' dtype
    b = launch(A, D, U, block_m=bm, block_o=bo, block_k=bk)
    assert_close(b, coef_oracle(A, D, U), dtype=coef_tol(dtype, U.dtype), reduction_len=T * I * O)


CASES = {"tile_gram": _tile_case, "ghost_gram": _ghost_case, "coef": _coef_case}


@pytest.mark.parametrize("kernel", list(CASES))
@CI
@given(data=st.data())
def test_kernel_random_shapes(kdev, kernel, data):
    CASES[kernel](kdev, data)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", list(CASES))
@SLOW
@given(data=st.data())
def test_kernel_random_shapes_slow(kdev, kernel, data):
    CASES[kernel](kdev, data)
