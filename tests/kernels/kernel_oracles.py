"""Float64 oracles written as explicit per-sample / per-token loops, and test inputs.

Deliberately independent of orthograd_fast.engine.ops_reference (no einsum, no shared code).
"""

from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (B, T, I, O): ragged (no dim a multiple of a block), T = 1, B = 1, more samples than a block
SHAPES = [(5, 7, 33, 17), (5, 1, 33, 17), (1, 7, 33, 17), (9, 3, 10, 6)]


def shape_id(s):
    return "B{}_T{}_I{}_O{}".format(*s)


def tiny_blocks(kdev: str, kind: str) -> dict:
    """Small launcher blocks that force several tiles, sample blocks and loop trips at the test
    shapes. 16 on CUDA: the smallest tl.dot tile every NVIDIA lowering accepts."""
    s = 2 if kdev == "cpu" else 16
    return {
        "tile": dict(block_b=2 if kdev == "cpu" else 16, block_o=8 if kdev == "cpu" else 16,
                     block_i=16, block_t=4 if kdev == "cpu" else 16),
        "ghost": dict(block_b=s, block_m=8 if kdev == "cpu" else 16,
                      block_n=8 if kdev == "cpu" else 16, block_k=8 if kdev == "cpu" else 16),
        "coef": dict(block_m=8 if kdev == "cpu" else 16, block_o=8 if kdev == "cpu" else 16,
                     block_k=8 if kdev == "cpu" else 16),
    }[kind]


def rand_factors(seed: int, B, T, I, O, dtype, device="cpu", u_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, T, I, generator=g).to(dtype).to(device)
    D = torch.randn(B, T, O, generator=g).to(dtype).to(device)
    U = torch.randn(O, I, generator=g).to(u_dtype).to(device)
    return A, D, U


def per_sample_grads64(A, D):
    """[B, O, I] float64, g_i = sum_t d_it a_it^T built token by token."""
    B, T, I = A.shape
    O = D.shape[2]
    A64, D64 = A.detach().cpu().double(), D.detach().cpu().double()
    G = torch.zeros(B, O, I, dtype=torch.float64)
    for i in range(B):
        for t in range(T):
            G[i] += torch.outer(D64[i, t], A64[i, t])
    return G


def gram_oracle(A, D, U=None):
    G = per_sample_grads64(A, D)
    B = G.shape[0]
    K = torch.empty(B, B, dtype=torch.float64)
    for i in range(B):
        for j in range(B):
            K[i, j] = (G[i] * G[j]).sum()
    b = None
    if U is not None:
        U64 = U.detach().cpu().double()
        b = torch.stack([(G[i] * U64).sum() for i in range(B)])
    return K, b


def coef_oracle(A, D, U):
    """b_i = sum_t d_it^T U a_it, token by token (never forms g_i)."""
    A64, D64, U64 = (x.detach().cpu().double() for x in (A, D, U))
    B, T, _ = A64.shape
    b = torch.zeros(B, dtype=torch.float64)
    for i in range(B):
        for t in range(T):
            b[i] += D64[i, t] @ (U64 @ A64[i, t])
    return b


def coef_tol(dtype, u_dtype):
    """Tolerance dtype for the coefficient kernel. bf16 A with fp32 U runs on bf16 tensor cores with
    U split hi + lo (16 of U's 24 bits): held to the bf16 contract (test_coef.py's
    test_split_u_error_bound checks its real accuracy); everything else accumulates in fp32."""
    return torch.bfloat16 if (dtype, u_dtype) == (torch.bfloat16, torch.float32) else torch.float32
