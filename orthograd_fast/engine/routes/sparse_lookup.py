"""The sparse lookup route: a table used only by lookups (an embedding without a tied dense head),
whose per-sample rows are nonzero on the table rows each sample looked up.

Sample i's gradient is Y_i[v] = sum of its token rows a_it with id_it = v. With S[v, i] = Y_i[v]
for the (row, sample) pairs that occur (M <= B T of them),

    K_ij = sum_v <S[v, i], S[v, j]>

over the pairs of entries of one table row: at most B per row, so at most B M products of d
entries. The lookup route forms B x V x d rows and a B^2 V d Gram; the token route pairs all
(B T)^2 tokens. b comes from the same entries S (U gathered at their M rows); the update is a
scatter of the tokens (as on those routes).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..factors import OuterFactors
from .base import UsesRoute

# pairs of entries multiplied per chunk (two float64 gathers of this many rows of d entries)
PAIR_CHUNK = 1 << 12


def _cat(xs: List[Tensor]) -> Tensor:
    """torch.cat(xs), without its copy of a lone tensor."""
    return xs[0] if len(xs) == 1 else torch.cat(xs)


class SparseLookupRoute(UsesRoute):
    """K from the (row, sample) sums S (float64), pair by pair within each table row."""

    name = "sparse"

    def __init__(self, param: Tensor, B: int, uses: List[OuterFactors]):
        super().__init__(param, B)
        self.uses = uses
        self._S: Optional[Tuple[Tensor, Tensor, Tensor]] = None  # _entries()

    @staticmethod
    def takes(uses: list) -> bool:
        """Every use a lookup (one-hot rows) of one [V, d] view."""
        return all(isinstance(u, OuterFactors) and u.ids is not None for u in uses) and len({(u.shape, u.transposed) for u in uses}) == 1

    def _tokens(self) -> int:
        return sum(u.ids.numel() for u in self.uses)

    # the route's time per token entry in the multiply-adds work() counts elsewhere: its ops are
    # sorts, scatters and float64 copies of the tokens, not products (measured on 2 CPU cores, one
    # thread: 2.5 ms for 2048 tokens of 128 entries, where a tile term of 2e8 took 8.6 ms; the
    # products' count, 8 per entry, put it last in the queue, 4-7 ms beside an idle thread)
    TOKEN_WORK = 256

    def work(self, unlearn_coef: bool = False) -> int:
        # compaction, pairs (at most B per table row; typically a few) and b: by the tokens
        return self.TOKEN_WORK * self._tokens() * self.uses[0].shape[2]

    def update_work(self) -> int:
        return self._tokens() * self.uses[0].shape[2]

    def _entries(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(S [M, d] float64, table row [M], sample [M]) of the (row, sample) pairs that occur,
        sorted by table row; formed once, for K and every b (a term's b is asked for again:
        og.forget()'s check, each projection of the span)."""
        if self._S is None:
            B = self.B
            d = self.uses[0].shape[2]
            dev = self.uses[0].A.device
            ids = _cat([u.ids.reshape(-1).long() for u in self.uses])
            sample = _cat([torch.arange(B, device=dev).repeat_interleave(u.ids.shape[1]) for u in self.uses])
            A = _cat([u.A[:, :, 0, :].reshape(-1, d) for u in self.uses])
            keys, inv = torch.unique(ids * B + sample, return_inverse=True)
            S = torch.zeros(keys.numel(), d, dtype=torch.float64, device=dev).index_add_(0, inv, A.to(torch.float64))
            self._S = (S, torch.div(keys, B, rounding_mode="floor"), keys % B)
        return self._S

    def coef(self, U: Tensor) -> Tensor:
        """b_i = sum over sample i's entries of <S[v, i], U[v]>: U gathered at the M entries' rows
        (not at every token, and no float64 copy of the tokens)."""
        S, row, smp = self._entries()
        Uv = self.uses[0].view(U)[0]  # [V, d]
        dots = (S * Uv.index_select(0, row).to(torch.float64)).sum(1)
        return torch.zeros(self.B, dtype=torch.float64, device=S.device).index_add_(0, smp, dots)

    def _gram(self) -> Tensor:
        B = self.B
        S, row, smp = self._entries()
        M, dev = S.shape[0], S.device
        K = torch.zeros(B * B, dtype=torch.float64, device=dev)
        # each entry with itself: K_ii += |S[v, i]|^2 (no gather)
        K.index_add_(0, smp * (B + 1), (S * S).sum(1))
        # each entry with the later entries of its table row (keys sorted: a row's entries are
        # contiguous, samples distinct), both orders: K_ij and K_ji
        counts = torch.unique_consecutive(row, return_counts=True)[1]
        last = (torch.cumsum(counts, 0) - 1).repeat_interleave(counts)  # per entry: its row's last entry
        r = last - torch.arange(M, device=dev)  # later entries of its row
        ends = torch.cumsum(r, 0).cpu()  # one host copy: the pair counts, for the chunks
        total = int(ends[-1]) if ends.numel() else 0
        if total:
            # chunks of whole entries, about PAIR_CHUNK pairs each
            bounds = torch.searchsorted(ends, torch.arange(PAIR_CHUNK, total + PAIR_CHUNK, PAIR_CHUNK), right=True).tolist()
            e0 = 0
            for e1 in bounds:
                e1 = min(max(e1, e0 + 1), M)
                if e1 <= e0:
                    continue
                re = r[e0:e1]
                p = torch.arange(e0, e1, device=dev).repeat_interleave(re)
                q = p + 1 + torch.arange(p.numel(), device=dev) - (torch.cumsum(re, 0) - re).repeat_interleave(re)
                # (index_select: about 2.5x faster than S[p] on the CPU)
                dots = (S.index_select(0, p) * S.index_select(0, q)).sum(1)
                sp, sq = smp[p], smp[q]
                K.index_add_(0, torch.cat([sp * B + sq, sq * B + sp]), torch.cat([dots, dots]))
                e0 = e1
        return K.view(B, B)
