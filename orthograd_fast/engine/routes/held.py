"""Routes that can keep their per-sample rows in float32 from the Gram to the update (tile, conv
and lookup on the CPU): K from a float32 GEMM, refined by re-projection passes
(:mod:`orthograd_fast.engine.held_rows`, docs/math.md section 11)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import held_rows
from .base import EXACT_UPDATE_TOL, Route


class HeldRoute(Route):
    """A route whose float32 rows fit in blocks. ``hold`` is asked by the projection's plan
    (gram.hold_rows), ``rows`` is set by the Gram and dropped by the update; without them the
    subclass's float64 route runs (:meth:`_gram_coef`, :meth:`_coef`)."""

    holds = True

    def __init__(self, param: Tensor, B: int):
        super().__init__(param, B)
        self.hold, self.hold_rtol = False, 0.0
        self.rows: Optional[held_rows.HeldRows] = None
        self._k32 = False  # K came from float32 rows
        # (U, U._version, U's flat float32 copy): the copy b was taken from, for the update
        self._copied: Optional[tuple] = None

    def _gram_work(self) -> int:
        """The Gram's multiply-adds: a float32 GEMM when the rows are held, float64 otherwise."""
        return (1 if self.hold else 2) * self.B * self.B * self.numel

    def update_work(self) -> int:
        if self.hold:  # GEMVs: the update and the passes
            return 2 * (held_rows.MAX_PASSES + 1) * self.B * self.numel
        return self._update_work()

    def _update_work(self) -> int:
        return self.B * self.numel

    def gram_coef(self, U: Tensor, b: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if self._k32 and self.rows is None:  # a float32 K whose rows the update dropped: form again
            self.K, self._k32 = None, False
        if self.K is None and self.hold:
            held = self._held_gram_coef(U)
            if held is not None:
                self.K = held[0]
                return held
        return super().gram_coef(U, b)

    def coef(self, U: Tensor) -> Tensor:
        if self.rows is not None:
            return self.rows.coef(self._flat_kept(U))
        return self._coef(U)

    def _coef(self, U: Tensor) -> Tensor:
        raise NotImplementedError

    def _held_view(self, U: Tensor) -> Tensor:
        """U in the layout of the held rows' columns."""
        return U

    def _held_blocks(self, buf: Tensor) -> List[held_rows.Block]:
        """Every per-sample row, float32, as column blocks (offset, n_j, form) in the order of
        :meth:`_held_view`, each at most held_rows.BLOCK_BYTES: ``form()`` writes the block's rows
        into ``buf`` (B * numel: block j from B * offset) and returns them as [B, n_j]. The
        blocks are independent (formed side by side where the term runs alone)."""
        raise NotImplementedError

    def _flat(self, U: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """U as the flat float32 vector the held rows' columns index, and the view to copy it back
        into (None when the vector is that view itself)."""
        V = self._held_view(U)
        if V.dtype == torch.float32 and V.is_contiguous():
            return V.view(-1), None
        return torch.empty(V.shape, dtype=torch.float32, device=V.device).copy_(V).view(-1), V  # one copy

    def _flat_kept(self, U: Tensor) -> Tensor:
        """:meth:`_flat`'s vector, a copy kept for the update (:meth:`project_held_`) while U is
        not written: a transposed weight (GPT-2's Conv1D) is then copied once, not twice."""
        r, back = self._flat(U)
        if back is not None:
            self._copied = (U, U._version, r)
        return r

    def _held_gram_coef(self, U: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        """K from the float32 rows, kept for the update; None (and ``hold`` off) where K is too
        ill-conditioned for the re-projection passes or the rank tolerance could act."""
        buf, slot = held_rows.scratch(self.B * self.numel, self.param.device)
        # K and b block by block, each block's products right after it is formed (still in cache)
        blocks, K, b = held_rows.HeldRows.gram_coef(self._held_blocks(buf), self._flat_kept(U), buf.device)
        return (K, b) if self._keep(held_rows.HeldRows.make(blocks, K, self.hold_rtol, slot), K) else None

    def _keep(self, rows: Optional[held_rows.HeldRows], K: Tensor) -> bool:
        """Hold ``rows`` with their K; None (K not usable): the float64 route from now on."""
        if rows is None:
            self.hold, self.hold_refused, self._copied = False, True, None
            return False
        self.rows, self.K, self._k32 = rows, K, True
        return True

    def prepare_held(self, buf: Tensor) -> None:
        """The float32 rows, formed into ``buf`` (B * numel, the caller's: it outlives this
        projection), and K from them, before u is known (orthograd_fast.engine.prefetch): the Gram
        job then only reads the rows once for b. Where K is not usable the rows go and the term
        takes the float64 route (``hold_refused``)."""
        blocks, K, _ = held_rows.HeldRows.gram_coef(self._held_blocks(buf), None, buf.device)
        self._keep(held_rows.HeldRows.make(blocks, K, self.hold_rtol, None), K)

    def project_held_(self, U: Tensor, b: Tensor, scale: float = 1.0, shift: float = 0.0, source: Optional[Tensor] = None) -> bool:
        """U <- scale * (P_perp U - shift * sum_i g_i) in place from the held rows (c = K^-1 b);
        the rows are dropped. False when the passes did not converge: U is then partly updated
        and the route is set back to float64 (the next gram_coef forms its Gram again).
        ``source``: the tensor U is a copy of (default U itself): where b was taken from a copy
        of it in the rows' layout (:meth:`_flat_kept`) and it has not been written since, that
        copy is updated and written back into U."""
        rows = self.rows
        c = rows.Kinv @ b
        exact = rows.amplification(c + shift) * held_rows.EPS32 > EXACT_UPDATE_TOL
        copied, self._copied = self._copied, None
        src = U if source is None else source
        if copied is not None and copied[0] is src and copied[1] == src._version:
            r, back = copied[2], self._held_view(U)  # (U: the source's values, written back into U)
        else:
            r, back = self._flat(U)
        ok = rows.apply_(r, c, scale, exact, shift)
        if ok and back is not None:
            _copy_back(back, r.view(back.shape))
        self.drop_rows()
        if not ok:
            self.hold = False
        return ok

    def drop_rows(self) -> None:
        """Forget the held rows (their scratch goes back to the thread)."""
        self._copied = None
        if self.rows is not None:
            self.rows.close()
            self.rows = None


def _copy_back(dst: Tensor, src: Tensor) -> None:
    """dst <- src, both seen in the order of dst's strides (largest first): torch walks a copy in
    its destination's order, and a transposed destination is written line by line (measured, one
    core, a [1024, 256] float32 gradient from its transpose: 0.76 ms written through the
    transposed view, 0.14 ms with the views permuted)."""
    perm = sorted(range(dst.dim()), key=lambda d: -dst.stride(d))
    dst.permute(perm).copy_(src.permute(perm))
