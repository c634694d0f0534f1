"""The lookup route: embedding tables (one-hot uses, possibly tied to dense ones of the same
[V, d] view) as per-sample rows, a slab of table rows at a time: B^2 V d flops instead of the
token route's (B T)^2 d, and never B x V x d at once."""

from __future__ import annotations

import functools
from typing import List, Tuple

import torch
from torch import Tensor

from .. import held_rows
from ..factors import OuterFactors, _compute_dtype
from .base import _SlabBuffer, apply_uses_
from .held import HeldRoute


class LookupRoute(HeldRoute):
    """Rows by index_add for lookups and per-sample tiles for dense uses (formed in the factors'
    dtype and widened, like the tile route), in slabs of about ``slab_bytes`` float64."""

    name = "lookup"

    def __init__(self, param: Tensor, B: int, uses: List[OuterFactors], slab_bytes: int):
        super().__init__(param, B)
        self.uses = uses
        self.slab_bytes = slab_bytes

    def work(self, unlearn_coef: bool = False) -> int:
        return self._gram_work()

    def _coef(self, U: Tensor) -> Tensor:
        return sum(u.coef(U) for u in self.uses)

    def apply_(self, U: Tensor, c: Tensor, scale: float = 1.0) -> None:
        apply_uses_(self.uses, U, c, scale)

    def _parts(self, rows: int) -> list:
        """Per use, for slabs of ``rows`` table rows: (None, None, A, D, None) for a dense use (A in
        the tiles' dtype), (ids, sample, A, None, bounds) for lookups sorted by table row, where
        slab k's lookups are the range bounds[k]:bounds[k + 1]."""
        _, O, I = self.uses[0].shape
        B = self.B
        starts = torch.arange(0, O + rows, rows, device=self.uses[0].A.device).clamp_max(O)
        flat = []
        for u in self.uses:
            T = u.A.shape[1]
            if u.ids is None:
                dt = _compute_dtype(u.A, u.D)  # per-sample tiles in the factors' dtype, like the tile route
                flat.append((None, None, u.A[:, :, 0, :].to(dt), u.D[:, :, 0, :], None))
            else:
                # tokens sorted by table row once: each slab's lookups are one contiguous range,
                # and the ranges of all slabs come from one searchsorted (one host sync per use)
                ids, order = u.ids.reshape(-1).sort()
                sample = torch.div(order, T, rounding_mode="floor")
                A = u.A[:, :, 0, :].reshape(B * T, I)[order]
                flat.append((ids, sample, A, None, torch.searchsorted(ids, starts).tolist()))
        return flat

    def _gram_coef(self, U: Tensor) -> Tuple[Tensor, Tensor]:
        """The float64 rows of a slab of table rows at a time; K and b accumulated over slabs."""
        _, O, I = self.uses[0].shape
        B = self.B
        dev = self.uses[0].A.device
        K = torch.zeros(B, B, dtype=torch.float64, device=dev)
        b = torch.zeros(B, dtype=torch.float64, device=dev)
        Uv = self.uses[0].view(U)[0]  # [V, d]; every use has the same orientation here
        rows = max(1, self.slab_bytes // max(1, B * I * 8))
        flat = self._parts(rows)
        n = min(rows, O) * I
        f64, u64 = _SlabBuffer(B * n, dev), _SlabBuffer(n, dev)
        t32 = {dt: _SlabBuffer(B * n, dev, dt) for dt in {A.dtype for ids, _, A, _, _ in flat if ids is None}}
        for k, o0 in enumerate(range(0, O, rows)):
            o1 = min(O, o0 + rows)
            r = o1 - o0
            slab = f64.take(B * r, I).zero_()
            for ids, sample, A, D, bounds in flat:
                if ids is None:  # a slab of per-sample tiles (a tied head's D is B x T x V), widened
                    slab += torch.bmm(D[:, :, o0:o1].to(A.dtype).transpose(1, 2), A, out=t32[A.dtype].take(B, r, I)).view(B * r, I)
                else:
                    lo, hi = bounds[k], bounds[k + 1]
                    slab.index_add_(0, sample[lo:hi] * r + (ids[lo:hi] - o0), A[lo:hi].double())
            S = slab.view(B, r * I)
            K.addmm_(S, S.t())
            b.addmv_(S, u64.take(r * I).copy_(Uv[o0:o1].reshape(-1)))
        return K, b

    # --- held float32 rows ---------------------------------------------------------------------
    def can_hold(self) -> bool:
        return self.holdable(self.uses)

    @staticmethod
    def holdable(us) -> bool:
        """Float32 lookups and tiles on the CPU."""
        dense = all(u.D is None or _compute_dtype(u.A, u.D) == torch.float32 for u in us)
        return us[0].A.device.type == "cpu" and dense and all(u.A.dtype == torch.float32 for u in us)

    def _held_view(self, U: Tensor) -> Tensor:
        return self.uses[0].view(U)[0]

    def _held_blocks(self, buf: Tensor) -> List[held_rows.Block]:
        """Slabs of table rows: index_add for lookups, tiles for dense uses."""
        B = self.B
        _, O, I = self.uses[0].shape
        rows = max(1, held_rows.BLOCK_BYTES // (4 * B * I))
        flat = self._parts(rows)

        def form(k, o0, o1):
            r = o1 - o0
            Y = buf[B * o0 * I : B * o1 * I].view(B, r * I).zero_()
            for ids, sample, A, D, bounds in flat:
                if ids is None:
                    Y.view(B, r, I).baddbmm_(D[:, :, o0:o1].to(A.dtype).transpose(1, 2), A)
                else:
                    lo, hi = bounds[k], bounds[k + 1]
                    Y.view(B * r, I).index_add_(0, sample[lo:hi] * r + (ids[lo:hi] - o0), A[lo:hi])
            return Y

        starts = range(0, O, rows)
        return [(o0 * I, (min(O, o0 + rows) - o0) * I, functools.partial(form, k, o0, min(O, o0 + rows))) for k, o0 in enumerate(starts)]
