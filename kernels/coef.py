"""Fused coefficients b_i = <g_i, U> = sum_t d_it^T U a_it, without writing D U (or A U^T) out.

Tokens are flattened (row r = b * T + t). Program (m, o) computes the [BM, BO] block X = A_r U_o^T
on chip (loop over I), multiplies by D_r,o and reduces over o, writing one partial per token:
R[o, r] = sum_{o in tile} d_r[o] (U a_r)[o]. The launcher sums R over o tiles and tokens per sample
in torch (deterministic; R is num_o_tiles * B * T floats, far smaller than D U).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_dtype, is_interpreted


@triton.jit
def _coef_kernel(A, D, U, R,
                 N, T, I, O,
                 s_ab, s_at, s_ai, s_db, s_dt, s_do, s_uo, s_ui,
                 BM: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, SPLIT_U: tl.constexpr, PREC: tl.constexpr):
    """Per-token partial coefficients.

    A [B, T, I]       fp32 | bf16 | fp16 (any strides)   layer inputs
    D [B, T, O]       any float dtype (any strides)       output gradients (read once, as fp32)
    U [O, I]          any float dtype (any strides)       unlearn gradient
    R [n_o_tiles, N]  fp32 (contiguous)  out: R[o, r] = sum over this o tile of d_r * (U a_r)
    N = B * T tokens. Grid (cdiv(N, BM), cdiv(O, BO)).
    SPLIT_U: A is bf16 and U fp32; U is split as hi + lo, two bf16 numbers, and both multiplied on
    the tensor cores, which keeps ~16 mantissa bits of U instead of bf16's 8.
    """
    pm = tl.program_id(0)
    po = tl.program_id(1)
    rows = pm * BM + tl.arange(0, BM)
    rmask = rows < N
    rb = (rows // T).to(tl.int64)
    rt = rows % T
    oo = po * BO + tl.arange(0, BO)
    omask = oo < O
    kk = tl.arange(0, BK)
    acc = tl.zeros((BM, BO), dtype=tl.float32)
    for k0 in range(0, I, BK):
        k = k0 + kk
        kmask = k < I
        a = tl.load(A + rb[:, None] * s_ab + rt[:, None] * s_at + k[None, :] * s_ai,
                    mask=rmask[:, None] & kmask[None, :], other=0.0).to(DOT_DTYPE)
        # U tile loaded transposed: [BK, BO] = U[o, k]^T
        u = tl.load(U + oo[None, :] * s_uo + k[:, None] * s_ui,
                    mask=kmask[:, None] & omask[None, :], other=0.0).to(tl.float32)
        if SPLIT_U:
            u_hi = u.to(tl.bfloat16)
            u_lo = (u - u_hi.to(tl.float32)).to(tl.bfloat16)
            acc = tl.dot(a, u_hi.to(DOT_DTYPE), acc, input_precision=PREC)
            acc = tl.dot(a, u_lo.to(DOT_DTYPE), acc, input_precision=PREC)
        else:
            acc = tl.dot(a, u.to(DOT_DTYPE), acc, input_precision=PREC)
    d = tl.load(D + rb[:, None] * s_db + rt[:, None] * s_dt + oo[None, :] * s_do,
                mask=rmask[:, None] & omask[None, :], other=0.0).to(tl.float32)
    r = tl.sum(acc * d, axis=1)
    tl.store(R + po.to(tl.int64) * N + rows, r, mask=rmask)


def coef(A: torch.Tensor, D: torch.Tensor, U: torch.Tensor, *, block_m: int | None = None,
         block_o: int | None = None, block_k: int | None = None, split_u: bool | None = None,
         num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Launch ``_coef_kernel``; inputs trusted. Returns b fp32 [B].

    A [B, T, I], D [B, T, O], U [O, I] on one device. The dot runs in A's dtype when U has it too;
    bf16 A with fp32 U uses the hi/lo split (``split_u``, default on); any other mix runs in fp32.
    """
    B, T, I = A.shape
    O = D.shape[2]
    N = B * T
    dev = A.device
    interp = is_interpreted(_coef_kernel)
    if split_u is None:
        split_u = A.dtype == torch.bfloat16 and U.dtype == torch.float32
    if split_u and A.dtype != torch.bfloat16:
        raise ValueError("coef: split_u needs bfloat16 A")
    if split_u or U.dtype == A.dtype:
        op_dtype = A.dtype
    else:
        op_dtype = torch.float32  # mixed precision without the split: widen, keep U exact
    if interp:
        bm, bo, bk, nw = 32, 32, 32, 4  # interpreter: cost is per op, so fewer, larger tiles
    else:
        # fp32 operands go through FMAs (ieee), whose operand tiles take more registers than the
        # tensor-core layouts: 128 x 64 keeps them spill-free on sm_90 (compile_check.py)
        bm, bo, bk, nw = 128, (128 if op_dtype != torch.float32 else 64), (64 if op_dtype != torch.float32 else 32), 8
    bm = block_m or bm
    bo = block_o or bo
    bk = block_k or bk
    nw = num_warps or nw
    n_o = triton.cdiv(O, bo)
    r = torch.empty((n_o, N), device=dev, dtype=torch.float32)
    extra = {} if interp else {"num_warps": nw, **({"num_stages": num_stages} if num_stages else {})}
    _coef_kernel[(triton.cdiv(N, bm), n_o)](
        A, D, U, r, N, T, I, O,
        A.stride(0), A.stride(1), A.stride(2), D.stride(0), D.stride(1), D.stride(2),
        U.stride(0), U.stride(1),
        BM=bm, BO=bo, BK=bk, DOT_DTYPE=dot_dtype(op_dtype, interp), SPLIT_U=bool(split_u),
        PREC="ieee", **extra,
    )
    return r.sum(0).view(B, T).sum(1)
