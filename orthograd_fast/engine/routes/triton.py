"""The tile and ghost routes on the fused Triton kernels: K and b accumulated in float32, so the
terms are ``approx`` and the engine adds one re-projection pass and a coarser rank tolerance
(:mod:`orthograd_fast.engine.solve`)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..factors import OuterFactors, _compute_dtype
from .base import Route
from .ghost import GhostRoute
from .tile import TileRoute


def kernels_take(use: OuterFactors, backend: str) -> bool:
    """The kernels take one group of dense fp32/bf16/fp16 factors; grouped uses, embeddings and
    float64 models stay on the torch path."""
    return (
        backend == "triton"
        and use.shape[0] == 1
        and use.A.dtype != torch.float64
        and use.D.dtype != torch.float64
    )


class _Kernels:
    """K, b and the coefficients of the second pass from the kernels (which read strided factors
    directly); the update is the torch route's factor GEMM."""

    approx = True
    on_triton = True
    _launch = ""  # the kernel: triton_ops.tile_gram or triton_ops.ghost_gram

    def gram_coef(self, U: Tensor, b: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return Route.gram_coef(self, U)  # b is never known here (unlearn_coef_cheaper is False)

    def _factors(self) -> Tuple[Tensor, Tensor]:
        return self.use.A[:, :, 0, :], self.use.D[:, :, 0, :]

    def _gram_coef(self, U: Tensor) -> Tuple[Tensor, Tensor]:
        from .. import triton_ops

        A, D = self._factors()
        if A.dtype != D.dtype:
            dt = _compute_dtype(A, D)
            A, D = A.to(dt), D.to(dt)
        K, b = getattr(triton_ops, self._launch)(A, D, self.use.view(U)[0])
        return K.double(), b.double()

    def coef(self, U: Tensor) -> Tensor:
        from .. import triton_ops

        A, D = self._factors()
        return triton_ops.coef(A, D, self.use.view(U)[0]).double()

    def can_hold(self) -> bool:
        return False

    def unlearn_coef_cheaper(self, fuses: List[OuterFactors]) -> bool:
        return False


class TritonTileRoute(_Kernels, TileRoute):
    """Per-sample tiles formed on chip and never stored (triton_ops.tile_gram)."""

    _launch = "tile_gram"


class TritonGhostRoute(_Kernels, GhostRoute):
    """Token Grams of sample-block pairs on chip (triton_ops.ghost_gram)."""

    _launch = "ghost_gram"
