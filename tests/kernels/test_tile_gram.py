"""Fused tile Gram kernel vs the torch reference and a float64 per-sample loop."""

import pytest
import torch
from kernel_oracles import DTYPES, SHAPES, gram_oracle, rand_factors, shape_id, tiny_blocks
from tolerance import assert_close

from orthograd_fast.engine import triton_ops
from orthograd_fast.engine.ops_reference import tile_gram_ref


def _lens(T, I, O):
    # terms summed into one K entry (t, s, o, i) and into one b entry (t, o, i)
    return T * T * I * O, T * I * O


# Inputs are rounded to `dtype` first; kernel, reference and oracle then all see the same numbers
# and accumulate in fp32 (fp64 for the oracle), so fp32 tolerances apply to every input dtype.
ACC = torch.float32


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_reference_matches_float64_loop(shape, dtype):
    B, T, I, O = shape
    A, D, U = rand_factors(1, B, T, I, O, dtype)
    K, b = tile_gram_ref(A, D, U)
    Ko, bo = gram_oracle(A, D, U)
    kl, bl = _lens(T, I, O)
    tol = torch.float64 if dtype == torch.float64 else ACC
    assert_close(K, Ko, dtype=tol, reduction_len=kl)
    assert_close(b, bo, dtype=tol, reduction_len=bl)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_default_blocks(kdev, shape, dtype):
    B, T, I, O = shape
    A, D, U = rand_factors(SHAPES.index(shape) * 10 + DTYPES.index(dtype), B, T, I, O, dtype, kdev)
    K, b = triton_ops.tile_gram(A, D, U)
    assert K.dtype == torch.float32 and b.dtype == torch.float32
    assert K.shape == (B, B) and b.shape == (B,)
    Ko, bo = gram_oracle(A, D, U)
    Kr, br = tile_gram_ref(A, D, U)
    kl, bl = _lens(T, I, O)
    assert_close(K, Ko, dtype=ACC, reduction_len=kl)
    assert_close(b, bo, dtype=ACC, reduction_len=bl)
    assert_close(K, Kr, dtype=ACC, reduction_len=kl)
    assert_close(b, br, dtype=ACC, reduction_len=bl)


@pytest.mark.parametrize("dtype,deterministic", [(torch.float32, True), (torch.bfloat16, True),
                                                 (torch.float32, False)],
                         ids=["fp32-partials", "bf16-partials", "fp32-atomic"])
def test_small_blocks_many_tiles_and_sample_blocks(kdev, dtype, deterministic):
    """Several (O x I) tiles, ragged edges, T loop trips, 3 sample blocks (6 block pairs)."""
    from orthograd_fast.kernels.tile_gram import tile_gram as launch

    B, T, I, O = (5, 6, 20, 10) if kdev == "cpu" else (37, 21, 50, 40)
    A, D, U = rand_factors(7, B, T, I, O, dtype, kdev)
    K, b = launch(A, D, U, deterministic=deterministic, num_programs=3,
                  **tiny_blocks(kdev, "tile"))
    Ko, bo = gram_oracle(A, D, U)
    kl, bl = _lens(T, I, O)
    assert_close(K, Ko, dtype=ACC, reduction_len=kl)
    assert_close(b, bo, dtype=ACC, reduction_len=bl)


@pytest.mark.parametrize("deterministic,with_u", [(True, True), (False, True), (True, False)],
                         ids=["partials", "atomic", "partials-no-u"])
def test_block_rows_ragged_last_block(kdev, deterministic, with_u):
    """A program owns one sample block and loops over the later ones: 4 blocks, the last holding
    one sample; more programs asked for than there are tiles; every Gram block (p, q), q >= p,
    written and the strict upper ones mirrored by the launcher."""
    from orthograd_fast.kernels.tile_gram import tile_gram as launch

    B, T, I, O = (7, 3, 19, 11) if kdev == "cpu" else (49, 5, 37, 33)
    A, D, U = rand_factors(13, B, T, I, O, torch.float32, kdev)
    K, b = launch(A, D, U if with_u else None, deterministic=deterministic, num_programs=64,
                  **tiny_blocks(kdev, "tile"))
    Ko, bo = gram_oracle(A, D, U)
    kl, bl = _lens(T, I, O)
    assert_close(K, Ko, dtype=ACC, reduction_len=kl)
    if with_u:
        assert_close(b, bo, dtype=ACC, reduction_len=bl)
    else:
        assert b is None


def test_no_u_and_fp16_u(kdev):
    A, D, U = rand_factors(3, 4, 5, 20, 12, torch.float16, kdev, u_dtype=torch.float16)
    K, b = triton_ops.tile_gram(A, D)
    assert b is None
    Ko, bo = gram_oracle(A, D, U)
    assert_close(K, Ko, dtype=ACC, reduction_len=25 * 240)
    _, b = triton_ops.tile_gram(A, D, U)
    assert_close(b, bo, dtype=ACC, reduction_len=5 * 240)


def test_strided_inputs_and_mixed_dtypes(kdev):
    """Non-contiguous views are read through their strides; A bf16 with D fp32 is promoted."""
    g = torch.Generator().manual_seed(11)
    At = torch.randn(6, 19, 4, generator=g).to(kdev)  # [B, I, T] storage, viewed as [B, T, I]
    Dt = torch.randn(13, 6, 4, generator=g).to(kdev)  # [O, B, T] storage
    A = At.transpose(1, 2)
    D = Dt.permute(1, 2, 0)
    U = torch.randn(19, 13, generator=g).to(kdev).T  # [O, I] view of an [I, O] tensor
    assert not A.is_contiguous() and not D.is_contiguous() and not U.is_contiguous()
    K, b = triton_ops.tile_gram(A, D, U)
    Ko, bo = gram_oracle(A, D, U)
    assert_close(K, Ko, dtype=ACC, reduction_len=16 * 19 * 13)
    assert_close(b, bo, dtype=ACC, reduction_len=4 * 19 * 13)
    Ab = A.to(torch.bfloat16)
    K, _ = triton_ops.tile_gram(Ab, D)
    assert_close(K, gram_oracle(Ab, D)[0], dtype=ACC, reduction_len=16 * 19 * 13)


def test_two_d_factors_mean_t1(kdev):
    A, D, U = rand_factors(5, 6, 1, 9, 7, torch.float32, kdev)
    K2, b2 = triton_ops.tile_gram(A[:, 0], D[:, 0], U)
    K3, b3 = triton_ops.tile_gram(A, D, U)
    assert torch.equal(K2, K3) and torch.equal(b2, b3)


def test_deterministic_bitwise(kdev):
    A, D, U = rand_factors(9, 5, 7, 33, 17, torch.float32, kdev)
    K1, b1 = triton_ops.tile_gram(A, D, U)
    K2, b2 = triton_ops.tile_gram(A, D, U)
    assert torch.equal(K1, K2) and torch.equal(b1, b2)
    assert torch.equal(K1, K1.T)  # exactly symmetric (the launcher symmetrizes)


def test_empty_dims(kdev):
    A = torch.randn(3, 0, 5, device=kdev)
    D = torch.randn(3, 0, 4, device=kdev)
    K, b = triton_ops.tile_gram(A, D, torch.randn(4, 5, device=kdev))
    assert torch.equal(K, torch.zeros(3, 3, device=kdev)) and torch.equal(b, torch.zeros(3, device=kdev))


@pytest.mark.parametrize("fn", ["tile_gram", "ghost_gram", "coef"])
def test_validation_names_the_argument(fn):
    f = getattr(triton_ops, fn)
    A = torch.randn(2, 3, 4)
    D = torch.randn(2, 3, 5)
    U = torch.randn(5, 4)
    with pytest.raises(ValueError, match="A must be"):
        f(torch.randn(2), D, U)
    with pytest.raises(ValueError, match="agree in B and T"):
        f(A, torch.randn(3, 3, 5), U)
    with pytest.raises(ValueError, match="D has dtype torch.float64"):
        f(A, D.double(), U)
    with pytest.raises(ValueError, match=r"U must have shape \[O, I\] = \[5, 4\]"):
        f(A, D, U.T)
    with pytest.raises(TypeError, match="D must be a torch.Tensor"):
        f(A, D.numpy(), U)
    if fn == "coef":
        with pytest.raises(ValueError, match="U is required"):
            f(A, D, None)


def test_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setattr(triton_ops, "kernels_interpreted", lambda: False)
    if not triton_ops.triton_available():
        pytest.skip("triton is not installed")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_ops.tile_gram(torch.randn(2, 3, 4), torch.randn(2, 3, 5))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 128, 768, 1024), (130, 33, 257, 129), (3, 1, 1000, 999)],
                         ids=shape_id)
def test_gpu_large(gpu, shape, dtype):
    B, T, I, O = shape
    A, D, U = rand_factors(21, B, T, I, O, dtype, gpu)
    for det in (True, False):
        K, b = triton_ops.tile_gram(A, D, U, deterministic=det)
        Kr, br = tile_gram_ref(A.double(), D.double(), U.double())
        kl, bl = _lens(T, I, O)
        assert_close(K, Kr, dtype=ACC, reduction_len=kl)
        assert_close(b, br, dtype=ACC, reduction_len=bl)


def test_nan_poisoning_is_active():
    """The suite's guard against unwritten outputs (tests/conftest.py) must be on here."""
    assert torch.empty(4).isnan().all() and torch.empty_like(torch.ones(2, 3)).isnan().all()


def test_package_imports_without_triton():
    """`import orthograd_fast` (and the torch paths) must work where triton is not installed."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, orthograd_fast\n"
        "from orthograd_fast import gram_schmidt\n"
        "from orthograd_fast.engine import ops_reference, triton_ops\n"
        "assert not triton_ops.triton_available()\n"
        "assert gram_schmidt.cgs2(torch.randn(20, 3)).shape == (20, 3)\n"
        "try:\n"
        "    triton_ops.coef(torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.randn(5, 4))\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not installed' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error without triton')\n"
        "assert 'triton' not in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
