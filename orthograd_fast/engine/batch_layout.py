"""Batch layout tracking for operation-level capture.

Two questions an intercepted operation asks about its tensors:

* does it carry the retain batch at all?  :class:`Provenance` decides by origin (the model's
  inputs and what is computed from them), never by a dim that happens to equal B.
* where is the retain batch?  Batch-first tensors carry it on dim 0; inside
  ``F.multi_head_attention_forward`` tensors are sequence-first ``(T, B, E)`` or folded ``(T * B, E)``
  (sequence-major), and :func:`batch_major` turns both into ``(B, T, E)``.

Which parameter a tensor comes from, and how its rows map back: :mod:`.param_space`.
"""

from __future__ import annotations

import weakref
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten


def _storage_key(t: Tensor) -> Optional[int]:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, functional)
        return None


def batch_major(t: Tensor, B: int, seq_first: bool) -> Tensor:
    """``t`` with the retain batch on dim 0. Sequence-first: ``(T, B, ...)`` or ``(T * B, F)``
    sequence-major (how multi-head attention folds the batch before its projections)."""
    if not seq_first:
        return t
    return t.reshape(-1, B, t.shape[-1]).transpose(0, 1)


# Making a tensor the same for every sample: an explicit expansion along the batch, or a fill.
EXPAND_FUNCS = {Tensor.expand, torch.broadcast_to, Tensor.broadcast_to, Tensor.repeat, torch.tile, Tensor.tile}
FILL_FUNCS = {torch.zeros, torch.ones, torch.full, torch.empty, Tensor.new_zeros, Tensor.new_ones, Tensor.new_full,
              Tensor.new_empty}
# Reshapes keep the flat (row-major) order: a sample-major tensor stays sample-major.
RESHAPE_FUNCS = {Tensor.view, Tensor.reshape, torch.reshape, Tensor.flatten, torch.flatten, Tensor.unflatten,
                 torch.unflatten, Tensor.view_as, Tensor.reshape_as}
_SWAPS = {Tensor.transpose, torch.transpose, Tensor.swapaxes, torch.swapaxes, Tensor.swapdims, torch.swapdims}
_PERMUTES = {Tensor.permute, torch.permute}
_T = {Tensor.t, torch.t}  # (2-D: the two dims swapped; 0-D and 1-D unchanged)
_ROLLS = {Tensor.roll, torch.roll, Tensor.flip, torch.flip}
_JOINS = {torch.cat, torch.concat, torch.concatenate}
_STACKS = {torch.stack}
_UNSQUEEZES = {Tensor.unsqueeze, torch.unsqueeze}
_SQUEEZES = {Tensor.squeeze, torch.squeeze}
_UNBINDS = {Tensor.unbind, torch.unbind, Tensor.__iter__}
_MOVEDIMS = {Tensor.movedim, torch.movedim, Tensor.moveaxis, torch.moveaxis}
# Each entry repeated r times in place: along the batch's dim, k rows per sample become k * r
_INTERLEAVES = {Tensor.repeat_interleave, torch.repeat_interleave}
# Reductions over given dims (max / min: only with a dim, else elementwise or whole): a dim before
# the batch's that goes moves it left (a sequence-first [T, B, F] summed over time: [B, F])
_REDUCES = {f for name in ("sum", "mean", "nansum", "nanmean", "amax", "amin", "logsumexp", "max", "min")
            for f in (getattr(torch, name, None), getattr(Tensor, name, None)) if f is not None}
_MAXMIN = {torch.max, Tensor.max, torch.min, Tensor.min}


# Unpacking a PackedSequence (inside nn.utils.rnn.pad_packed_sequence): one sequence per sample,
# on dim 0 or 1 (batch_first); the index_select that follows puts them in the caller's order.
_PAD_PACKED = torch._pad_packed_sequence

# Operations whose output layout is not the input's: everything else keeps the batch dim in place.
_MOVES = (RESHAPE_FUNCS | _SWAPS | _PERMUTES | _T | _ROLLS | _JOINS | _STACKS | _UNSQUEEZES | _SQUEEZES | _UNBINDS
          | _MOVEDIMS | _REDUCES | _INTERLEAVES | {Tensor.__getitem__})
_METHOD_WRAPPER = type(Tensor.mT.__get__)  # attribute reads (``.mT``, ``.T``, ``._base``)


class Provenance:
    """Which tensors of the retain forward carry the retain batch, and where.

    Batched: the model's inputs with dim 0 == B, anything an operation computes from a batched
    tensor, a tensor expanded along dim 0 to B (``ids.expand(B, -1)``: one row per sample) and a
    constant fill with dim 0 == B (``torch.zeros(B, H)``). Everything else is not batched, whatever
    its shape: T5's relative-position ids are [T, S] and built from ``arange``, so with T == B a
    shape test would take positions for samples and attribute gradients to the wrong samples.

    Where known, a batched tensor also carries its layout ``(k, d)``: dim ``d`` holds ``k * B``
    entries, sample by sample (entries ``i*k .. i*k + k - 1`` belong to sample ``i``). Window
    attention's ``(B, H, W, C) -> (B * windows, N, C)`` gives ``(windows, 0)``; a transpose to
    sequence-first gives ``(1, 1)``. Reshapes keep the flat order, so a tensor with ``d == 0`` keeps
    its layout through them (``k`` becomes dim 0 / B); transposes, permutes, unsqueezes and stacks
    move ``d``; an operation that mixes, drops or reorders that dim loses the layout, and a tensor
    without a known layout is not taken for batch-first data whatever its shape (no rule captures
    it: refused, or replayed by the fallback from its module's batch-first input). Tags are weak:
    they do not keep forward intermediates alive."""

    def __init__(self):
        self._tags: Dict[int, tuple] = {}  # id -> (weakref, layout (k, d) or None)

    def mark(self, t, layout: Optional[Tuple[int, int]] = (1, 0)) -> None:
        if isinstance(t, Tensor):
            self._tags[id(t)] = (weakref.ref(t), layout)

    def _entry(self, t):
        e = self._tags.get(id(t))
        return e if e is not None and e[0]() is t else None

    def batched(self, t) -> bool:
        """Under torch.compile's tracing the tensors are stand-ins without tags: judged by shape there."""
        if not isinstance(t, Tensor):
            return False
        return self._entry(t) is not None or _compiling()

    def layout(self, t, B: Optional[int]) -> Optional[Tuple[int, int]]:
        """``(k, d)`` for a batched ``t`` (see the class), None when not batched or not known."""
        if not isinstance(t, Tensor) or B is None or t.dim() == 0:
            return None
        e = self._entry(t)
        if e is None:
            return (1, 0) if _compiling() and t.shape[0] == B else None
        return _checked(e[1], t, B)

    def fold(self, t, B: Optional[int]) -> Optional[int]:
        """``k`` when ``t`` carries the batch on dim 0, ``k`` rows per sample; else None."""
        lay = self.layout(t, B)
        return lay[0] if lay is not None and lay[1] == 0 else None

    def propagate(self, func, args, kwargs, leaves, out, B: Optional[int]) -> None:
        # called for every operation of the retain forward: the common case (an elementwise op on
        # a batched tensor) stays on the first few lines
        tags = self._tags
        if func is _PAD_PACKED:
            self._unpacked(args, kwargs, out, B)
            return
        for t in leaves:
            if isinstance(t, Tensor):
                e = tags.get(id(t))
                if e is None or e[0]() is not t:
                    continue
                lay = _checked(e[1], t, B)
                outs = (out,) if isinstance(out, Tensor) else tensors_in(out)
                general = func not in _MOVES and type(func) is not _METHOD_WRAPPER
                for o in outs:
                    eo = tags.get(id(o))
                    if eo is not None and eo[0]() is o:
                        continue  # an input returned (in place, ``._base``) keeps its tag
                    if lay is None or o.dim() == 0:
                        lo = None
                    elif general:  # keeps the batch dim where it is, if its size is unchanged
                        d = lay[1]
                        lo = lay if d < o.dim() and o.shape[d] == t.shape[d] and (d == 0 or o.dim() == t.dim()) else None
                    else:
                        lo = _out_layout(func, args, kwargs, t, lay, o, B)
                    tags[id(o)] = (weakref.ref(o), lo)
                return
        outs = tensors_in(out)
        if not outs:
            return
        o = outs[0]
        if B is None or o.dim() == 0 or o.shape[0] != B:
            return
        if func in FILL_FUNCS:
            self.mark(o)
        elif func in EXPAND_FUNCS and B > 1:
            src = leaves[0] if leaves and isinstance(leaves[0], Tensor) else None
            if src is not None and (src.dim() < o.dim() or src.shape[0] == 1):
                self.mark(o)

    def _unpacked(self, args, kwargs, out, B: Optional[int]) -> None:
        """The padded sequences of a PackedSequence (``torch._pad_packed_sequence``): batched, one
        sequence per sample on dim 0 (batch_first) or 1, whatever the packed data's tag."""
        outs = tensors_in(out)
        batch_first = args[2] if len(args) > 2 else kwargs.get("batch_first", False)
        d = 0 if batch_first else 1
        if outs and B is not None and outs[0].dim() > d and outs[0].shape[d] == B:
            self.mark(outs[0], (1, d))

    def clear(self) -> None:
        self._tags.clear()


def _checked(lay, t: Tensor, B: Optional[int]):
    """A tag's layout if ``t``'s shape still agrees with it (dim d holds k * B entries), else None."""
    return lay if lay is not None and B is not None and lay[1] < t.dim() and t.shape[lay[1]] == lay[0] * B else None


def _dims_arg(args, kwargs, i, name):
    v = args[i] if len(args) > i else kwargs.get(name)
    if v is None:
        return None
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _out_layout(func, args, kwargs, src: Tensor, lay, o: Tensor, B: Optional[int]):
    """The layout of output ``o`` of ``func`` whose batched input ``src`` has layout ``lay``."""
    if lay is None or B is None or o.dim() == 0:
        return None
    k, d = lay
    n = src.dim()
    if func in RESHAPE_FUNCS:
        if not (args and args[0] is src and o.numel() == src.numel()):
            return None
        if d == 0 and o.shape[0] and o.shape[0] % B == 0:
            return (o.shape[0] // B, 0)
        if d > 0 and o.shape[: d + 1] == src.shape[: d + 1]:
            return lay  # the dims up to the batch's unchanged: only later dims regrouped
        return None
    attr = getattr(getattr(func, "__self__", None), "__name__", None) if type(func) is _METHOD_WRAPPER else None
    if attr in ("T", "mT", "H", "mH"):  # transposes read as attributes
        if attr in ("T", "H"):
            return (k, n - 1 - d)
        return (k, n - 1 if d == n - 2 else n - 2 if d == n - 1 else d)
    if func in _SWAPS:
        d0, d1 = (_dims_arg(args, kwargs, 1, "dim0") or (None,))[0], (_dims_arg(args, kwargs, 2, "dim1") or (None,))[0]
        if d0 is None or d1 is None:
            return None
        d0, d1 = d0 % n, d1 % n
        return (k, d1 if d == d0 else d0 if d == d1 else d)
    if func in _T:
        return (k, n - 1 - d) if n == 2 else lay
    if func in _PERMUTES:
        dims = args[1:] if len(args) > 1 else (kwargs.get("dims"),)
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else tuple(dims)
        dims = [x % n for x in dims if isinstance(x, int)]
        return (k, dims.index(d)) if len(dims) == n and d in dims else None
    if func in _UNSQUEEZES:
        dim = (_dims_arg(args, kwargs, 1, "dim") or (0,))[0] % o.dim()
        return (k, d + 1 if dim <= d else d)
    if func in _SQUEEZES:
        dims = _dims_arg(args, kwargs, 1, "dim")
        dims = [x % n for x in dims] if dims is not None else [i for i in range(n) if src.shape[i] == 1]
        dims = [x for x in dims if src.shape[x] == 1]
        return None if d in dims else (k, d - sum(1 for x in dims if x < d))
    if func in _MOVEDIMS:
        a, b = _dims_arg(args, kwargs, 1, "source"), _dims_arg(args, kwargs, 2, "destination")
        if a is None or b is None or len(a) != len(b):
            return None
        order = [i for i in range(n) if i not in {x % n for x in a}]
        for x, y in sorted(zip((y % n for y in b), (x % n for x in a))):
            order.insert(x, y)
        return (k, order.index(d)) if d in order else None
    if func in _STACKS:
        dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % o.dim()
        return (k, d + 1 if dim <= d else d)
    if func is Tensor.__getitem__ and args and args[0] is not src:  # a batched index: table[ids]
        return lay if d < o.dim() and o.shape[d] == src.shape[d] else None
    if func is Tensor.__getitem__:
        pos = _index_position(args[1] if len(args) > 1 else None, n, d)
        return (k, pos) if pos is not None and pos < o.dim() and o.shape[pos] == src.shape[d] else None
    if func in _INTERLEAVES:
        # (GCViT's global query, one per image, repeated for each of its windows)
        r = args[1] if len(args) > 1 else kwargs.get("repeats")
        dim = args[2] if len(args) > 2 else kwargs.get("dim")
        if not (args and args[0] is src) or not isinstance(r, int) or isinstance(r, bool) or not isinstance(dim, int):
            return None  # (tensor repeats, or no dim: the input flattened)
        if dim % n != d:
            return lay if o.shape[d] == src.shape[d] else None
        return (k * r, d) if o.shape[d] == src.shape[d] * r else None
    if func in _UNBINDS:
        dim = (_dims_arg(args, kwargs, 1, "dim") or (0,))[0] % n if func is not Tensor.__iter__ else 0
        return None if dim == d else (k, d - 1 if dim < d else d)
    if func in _REDUCES and args and args[0] is src:
        dims = _dims_arg(args, kwargs, 1, "dim")
        if dims is not None and all(isinstance(x, int) and not isinstance(x, bool) for x in dims):
            dims = {x % n for x in dims}
            if d in dims:
                return None  # the samples reduced together
            keep = args[2] if len(args) > 2 and isinstance(args[2], bool) else kwargs.get("keepdim", False)
            return (k, d if keep else d - sum(1 for x in dims if x < d))
        if dims is None and func not in _MAXMIN:
            return None  # a reduction over every dim
        # (max / min of two tensors: elementwise, the general rule below)
    if d == 0 and o.shape[0] != src.shape[0]:
        return None
    if d > 0 and (o.dim() != n or o.shape[d] != src.shape[d]):
        return None
    if func in _ROLLS:
        if func in (Tensor.roll, torch.roll):
            dims = _dims_arg(args, kwargs, 2, "dims")
        else:  # flip(dims) or Tensor.flip(*dims)
            dims = _dims_arg(args, kwargs, 1, "dims") if len(args) <= 2 else tuple(args[1:])
        return lay if dims is not None and all(x % n != d for x in dims) else None
    if func in _JOINS:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return lay if dim % n != d else None
    return lay


def _index_position(idx, n: int, d: int) -> Optional[int]:
    """Where dim ``d`` of an ``n``-dim tensor lands under basic indexing ``t[idx]`` (ints, slices,
    None, Ellipsis), or None when the index drops it, slices it, or is advanced (tensors, lists)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) or isinstance(i, bool) for i in idx):
        return None
    used = sum(1 for i in idx if i is not None and i is not Ellipsis)
    full = [slice(None)] * max(n - used, 0)
    if Ellipsis in idx:
        e = idx.index(Ellipsis)
        idx = idx[:e] + tuple(full) + tuple(i for i in idx[e + 1 :] if i is not Ellipsis)
    else:
        idx = idx + tuple(full)
    src, out = 0, 0
    for i in idx:
        if i is None:
            out += 1
            continue
        if src == d:
            return out if isinstance(i, slice) and i == slice(None) else None
        src += 1
        out += 0 if isinstance(i, int) else 1
    return None


def is_batched(t, B: int, seq_first: bool = False) -> bool:
    if not isinstance(t, Tensor) or t.dim() == 0:
        return False
    if seq_first:
        return (t.dim() >= 3 and t.shape[1] == B) or (t.dim() == 2 and t.shape[0] % B == 0)
    return t.shape[0] == B


def same_view(t: Tensor, root: Tensor) -> bool:
    """``t`` is ``root`` seen whole: the same shape, strides and offset into the storage."""
    return t.shape == root.shape and t.stride() == root.stride() and t.storage_offset() == root.storage_offset()


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # older torch
        return False


def tensors_in(x) -> list:
    """The tensors of ``x`` (a tensor, or nested lists and tuples of them), in order."""
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [o for y in x for o in tensors_in(y)]
    return []


def _leaves(args, kwargs):
    return [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
