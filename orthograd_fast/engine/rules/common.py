"""Helpers shared by the operation rules: argument access and per-sample rows -> uses."""

from __future__ import annotations

from torch import Tensor

from ..batch_layout import same_view

def arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def as_tuple(v, nd):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


def explicit(space, t: Tensor, rows: Tensor) -> dict:
    """Per-sample rows [B, t.numel()] of an operand -> {param: [use]}."""
    return space.rows_to_uses(t, rows)


def merge(into: dict, new: dict) -> dict:
    for p, us in new.items():
        into.setdefault(p, []).extend(us)
    return into


def bias_uses(space, b, D: Tensor) -> dict:
    if b is None or space.base(b) is None:
        return {}
    return explicit(space, b, D.sum(1) if D.shape[1] > 1 else D[:, 0])


def weight_use(space, w, use) -> dict:
    kind, p = space.base(w)
    if kind == "param" and same_view(w, p):
        return {p: [use]}
    return explicit(space, w, use.explicit())
