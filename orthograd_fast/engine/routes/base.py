"""The route interface and the helpers every route shares (docs/math.md sections 3 to 5 and 9)."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

# Updates whose float32 rounding would exceed this, relative to the update, are formed in float64.
EXACT_UPDATE_TOL = 1e-5


class _SlabBuffer:
    """One scratch allocation reused by every slab of a term's loop: a fresh multi-MiB tensor per
    slab costs page faults (measured on 2 CPU cores: 20-35% of the tile route's Gram and
    coefficients for 2-8 MiB slabs). ``take`` returns a contiguous view of its first elements."""

    def __init__(self, n: int, device, dtype=torch.float64):
        self.flat = torch.empty(n, dtype=dtype, device=device)

    def take(self, *shape: int) -> Tensor:
        return self.flat[: math.prod(shape)].view(shape)


def update_amplification(K: Tensor, c: Tensor) -> Tensor:
    """sum_i |c_i| |g_i| / |sum_i c_i g_i| for K [..., B, B], c [..., B]: how much larger the
    update's terms are than the update. A GEMM in precision eps rounds the update by about eps
    times this, relative to its size (inf for cancelling terms with a zero update)."""
    g = K.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    size = (c * (K @ c.unsqueeze(-1)).squeeze(-1)).sum(-1).clamp_min(0).sqrt()
    total = (c.abs() * g).sum(-1)
    return torch.where(size > 0, total / size.clamp_min(1e-300), torch.where(total > 0, float("inf"), 0.0))


def apply_uses_(uses: list, U: Tensor, c: Tensor, scale: float) -> None:
    """U <- scale * (U - sum over the uses of their sum_i c_i g_i), one use at a time."""
    for u in uses:
        u.apply_(U, c)
    if scale != 1.0:
        U.mul_(scale)


class Route:
    """How one tensor's K, b and update are evaluated. The route keeps K once formed (``K``; the
    projection may replace it by its own view of the stacked Grams) and answers for its own cost.

    Subclasses set ``name`` (PerSampleGrads.mode) and implement :meth:`_gram_coef`, :meth:`coef`,
    :meth:`apply_` and :meth:`work`."""

    name = ""
    approx = False  # K accumulated in float32 (the Triton kernels): one more re-projection pass
    on_triton = False
    use = None  # the one dense factored use (tile and ghost routes)
    uses: Optional[list] = None  # the uses, evaluated one by one (tokens, lookup, conv)
    G: Optional[Tensor] = None  # float64 rows (explicit route)
    # a one-token weight's bias whose Gram D D^T the weight's job forms (ghost route only)
    shared_bias = None
    # held float32 rows (routes.held.HeldRoute; never on the other routes: ``holds`` False)
    holds = False
    hold, hold_rtol, rows = False, 0.0, None
    hold_refused = False  # float32 rows whose K was not usable: the float64 route for this span

    def __init__(self, param: Tensor, B: int):
        self.param = param
        self.numel = param.numel()
        self.B = B
        self.K: Optional[Tensor] = None

    @property
    def factor_dtype(self) -> torch.dtype:
        """dtype of the captured factors (picks the default rank tolerance)."""
        return self.param.dtype if self.use is None else self.use.a_dtype

    def work(self, unlearn_coef: bool = False) -> int:
        """Rough multiply-adds of gram_coef, float64 ones counted twice."""
        raise NotImplementedError

    def update_work(self) -> int:
        """Rough multiply-adds of apply_ (the update GEMM)."""
        return self.B * self.numel

    def spreadable(self) -> bool:
        """Whether its scratch memory is a few slabs, so that it may run beside other terms."""
        return True

    def gram_coef(self, U: Tensor, b: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(K, b) float64; K formed once. ``b`` (known coefficients) only matters where the route
        can form K alone (ghost)."""
        if self.K is not None:
            return self.K, self.coef(U)
        self.K, b = self._gram_coef(U)
        return self.K, b

    def _gram_coef(self, U: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def coef(self, U: Tensor) -> Tensor:
        """b_i = <g_i, U>, float64 [B]."""
        raise NotImplementedError

    def apply_(self, U: Tensor, c: Tensor, scale: float = 1.0) -> None:
        """U <- scale * (U - sum_i c_i g_i) in place, in U's dtype."""
        raise NotImplementedError

    def unlearn_coef_cheaper(self, fuses: List) -> bool:
        """Whether b is cheaper from og.forget()'s factors (ghost route only)."""
        return False

    def can_hold(self) -> bool:
        """Whether the route can keep its float32 rows (routes.held)."""
        return False

    def prepare_held(self, buf: Tensor) -> None:
        """Form the held rows and K before u is known (routes.held)."""
        raise NotImplementedError(f"{type(self).__name__} holds no rows")

    def drop_rows(self) -> None:
        """Forget held rows (none here)."""


class UsesRoute(Route):
    """A route that evaluates its uses one by one (``uses``): b and the update use by use (the
    gathers and scatters of one-hot uses), K from the subclass's :meth:`_gram`."""

    def _gram_coef(self, U: Tensor) -> Tuple[Tensor, Tensor]:
        return self._gram(), self.coef(U)

    def coef(self, U: Tensor) -> Tensor:
        return sum(u.coef(U) for u in self.uses)

    def apply_(self, U: Tensor, c: Tensor, scale: float = 1.0) -> None:
        apply_uses_(self.uses, U, c, scale)

    def _gram(self) -> Tensor:
        raise NotImplementedError
