"""Float32 per-sample rows kept from the Gram to the update, refined by re-projection passes.

A tile or conv term on the CPU whose rows fit the projection's budget forms them once, in float32,
as Y [B, n]: K = Y Y^T is a float32 GEMM (on the CPU about a third of the float64 one's time, and
no float64 widening), b = Y u and the update u - Y^T c are GEMVs instead of factor GEMMs.

K's float32 rounding (||K32 - K||_2 about 0.02 eps32 sqrt(n) lambda_max, measured) leaves a
residual in the span of relative size rho = ||K32 - K||_2 / lambda_min after the update; every
pass r <- r - Y^T K^-1 (Y r) multiplies it by rho again. The term takes as many passes (at most
MAX_PASSES) as bring rho^(passes + 1) under TARGET; a Gram too ill-conditioned for that goes back
to the float64 route (docs/math.md section 11).
"""

from __future__ import annotations

import math
import threading
from typing import List, Optional, Tuple

import torch
from torch import Tensor

EPS32 = torch.finfo(torch.float32).eps
# bound on ||K32 - K||_2 / (eps32 sqrt(n) lambda_max): five times the largest measured (0.013 to
# 0.023 on random, correlated and real-model tiles, n = 1.6e4 to 1e6)
DELTA = 0.1
# the span component left after the passes, relative to the projected part of u
TARGET = 1e-7
MAX_PASSES = 3
# float32 rows one term may hold (0: the float64 route only); a term holds them inside its own
# job, so a projection holds at most one term's rows per thread
MAX_BYTES = 64 << 20
BLOCK_BYTES = 8 << 20

# One float32 scratch per thread, reused by every held term the thread runs, across steps: a fresh
# allocation of tens of MiB faults in every page again at each step (measured on 2 CPU cores: the
# per-sample tiles of a 1024 x 256 weight at B = 32, 33 MiB, 9 ms into a reused buffer, 26 to 33
# ms into a fresh one). It stays allocated (at most MAX_BYTES per thread) until release().
_scratch = threading.local()


class _Slot:
    """A thread's scratch buffer and whether held rows currently live in it."""

    def __init__(self):
        self.buf: Optional[Tensor] = None
        self.busy = False


def scratch(numel: int, device) -> Tuple[Tensor, Optional[_Slot]]:
    """(float32 buffer of ``numel`` elements, the slot to free with :meth:`HeldRows.close`): this
    thread's scratch, grown when too small; a fresh tensor (slot None) while it is in use."""
    slot = getattr(_scratch, "slot", None)
    if slot is None:
        slot = _scratch.slot = _Slot()
    if slot.busy:
        return torch.empty(numel, dtype=torch.float32, device=device), None
    if slot.buf is None or slot.buf.numel() < numel or slot.buf.device != torch.device(device):
        slot.buf = None  # the old buffer goes before the larger one comes
        slot.buf = torch.empty(numel, dtype=torch.float32, device=device)
    slot.busy = True
    return slot.buf[:numel], slot


def release() -> None:
    """Free the calling thread's scratch (the worker threads' go with their threads)."""
    _scratch.slot = None


def passes_needed(n: int, lam_min: float, lam_max: float, rtol: float) -> Optional[int]:
    """Re-projection passes that bring a float32 Gram's residual under TARGET; None when more than
    MAX_PASSES would be needed, or when the rank tolerance ``rtol`` (on singular values) could drop
    a direction (within a factor 10 of its cutoff): the float64 route decides those."""
    if not (lam_min > 0 and math.isfinite(lam_max)) or lam_min <= 100 * rtol * rtol * lam_max:
        return None
    rho = DELTA * EPS32 * math.sqrt(n) * lam_max / lam_min
    for k in range(MAX_PASSES + 1):
        if rho ** (k + 1) <= TARGET:
            return k
    return None


class HeldRows:
    """The rows as float32 column blocks Y_j [B, n_j] (columns off_j .. off_j + n_j of the flat
    tensor; views of the thread's :func:`scratch`, at most BLOCK_BYTES each: a GEMM's working set),
    with K^-1 (float64, from K's eigendecomposition) and the pass count."""

    def __init__(self, blocks: List[Tuple[int, Tensor]], K: Tensor, Kinv: Tensor, passes: int, slot: Optional[_Slot]):
        self.blocks, self.K, self.Kinv, self.passes, self._slot = blocks, K, Kinv, passes, slot

    def close(self) -> None:
        """Give the scratch back (the blocks are not used again)."""
        if self._slot is not None:
            self._slot.busy, self._slot = False, None
        self.blocks = []

    @staticmethod
    def gram(blocks: List[Tuple[int, Tensor]]) -> Tensor:
        """K = sum_j Y_j Y_j^T: float32 products, summed in float64."""
        K = None
        for _, Y in blocks:
            Kj = (Y @ Y.t()).double()
            K = Kj if K is None else K.add_(Kj)
        return K

    @classmethod
    def make(cls, blocks: List[Tuple[int, Tensor]], K: Tensor, rtol: float, slot: Optional[_Slot]) -> Optional["HeldRows"]:
        """Rows held with K (:meth:`gram`), or None when K is too ill-conditioned for the passes
        (the caller then takes the float64 route; the scratch is given back)."""
        rows = cls(blocks, K, K, 0, slot)
        if not bool(torch.isfinite(K).all()):
            rows.close()
            return None  # the float64 route reports it by name
        lam, V = torch.linalg.eigh(K)
        n = sum(Y.shape[1] for _, Y in blocks)
        passes = passes_needed(n, float(lam[0]), float(lam[-1]), rtol)  # CPU only: no device sync
        if passes is None:
            rows.close()
            return None
        rows.Kinv, rows.passes = (V / lam) @ V.t(), passes
        return rows

    def coef(self, r: Tensor) -> Tensor:
        """b = Y r, float64 [B]."""
        b = None
        for off, Y in self.blocks:
            bj = torch.mv(Y, r[off : off + Y.shape[1]]).double()
            b = bj if b is None else b.add_(bj)
        return b

    def _sub(self, r: Tensor, c: Tensor, beta: float, alpha: float, exact: bool) -> None:
        """r <- beta * r + alpha * Y^T c (float64 where ``exact``)."""
        for off, Y in self.blocks:
            rj = r[off : off + Y.shape[1]]
            if exact:
                rj.copy_(torch.addmv(rj.double(), Y.t().double(), c, beta=beta, alpha=alpha))
            else:
                rj.addmv_(Y.t(), c.to(Y.dtype), beta=beta, alpha=alpha)

    def apply_(self, r: Tensor, c: Tensor, scale: float = 1.0, exact: bool = False, shift: float = 0.0) -> None:
        """r <- scale * (P_perp r - shift * sum_i g_i) in place (r: flat float32, n), from the first
        coefficients c = K^-1 b (float64 [B]). ``exact``: the first update in float64 (cancelling
        coefficients, :func:`orthograd_fast.engine.gram.update_amplification`)."""
        ck = c  # the first update's coefficients, then each pass's
        for k in range(self.passes + 1):
            last = k == self.passes
            if last:  # the shift and the scale ride in the last GEMV
                ck = ck + shift
            self._sub(r, ck, scale if last else 1.0, -scale if last else -1.0, exact and k == 0)
            if not last:
                ck = self.Kinv @ self.coef(r)
