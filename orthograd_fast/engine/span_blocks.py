"""Retain spans beyond one batch: the uses of several retain() blocks as one batch of B_total.

Each block's uses of a parameter are merged by kind (dense factors, one-hot factors, explicit
rows); blocks that lack a kind contribute zero rows; token counts are zero-padded to the longest
block (zero tokens add nothing to any Gram, coefficient or update). Then everything is
concatenated along the sample dimension.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor

from .factors import ExplicitRows, OuterFactors, merge_tokens


def _key(u) -> tuple:
    if isinstance(u, ExplicitRows):
        return ("explicit",)
    return ("ids" if u.ids is not None else "dense", u.shape, u.transposed)


def _pad_T(t: Tensor, T: int) -> Tensor:
    if t is None or t.shape[1] == T:
        return t
    pad = t.new_zeros((t.shape[0], T - t.shape[1]) + tuple(t.shape[2:]))
    return torch.cat([t, pad], dim=1)


def _zeros_like_use(u, B: int):
    if isinstance(u, ExplicitRows):
        return ExplicitRows(u.G.new_zeros(B, u.G.shape[1]))
    A = u.A.new_zeros((B, 1) + tuple(u.A.shape[2:]))
    D = None if u.D is None else u.D.new_zeros((B, 1) + tuple(u.D.shape[2:]))
    ids = None if u.ids is None else u.ids.new_zeros(B, 1)
    return OuterFactors(A, D, ids, u.shape, u.transposed)


def concat_blocks(blocks: List[Tuple[int, Dict[Tensor, list]]]) -> Dict[Tensor, list]:
    """[(B_k, {param: [uses]})] -> {param: [uses over sum_k B_k samples]}."""
    if len(blocks) == 1:
        return blocks[0][1]
    params = []
    seen = set()
    for _, d in blocks:
        for p in d:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    out: Dict[Tensor, list] = {}
    for p in params:
        per_block = []
        keys = []
        for Bk, d in blocks:
            kinds: Dict[tuple, list] = {}
            for u in d.get(p, []):
                k = _key(u)
                kinds.setdefault(k, []).append(u)
                if k not in keys:
                    keys.append(k)
            merged = {}
            for k, us in kinds.items():
                if k[0] == "explicit":
                    G = us[0].G
                    for u in us[1:]:
                        G = G + u.G
                    merged[k] = ExplicitRows(G)
                else:
                    merged[k] = merge_tokens(us)
            per_block.append((Bk, merged))
        uses = []
        for k in keys:
            proto = next(m[k] for _, m in per_block if k in m)
            parts = [m[k] if k in m else _zeros_like_use(proto, Bk) for Bk, m in per_block]
            if k[0] == "explicit":
                uses.append(ExplicitRows(torch.cat([q.G for q in parts], dim=0)))
                continue
            T = max(q.A.shape[1] for q in parts)
            A = torch.cat([_pad_T(q.A, T) for q in parts], dim=0)
            D = None if proto.D is None else torch.cat([_pad_T(q.D, T) for q in parts], dim=0)
            ids = None if proto.ids is None else torch.cat([_pad_T(q.ids, T) for q in parts], dim=0)
            uses.append(OuterFactors(A, D, ids, proto.shape, proto.transposed))
        out[p] = uses
    return out
