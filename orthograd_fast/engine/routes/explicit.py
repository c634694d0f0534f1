"""The explicit route: every use materialized as float64 rows G [B, numel] (small tensors, or
uses of different kinds), and groups of such terms evaluated as one batch (docs/math.md section 8)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..factors import ExplicitRows, explicit_rows
from .base import Route


class ExplicitRoute(Route):
    """K = G G^T, b = G u and u - G^T c from the rows, formed on first use."""

    name = "explicit"

    def __init__(self, param: Tensor, B: int, uses: list):
        super().__init__(param, B)
        self._G: Optional[Tensor] = None
        self._G_uses: Optional[list] = uses
        self._stacked: Optional[Tuple[Tensor, int]] = None  # (a group's stacked rows, this term's index)

    @property
    def G(self) -> Tensor:
        """[B, numel] float64 rows, formed on first use: inside the term's own job, on its own
        thread (orthograd_fast.engine.threads)."""
        if self._G is None:
            if self._stacked is not None:
                G, j = self._stacked
                self._G, self._stacked = G[j], None
            else:
                self._G = explicit_rows(self._G_uses)
            self._G_uses = None
        return self._G

    def work(self, unlearn_coef: bool = False) -> int:
        return 2 * self.B * self.B * self.numel

    def _gram_coef(self, U: Tensor) -> Tuple[Tensor, Tensor]:
        return self.G @ self.G.t(), self.G @ U.reshape(-1).double()

    def coef(self, U: Tensor) -> Tensor:
        return self.G @ U.reshape(-1).double()

    def apply_(self, U: Tensor, c: Tensor, scale: float = 1.0) -> None:
        U.view(-1).sub_((c.double() @ self.G).to(U.dtype))
        if scale != 1.0:
            U.mul_(scale)


class ExplicitGroup:
    """Explicit terms (float64 rows G [B, n]) of one size, one dtype and one device, evaluated as one
    batch: K and b by one bmm each, the update by one bmm and one grouped copy back, instead of
    several small ops per tensor (a ViT has ~100 biases and norm weights; per-op host time would
    dominate). The same numbers as the per-term path, the update formed in float64."""

    def __init__(self, terms: list, ks: List[int], rows: Tensor, shape: Optional[torch.Size] = None):
        self.terms = terms  # orthograd_fast.engine.gram.PerSampleGrads, all on the explicit route
        self.ks = ks  # the members' positions in the projection's list of active tensors
        self.rows = rows  # the same as an index tensor
        self.shape = shape  # the members' common shape (None: shapes differ): stacked without reshapes
        self.B = terms[0].B
        self.numel = terms[0].numel
        self._G: Optional[Tensor] = None
        self._U: Optional[Tensor] = None

    @staticmethod
    def key(t) -> Optional[tuple]:
        """Terms with equal keys may share a group (None: not groupable)."""
        if not isinstance(t.route, ExplicitRoute) or t.gram_source is not None:
            return None
        return (t.B, t.numel, t.param.dtype, t.param.device)

    def work(self) -> int:  # the members' PerSampleGrads.work(), summed
        return 2 * self.B * self.B * self.numel * len(self.terms)

    def update_work(self) -> int:
        return self.B * self.numel * len(self.terms)

    def gram_coef(self, Us: List[Tensor], want_K: bool = True) -> Tuple[Optional[Tensor], Tensor]:
        """(K [m, B, B], b [m, B]) float64 for the members' tensors ``Us`` (the engine keeps each
        member's K from the projection's stack). ``want_K`` False: K is not formed (None), for a
        group solved by :meth:`solve_columns`, which needs the rows and the tensors only (b still
        carries the finiteness of both)."""
        G = stacked_rows(self.terms)
        U = torch.stack(Us) if self.shape is not None else torch.stack([u.reshape(-1) for u in Us])
        U = U.reshape(len(Us), -1).double()
        self._G, self._U = G, U
        K = torch.bmm(G, G.transpose(1, 2)) if want_K else None
        b = torch.bmm(G, U.unsqueeze(-1)).squeeze(-1)
        return K, b

    def solve_columns(self, rtol: float, eigh_only: bool = False, refused: Optional[list] = None) -> Tensor:
        """c [m, B] from the members' n x n column Grams (numel < B: see solve.solve_columns), from
        the rows and tensors gram_coef stacked (``eigh_only``, ``refused``: solve.solve_psd)."""
        from ..solve import solve_columns_stacked

        return solve_columns_stacked(self._G, self._U, rtol, eigh_only, refused)

    def apply_(self, Us: List[Tensor], c: Tensor, scale: float = 1.0) -> None:
        """Us[j] <- scale * (Us[j] - sum_i c[j, i] g_ji), from the float64 copy made by gram_coef
        (Us must be unchanged since)."""
        res = self._U - torch.bmm(c.double().unsqueeze(1), self._G).squeeze(1)
        if scale != 1.0:
            res.mul_(scale)
        res = res.to(Us[0].dtype)
        if self.shape is not None:
            torch._foreach_copy_(Us, res.view(len(Us), *self.shape).unbind(0))
        else:
            torch._foreach_copy_(Us, [r.view(u.shape) for r, u in zip(res.unbind(0), Us)])
        self._U = None


def stacked_rows(terms: list) -> Tensor:
    """[m, B, n] float64: the explicit terms' rows stacked. Members that still hold their given
    rows (small tensors' rows, formed at the retain exit) are stacked and widened by one op each,
    and their ``G`` become views of the stack (formed when asked), instead of a widening and a
    view per member."""
    routes = [t.route for t in terms]
    rows = []  # each member's one given ExplicitRows, while all have one of one dtype
    dt = None
    for r in routes:
        u = r._G_uses if r._G is None and r._stacked is None else None
        if u is None or len(u) != 1 or type(u[0]) is not ExplicitRows or (dt is not None and u[0].G.dtype != dt):
            return torch.stack([t.G for t in terms])
        dt = u[0].G.dtype
        rows.append(u[0].G)
    G = torch.stack(rows).double()
    for j, r in enumerate(routes):
        r._stacked, r._G_uses = (G, j), None
    return G
