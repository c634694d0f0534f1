"""Flash-style ghost Gram: K[i, j] = sum_{t,s} (A_i A_j^T)[t, s] * (D_i D_j^T)[t, s].

Tokens of all samples are flattened (row r = b * T + t). A program owns a sample-block pair
(p, q), p <= q, and a strided share of the row tiles of block p; for each row tile x column tile
(of block q) it builds the two token Grams S_A = A_r A_c^T and S_D = D_r D_c^T on chip (looping
over I and O in BK chunks), multiplies them elementwise and folds the product into the SB x SB
sample block with two one-hot matmuls (onehot_r^T (S_A * S_D) onehot_c), which also handles tiles
that straddle samples (T not a multiple of the tile, or T = 1). Nothing of size T^2 touches memory.

Deterministic: program (pair, split) writes its block to Kp[split]; the launcher sums the splits.
Block pairs with p < q are mirrored on store, so only i <= j work is done (up to block granularity).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_dtype, is_interpreted, num_sms, pair_table, pow2


@triton.jit
def _token_gram(X, rb, rt, rmask, cb, ct, cmask, K, s_xb, s_xt, s_xk,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
    """fp32 [BM, BN]: X_rows X_cols^T over the feature axis of X (size K), tokens given as (b, t)."""
    kk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + kk
        kmask = k < K
        xr = tl.load(X + rb[:, None] * s_xb + rt[:, None] * s_xt + k[None, :] * s_xk,
                     mask=rmask[:, None] & kmask[None, :], other=0.0).to(DOT_DTYPE)
        # columns loaded transposed ([BK, BN]) so the dot needs no tl.trans
        xc = tl.load(X + cb[None, :] * s_xb + ct[None, :] * s_xt + k[:, None] * s_xk,
                     mask=kmask[:, None] & cmask[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(xr, xc, acc, input_precision=PREC)
    return acc


@triton.jit
def _ghost_gram_kernel(A, D, PAIRS, KP,
                       B, T, I, O,
                       s_ab, s_at, s_ai, s_db, s_dt, s_do,
                       SB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
    """Partial ghost Gram blocks.

    A     [B, T, I]     fp32 | bf16 | fp16 (any strides)   layer inputs
    D     [B, T, O]     same dtype as A (any strides)       output gradients
    PAIRS [P, 2]        int32                               sample-block pairs (p, q), p <= q
    KP    [S, B, B]     fp32 (contiguous)  out: Kp[s] = this split's share of K (all entries set)
    Grid (P, S): axis 0 picks the pair, axis 1 the split of block p's row tiles.
    """
    pair = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    p = tl.load(PAIRS + 2 * pair)
    q = tl.load(PAIRS + 2 * pair + 1)
    row_lo = p * SB * T
    row_hi = tl.minimum((p + 1) * SB, B) * T
    col_lo = q * SB * T
    col_hi = tl.minimum((q + 1) * SB, B) * T
    lane = tl.arange(0, SB)
    acc = tl.zeros((SB, SB), dtype=tl.float32)
    for r0 in range(row_lo + split * BM, row_hi, n_split * BM):
        rows = r0 + tl.arange(0, BM)
        rmask = rows < row_hi
        rb = (rows // T).to(tl.int64)
        rt = rows % T
        oh_r = tl.where(rmask[:, None] & ((rb - p * SB)[:, None] == lane[None, :]), 1.0, 0.0)
        for c0 in range(col_lo, col_hi, BN):
            cols = c0 + tl.arange(0, BN)
            cmask = cols < col_hi
            cb = (cols // T).to(tl.int64)
            ct = cols % T
            s_a = _token_gram(A, rb, rt, rmask, cb, ct, cmask, I, s_ab, s_at, s_ai,
                              BM, BN, BK, DOT_DTYPE, PREC)
            s_d = _token_gram(D, rb, rt, rmask, cb, ct, cmask, O, s_db, s_dt, s_do,
                              BM, BN, BK, DOT_DTYPE, PREC)
            oh_c = tl.where(cmask[:, None] & ((cb - q * SB)[:, None] == lane[None, :]), 1.0, 0.0)
            # segment sums by sample: onehot_r^T P onehot_c, fp32 throughout (0/1 weights: exact)
            part = tl.dot(tl.trans(oh_r), s_a * s_d, input_precision="ieee")
            acc = tl.dot(part, oh_c, acc, input_precision="ieee")
    rws = p * SB + lane
    cls = q * SB + lane
    msk = (rws < B)[:, None] & (cls < B)[None, :]
    base = KP + split.to(tl.int64) * B * B
    tl.store(base + rws[:, None] * B + cls[None, :], acc, mask=msk)
    if p != q:
        tl.store(base + cls[None, :] * B + rws[:, None], acc, mask=msk)


def ghost_gram(A: torch.Tensor, D: torch.Tensor, *, block_b: int | None = None,
               block_m: int | None = None, block_n: int | None = None,
               block_k: int | None = None, num_splits: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Launch ``_ghost_gram_kernel``; inputs trusted. Returns K fp32 [B, B].

    A [B, T, I], D [B, T, O] of one dtype (fp32/bf16/fp16) on one device.
    """
    B, T, I = A.shape
    O = D.shape[2]
    dev = A.device
    interp = is_interpreted(_ghost_gram_kernel)
    if interp:
        sb, bm, bn, bk, nw = pow2(B, 1, 16), 32, 32, 32, 4  # interpreter: cost is per op
    else:
        # 16 is the smallest tile every tl.dot lowering accepts on NVIDIA. 8 warps and 2 stages:
        # with 4 warps the two 64 x 64 token Grams spilled 0.8-2.3 KiB per thread on sm_90, with 3
        # stages fp32 spilled 392 B (benchmarks/gpu/compile_check.py); now <= 24 B
        # Token tiles no taller than a sample block's tokens: with T = 1 (MLP layers) a block has
        # 16 rows, and 64-row tiles would multiply 75% masked zeros (16x the work of the Gram).
        tok = pow2(min(16, B) * T, 16, 64)
        sb, bm, bn, bk, nw = 16, tok, tok, (64 if A.element_size() == 2 else 32), (8 if tok == 64 else 4)
    sb = block_b or sb
    bm = block_m or bm
    bn = block_n or bn
    bk = block_k or bk
    nw = num_warps or nw
    nb = triton.cdiv(B, sb)
    pairs = pair_table(nb, dev)
    row_tiles = triton.cdiv(min(sb, B) * T, bm)  # row tiles in the largest sample block
    if num_splits is None:
        want = (4 * num_sms(dev)) if dev.type == "cuda" else 2
        num_splits = triton.cdiv(want, pairs.shape[0])
    s = max(1, min(num_splits, row_tiles))
    kp = torch.empty((s, B, B), device=dev, dtype=torch.float32)
    extra = {} if interp else {"num_warps": nw, "num_stages": num_stages or 2}
    _ghost_gram_kernel[(pairs.shape[0], s)](
        A, D, pairs, kp, B, T, I, O,
        A.stride(0), A.stride(1), A.stride(2), D.stride(0), D.stride(1), D.stride(2),
        SB=sb, BM=bm, BN=bn, BK=bk,
        DOT_DTYPE=dot_dtype(A.dtype, interp), PREC="ieee",
        **extra,
    )
    K = kp.sum(0)
    # entries (i, j) and (j, i) inside a diagonal block are summed in different orders; make K
    # exactly symmetric for the eigen-solve downstream
    return 0.5 * (K + K.T)
