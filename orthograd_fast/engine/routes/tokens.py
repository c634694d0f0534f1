"""The tokens route: uses that include embedding lookups (one-hot rows) in the ghost order, the
one-hot side evaluated by gathers and id equality, so the vocabulary is never materialized."""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from ..factors import CHUNK_BYTES, OuterFactors
from .base import UsesRoute


class TokensRoute(UsesRoute):
    """K over every ordered pair of uses, in CHUNK_BYTES blocks (runs alone: not spreadable)."""

    name = "tokens"

    def __init__(self, param: Tensor, B: int, uses: List[OuterFactors]):
        super().__init__(param, B)
        self.uses = uses

    def work(self, unlearn_coef: bool = False) -> int:
        tokens = self.B * sum(u.A.shape[1] for u in self.uses)
        return 2 * tokens * tokens * self.uses[0].shape[2]

    def spreadable(self) -> bool:
        return False

    def _gram(self) -> Tensor:
        """For every ordered pair of uses, sum_{t,s} (a_bt . a_cs) * (d_bt . d_cs), where d . d' is
        a dot product (dense), a gather of a dense row at an id (dense x one-hot) or id equality
        (one-hot x one-hot)."""
        B = self.B
        flat = []
        for u in self.uses:
            T = u.A.shape[1]
            A = u.A[:, :, 0, :].reshape(B * T, -1).double()
            D = None if u.D is None else u.D[:, :, 0, :].reshape(B * T, -1).double()
            ids = None if u.ids is None else u.ids.reshape(-1)
            flat.append((T, A, D, ids))
        K = torch.zeros(B, B, dtype=torch.float64, device=flat[0][1].device)
        for Tu, Au, Du, iu in flat:
            for Tv, Av, Dv, iv in flat:
                step = max(1, CHUNK_BYTES // max(1, 2 * Tu * B * Tv * 8))
                for b0 in range(0, B, step):
                    b1 = min(B, b0 + step)
                    r = slice(b0 * Tu, b1 * Tu)
                    KA = Au[r] @ Av.t()
                    if Du is not None and Dv is not None:
                        KD = Du[r] @ Dv.t()
                    elif Du is not None:
                        KD = Du[r][:, iv]
                    elif Dv is not None:
                        KD = Dv[:, iu[r]].t()
                    else:
                        KD = (iu[r][:, None] == iv[None, :]).double()
                    K[b0:b1] += (KA * KD).reshape(b1 - b0, Tu, B, Tv).sum(dim=(1, 3))
        return K
