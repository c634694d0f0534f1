"""Float32 per-sample rows kept from the Gram to the update, refined by re-projection passes.

A tile, conv or lookup term on the CPU whose rows fit MAX_BYTES forms them once, in float32, as
Y [B, n]: K = Y Y^T is a float32 GEMM (on the CPU about a third of the float64 one's time, and no
float64 widening), b = Y u and the update u - Y^T c are GEMVs instead of factor GEMMs.

K's float32 rounding (||K32 - K||_2 about 0.02 eps32 sqrt(n) lambda_max, measured) leaves a
residual in the span of relative size rho = ||K32 - K||_2 / lambda_min after the update; every
pass r <- r - Y^T K^-1 (Y r) multiplies it by rho again. The passes measure what they remove
(the energy b^T K^-1 b of the span component, b = Y r) and stop when it is under TARGET of the
first update's, or at float32 resolution; a Gram whose estimated rho is above RHO_MAX, or passes
that converge slowly, send the term back to the float64 route (docs/math.md section 11).
"""

from __future__ import annotations

import math
import threading
from typing import Callable, List, Optional, Tuple, TypeVar

import torch
from torch import Tensor

from . import threads

# a block to form: (column offset, columns, a callable that forms its rows Y [B, columns] in the
# scratch and returns them)
Block = Tuple[int, int, Callable[[], Tensor]]

EPS32 = torch.finfo(torch.float32).eps
# estimate of ||K32 - K||_2 / (eps32 sqrt(n) lambda_max): about twice the largest measured (0.013
# to 0.023 on random, correlated and real-model tiles, n = 1.6e4 to 1e6); the passes measure the
# real contraction, this only screens out Grams no pass could fix
DELTA = 0.05
RHO_MAX = 0.5
# the span component left after the passes, relative to the one the first update removed (float32
# resolution: on the real-model zoo the passes stall at 1e-7 to 3e-7 of it)
TARGET = 3e-7
# passes at most, and the slowest contraction per pass accepted (else: the float64 route)
MAX_PASSES = 8
SLOW = 0.5
# float32 rows one term may hold (0: the float64 route only); a term holds them inside its own
# job, so a projection holds at most one term's rows per thread
MAX_BYTES = 64 << 20


R = TypeVar("R")


def _sum(xs: List[Tensor]) -> Tensor:
    """xs[0] + xs[1] + ... in order (the same sum whichever threads formed the parts)."""
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


# b = Y r is summed in float64 over column chunks of this many columns: one float32 GEMV's
# rounding grows with its length (measured, B = 32, n = 16384 / 65536 / 262144: 7e-8 / 2e-7 /
# 4e-7 of |y_i| |r|; at 262144 in these chunks 1e-8 to 3e-8), and the first update inherits it
# as a span component the passes must then remove (on the LSTM's tiles one pass fewer per term)
MV_CHUNK = 16384


def _mv(Y: Tensor, r: Tensor, sub: Optional[Tensor] = None) -> Tensor:
    """Y r, float64 [B], of float32 rows Y [B, n] (a row-major view) and r [n]: float32 GEMVs over
    MV_CHUNK columns, summed in float64. ``sub`` (float32 [B]): each chunk of r first becomes
    r - Y^T sub, multiplied again while it is in the core's own cache (measured, 1 core, B = 32,
    262144 columns: 2.7 ms against 3.1 to 3.5 for the update over whole blocks, whose second read
    came from the shared cache)."""
    b = None
    for s in range(0, max(Y.shape[1], 1), MV_CHUNK):
        Ys, rs = Y[:, s : s + MV_CHUNK], r[s : s + MV_CHUNK]
        if sub is not None:
            rs.addmv_(Ys.t(), sub, alpha=-1.0)
        bs = torch.mv(Ys, rs)
        b = bs.double() if b is None else b.add_(bs)
    return b


def fits(B: int, numel: int) -> bool:
    """Whether B float32 rows of ``numel`` fit :data:`MAX_BYTES`."""
    return 4 * B * numel <= MAX_BYTES


# held rows are formed, multiplied and updated in column blocks of at most this many bytes
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


def usable(n: int, lam_min: float, lam_max: float, rtol: float) -> bool:
    """Whether a float32 Gram of n columns with these extreme eigenvalues can be refined: the
    estimated contraction per pass at most RHO_MAX, and no eigenvalue within a factor 100 of the
    rank cutoff ``rtol^2 lambda_max`` (the float64 route makes that decision)."""
    if not (lam_min > 0 and math.isfinite(lam_max)) or lam_min <= 100 * rtol * rtol * lam_max:
        return False
    return DELTA * EPS32 * math.sqrt(n) * lam_max / lam_min <= RHO_MAX


class HeldRows:
    """The rows as float32 column blocks Y_j [B, n_j] (columns off_j .. off_j + n_j of the flat
    tensor; views of the thread's :func:`scratch`, at most BLOCK_BYTES each: a GEMM's working set),
    with K^-1 (float64, from a Cholesky factor of K) and the pass count."""

    def __init__(self, blocks: List[Tuple[int, Tensor]], K: Tensor, Kinv: Tensor, slot: Optional[_Slot]):
        self.blocks, self.K, self.Kinv, self._slot = blocks, K, Kinv, slot
        self._norms = K.diagonal().clamp_min(0).sqrt()  # |g_i|
        self.passes = 0  # re-projection passes the last apply_ made

    def close(self) -> None:
        """Give the scratch back (the blocks are not used again)."""
        if self._slot is not None:
            self._slot.busy, self._slot = False, None
        self.blocks = []

    @staticmethod
    def gram_coef(blocks: List[Block], r: Optional[Tensor], device) -> Tuple[list, Tensor, Optional[Tensor]]:
        """([(offset, Y_j)], K = sum_j Y_j Y_j^T, b = Y r): float32 products summed in float64
        in block order, each block's taken right after it is formed, so it is read from memory
        once while it is still in cache. A term that runs alone (every intra-op thread) runs its
        blocks side by side on one thread each (threads.side_by_side: B-row-wide GEMMs gain less
        from two threads on one block); inside a side-by-side job they run in order. ``r`` None:
        no b (rows formed before u is known, orthograd_fast.engine.prefetch; b comes later from one
        read of the rows, :meth:`coef`)."""

        def job(blk):
            off, n, form = blk
            Y = form()
            return (off, Y), (Y @ Y.t()).double(), None if r is None else _mv(Y, r[off : off + n])

        got = threads.side_by_side(job, blocks, [n for _, n, _ in blocks], device)
        b = None if r is None else _sum([g[2] for g in got])
        return [g[0] for g in got], _sum([g[1] for g in got]), b

    @classmethod
    def make(cls, blocks: List[Tuple[int, Tensor]], K: Tensor, rtol: float, slot: Optional[_Slot]) -> Optional["HeldRows"]:
        """Rows held with K (:meth:`gram_coef`), or None when K is not :func:`usable` (the caller then
        takes the float64 route; the scratch is given back)."""
        # A non-finite K (a non-finite sum) goes to the float64 route, which reports it by name.
        # The extreme eigenvalues decide; K^-1 comes from a Cholesky factor (a usable K is well
        # conditioned): on 32 x 32 Grams 60 + 40 us against 105-173 us for the eigenvectors.
        # CPU only: the host reads cost no device sync.
        if math.isfinite(float(K.sum())):
            lo, hi = torch.linalg.eigvalsh(K)[[0, -1]].tolist()
            if usable(sum(Y.shape[1] for _, Y in blocks), lo, hi, rtol):
                L, info = torch.linalg.cholesky_ex(K)
                if int(info) == 0:
                    return cls(blocks, K, torch.cholesky_inverse(L), slot)
        if slot is not None:
            slot.busy = False
        return None

    def amplification(self, c: Tensor) -> float:
        """routes.base.update_amplification(K, c) read on the host at once: sum_i |c_i| |g_i| /
        |sum_i c_i g_i| (inf for cancelling terms with a zero update)."""
        total, size2 = float(c.abs() @ self._norms), float(c @ (self.K @ c))
        if size2 > 0:
            return total / math.sqrt(size2)
        return math.inf if total > 0 else 0.0

    def _map(self, fn: Callable[[int, Tensor], R]) -> List[R]:
        """[fn(offset, Y_j)] over the blocks, side by side like :meth:`gram_coef`'s."""
        return threads.side_by_side(lambda blk: fn(*blk), self.blocks, [Y.shape[1] for _, Y in self.blocks], self.K.device)

    def coef(self, r: Tensor) -> Tensor:
        """b = Y r, float64 [B]."""
        return _sum(self._map(lambda off, Y: _mv(Y, r[off : off + Y.shape[1]])))

    def _sub(self, r: Tensor, c: Tensor, beta: float, alpha: float) -> None:
        """r <- beta * r + alpha * Y^T c."""
        c32 = c.to(torch.float32)
        self._map(lambda off, Y: r[off : off + Y.shape[1]].addmv_(Y.t(), c32, beta=beta, alpha=alpha))

    def _sweep(self, r: Tensor, c: Tensor, exact: bool = False) -> Tensor:
        """r <- r - Y^T c, then b = Y r of the result (float64 [B]), in column chunks (:func:`_mv`):
        each chunk is read from memory once and multiplied again while it is in cache.
        ``exact``: the update's first GEMV in float64, block by block."""
        c32 = c.to(torch.float32)

        def sweep(off, Y):
            rj = r[off : off + Y.shape[1]]
            if exact:
                rj.copy_(torch.addmv(rj.double(), Y.t().double(), c, alpha=-1.0))
                return _mv(Y, rj)
            return _mv(Y, rj, c32)

        return _sum(self._map(sweep))

    def apply_(self, r: Tensor, c: Tensor, scale: float = 1.0, exact: bool = False, shift: float = 0.0) -> bool:
        """r <- scale * (P_perp r - shift * sum_i g_i) in place (r: flat float32, n), from the first
        coefficients c = K^-1 b (float64 [B]). ``exact``: the first update in float64 (cancelling
        coefficients, :func:`orthograd_fast.engine.gram.update_amplification`). False when the
        passes did not converge (r is then partly updated: the caller works on a copy).

        Each sweep updates r and measures what the span still holds in one read of the rows (the
        update and the next b used to be separate reads, and a last GEMV applied the final
        correction); the last correction, under TARGET, is dropped unless a shift needs a GEMV."""
        b = self._sweep(r, c, exact)
        first = float(c @ (self.K @ c))  # energy of the span component the first update removed
        floor = self.noise_floor(r)
        prev = first
        for k in range(MAX_PASSES):
            ck = self.Kinv @ b
            energy = float(ck @ (self.K @ ck))
            if energy <= max(TARGET * TARGET * first, floor):
                break
            if energy > SLOW * SLOW * prev:
                return False
            b = self._sweep(r, ck)
            prev = energy
            self.passes = k + 1
        else:
            return False
        if shift:
            self._sub(r, ck + shift, scale, -scale)  # the shift and the scale ride in one GEMV
        elif scale != 1.0:
            r.mul_(scale)
        return True

    def noise_floor(self, r: Tensor) -> float:
        """The energy b^T K^-1 b that float32 rounding of b = Y r alone gives: about (2 eps32)^2
        |r|^2 times how much K^-1 magnifies it (max K_ii max (K^-1)_ii, at least the condition
        number). Measured: the passes stall at 0.3 to 2 times eps32^2 |r|^2 max K_ii max (K^-1)_ii
        on real-model tiles, 50 times below it on nearly collinear float32-exact rows."""
        return 4 * EPS32 * EPS32 * float(r @ r) * float(self.K.diagonal().max()) * float(self.Kinv.diagonal().max())
