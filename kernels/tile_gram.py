"""Fused tile Gram: K = G G^T and b = G u over per-sample gradients G_i = D_i^T A_i, never stored.

For every (O x I) tile of the weight, each program forms the per-sample tiles D_i^T A_i of one block
of samples p on chip (a batched tl.dot reducing over tokens, fp32 accumulate), folds them into b_i =
<G_i, U_tile>, and then, for every later block q >= p, forms q's tiles and adds the Gram block
G_p G_q^T. So each tile is formed nb (nb + 1) / 2 times for nb sample blocks, not nb^2 times as
with one program per block pair (p's tiles are reused across the q loop).

A program owns one sample block p (grid axis 1) and a strided set of tiles (axis 0). Its Gram
blocks (p, q), q >= p, are read-modify-written once per tile into its own slice of the partials
Kp[k] ([num_programs, B, B], zeroed; summed over k in torch: deterministic), or with
``deterministic=False`` added with fp32 atomics into K. Only the upper block triangle is written;
the launcher mirrors it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_dtype, is_interpreted, num_sms, pow2


@triton.jit
def _sample_tiles(A, D, b0, o0, i0, B, T, I, O,
                  s_ab, s_at, s_ai, s_db, s_dt, s_do,
                  SB: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, BT: tl.constexpr,
                  DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
    """fp32 [SB, BO, BI]: tile (o0:o0+BO, i0:i0+BI) of D_b^T A_b for samples b0..b0+SB (0 past B)."""
    sb = (b0 + tl.arange(0, SB)).to(tl.int64)  # int64: B*T*I can pass 2**31
    oo = o0 + tl.arange(0, BO)
    ii = i0 + tl.arange(0, BI)
    tt = tl.arange(0, BT)
    bmask = sb < B
    acc = tl.zeros((SB, BO, BI), dtype=tl.float32)
    for t0 in range(0, T, BT):
        t = t0 + tt
        # D loaded straight in transposed order [SB, BO, BT] so the batched dot needs no permute.
        d_ptr = D + sb[:, None, None] * s_db + oo[None, :, None] * s_do + t[None, None, :] * s_dt
        d_msk = bmask[:, None, None] & (oo < O)[None, :, None] & (t < T)[None, None, :]
        d = tl.load(d_ptr, mask=d_msk, other=0.0).to(DOT_DTYPE)
        a_ptr = A + sb[:, None, None] * s_ab + t[None, :, None] * s_at + ii[None, None, :] * s_ai
        a_msk = bmask[:, None, None] & (t < T)[None, :, None] & (ii < I)[None, None, :]
        a = tl.load(a_ptr, mask=a_msk, other=0.0).to(DOT_DTYPE)
        acc = tl.dot(d, a, acc, input_precision=PREC)
    return acc


@triton.jit
def _tile_gram_kernel(A, D, U, KP, BP,
                      B, T, I, O,
                      s_ab, s_at, s_ai, s_db, s_dt, s_do, s_uo, s_ui,
                      n_tiles_i, n_tiles, n_blocks,
                      HAS_U: tl.constexpr, ATOMIC: tl.constexpr,
                      SB: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, BT: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, GRAM_PREC: tl.constexpr):
    """Partial Gram rows and coefficients of one sample block.

    A  [B, T, I]  fp32 | bf16 | fp16 (any strides)    layer inputs a_it
    D  [B, T, O]  same dtype as A (any strides)         output gradients d_it
    U  [O, I]     any float dtype (any strides)         unlearn gradient; unused if not HAS_U
    KP [G0, B, B] fp32 (contiguous, zeroed)  out: += blocks (p, q >= p) of this program's tiles
                  (ATOMIC: [B, B], atomically)
    BP [G0, B]    fp32 (contiguous)  out: b of block p over this program's tiles (ATOMIC: [B],
                  zeroed, atomically)
    Grid (G0, n_blocks): axis 0 strides over the n_tiles (O x I) tiles, axis 1 is the block p.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    p = tl.program_id(1)
    rows = p * SB + tl.arange(0, SB)
    rmask = rows < B
    lane = tl.arange(0, SB)
    kbase = KP if ATOMIC else KP + pid.to(tl.int64) * B * B
    acc_b = tl.zeros((SB,), dtype=tl.float32)
    for tile in range(pid, n_tiles, nprog):
        o0 = (tile // n_tiles_i) * BO
        i0 = (tile % n_tiles_i) * BI
        gp3 = _sample_tiles(A, D, p * SB, o0, i0, B, T, I, O, s_ab, s_at, s_ai, s_db, s_dt, s_do,
                            SB, BO, BI, BT, DOT_DTYPE, PREC)
        if HAS_U:
            oo = o0 + tl.arange(0, BO)
            ii = i0 + tl.arange(0, BI)
            u = tl.load(U + oo[:, None] * s_uo + ii[None, :] * s_ui,
                        mask=(oo < O)[:, None] & (ii < I)[None, :], other=0.0)
            acc_b += tl.sum(tl.reshape(gp3 * u.to(tl.float32)[None, :, :], (SB, BO * BI)), axis=1)
        gp = tl.reshape(gp3, (SB, BO * BI))
        for q in range(p, n_blocks):
            if q == p:
                gq = gp
            else:
                gq = tl.reshape(_sample_tiles(A, D, q * SB, o0, i0, B, T, I, O, s_ab, s_at, s_ai,
                                              s_db, s_dt, s_do, SB, BO, BI, BT, DOT_DTYPE, PREC),
                                (SB, BO * BI))
            part = tl.dot(gp, tl.trans(gq), input_precision=GRAM_PREC)
            cols = q * SB + lane
            ptr = kbase + rows[:, None] * B + cols[None, :]
            msk = rmask[:, None] & (cols < B)[None, :]
            if ATOMIC:
                tl.atomic_add(ptr, part, mask=msk)
            else:  # this program alone writes this slice of its partials: no race
                tl.store(ptr, tl.load(ptr, mask=msk, other=0.0) + part, mask=msk)
    if HAS_U:
        if ATOMIC:
            tl.atomic_add(BP + rows, acc_b, mask=rmask)
        else:
            tl.store(BP + pid.to(tl.int64) * B + rows, acc_b, mask=rmask)


def _default_blocks(B: int, dtype: torch.dtype, interpreted: bool):
    """(SB, BO, BI, BT, num_warps, num_stages)."""
    if interpreted:
        # Interpreter cost is per program and per loop trip, not per element: moderate blocks.
        return pow2(B, 1, 16), 32, 32, 16, 4, None
    # GPU: a program holds two sample blocks' tiles, 2 x SB x BO x BI fp32, in registers, and the
    # batched dot replicates its operands across threads. Compiled for sm_90
    # (benchmarks/gpu/compile_check.py; benchmarks/results/sm90-compile-2026-11-28.md): SB 16,
    # 16 x 16 tiles, 8 warps, one stage uses ~165 of 255 registers and no spills. 16 x 32 tiles
    # also fit (220-250 registers: little margin for another triton version; the GPU script times
    # them); SB 32 spills. SB 64, the former default, needed 320 KiB of shared memory in fp32 (the
    # limit is 227 KiB) and 8-13 KiB of spills per thread.
    return 16, 16, 16, 16, 8, 1


def tile_gram(A: torch.Tensor, D: torch.Tensor, U: torch.Tensor | None = None, *,
              deterministic: bool = True, block_b: int | None = None, block_o: int | None = None,
              block_i: int | None = None, block_t: int | None = None,
              num_programs: int | None = None, gram_precision: str = "ieee",
              num_warps: int | None = None, num_stages: int | None = None):
    """Launch ``_tile_gram_kernel``. Inputs are trusted (orthograd_fast.engine.triton_ops validates).

    A [B, T, I], D [B, T, O] of one dtype (fp32/bf16/fp16), U [O, I] or None, all on one device.
    Returns (K fp32 [B, B], b fp32 [B] or None). ``gram_precision`` is the tl.dot input precision
    of the fp32 G G^T product: "ieee" (default, true fp32) or "tf32x3" (GPU speed option).
    Block sizes default per device; tests pass tiny ones to exercise the ragged edges.
    """
    B, T, I = A.shape
    O = D.shape[2]
    dev = A.device
    interp = is_interpreted(_tile_gram_kernel)
    sb, bo, bi, bt, nw, ns = _default_blocks(B, A.dtype, interp)
    sb = block_b or sb
    bo = block_o or bo
    bi = block_i or bi
    bt = block_t or bt
    nw = num_warps or nw
    ns = num_stages or ns
    n_tiles_i = triton.cdiv(I, bi)
    n_tiles = triton.cdiv(O, bo) * n_tiles_i
    nb = triton.cdiv(B, sb)
    g0 = num_programs or min(n_tiles, triton.cdiv(2 * num_sms(dev), nb) if dev.type == "cuda" else 4)
    # the partial Grams are g0 * B * B floats: keep them under ~256 MiB for large B
    g0 = max(1, min(g0, n_tiles, (64 << 20) // (B * B)))
    has_u = U is not None
    if deterministic:  # every program read-modify-writes its own slice: zeroed
        kp = torch.zeros((g0, B, B), device=dev, dtype=torch.float32)
        bp = torch.empty((g0, B) if has_u else (1,), device=dev, dtype=torch.float32)
    else:
        kp = torch.zeros((B, B), device=dev, dtype=torch.float32)
        bp = torch.zeros((B,) if has_u else (1,), device=dev, dtype=torch.float32)
    u_arg = U if has_u else kp  # dummy pointer, never read when HAS_U is False
    s_u = (U.stride(0), U.stride(1)) if has_u else (0, 0)
    prec = "ieee"  # fp32 operands: no TF32 in the per-sample tiles; ignored for 16-bit operands
    extra = {} if interp else {"num_warps": nw, **({"num_stages": ns} if ns else {})}
    _tile_gram_kernel[(g0, nb)](
        A, D, u_arg, kp, bp,
        B, T, I, O,
        A.stride(0), A.stride(1), A.stride(2), D.stride(0), D.stride(1), D.stride(2), *s_u,
        n_tiles_i, n_tiles, nb,
        HAS_U=has_u, ATOMIC=not deterministic,
        SB=sb, BO=bo, BI=bi, BT=bt,
        DOT_DTYPE=dot_dtype(A.dtype, interp), PREC=prec, GRAM_PREC=gram_precision,
        **extra,
    )
    if deterministic:
        K = kp.sum(0)
        b = bp.sum(0) if has_u else None
    else:
        K = kp
        b = bp if has_u else None
    # only blocks (p, q >= p) were written: mirror the strictly upper ones
    blk = torch.arange(B, device=dev) // sb
    K = K + (K * (blk[:, None] < blk[None, :])).T
    # a diagonal block's (i, j) and (j, i) may round differently; exact symmetry for the solve
    return 0.5 * (K + K.T), b
