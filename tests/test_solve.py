"""The small solve c = K^+ b (orthograd_fast.engine.solve) against an independent float64 projector.

Oracle: the SVD of the row matrix G (K = G G^T), keeping sigma_k > rtol * sigma_max; c is the
minimum-norm solution restricted to those directions. Covers the Cholesky fast path (well
conditioned), the eigh route (rank deficient, near the cutoff) and batches mixing both.
"""

import numpy as np
import pytest
import torch

import orthograd_fast.engine.solve as solve
from orthograd_fast.engine.solve import solve_columns, solve_psd


def _oracle(G: np.ndarray, b: np.ndarray, rtol: float) -> np.ndarray:
    U, S, _ = np.linalg.svd(G, full_matrices=False)
    keep = S > rtol * S[0]
    # K^+ = U diag(1/S^2) U^T on the kept directions
    return U[:, keep] @ ((U[:, keep].T @ b) / (S[keep, None] ** 2 if b.ndim == 2 else S[keep] ** 2))


def _rows(rng, B, n, rank=None, cond=None):
    G = rng.standard_normal((B, n))
    if rank is not None:
        G = rng.standard_normal((B, rank)) @ rng.standard_normal((rank, n))
    if cond is not None:
        U, _, Vt = np.linalg.svd(G, full_matrices=False)
        G = U @ np.diag(np.logspace(0, -np.log10(cond), B)) @ Vt
    return G


@pytest.mark.parametrize("case", ["well", "dup", "low_rank", "near_cutoff"])
@pytest.mark.parametrize("B", [1, 7, 33])
def test_solve_matches_svd_oracle(case, B):
    rng = np.random.default_rng(B * 31 + len(case))
    rtol = 1e-6
    if case == "well":
        G = _rows(rng, B, 3 * B + 5)
    elif case == "dup":
        G = _rows(rng, B, 3 * B + 5)
        G[-1] = G[0]  # a duplicated sample: rank B-1
    elif case == "low_rank":
        G = _rows(rng, B, 3 * B + 5, rank=max(1, B // 3))
    else:  # singular values from 1 down to 1e-7, the cutoff 1e-6 falls inside
        G = _rows(rng, B, 3 * B + 5, cond=1e7)
    b = G @ rng.standard_normal(G.shape[1])
    c = solve_psd(torch.from_numpy(G @ G.T), torch.from_numpy(b), rtol).numpy()
    ref = _oracle(G, b, rtol)
    # compare the projected components G^T c (what the engine subtracts), relative to |G^T ref|
    err = np.linalg.norm(G.T @ (c - ref)) / (np.linalg.norm(G.T @ ref) + 1e-300)
    # Near the cutoff the Gram squares the spectrum: eigenvalues ~1e-12 lambda_max carry float64
    # rounding of ~1e-16 / 1e-12 = 1e-4 relative (the oracle works on G itself, not on K).
    tol = 1e-4 if case == "near_cutoff" else 1e-6
    assert err <= tol, f"{case} B={B}: {err:.2e}"


@pytest.mark.parametrize("chunk", [None, 2, 3])
def test_batched_mixed_conditioning_and_per_matrix_rtol(chunk, monkeypatch):
    # chunk: matrices per solve_psd chunk (4 = 2 + 2, 3 + 1): per-matrix tolerances must follow them
    if chunk is not None:
        monkeypatch.setattr(solve, "SOLVE_CHUNK_BYTES", chunk * 9 * 9 * 8)
    rng = np.random.default_rng(5)
    B = 9
    Gs = [_rows(rng, B, 40), _rows(rng, B, 40, rank=4), _rows(rng, B, 40, cond=1e5), _rows(rng, B, 40)]
    Gs[3][2] = Gs[3][5]
    rtols = [1e-6, 1e-6, 1e-3, 1e-8]  # the third matrix: the cutoff removes its weakest directions
    K = torch.from_numpy(np.stack([G @ G.T for G in Gs]))
    bs = [G @ rng.standard_normal(40) for G in Gs]
    c = solve_psd(K, torch.from_numpy(np.stack(bs)), torch.tensor(rtols, dtype=torch.float64).unsqueeze(-1)).numpy()
    for k, (G, b, rt) in enumerate(zip(Gs, bs, rtols)):
        ref = _oracle(G, b, rt)
        err = np.linalg.norm(G.T @ (c[k] - ref)) / np.linalg.norm(G.T @ ref)
        assert err <= 1e-6, f"matrix {k}: {err:.2e}"


@pytest.mark.parametrize("chunk", [None, 3])
def test_eigh_only_matches_the_oracle_and_refused_reports_cholesky(chunk, monkeypatch):
    # eigh_only skips the Cholesky attempt (groups known to be singular): the same solutions;
    # ``refused`` says per chunk whether Cholesky refused every matrix
    if chunk is not None:
        monkeypatch.setattr(solve, "SOLVE_CHUNK_BYTES", chunk * 7 * 7 * 8)
    rng = np.random.default_rng(13)
    B = 7
    Gs = [_rows(rng, B, 30, rank=3), _rows(rng, B, 30), _rows(rng, B, 30, cond=1e4), _rows(rng, B, 30, rank=5)]
    rtols = [1e-6, 1e-8, 1e-3, 1e-6]
    K = torch.from_numpy(np.stack([G @ G.T for G in Gs]))
    b = torch.from_numpy(np.stack([G @ rng.standard_normal(30) for G in Gs]))
    rt = torch.tensor(rtols, dtype=torch.float64).unsqueeze(-1)
    refused: list = []
    c_mixed = solve_psd(K, b, rt, refused=refused).numpy()
    c_eigh = solve_psd(K, b, rt, eigh_only=True).numpy()
    for k, (G, rtk) in enumerate(zip(Gs, rtols)):
        ref = _oracle(G, b[k].numpy(), rtk)
        for name, c in (("mixed", c_mixed), ("eigh_only", c_eigh)):
            err = np.linalg.norm(G.T @ (c[k] - ref)) / np.linalg.norm(G.T @ ref)
            assert err <= 1e-6, f"{name} matrix {k}: {err:.2e}"
    # a chunk with a full-rank member passes Cholesky for it; the last chunk of 3 + 1 is rank 5 of 7
    assert refused == ([False] if chunk is None else [False, True])
    refused = []
    solve_psd(K[[0, 3]], b[[0, 3]], rt[[0, 3]], refused=refused)  # rank 3 and 5 of 7: both refused
    assert refused == [True]
    # under eigh_only, ``refused`` says whether no matrix kept every eigenvalue (the flag that
    # sends a group back to Cholesky once it is full rank; matrix 2: sigma ratios to 1e-4, rtol 1e-3)
    for ks, want in (([0, 3], [True]), ([0, 1, 3], [False]), ([1], [False]), ([2], [True])):
        refused = []
        solve_psd(K[ks], b[ks], rt[ks], eigh_only=True, refused=refused)
        assert refused == want, (ks, refused)


def test_cholesky_certificate_is_sound_and_takes_well_conditioned_matrices():
    # the fast path's bound: ok only where every eigenvalue passes the cutoff (else the Cholesky
    # solve would differ from the eigh route), and ok for spectra well inside it; per-matrix rtol
    rng = np.random.default_rng(17)
    n, m = 6, 60
    lo = 10.0 ** rng.uniform(-14, 0, m)  # the smallest eigenvalue / the largest
    Ks = []
    for r in lo:
        Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        Ks.append(Q @ np.diag(np.r_[1.0, r, 10 ** rng.uniform(np.log10(r), 0, n - 2)]) @ Q.T)
    K = torch.from_numpy(np.stack(Ks))
    rt = torch.from_numpy(10.0 ** rng.uniform(-7, -2, m))
    _, ok = solve._well_conditioned_solve(K, torch.ones(m, n, 1, dtype=torch.float64), rt.square())
    ratio = torch.from_numpy(lo)
    assert not bool((ok & (ratio <= rt.square())).any())  # sound: nothing below the cutoff passes
    # the bound loses at most a factor n on lambda_min and one on lambda_max: n^2 in all
    clear = ratio > 2 * n * n * rt.square()
    assert bool(clear.any()) and bool(ok[clear].all()), (ok, ratio / rt.square())
    assert not bool(ok.all())


def test_matrix_right_hand_side():
    rng = np.random.default_rng(11)
    G = _rows(rng, 6, 20)
    bm = G @ rng.standard_normal((20, 3))
    c = solve_psd(torch.from_numpy(G @ G.T), torch.from_numpy(bm), 1e-6).numpy()
    ref = _oracle(G, bm, 1e-6)
    assert np.abs(c - ref).max() <= 1e-8 * np.abs(ref).max()


def _tall(rng, B, n, spectrum):
    U, _ = np.linalg.qr(rng.standard_normal((B, n)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return U @ np.diag(spectrum) @ V.T


def test_solve_columns_matches_svd_oracle():
    # tensors with fewer entries (n) than samples (B): c = K^+ G u from the n x n column Gram,
    # batched per n; full column rank (the projection removes all of u), a duplicated column,
    # low rank, and singular values straddling the cutoff
    rng = np.random.default_rng(17)
    B = 23
    Gs = [
        rng.standard_normal((B, 5)),
        rng.standard_normal((B, 9)),
        rng.standard_normal((B, 5)),
        rng.standard_normal((B, 3)) @ rng.standard_normal((3, 9)),  # rank 3
        _tall(rng, B, 5, np.logspace(0, -9, 5)),
        rng.standard_normal((B, 1)),
    ]
    Gs[2][:, 4] = Gs[2][:, 1]  # a duplicated column: rank 4
    rtols = [1e-6, 1e-6, 1e-6, 1e-6, 1e-6, 1e-3]  # >= COLUMN_MIN_RTOL, as the engine uses it
    us = [rng.standard_normal(G.shape[1]) for G in Gs]
    got = solve_columns([torch.from_numpy(G) for G in Gs], [torch.from_numpy(u).float() for u in us], rtols)
    for k, (G, u, rt, c) in enumerate(zip(Gs, us, rtols, got)):
        u32 = np.float32(u).astype(np.float64)  # the engine hands in the float32 tensor
        ref = _oracle(G, G @ u32, rt)
        err = np.linalg.norm(G.T @ (c.numpy() - ref)) / np.linalg.norm(G.T @ ref)
        tol = 1e-4 if k == 4 else 1e-9  # near the cutoff the Gram squares the spectrum (see above)
        assert c.shape == (B,) and err <= tol, f"tensor {k}: {err:.2e}"
    # full column rank: G^T c is u itself (nothing of u is left outside the span)
    for k in (0, 1, 5):
        u32 = np.float32(us[k]).astype(np.float64)
        assert np.linalg.norm(Gs[k].T @ got[k].numpy() - u32) <= 1e-9 * np.linalg.norm(u32)
