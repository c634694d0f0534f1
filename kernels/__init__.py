"""Triton kernels of orthograd-fast, installed as ``orthograd_fast.kernels``.

Imported lazily by the engine: nothing here is imported unless a Triton backend is asked for,
so the package works without triton installed. Import these modules only as
``orthograd_fast.kernels.<name>`` (never as a top-level ``kernels``).

| module | kernel -> launcher | torch-facing function (orthograd_fast.triton_ops) |
|---|---|---|
| tile_gram  | _tile_gram_kernel -> tile_gram   | tile_gram(A, D, U=None, *, deterministic=True) |
| ghost_gram | _ghost_gram_kernel -> ghost_gram | ghost_gram(A, D, U=None) (b through coef) |
| coef       | _coef_kernel -> coef             | coef(A, D, U) |
| cgs_step   | _cgs_step_kernel -> cgs_step     | cgs2(G, rtol=None), project_out(G, u, rtol=None) (via gram_schmidt) |

Launchers trust their inputs (triton_ops validates) and take block-size keywords, which the tests
use to force many small tiles. Whether a kernel runs compiled or in the Triton interpreter is fixed
when its module is imported (TRITON_INTERPRET at that moment): see ``_common.is_interpreted``.
"""
