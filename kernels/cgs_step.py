"""One fused step of blocked classical Gram-Schmidt over the tall dimension n.

    Y = X @ Tm - Q @ C          (Tm: k x m block transform, C: r x m projection coefficients)
    SQ = Q^T Y                  (r x m, what the next re-orthogonalization pass subtracts)
    SY = Y^T Y                  (m x m in float64, for the in-block Cholesky with rank checks)

X has k columns, Y has m (k = m without Tm). All in one read of Q and X: each program owns a contiguous range of rows, applies the update row
block by row block and accumulates its partial SQ / SY on chip; the launcher sums the partials in
float64 in torch (deterministic, and short per-program sums keep fp32 rounding small).
SY is accumulated in fp64 because the in-block rank decision subtracts nearly equal squared norms.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from ._common import is_interpreted, num_sms, pow2, tl_dtype


@triton.jit
def _cgs_step_kernel(Q, X, TM, C, Y, SQ, SY,
                     n, r, k, m, rows_per_prog,
                     s_qn, s_qr, s_xn, s_xm, s_yn, s_ym,
                     HAS_T: tl.constexpr, HAS_C: tl.constexpr, STORE_Y: tl.constexpr,
                     WANT_SQ: tl.constexpr, WANT_SY: tl.constexpr,
                     MB: tl.constexpr, RB: tl.constexpr, BN: tl.constexpr,
                     WORK: tl.constexpr):
    """Fused update and reductions for one program's row range.

    Q  [n, r]      WORK (fp32 | fp64), any strides    orthonormal columns so far
    X  [n, k]      WORK, any strides                  block being orthogonalized
    TM [k, m]      WORK, contiguous                   right transform (if HAS_T; else k = m)
    C  [r, m]      WORK, contiguous                   coefficients to subtract (if HAS_C)
    Y  [n, m]      WORK, any strides        out: X Tm - Q C (if STORE_Y)
    SQ [G, r, m]   WORK, contiguous         out: per-program Q^T Y (if WANT_SQ)
    SY [G, m, m]   fp64, contiguous         out: per-program Y^T Y (if WANT_SY)
    Grid (G, cdiv(r, RB)): axis 1 splits the columns of Q for SQ; only axis-1 index 0 stores Y
    and SY (the others recompute Y, which costs nothing extra when r <= RB, the usual case).
    """
    pid = tl.program_id(0)
    kr = tl.program_id(1)
    row_lo = pid.to(tl.int64) * rows_per_prog
    row_hi = tl.minimum(row_lo + rows_per_prog, n)
    mm = tl.arange(0, MB)
    mmask = mm < m
    kmask = mm < k
    rr = tl.arange(0, RB)
    if HAS_T:
        tmat = tl.load(TM + mm[:, None] * m + mm[None, :],
                       mask=kmask[:, None] & mmask[None, :], other=0.0).to(WORK)
    acc_q = tl.zeros((RB, MB), dtype=WORK)
    acc_y = tl.zeros((MB, MB), dtype=tl.float64)
    for n0 in range(row_lo, row_hi, BN):
        rows = n0 + tl.arange(0, BN)
        rmask = rows < row_hi
        x = tl.load(X + rows[:, None] * s_xn + mm[None, :] * s_xm,
                    mask=rmask[:, None] & kmask[None, :], other=0.0).to(WORK)
        if HAS_T:
            y = tl.dot(x, tmat, input_precision="ieee")
        else:
            y = x
        if HAS_C:
            for r0 in range(0, r, RB):
                rc = r0 + rr
                q = tl.load(Q + rows[:, None] * s_qn + rc[None, :] * s_qr,
                            mask=rmask[:, None] & (rc < r)[None, :], other=0.0).to(WORK)
                c = tl.load(C + rc[:, None] * m + mm[None, :],
                            mask=(rc < r)[:, None] & mmask[None, :], other=0.0).to(WORK)
                y = y - tl.dot(q, c, input_precision="ieee")
        if STORE_Y:
            if kr == 0:
                tl.store(Y + rows[:, None] * s_yn + mm[None, :] * s_ym, y,
                         mask=rmask[:, None] & mmask[None, :])
        if WANT_SQ:
            rk = kr * RB + rr
            qk = tl.load(Q + rows[:, None] * s_qn + rk[None, :] * s_qr,
                         mask=rmask[:, None] & (rk < r)[None, :], other=0.0).to(WORK)
            # out_dtype spelled out: triton 3.6 asserts acc's dtype equals it (default fp32)
            acc_q = tl.dot(tl.trans(qk), y, acc_q, input_precision="ieee", out_dtype=WORK)
        if WANT_SY:
            if kr == 0:
                y64 = y.to(tl.float64)
                acc_y = tl.dot(tl.trans(y64), y64, acc_y, input_precision="ieee",
                               out_dtype=tl.float64)
    if WANT_SQ:
        rk = kr * RB + rr
        tl.store(SQ + pid.to(tl.int64) * r * m + rk[:, None] * m + mm[None, :], acc_q,
                 mask=(rk < r)[:, None] & mmask[None, :])
    if WANT_SY:
        if kr == 0:
            tl.store(SY + pid.to(tl.int64) * m * m + mm[:, None] * m + mm[None, :], acc_y,
                     mask=mmask[:, None] & mmask[None, :])


MAX_BLOCK = 64  # widest X block the kernel takes (MB); callers split wider ones


def cgs_step(Q: torch.Tensor | None, X: torch.Tensor, Tm: torch.Tensor | None = None,
             C: torch.Tensor | None = None, *, store_y: bool = True, want_sq: bool = True,
             want_sy: bool = True, out: torch.Tensor | None = None,
             block_n: int | None = None, block_r: int | None = None,
             num_programs: int | None = None, num_warps: int | None = None):
    """Launch ``_cgs_step_kernel``; inputs trusted (gram_schmidt.py prepares them).

    Q [n, r] or None (r = 0), X [n, k], Tm [k, m] or None (then m = k), C [r, m] or None, all of
    one work dtype (fp32 or fp64) on one device, k and m <= 64; ``out`` [n, m] receives Y
    (allocated if None). Returns (Y or None, SQ fp64 [r, m] or None, SY fp64 [m, m] or None).
    """
    n, k = X.shape
    m = Tm.shape[1] if Tm is not None else k
    if max(k, m) > MAX_BLOCK:
        raise ValueError(f"cgs_step: blocks of {k} -> {m} columns, at most {MAX_BLOCK} per launch")
    r = 0 if Q is None else Q.shape[1]
    dev = X.device
    interp = is_interpreted(_cgs_step_kernel)
    want_sq = want_sq and r > 0
    has_c = C is not None and r > 0
    mb = pow2(max(k, m), 1 if interp else 16)
    # GPU: 32-row slabs, Q columns 32 at a time and 8 warps keep X, Y, Tm and both accumulators
    # (one of them fp64) in registers: 64 / 64 / 4 warps spilled 1.6-2.8 KiB per thread on sm_90
    # (compile_check.py); 32 / 32 / 8 spills <= 32 B
    bn = block_n or (64 if interp else 32)
    rb = block_r or (pow2(r, 1 if interp else 16, 16 if interp else 32))
    g = num_programs or ((4 * num_sms(dev)) if dev.type == "cuda" else 3)
    g = max(1, min(g, triton.cdiv(max(n, 1), bn)))
    rows_per_prog = triton.cdiv(triton.cdiv(max(n, 1), g), bn) * bn
    g = triton.cdiv(max(n, 1), rows_per_prog)
    n_kr = triton.cdiv(r, rb) if want_sq else 1
    if want_sy and not _FP64_DOT_OK.get(dev.type, True):
        return _sy_in_torch(Q, X, Tm, C, store_y, want_sq, out, bn, block_r, num_programs,
                            num_warps)
    launch = dict(g=g, n_kr=n_kr, mb=mb, rb=rb, bn=bn, rows_per_prog=rows_per_prog,
                  interp=interp, num_warps=num_warps)
    try:
        return _launch(Q, X, Tm, C, has_c, store_y, want_sq, want_sy, out, **launch)
    except Exception:  # noqa: BLE001 - see _FP64_DOT_OK; anything else fails again below
        if not want_sy or dev.type != "cuda" or _FP64_DOT_OK.get(dev.type) is not None:
            raise
        _FP64_DOT_OK[dev.type] = False
        warnings.warn("cgs_step: this Triton build cannot compile the float64 tl.dot for Y^T Y; "
                      "computing it in torch instead (one extra pass over Y)")
        return _sy_in_torch(Q, X, Tm, C, store_y, want_sq, out, bn, block_r, num_programs,
                            num_warps)


# Whether the float64 tl.dot (Y^T Y) compiles on this device type: None = not tried yet. Only the
# fp64 Gram needs it; if the GPU build refuses it, Y is stored and its Gram taken in torch.
_FP64_DOT_OK: dict = {}


def _sy_in_torch(Q, X, Tm, C, store_y, want_sq, out, bn, block_r, num_programs, num_warps):
    y, sq, _ = cgs_step(Q, X, Tm, C, store_y=True, want_sq=want_sq, want_sy=False, out=out,
                        block_n=bn, block_r=block_r, num_programs=num_programs,
                        num_warps=num_warps)
    sy = torch.zeros((y.shape[1], y.shape[1]), dtype=torch.float64, device=y.device)
    for i in range(0, y.shape[0], 1 << 20):
        c = y[i:i + (1 << 20)].to(torch.float64)
        sy += c.T @ c
    return (y if store_y else None), sq, sy


def _launch(Q, X, Tm, C, has_c, store_y, want_sq, want_sy, out, *, g, n_kr, mb, rb, bn,
            rows_per_prog, interp, num_warps):
    n, k = X.shape
    m = Tm.shape[1] if Tm is not None else k
    r = 0 if Q is None else Q.shape[1]
    dev, work = X.device, X.dtype
    y = None
    if store_y:
        y = out if out is not None else torch.empty((n, m), device=dev, dtype=work)
    sq = torch.empty((g, r, m), device=dev, dtype=work) if want_sq else None
    sy = torch.empty((g, m, m), device=dev, dtype=torch.float64) if want_sy else None
    dummy = X  # stands in for absent pointers; the matching constexpr flag keeps it unread
    s_q = (Q.stride(0), Q.stride(1)) if Q is not None else (0, 0)
    s_y = (y.stride(0), y.stride(1)) if y is not None else (0, 0)
    extra = {} if interp else {"num_warps": num_warps or 8}
    _cgs_step_kernel[(g, n_kr)](
        Q if Q is not None else dummy, X, Tm if Tm is not None else dummy,
        C if has_c else dummy, y if y is not None else dummy,
        sq if sq is not None else dummy, sy if sy is not None else dummy,
        n, r, k, m, rows_per_prog,
        *s_q, X.stride(0), X.stride(1), *s_y,
        HAS_T=Tm is not None, HAS_C=has_c, STORE_Y=store_y, WANT_SQ=want_sq, WANT_SY=want_sy,
        MB=mb, RB=rb, BN=bn, WORK=tl_dtype(work),
        **extra,
    )
    if want_sy and X.device.type == "cuda":
        _FP64_DOT_OK.setdefault(X.device.type, True)
    sq_sum = sq.sum(0, dtype=torch.float64) if want_sq else None
    sy_sum = sy.sum(0) if want_sy else None
    return y, sq_sum, sy_sum
