"""Fused coefficient kernel b_i = sum_t d_it^T U a_it vs the torch reference and a float64 loop."""

import pytest
import torch
from kernel_oracles import DTYPES, SHAPES, coef_oracle, coef_tol, rand_factors, shape_id, tiny_blocks
from tolerance import assert_close

from orthograd_fast.engine import triton_ops
from orthograd_fast.engine.ops_reference import coef_ref

ACC = torch.float32  # see test_tile_gram.py


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_reference_matches_float64_loop(shape, dtype):
    B, T, I, O = shape
    A, D, U = rand_factors(3, B, T, I, O, dtype)
    tol = torch.float64 if dtype == torch.float64 else ACC
    assert_close(coef_ref(A, D, U), coef_oracle(A, D, U), dtype=tol, reduction_len=T * I * O)


# U dtype: same as A (the dot runs in A's dtype), fp32 with bf16 A (hi/lo split), other mixes (fp32)
U_CASES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
           (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
           (torch.float16, torch.float16), (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("dtype,u_dtype", U_CASES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_default_blocks(kdev, shape, dtype, u_dtype):
    B, T, I, O = shape
    A, D, U = rand_factors(200 + SHAPES.index(shape) * 10 + U_CASES.index((dtype, u_dtype)),
                           B, T, I, O, dtype, kdev, u_dtype=u_dtype)
    b = triton_ops.coef(A, D, U)
    assert b.dtype == torch.float32 and b.shape == (B,)
    tol = coef_tol(dtype, u_dtype)
    assert_close(b, coef_oracle(A, D, U), dtype=tol, reduction_len=T * I * O)
    assert_close(b, coef_ref(A, D, U), dtype=tol, reduction_len=T * I * O)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_blocks(kdev, dtype):
    from orthograd_fast.kernels.coef import coef as launch

    B, T, I, O = (5, 7, 33, 17) if kdev == "cpu" else (33, 45, 100, 70)
    A, D, U = rand_factors(41, B, T, I, O, dtype, kdev)
    b = launch(A, D, U, **tiny_blocks(kdev, "coef"))
    assert_close(b, coef_oracle(A, D, U), dtype=coef_tol(dtype, U.dtype), reduction_len=T * I * O)


def test_split_u_error_bound(kdev):
    """SPLIT_U: |U - hi - lo| <= 2^-17 |U| elementwise, so |b - b_exact| <= 2^-17 sum|d||U||a|
    plus fp32 accumulation; and it must beat simply rounding U to bf16 by far."""
    from orthograd_fast.kernels.coef import coef as launch

    A, D, U = rand_factors(43, 4, 8, 64, 48, torch.bfloat16, kdev)
    exact = coef_oracle(A, D, U)
    l1 = coef_oracle(A.abs(), D.abs(), U.abs())
    err_split = (launch(A, D, U).cpu().double() - exact).abs()
    assert (err_split <= (2.0 ** -17 + 64 * 2.0 ** -24) * l1).all(), (err_split / l1).max()
    err_round = (launch(A, D, U.to(torch.bfloat16)).cpu().double() - exact).abs()
    assert err_split.max() * 20 < err_round.max(), (err_split.max(), err_round.max())


def test_strided_inputs(kdev):
    g = torch.Generator().manual_seed(5)
    A = torch.randn(9, 4, 3, generator=g).to(kdev).permute(2, 1, 0)  # [B=3, T=4, I=9]
    D = torch.randn(3, 8, 4, generator=g).to(kdev).transpose(1, 2)   # [B=3, T=4, O=8]
    U = torch.randn(9, 8, generator=g).to(kdev).T                    # [O=8, I=9]
    b = triton_ops.coef(A, D, U)
    assert_close(b, coef_oracle(A, D, U), dtype=ACC, reduction_len=4 * 9 * 8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,u_dtype", U_CASES, ids=lambda d: str(d).replace("torch.", ""))
def test_gpu_large(gpu, dtype, u_dtype):
    B, T, I, O = 32, 256, 768, 3072
    A, D, U = rand_factors(23, B, T, I, O, dtype, gpu, u_dtype=u_dtype)
    b = triton_ops.coef(A, D, U)
    assert_close(b, coef_ref(A.double(), D.double(), U.double()), dtype=coef_tol(dtype, u_dtype),
                 reduction_len=T * I * O)
