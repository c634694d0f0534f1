"""Launch-side helpers shared by the kernels (no @triton.jit here).

Importing this module imports triton; it is only ever imported lazily, from the launchers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL_DTYPE = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}


def is_interpreted(kernel) -> bool:
    """True if ``kernel`` was built by ``@triton.jit`` in interpreter mode.

    Triton chooses interpreter vs compiler when the decorator runs (module import), reading
    TRITON_INTERPRET at that moment; setting the variable later has no effect on this kernel.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPE[dtype]


def dot_dtype(dtype: torch.dtype, interpreted: bool):
    """Operand dtype for tl.dot on inputs of ``dtype``.

    The triton 3.9 interpreter multiplies bfloat16 blocks as their raw uint16 storage (garbage),
    so under the interpreter bf16 operands are widened to fp32 first: exact, because a product of
    two bf16 numbers fits in fp32's mantissa and the GPU kernels accumulate in fp32 as well.
    """
    if interpreted and dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPE[dtype]


def pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """Smallest power of two >= max(n, lo), capped at hi."""
    p = triton.next_power_of_2(max(int(n), int(lo), 1))
    if hi is not None:
        p = min(p, hi)
    return p


def pair_table(num_blocks: int, device) -> torch.Tensor:
    """int32 [P, 2] of sample-block pairs (p, q) with p <= q, P = nb (nb + 1) / 2."""
    idx = torch.triu_indices(num_blocks, num_blocks)
    return idx.t().contiguous().to(device=device, dtype=torch.int32)


def num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a handful of programs is enough to exercise the multi-program paths
