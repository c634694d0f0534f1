"""Torch-facing entry points of the Triton kernels, the functions the engine calls.

    tile_gram(A, D, U=None, *, deterministic=True) -> (K fp32 [B, B], b fp32 [B] or None)
    ghost_gram(A, D, U=None)                       -> (K fp32 [B, B], b fp32 [B] or None)
    coef(A, D, U)                                  -> b fp32 [B],  b_i = sum_t d_it^T U a_it
    resolve_backend(backend, on_cuda, who)         -> "torch" or "triton", the backend that runs

A [B, T, I] layer inputs, D [B, T, O] output gradients (a 2-D [B, I] / [B, O] pair means T = 1),
U [O, I] the unlearn gradient of the weight. Inputs are validated here (errors name the
argument); the launchers in orthograd_fast.kernels trust them.

Triton is imported only inside these functions, so ``import orthograd_fast`` works without it.
Tensors must be on CUDA, or on CPU with TRITON_INTERPRET=1 set before the kernel modules are first
imported (Triton fixes interpreter vs compiler per kernel at import); otherwise use the torch path
(orthograd_fast.engine.ops_reference).

The blocked Gram-Schmidt kernel (kernels.cgs_step) has its front end in orthograd_fast.gram_schmidt,
which imports this module and is not imported back: the engine never reaches it.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["BACKENDS", "triton_available", "kernels_interpreted", "resolve_backend", "tile_gram",
           "ghost_gram", "coef"]

BACKENDS = ("auto", "torch", "triton")

_FACTOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True if triton imports (says nothing about a GPU; never touches hardware)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401 - the kernels need it, not just the top module
    except Exception:
        return False
    return True


def kernels_interpreted() -> bool:
    """True if the kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    if not triton_available():
        return False
    from ..kernels._common import is_interpreted
    from ..kernels.tile_gram import _tile_gram_kernel

    return is_interpreted(_tile_gram_kernel)


def _unrunnable(who: str, on_cuda: bool, where: str) -> str | None:
    """Why the Triton kernels cannot run for data ``where`` (None if they can)."""
    if not triton_available():
        return (f"{who}: triton is not installed; use backend='torch' "
                "(pip install 'orthograd-fast[triton]' for the kernels)")
    if on_cuda or kernels_interpreted():
        return None
    return (f"{who}: {where}; the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set "
            "before orthograd_fast.kernels is first imported (to run them on CPU in the "
            "interpreter). Otherwise use backend='torch'.")


def resolve_backend(backend: str, on_cuda: bool, who: str, error: type = RuntimeError) -> str:
    """The backend that runs ("torch" or "triton") for a requested one of BACKENDS.

    "auto" takes Triton for CUDA data when triton imports, else torch; "triton" raises ``error``
    (message starting with ``who``) where the kernels cannot run. An unknown name is a ValueError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{who}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    why = _unrunnable(who, on_cuda, "the data is on the CPU")
    if why:
        raise error(why)
    return "triton"


def _require_runnable(fn: str, name: str, t: torch.Tensor) -> None:
    why = _unrunnable(fn, t.is_cuda, f"{name} is on {t.device}")
    if why:
        raise RuntimeError(why)


def _check_tensor(fn: str, name: str, t, dims: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{fn}: {name} must be {want}, got shape {tuple(t.shape)}")


def _factors(fn: str, A, D):
    """Validate A, D; return 3-D views of one common dtype (promoted if they differ)."""
    _check_tensor(fn, "A", A, (2, 3))
    _check_tensor(fn, "D", D, (2, 3))
    if A.dim() != D.dim():
        raise ValueError(f"{fn}: A and D must both be 3-D [B, T, *] (or both 2-D, T = 1); got "
                         f"A {tuple(A.shape)}, D {tuple(D.shape)}")
    if A.dim() == 2:
        A, D = A[:, None, :], D[:, None, :]
    if A.shape[:2] != D.shape[:2]:
        raise ValueError(f"{fn}: A [B, T, I] and D [B, T, O] must agree in B and T; got "
                         f"A {tuple(A.shape)}, D {tuple(D.shape)}")
    for name, t in (("A", A), ("D", D)):
        if t.dtype not in _FACTOR_DTYPES:
            raise ValueError(f"{fn}: {name} has dtype {t.dtype}; the kernels take float32, "
                             "bfloat16 or float16 (use backend='torch' for float64)")
    if A.device != D.device:
        raise ValueError(f"{fn}: A is on {A.device} but D is on {D.device}")
    _require_runnable(fn, "A", A)
    if A.dtype != D.dtype:
        # tl.dot needs one operand dtype; promoting (bf16 -> fp32) is exact
        dt = torch.promote_types(A.dtype, D.dtype)
        A, D = A.to(dt), D.to(dt)
    return A.detach(), D.detach()


def _unlearn_grad(fn: str, U, A, D, required: bool):
    if U is None:
        if required:
            raise ValueError(f"{fn}: U is required")
        return None
    _check_tensor(fn, "U", U, (2,))
    O, I = D.shape[2], A.shape[2]
    if tuple(U.shape) != (O, I):
        raise ValueError(f"{fn}: U must have shape [O, I] = [{O}, {I}] (D's last dim, A's last "
                         f"dim), got {tuple(U.shape)}")
    if U.dtype not in _FACTOR_DTYPES:
        raise ValueError(f"{fn}: U has dtype {U.dtype}; expected float32, bfloat16 or float16")
    if U.device != A.device:
        raise ValueError(f"{fn}: U is on {U.device} but A is on {A.device}")
    return U.detach()


def _empty_result(A, D, U):
    B = A.shape[0]
    if B and A.shape[1] and A.shape[2] and D.shape[2]:
        return None
    K = torch.zeros((B, B), device=A.device, dtype=torch.float32)
    return K, (torch.zeros(B, device=A.device, dtype=torch.float32) if U is not None else None)


def tile_gram(A: torch.Tensor, D: torch.Tensor, U: torch.Tensor | None = None, *,
              deterministic: bool = True):
    """Gram K[i, j] = <g_i, g_j> and b_i = <g_i, U> of per-sample gradients g_i = D_i^T A_i,
    from (O x I) tiles of g_i formed on chip and never stored.

    Cost ~ (nb + 1) B T I O + B^2 I O flops for nb = B / 16 sample blocks (each block's tiles are
    formed once per later block instead of being stored) and no T^2 term: the route for long
    sequences (ghost_gram costs ~ 2 (B T)^2 (I + O)). deterministic=False accumulates with fp32
    atomics (the last bits may then differ from run to run). K is exactly symmetric.
    """
    fn = "tile_gram"
    A, D = _factors(fn, A, D)
    U = _unlearn_grad(fn, U, A, D, required=False)
    if not isinstance(deterministic, bool):
        raise TypeError(f"{fn}: deterministic must be a bool, got {type(deterministic).__name__}")
    empty = _empty_result(A, D, U)
    if empty is not None:
        return empty
    from ..kernels.tile_gram import tile_gram as launch

    return launch(A, D, U, deterministic=deterministic)


def ghost_gram(A: torch.Tensor, D: torch.Tensor, U: torch.Tensor | None = None):
    """Gram through token Grams, K[i, j] = sum((A_i A_j^T) * (D_i D_j^T)), flash-style (tiles of
    both token axes kept on chip), plus b = coef(A, D, U) if U is given.

    Cost ~ 2 (B T)^2 (I + O) flops: the cheaper route when T is small against I O / (I + O),
    e.g. T = 1. Deterministic; K is exactly symmetric.
    """
    fn = "ghost_gram"
    A, D = _factors(fn, A, D)
    U = _unlearn_grad(fn, U, A, D, required=False)
    empty = _empty_result(A, D, U)
    if empty is not None:
        return empty
    from ..kernels.ghost_gram import ghost_gram as launch_k

    K = launch_k(A, D)
    b = None
    if U is not None:
        from ..kernels.coef import coef as launch_b

        b = launch_b(A, D, U)
    return K, b


def coef(A: torch.Tensor, D: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """b_i = <g_i, U> = sum_t d_it^T U a_it (fp32 [B]), without forming D U or any g_i."""
    fn = "coef"
    A, D = _factors(fn, A, D)
    U = _unlearn_grad(fn, U, A, D, required=True)
    empty = _empty_result(A, D, U)
    if empty is not None:
        return empty[1]
    from ..kernels.coef import coef as launch

    return launch(A, D, U)
