"""The conv route: the tile order for convolutions (ConvFactors), per-sample tiles from grouped
weight-gradient convolutions in slabs of output channels, widened to float64 for K and b."""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import held_rows
from ..conv_factors import ConvFactors
from ..factors import CHUNK_BYTES, _compute_dtype
from .base import _SlabBuffer, apply_uses_
from .held import HeldRoute


class ConvRoute(HeldRoute):
    """Every convolution call unfolds its samples' input again, whatever the number of output
    channels it produces, so the calls produce ``call_bytes`` of float32 tiles each and only the
    float64 widening goes in ``slab_bytes`` pieces (fewer calls than one per float64 slab)."""

    name = "conv"

    def __init__(self, param: Tensor, B: int, uses: List[ConvFactors], slab_bytes: int, call_bytes: int):
        super().__init__(param, B)
        self.uses = uses
        self.slab_bytes, self.call_bytes = slab_bytes, call_bytes

    @property
    def factor_dtype(self) -> torch.dtype:
        return self.uses[0].x.dtype

    def _tokens(self) -> int:
        return sum(u.tokens for u in self.uses)

    def work(self, unlearn_coef: bool = False) -> int:
        return self._tokens() * self.B * self.numel + self._gram_work()

    def _update_work(self) -> int:
        return self._tokens() * self.B * self.numel

    def _gram_coef(self, U: Tensor) -> Tuple[Tensor, Tensor]:
        return self._tiles(U, gram=True)

    def _coef(self, U: Tensor) -> Tensor:
        """b from the same float32 tiles as K."""
        return self._tiles(U, gram=False)[1]

    def apply_(self, U: Tensor, c: Tensor, scale: float = 1.0) -> None:
        apply_uses_(self.uses, U, c, scale)

    def _tiles(self, U: Tensor, gram: bool) -> Tuple[Optional[Tensor], Tensor]:
        """K (unless ``gram`` is False) and b from tiles formed call by call, widened slab by slab."""
        u0 = self.uses[0]
        O, I = u0.out_channels, u0.row  # output channels, weight entries per output channel
        B = self.B
        dev = u0.x.device
        K = torch.zeros(B, B, dtype=torch.float64, device=dev)
        b = torch.zeros(B, dtype=torch.float64, device=dev)
        Uf = U.reshape(O, -1)
        rows = max(1, min(CHUNK_BYTES, self.slab_bytes) // max(1, B * I * 8))  # float64 widening
        dt = u0._dt()  # the tiles' dtype: float32 (float64 for a float64 model)
        per_call = max(rows, self.call_bytes // max(1, B * I * torch.finfo(dt).bits // 8))  # channels per call
        if u0.groups > 1:  # a call covers whole groups
            per_call = -(-per_call // u0.channel_step) * u0.channel_step
        # samples per convolution call: its unfolded input copy stays near the slab size
        step = min(u.sample_chunk(self.slab_bytes) for u in self.uses)
        f64, u64 = _SlabBuffer(B * min(rows, O) * I, dev), _SlabBuffer(min(rows, O) * I, dev)
        for c0 in range(0, O, per_call):
            c1 = min(O, c0 + per_call)
            if step >= B:
                tiles32 = sum(u.tiles(c0, c1) for u in self.uses)
            else:
                tiles32 = torch.empty(B, (c1 - c0) * I, dtype=dt, device=dev)
                for b0 in range(0, B, step):
                    b1 = min(B, b0 + step)
                    tiles32[b0:b1] = sum(u.tiles(c0, c1, b0, b1) for u in self.uses)
            for o0 in range(c0, c1, rows):
                o1 = min(c1, o0 + rows)
                tiles = f64.take(B, (o1 - o0) * I).copy_(tiles32[:, (o0 - c0) * I : (o1 - c0) * I])
                if gram:
                    K.addmm_(tiles, tiles.t())
                b.addmv_(tiles, u64.take((o1 - o0) * I).copy_(Uf[o0:o1].reshape(-1)))
        return (K if gram else None), b

    # --- held float32 rows ---------------------------------------------------------------------
    def can_hold(self) -> bool:
        """Float32 tiles on the CPU."""
        x, gy = self.uses[0].x, self.uses[0].gy
        return x.device.type == "cpu" and _compute_dtype(x, gy) == torch.float32

    def _held_blocks(self, buf: Tensor) -> List[held_rows.Block]:
        B = self.B
        u0 = self.uses[0]
        O, I = u0.out_channels, u0.row
        per_call = max(1, min(self.call_bytes, held_rows.BLOCK_BYTES) // max(1, B * I * 4))  # channels per block
        if u0.groups > 1:
            per_call = -(-per_call // u0.channel_step) * u0.channel_step
        step = min(u.sample_chunk(self.slab_bytes) for u in self.uses)

        def form(c0, c1):
            Y = buf[B * c0 * I : B * c1 * I].view(B, (c1 - c0) * I)
            for b0 in range(0, B, step):
                b1 = min(B, b0 + step)
                Y[b0:b1] = sum(u.tiles(c0, c1, b0, b1) for u in self.uses)
            return Y

        return [(c0 * I, (min(O, c0 + per_call) - c0) * I, functools.partial(form, c0, min(O, c0 + per_call))) for c0 in range(0, O, per_call)]
