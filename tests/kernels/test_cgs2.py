"""Blocked CGS2 (torch and Triton backends) and its fused step kernel.

Oracles: the textbook column-by-column CGS2 in float64 (ops_reference.cgs2_ref) for the rank
decisions and the span, and an SVD projector in float64 for full-rank inputs.
"""

import pytest
import torch
from tolerance import assert_close

from orthograd_fast import gram_schmidt as gs
from orthograd_fast.engine import triton_ops
from orthograd_fast.engine.ops_reference import cgs2_ref, cgs_step_ref, project_out_ref


def _rand(seed, *shape, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """(backend, device): torch on CPU always; triton on the kernel device (skips if none)."""
    if request.param == "torch":
        return "torch", "cpu"
    return "triton", request.getfixturevalue("kdev")


def _orth_err(Q):
    Q = Q.double().cpu()
    return (Q.T @ Q - torch.eye(Q.shape[1], dtype=torch.float64)).abs().max().item()


def _svd_projector_out(G, u):
    """u - U U^T u with U the left singular vectors of a full-column-rank G, float64."""
    Uf, _, _ = torch.linalg.svd(G.double().cpu(), full_matrices=False)
    u = u.double().cpu()
    return u - Uf @ (Uf.T @ u)


# ----------------------------------------------------------------------------- step kernel
@pytest.mark.parametrize("work", [torch.float32, torch.float64])
@pytest.mark.parametrize("r,k,m", [(0, 5, 5), (7, 5, 3), (21, 6, 6)], ids=["r0", "r7", "r21"])
def test_step_kernel_matches_reference(kdev, work, r, k, m):
    """Y = X Tm - Q C, Q^T Y, Y^T Y over ragged row ranges; r = 21 with block_r = 8 uses the
    grid axis that splits Q's columns (and recomputes Y there)."""
    from orthograd_fast.kernels.cgs_step import cgs_step

    n = 70
    Q = _rand(1, n, r, dtype=work, device=kdev) if r else None
    X = _rand(2, n, k, dtype=work, device=kdev)
    Tm = _rand(3, k, m, dtype=work, device=kdev) if (k != m or r == 0) else None
    C = _rand(4, r, m, dtype=work, device=kdev) if r else None
    Y, sq, sy = cgs_step(Q, X, Tm, C, block_n=16, block_r=8 if kdev == "cpu" else 16,
                         num_programs=3)
    Yr, sqr, syr = cgs_step_ref(Q, X, Tm, C)
    dt = work
    assert_close(Y, Yr, dtype=dt, reduction_len=k + r)
    if r:
        assert_close(sq, sqr, dtype=dt, reduction_len=n * (k + r))
    assert_close(sy, syr, dtype=dt, reduction_len=n * (k + r) ** 2)


def test_step_kernel_writes_into_strided_out(kdev):
    from orthograd_fast.kernels.cgs_step import cgs_step

    X = _rand(5, 40, 4, device=kdev)
    Tm = _rand(6, 4, 3, device=kdev)
    buf = torch.full((40, 9), 7.0, device=kdev)
    cgs_step(None, X, Tm, None, store_y=True, want_sq=False, want_sy=False, out=buf[:, 2:5])
    assert_close(buf[:, 2:5], X.double() @ Tm.double(), dtype=torch.float32, reduction_len=4)
    assert (buf[:, :2] == 7).all() and (buf[:, 5:] == 7).all()  # neighbours untouched


# ----------------------------------------------------------------------------- oracles
def test_reference_cgs2_matches_svd():
    G = _rand(7, 60, 9, dtype=torch.float64)
    u = _rand(8, 60, dtype=torch.float64)
    Q = cgs2_ref(G, 1e-12)
    assert Q.shape == (60, 9) and _orth_err(Q) < 1e-13
    assert_close(project_out_ref(G, u, 1e-12), _svd_projector_out(G, u), dtype=torch.float64,
                 reduction_len=9 * 60)


# ----------------------------------------------------------------------------- cgs2
_SHAPES = {"97x11-b4": (97, 11, 4), "97x11-b32": (97, 11, 32), "wide40x50": (40, 50, 16),
           "single": (33, 1, 32)}
_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# torch backend: every dtype x shape; triton: one case per dtype (the interpreter is slow), and
# every shape is covered by some dtype
_CASES = [("torch", d, s) for d in _DT for s in _SHAPES] + [
    ("triton", "fp32", "97x11-b4"), ("triton", "fp64", "97x11-b32"),
    ("triton", "bf16", "wide40x50"), ("triton", "fp16", "single")]


@pytest.mark.parametrize("be,dt,shape", _CASES, ids=["-".join(c) for c in _CASES])
def test_cgs2_orthonormal_same_span(request, be, dt, shape):
    dev = request.getfixturevalue("kdev") if be == "triton" else "cpu"
    dtype = _DT[dt]
    n, m, block = _SHAPES[shape]
    G = _rand(10 + m, n, m, dtype=dtype, device=dev)
    Q = gs.cgs2(G, block=block, backend=be)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    assert Q.dtype == work and Q.shape[0] == n
    rtol = gs.cgs2_rtol(dtype)
    Qr = cgs2_ref(G, rtol)
    assert Q.shape[1] == Qr.shape[1] == min(n, m)
    tol = 1e-12 if work == torch.float64 else 1e-5  # fp32: O(m) eps
    assert _orth_err(Q) < tol
    # same span: the orthogonal projectors agree
    P = Q.double().cpu() @ Q.double().cpu().T
    assert (P - Qr @ Qr.T).abs().max().item() < 50 * tol


def _rank_test_matrix(dev):
    """Columns: 0-4 random; 5 = g1 + 2 g2 (dependent up to fp32 rounding); 6 = g0 - g3 + 1e-3
    noise (independent, poorly conditioned); 7 = 0; 8 = g4 - g0 + 1e-9 noise (dependent below
    any tolerance); 9 random. 3-column blocks put dependencies both inside and across blocks."""
    g = _rand(20, 80, 10, dtype=torch.float64)
    noise = _rand(21, 80, 2, dtype=torch.float64)
    g[:, 5] = g[:, 1] + 2 * g[:, 2]
    g[:, 6] = g[:, 0] - g[:, 3] + 1e-3 * noise[:, 0]
    g[:, 7] = 0
    g[:, 8] = g[:, 4] - g[:, 0] + 1e-9 * noise[:, 1]
    return g.float().to(dev)


@pytest.mark.parametrize("rtol,rank", [(None, 7), (0.1, 6)])
def test_rank_tolerance(backend, rtol, rank):
    be, dev = backend
    G = _rank_test_matrix(dev)
    Q = gs.cgs2(G, rtol=rtol, block=3, backend=be)
    eff = gs.cgs2_rtol(torch.float32) if rtol is None else rtol
    Qr = cgs2_ref(G, eff)
    assert Q.shape[1] == Qr.shape[1] == rank
    assert _orth_err(Q) < 1e-5
    assert (Q.double().cpu() @ Q.double().cpu().T - Qr @ Qr.T).abs().max().item() < 1e-3


def test_rtol_zero_keeps_rounding_noise():
    """rtol = 0: only the exact zero column drops; columns 5 and 8, dependent up to fp32
    rounding, keep their noise as (orthonormalized) directions, like an untolerant QR."""
    Q = gs.cgs2(_rank_test_matrix("cpu"), rtol=0.0, block=3, backend="torch")
    assert Q.shape[1] == 9
    assert _orth_err(Q) < 1e-4


def test_rank_tolerance_float64():
    g = _rank_test_matrix("cpu").double()
    g[:, 8] = g[:, 4] - g[:, 0] + 1e-14 * _rand(22, 80, dtype=torch.float64)
    Q = gs.cgs2(g, block=3, backend="torch")
    assert Q.shape[1] == cgs2_ref(g, gs.cgs2_rtol(torch.float64)).shape[1] == 8
    assert _orth_err(Q) < 1e-13


# ----------------------------------------------------------------------------- project_out
@pytest.mark.parametrize("ushape", [(), (3,)], ids=["vector", "matrix"])
def test_project_out_full_rank(backend, ushape):
    be, dev = backend
    G = _rand(30, 90, 12, device=dev)
    u = _rand(31, 90, *ushape, device=dev)
    up = gs.project_out(G, u, block=5, backend=be)
    assert up.shape == u.shape and up.dtype == u.dtype
    exact = _svd_projector_out(G, u)
    scale = u.double().norm().item()
    assert_close(up, exact, dtype=torch.float32, reduction_len=12, scale=scale / 10)
    # orthogonal to every column of G, relative to |g_i| |u|
    resid = (G.double().cpu().T @ up.double().cpu()).abs() / (G.double().cpu().norm(dim=0)[:, None]
                                                               * scale)
    assert resid.max().item() < 1e-6


def test_project_out_in_span_and_rank_deficient(backend):
    be, dev = backend
    G = _rank_test_matrix(dev)
    coeffs = _rand(40, 10, dtype=torch.float32, device=dev)
    u_in = G @ coeffs
    up = gs.project_out(G, u_in, backend=be, block=3)
    assert up.norm().item() < 1e-5 * u_in.norm().item()
    u = _rand(41, 80, device=dev)
    up = gs.project_out(G, u, backend=be, block=3)
    ref = project_out_ref(G, u, gs.cgs2_rtol(torch.float32))
    # column 6 is independent only by a 1e-3 relative part, so its basis direction is known to
    # ~eps32 / 1e-3 = 6e-5 from fp32 data: absolute errors up to ~1e-4 are the data's, not ours
    assert_close(up, ref, dtype=torch.float32, reduction_len=10, scale=10.0)


def test_project_out_bf16_u_and_g(backend):
    be, dev = backend
    G = _rand(50, 64, 6, dtype=torch.bfloat16, device=dev)
    u = _rand(51, 64, dtype=torch.bfloat16, device=dev)
    up = gs.project_out(G, u, backend=be)
    assert up.dtype == torch.bfloat16
    assert_close(up, _svd_projector_out(G, u), dtype=torch.bfloat16, reduction_len=6)


def test_triton_backend_defaults(kdev):
    """Default block and rtol on the Triton step kernel (the entry points the GPU bench uses)."""
    G = _rand(60, 50, 7, device=kdev)
    u = _rand(61, 50, device=kdev)
    Q = gs.cgs2(G, backend="triton")
    assert Q.shape == (50, 7) and _orth_err(Q) < 2e-6
    assert_close(gs.project_out(G, u, backend="triton"), _svd_projector_out(G, u),
                 dtype=torch.float32, reduction_len=7)


def test_cgs2_rtol_shares_the_input_rounding_with_solve():
    """float64: CGS2's own floor (explicit residuals, no squared condition number); reduced
    precision: at least the engine's tolerance for that dtype (the data's own rounding)."""
    from orthograd_fast.engine.solve import default_rtol

    assert gs.cgs2_rtol(torch.float64) == 1e-12 < default_rtol(torch.float64)
    assert gs.cgs2_rtol(torch.float32) == 1e-5
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert gs.cgs2_rtol(dt) >= default_rtol(dt)
    assert gs.cgs2_rtol(torch.bfloat16) == gs.cgs2_rtol(torch.float16) == 1e-3


def test_resolve_backend():
    assert triton_ops.resolve_backend("torch", True, "f") == "torch"
    assert triton_ops.resolve_backend("auto", False, "f") == "torch"
    assert triton_ops.resolve_backend("auto", True, "f") == (
        "triton" if triton_ops.triton_available() else "torch")
    with pytest.raises(ValueError, match=r"f: backend must be one of \('auto', 'torch', 'triton'\)"):
        triton_ops.resolve_backend("cuda", False, "f")


def test_zero_matrix_and_empty():
    assert gs.cgs2(torch.zeros(10, 3), backend="torch").shape == (10, 0)
    u = _rand(70, 10)
    assert torch.equal(gs.project_out(torch.zeros(10, 3), u, backend="torch"), u)
    assert gs.cgs2(torch.randn(10, 0), backend="torch").shape == (10, 0)


def test_validation_names_the_argument():
    G = torch.randn(10, 3)
    with pytest.raises(ValueError, match="G must be 2-D"):
        gs.cgs2(torch.randn(10))
    with pytest.raises(ValueError, match="G must be a floating"):
        gs.cgs2(torch.ones(10, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="G must be a torch.Tensor"):
        gs.cgs2([[1.0]])
    with pytest.raises(ValueError, match="block must be"):
        gs.cgs2(G, block=65)
    with pytest.raises(ValueError, match="backend must be"):
        gs.cgs2(G, backend="cuda")
    with pytest.raises(ValueError, match="rtol must be"):
        gs.cgs2(G, rtol=-1.0)
    with pytest.raises(ValueError, match=r"u must have shape \[n\]"):
        gs.project_out(G, torch.randn(9))
    bad = G.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        gs.cgs2(bad, backend="torch")


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gpu_large(gpu, dtype):
    n, m = 1_000_003, 64
    # small integers, exact in every dtype: column 40 is dependent exactly, not up to the dtype's
    # rounding (a bf16 difference of random columns keeps ~2e-3 of its norm, above any tolerance)
    g = torch.Generator().manual_seed(80)
    G = torch.randint(-8, 9, (n, m), generator=g).to(dtype=dtype, device=gpu)
    G[:, 40] = G[:, 3] - G[:, 7]  # one dependent column
    u = _rand(81, n, device=gpu)
    for be in ("triton", "torch"):
        Q = gs.cgs2(G, backend=be)
        assert Q.shape[1] == m - 1
        assert _orth_err(Q) < (1e-12 if dtype == torch.float64 else 1e-5)
        up = gs.project_out(G, u, backend=be)
        resid = (G.double().T @ up.double()).abs() / (G.double().norm(dim=0) * u.double().norm())
        assert resid.max().item() < (1e-12 if dtype == torch.float64 else 1e-5)


def test_step_fallback_gram_in_torch(kdev, monkeypatch):
    """If a GPU Triton build cannot compile the float64 tl.dot, cgs_step stores Y and takes
    Y^T Y in torch; same contract (exercised here by forcing the switch)."""
    from orthograd_fast.kernels import cgs_step as mod

    monkeypatch.setitem(mod._FP64_DOT_OK, torch.device(kdev).type, False)
    Q = _rand(90, 50, 6, device=kdev)
    X = _rand(91, 50, 4, device=kdev)
    C = _rand(92, 6, 4, device=kdev)
    y, sq, sy = mod.cgs_step(Q, X, None, C, store_y=False)
    assert y is None
    Yr, sqr, syr = cgs_step_ref(Q, X, None, C)
    assert_close(sq, sqr, dtype=torch.float32, reduction_len=50 * 10)
    assert_close(sy, syr, dtype=torch.float32, reduction_len=50 * 100)


def test_triton_backend_on_cpu_without_interpreter_says_how(monkeypatch):
    if not triton_ops.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setattr(triton_ops, "kernels_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        gs.cgs2(torch.randn(10, 3), backend="triton")


# ----------------------------------------------------------------------------- benchmark
def test_cgs2_vs_gram_benchmark_smoke(tmp_path):
    """benchmarks/cgs2_vs_gram.py at a tiny size: both routes give the exact projection, and the
    markdown has one row per cell and the verdict."""
    from benchmarks import cgs2_vs_gram as bench

    for dt in (torch.float32, torch.float64):
        for data in ("random", "duplicated"):
            row = bench.run_cell(6, 40, dt, data, "cpu", ["torch"], reps=1)
            assert row["rank_cgs2[torch]"] == (6 if data == "random" else 3)
            tol = 1e-12 if dt == torch.float64 else 1e-5
            assert row["orth_gram"] < tol and row["orth_cgs2[torch]"] < tol
            assert row["diff_cgs2[torch]"] < 10 * tol
    out = tmp_path / "t.md"
    md = bench.main(["--B", "4", "--n", "30", "--dtypes", "float64", "--data", "random",
                     "--reps", "1", "--no-accuracy", "--out", str(out)])
    assert out.read_text() == md and md.count("| float64 | 4 | 30 |") == 1
    assert "CGS2 faster in" in md
