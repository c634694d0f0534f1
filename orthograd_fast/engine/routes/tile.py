"""The tile route: one dense factored use, per-sample tiles D_b^T A_b first (docs/math.md
section 3), formed in slabs in the factors' dtype and reduced to K and b in float64."""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import held_rows
from ..factors import CHUNK_BYTES, OuterFactors, _compute_dtype
from ..route import TILE
from .base import _SlabBuffer
from .held import HeldRoute


class TileRoute(HeldRoute):
    """Per-sample tiles in slabs of output rows of about ``slab_bytes`` float64 each (small
    enough to stay in cache between forming, widening and the Gram GEMM)."""

    name = TILE

    def __init__(self, param: Tensor, B: int, use: OuterFactors, slab_bytes: int):
        super().__init__(param, B)
        self.use = use
        self.slab_bytes = slab_bytes

    def work(self, unlearn_coef: bool = False) -> int:
        return self.B * self.use.a_shape[1] * self.numel + self._gram_work()  # float32 tiles, then K

    def _update_work(self) -> int:
        return self.use.a_shape[1] * self.B * self.numel

    def _gram_coef(self, U: Tensor) -> Tuple[Tensor, Tensor]:
        return self._tiles(U, gram=True)

    def _coef(self, U: Tensor) -> Tensor:
        """b from the same float32 tiles as K (K^-1 amplifies any mismatch between K and b)."""
        return self._tiles(U, gram=False)[1]

    def apply_(self, U: Tensor, c: Tensor, scale: float = 1.0) -> None:
        self.use.apply_(U, c, scale)

    def _tiles(self, U: Tensor, gram: bool) -> Tuple[Optional[Tensor], Tensor]:
        """Per-sample tiles D_b^T A_b in slabs of output rows; K (unless ``gram`` is False) and b
        accumulated in fp64."""
        use = self.use
        dt = _compute_dtype(use.A, use.D)
        A, D = use.A.to(dt), use.D.to(dt)
        B, T, G, I = A.shape
        O = D.shape[-1]
        Uv = use.view(U)
        K = torch.zeros(B, B, dtype=torch.float64, device=A.device)
        b = torch.zeros(B, dtype=torch.float64, device=A.device)
        rows = max(1, min(CHUNK_BYTES, self.slab_bytes) // max(1, B * G * I * 8))
        Dt = D[:, :, 0, :].transpose(1, 2) if G == 1 else None  # [B, O, T], a transposed view: no copy
        n = min(rows, O) * G * I
        f64, u64 = _SlabBuffer(B * n, A.device), _SlabBuffer(n, A.device)
        t32 = _SlabBuffer(B * n, A.device, dt) if G == 1 and dt != torch.float64 else None
        for o0 in range(0, O, rows):
            o1 = min(O, o0 + rows)
            r = o1 - o0
            tiles = f64.take(B, r * G * I)  # the same float64 values as .double() of the tiles
            if G == 1:
                if t32 is None:  # float64 factors: straight into the slab
                    torch.bmm(Dt[:, o0:o1], A[:, :, 0, :], out=tiles.view(B, r, I))
                else:
                    tiles.view(B, r, I).copy_(torch.bmm(Dt[:, o0:o1], A[:, :, 0, :], out=t32.take(B, r, I)))
            else:
                tiles.view(B, G, r, I).copy_(torch.einsum("btgo,btgi->bgoi", D[..., o0:o1], A))
            if gram:
                K.addmm_(tiles, tiles.t())
            b.addmv_(tiles, u64.take(r * G * I).view(G, r, I).copy_(Uv[:, o0:o1, :]).view(-1))
        return (K if gram else None), b

    # --- held float32 rows ---------------------------------------------------------------------
    def can_hold(self) -> bool:
        """Float32 tiles on the CPU."""
        return self.use.device.type == "cpu" and self.use.compute_dtype == torch.float32

    def _flipped(self) -> bool:
        """Hold the tiles transposed, [I, O] per sample, for a weight stored [I, O] (GPT-2's
        Conv1D; one group): the rows are then in the gradient's own layout, which b and the
        update read without a copy (measured, one core, B = 32, a whole term paired: 0.94x-0.96x
        at T = 32-64, O x I = 384-512 x 128 and 128 x 128-512, 1.01x at T = 64, 128 x 512). For
        a weight stored [O, I] the transposed tiles need that copy, and the faster batched GEMM
        of O > I does not pay for it (0.99x-1.07x at O = 512-1024, I = 128-256)."""
        return self.use.transposed and self.use.a_shape[2] == 1

    def _held_view(self, U: Tensor) -> Tensor:
        V = self.use.view(U)
        return V.transpose(1, 2) if self._flipped() else V

    def _held_blocks(self, buf: Tensor) -> List[held_rows.Block]:
        B = self.B
        A, D = self.use.A.float(), self.use.D.float()
        _, T, G, I = A.shape
        O = D.shape[-1]
        if self._flipped():  # blocks of input columns: tiles^T A_b^T D_b, rows of O
            At, D0 = A[:, :, 0, :].transpose(1, 2), D[:, :, 0, :]  # [B, I, T] (a view), [B, T, O]
            rows = max(1, held_rows.BLOCK_BYTES // (4 * B * O))
            out = []
            for i0 in range(0, I, rows):
                i1 = min(I, i0 + rows)
                Y = buf[B * i0 * O : B * i1 * O].view(B, (i1 - i0) * O)
                out.append((i0 * O, (i1 - i0) * O, functools.partial(_bmm_rows, At[:, i0:i1], D0, Y)))
            return out
        rows = max(1, held_rows.BLOCK_BYTES // (4 * B * I))  # output rows per block
        out = []
        for g in range(G):
            Dt = D[:, :, g, :].transpose(1, 2)  # [B, O, T], a view
            for o0 in range(0, O, rows):
                o1 = min(O, o0 + rows)
                off = (g * O + o0) * I
                Y = buf[B * off : B * (off + (o1 - o0) * I)].view(B, (o1 - o0) * I)
                out.append((off, (o1 - o0) * I, functools.partial(_bmm_rows, Dt[:, o0:o1], A[:, :, g, :], Y)))
        return out


def _bmm_rows(Dt: Tensor, A: Tensor, Y: Tensor) -> Tensor:
    """Per-sample products Dt_b A_b [B, r, C] into Y [B, r C] (tiles, or their transposes)."""
    torch.bmm(Dt, A, out=Y.view(Y.shape[0], Dt.shape[1], A.shape[2]))
    return Y
