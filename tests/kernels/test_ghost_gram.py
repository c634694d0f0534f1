"""Flash-style ghost Gram kernel vs the torch reference and a float64 per-sample loop."""

import pytest
import torch
from kernel_oracles import (DTYPES, SHAPES, coef_oracle, gram_oracle, rand_factors, shape_id,
                            tiny_blocks)
from tolerance import assert_close

from orthograd_fast.engine import triton_ops
from orthograd_fast.engine.ops_reference import ghost_gram_ref, tile_gram_ref

ACC = torch.float32  # see test_tile_gram.py: same rounded inputs everywhere, fp32 accumulation


def _lens(T, I, O):
    return T * T * I * O, T * I * O


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_reference_matches_float64_loop(shape, dtype):
    B, T, I, O = shape
    A, D, U = rand_factors(2, B, T, I, O, dtype)
    K, b = ghost_gram_ref(A, D, U)
    Ko, _ = gram_oracle(A, D)
    kl, bl = _lens(T, I, O)
    tol = torch.float64 if dtype == torch.float64 else ACC
    assert_close(K, Ko, dtype=tol, reduction_len=kl)
    assert_close(b, coef_oracle(A, D, U), dtype=tol, reduction_len=bl)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_default_blocks(kdev, shape, dtype):
    B, T, I, O = shape
    A, D, U = rand_factors(100 + SHAPES.index(shape) * 10 + DTYPES.index(dtype), B, T, I, O,
                           dtype, kdev)
    K, b = triton_ops.ghost_gram(A, D, U)
    assert K.dtype == torch.float32 and K.shape == (B, B) and b.shape == (B,)
    Ko, bo = gram_oracle(A, D, U)
    kl, bl = _lens(T, I, O)
    assert_close(K, Ko, dtype=ACC, reduction_len=kl)
    assert_close(K, ghost_gram_ref(A, D)[0], dtype=ACC, reduction_len=kl)
    # bf16 A with fp32 U: coef splits U into two bf16 numbers (16 bits kept): bf16 contract
    assert_close(b, bo, dtype=torch.bfloat16 if dtype == torch.bfloat16 else ACC, reduction_len=bl)


@pytest.mark.parametrize("shape", [(5, 7, 33, 17), (9, 1, 10, 6), (6, 3, 9, 20)], ids=shape_id)
def test_small_blocks_straddling_tiles(kdev, shape):
    """Token tiles that straddle samples (T not a multiple of the tile, T = 1), several sample
    blocks (block pairs p < q mirrored), split rows, several I / O chunks."""
    from orthograd_fast.kernels.ghost_gram import ghost_gram as launch

    B, T, I, O = shape if kdev == "cpu" else (shape[0] * 7, shape[1] * 5, shape[2] * 3, shape[3] * 3)
    A, D, _ = rand_factors(31, B, T, I, O, torch.float32, kdev)
    K = launch(A, D, num_splits=2, **tiny_blocks(kdev, "ghost"))
    Ko, _ = gram_oracle(A, D)
    assert_close(K, Ko, dtype=ACC, reduction_len=_lens(T, I, O)[0])
    assert torch.equal(K, K.T)


def test_ghost_equals_tile(kdev):
    A, D, U = rand_factors(8, 6, 5, 24, 12, torch.bfloat16, kdev)
    Kg, bg = triton_ops.ghost_gram(A, D, U)
    Kt, bt = triton_ops.tile_gram(A, D, U)
    assert_close(Kg, Kt, dtype=ACC, reduction_len=25 * 24 * 12)
    assert_close(bg, bt, dtype=torch.bfloat16, reduction_len=5 * 24 * 12)  # split U in coef


def test_no_u(kdev):
    A, D, _ = rand_factors(4, 3, 4, 8, 8, torch.float16, kdev)
    K, b = triton_ops.ghost_gram(A, D)
    assert b is None
    assert_close(K, tile_gram_ref(A, D)[0], dtype=ACC, reduction_len=16 * 64)


def test_deterministic_bitwise(kdev):
    A, D, _ = rand_factors(12, 7, 6, 20, 9, torch.float32, kdev)
    assert torch.equal(triton_ops.ghost_gram(A, D)[0], triton_ops.ghost_gram(A, D)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(32, 64, 768, 768), (70, 1, 513, 300), (17, 257, 64, 96)],
                         ids=shape_id)
def test_gpu_large(gpu, shape, dtype):
    B, T, I, O = shape
    A, D, U = rand_factors(22, B, T, I, O, dtype, gpu)
    K, b = triton_ops.ghost_gram(A, D, U)
    Kr, br = tile_gram_ref(A.double(), D.double(), U.double())
    kl, bl = _lens(T, I, O)
    assert_close(K, Kr, dtype=ACC, reduction_len=kl)
    assert_close(b, br, dtype=ACC, reduction_len=bl)
