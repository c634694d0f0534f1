"""Which parameter a tensor of the retain forward comes from, and how its per-sample rows map back.

:class:`ParamSpace` knows every managed parameter, the views of one (a slice, ``expand``,
``split``: found by their storage) and the tensors computed from parameters only (``.float()``, an
embedding lookup with ids shared by all samples), and maps per-sample rows of such a tensor back to
rows of its parameters. A parameter (or a tensor of parameters only) meets the batch in a
broadcasting operation: there :class:`PerSample` hands the operation a copy expanded along the
batch, so the backward delivers one gradient row per sample. :class:`Anchor` re-attaches an output
computed from detached parameter aliases (lean retain) to the graph.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_map

from ..errors import CaptureError
from .batch_layout import _compiling, _leaves, _storage_key, same_view, tensors_in


class PerSample(torch.autograd.Function):
    """``src`` (leading dim 1) expanded to ``B`` along dim 0; the backward sums the rows for
    ``src`` (when it needs a gradient) while a hook on the output keeps the rows themselves.
    ``anchors`` (the real parameters, under lean retain) attach the output to the graph."""

    @staticmethod
    def forward(ctx, src, B, *anchors):
        return src.expand(B, *src.shape[1:])

    @staticmethod
    def backward(ctx, g):
        gs = g.sum(0, keepdim=True) if ctx.needs_input_grad[0] else None
        return (gs, None) + (None,) * (len(ctx.needs_input_grad) - 2)


class ParamSpace:
    """The managed parameters of one retain block and the tensors made from them alone."""

    def __init__(self, params: List[Tensor], lean: bool):
        self.params = list(params)
        self.lean = lean
        self._by_id = {id(p): p for p in self.params}
        self._alias: Dict[int, Tensor] = {}  # id(p) -> the detached alias handed out (lean)
        self._by_storage: Dict[int, Tuple[str, object]] = {}
        for p in self.params:
            k = _storage_key(p)
            if k is not None and p.numel():
                self._by_storage[k] = ("param", p)
        # storage of an embedding lookup's output -> (weight, ids, padding_idx)
        self._lookups: Dict[int, tuple] = {}
        # storage of a tensor of B equal rows (mark_rows) -> (the tensor, held so that its storage
        # is not freed and reused under a stale mark; offset, row stride, B, version)
        self._rows: Dict[int, tuple] = {}

    # --- what a tensor is ---------------------------------------------------------------------
    def base(self, t) -> Optional[Tuple[str, object]]:
        """("param", p) for a parameter or a view of one, ("derived", entry) for a tensor computed
        from parameters only (or a view of one), else None."""
        if not isinstance(t, Tensor):
            return None
        p = self._by_id.get(id(t))
        if p is not None:
            return ("param", p)
        if not self._by_storage:
            return None
        k = _storage_key(t)
        return self._by_storage.get(k) if k is not None else None

    def owners(self, t) -> List[Tensor]:
        """The managed parameters ``t`` is made of."""
        b = self.base(t)
        if b is None:
            return []
        if b[0] == "param":
            return [b[1]]
        out = []
        for leaf in _leaves(b[1][2], b[1][3]):
            for q in self.owners(leaf):
                if all(q is not r for r in out):
                    out.append(q)
        return out

    def before_in_place(self, func, args, kwargs, name: str) -> None:
        """``func`` is about to write in place into ``args[0]``, a tensor made of parameters only
        (``nn.ReLU(inplace=True)`` in Swin V2's position-bias MLP): its storage's recipe becomes
        the out-of-place twin applied to a snapshot that keeps the recipe it had. A write into part
        of such a tensor, or without a known twin, is refused by name (its per-sample rows would
        be mapped back through the recipe from before the write); a write into a parameter's own
        storage runs as it did (later uses read the written values, as they run)."""
        t = args[0]
        kind, obj = self.base(t)
        if kind == "param":
            return  # (a parameter's own storage: later uses read the written values, as they run)
        oop = _out_of_place(func, kwargs)
        if oop is None or not (t is obj[0] or same_view(t, obj[0])):
            what = "part of a tensor" if oop is not None else "a tensor"
            shapes = ", ".join(str(tuple(p.shape)) for p in self.owners(t)[:3])
            raise CaptureError(
                f"{name} writes in place into {what} computed from parameters only (shape {tuple(t.shape)}, from "
                f"parameters of shape {shapes}): the capture maps per-sample gradients back through how such tensors "
                "were computed, which this write hides. Use the out-of-place form (inplace=False, x = x * s instead of "
                "x *= s), or freeze those parameters."
            )
        root = obj[0]
        snap = root.detach().clone()  # stands for the value before the write (its recipe: root's)
        k, kr = _storage_key(snap), _storage_key(root)
        if k is not None:
            self._by_storage[k] = ("derived", (snap,) + tuple(obj[1:]))
            if kr in self._lookups:  # (a lookup's rows map back as the lookup's before the write only)
                self._lookups[k] = self._lookups.pop(kr)
        kw = {n: v for n, v in kwargs.items() if n != "inplace"}
        self._by_storage[kr] = ("derived", (root, oop, (snap,) + tuple(args[1:]), kw, 0))

    def mark_rows(self, t: Tensor, B: int) -> None:
        """``t`` [B, ...] holds B equal rows, each the same function of the parameters (one row
        expanded or repeated along the batch, then row-wise operations): where it meets the batch
        it is that row handed out per sample. Kept with its version: a write in place drops it."""
        k = _storage_key(t)
        if k is not None and t.dim() >= 1 and t.shape[0] == B and t.is_floating_point():
            self._rows[k] = (t, t.storage_offset(), t.stride(0), B, t._version)

    def one_row(self, t, n: int, k: int = 1) -> bool:
        """``t`` has ``n`` rows on dim 0 that are one row of parameters: a stride-0 expand, or a
        view along the rows of a tensor :meth:`mark_rows` marked and nothing wrote since. ``k``:
        ``n * k`` rows, ``k`` per sample, each sample's the same ``k`` (a marked tensor viewed with
        a dim folded into dim 0: a bias per head repeated along the batch, then ``[B * H, ...]``)."""
        if not isinstance(t, Tensor) or t.dim() == 0 or t.shape[0] != n * k or n < 2 or self.base(t) is None:
            return False
        if t.stride(0) == 0:
            return True
        e = self._rows.get(_storage_key(t))
        return e is not None and e[3] == n and e[4] == t._version and t.stride(0) * k == e[2] and 0 <= t.storage_offset() - e[1] < t.stride(0)

    def use(self, t):
        """What an operation receives in place of ``t``: under lean retain a detached alias of a
        parameter (the retain backward then forms no weight gradient for it)."""
        if self.lean and id(t) in self._by_id:
            a = self._alias.get(id(t))
            if a is None:
                a = self._alias[id(t)] = t.detach()
            return a
        return t

    def add_param(self, p: Tensor) -> None:
        """Track ``p`` (every managed parameter already is; a lookup's table is added if not)."""
        if id(p) not in self._by_id:
            self.params.append(p)
            self._by_id[id(p)] = p
            k = _storage_key(p)
            if k is not None and p.numel():
                self._by_storage[k] = ("param", p)

    def add_lookup(self, out: Tensor, weight: Tensor, ids: Tensor, padding_idx: Optional[int]) -> None:
        """``out`` = rows ``ids`` of the parameter ``weight`` (an embedding lookup with ids shared by
        all samples): per-sample rows of ``out`` map back as an embedding use (no dense rows)."""
        self.add_param(weight)
        k = _storage_key(out)
        if k is not None:
            self._by_storage[k] = ("derived", (out, F.embedding, (ids, weight, padding_idx), {}, 0))
            self._lookups[k] = (weight, ids.detach(), padding_idx)

    def add_derived(self, out, func, args, kwargs) -> None:
        for o in tensors_in(out):
            if not o.is_floating_point():
                continue
            k = _storage_key(o)
            if k is None or k in self._by_storage:
                continue  # a view of a parameter (or of a derived tensor): found by its storage
            entry = (o, func, args, kwargs, tensors_in(out).index(o))
            self._by_storage[k] = ("derived", entry)

    # --- per-sample rows of a tensor -> rows of its parameters --------------------------------
    def rows_to_uses(self, t: Tensor, rows: Tensor) -> Dict[Tensor, list]:
        """``rows`` [B, t.numel()] -> {param: [use]}: an embedding use for a view of a lookup's
        output, else explicit rows (:meth:`rows_to_params`)."""
        from .factors import ExplicitRows, OuterFactors

        t, rows = self._peel(t, rows)
        k = _storage_key(t)
        look = self._lookups.get(k) if k is not None else None
        if look is not None:
            weight, ids, pad = look
            root = self.base(t)[1][0]
            B = rows.shape[0]
            rows = _rows_of_root(t, root, rows)
            V, d = weight.shape
            flat = ids.reshape(1, -1).expand(B, -1)
            r = rows.reshape(B, -1, d)
            if pad is not None:
                r = r * (flat != (pad if pad >= 0 else V + pad)).unsqueeze(-1).to(r.dtype)
            return {weight: [OuterFactors(r[:, :, None, :], None, flat, (1, V, d))]}
        return {p: [ExplicitRows(r)] for p, r in self.rows_to_params(t, rows).items()}

    def _peel(self, t: Tensor, rows: Tensor) -> Tuple[Tensor, Tensor]:
        """(t', rows') with the elementwise steps whose vector-Jacobian product is a mask or a sign
        taken off the computation of ``t`` (a copy, a constant added, a constant fill where a
        constant mask says): T5's ``where(causal, bias, min).contiguous()`` over its bias lookup
        maps to that lookup's embedding use, instead of a vmapped autograd pass per block."""
        while True:
            b = self.base(t)
            if b is None or b[0] != "derived":
                return t, rows
            root, func, args, kwargs, index = b[1]
            if index != 0 or not isinstance(root, Tensor):
                return t, rows
            if t is not root and not same_view(t, root):
                if not root.is_contiguous():
                    return t, rows
                rows = _rows_of_root(t, root, rows)
            peel = _PEELS.get(func)
            got = peel(self, root, args, kwargs, rows) if peel is not None else None
            if got is None:
                return root, rows
            t, rows = got

    def _const(self, x) -> bool:
        """A number, or a tensor that is no parameter, no view of one and computed from none."""
        return not isinstance(x, Tensor) or (self.base(x) is None and not x.requires_grad)

    def rows_to_params(self, t: Tensor, rows: Tensor) -> Dict[Tensor, Tensor]:
        """``rows`` [B, t.numel()] (per-sample gradients with respect to ``t``) -> {param: [B, numel]}."""
        kind, obj = self.base(t)
        B = rows.shape[0]
        if kind == "param":
            if not same_view(t, obj) and not obj.is_contiguous():
                raise NotImplementedError("a view of a non-contiguous parameter")
            return {obj: _rows_of_root(t, obj, rows)}
        # computed from parameters: the per-sample vector-Jacobian product of the recomputation
        params = self.owners(t)
        env = {id(p): p.detach().to(rows.dtype).requires_grad_(True) for p in params}
        with torch.enable_grad():
            val = self._value(t, env, rows.dtype)
            gs = torch.autograd.grad(
                val, [env[id(p)] for p in params], rows.reshape(B, *t.shape).to(val.dtype),
                is_grads_batched=True, allow_unused=True,
            )
        return {p: (g.reshape(B, -1) if g is not None else torch.zeros(B, p.numel(), dtype=rows.dtype)) for p, g in zip(params, gs)}

    def _value(self, t, env, dtype=None):
        """``t`` recomputed from the parameters in ``env``; the floating constants it meets (a
        spectral norm's power-iteration vectors, an identity) in ``dtype``, the parameters' own."""
        b = self.base(t)
        if b is None:
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t
        kind, obj = b
        if kind == "param":
            root, v = obj, env[id(obj)]
        else:
            root, func, args, kwargs, index = obj
            a, kw = tree_map(lambda x: self._value(x, env, dtype) if isinstance(x, Tensor) else x, (args, kwargs))
            v = tensors_in(func(*a, **kw))[index]
        if t is root or same_view(t, root):
            return v
        return v.as_strided(t.shape, t.stride(), t.storage_offset() - root.storage_offset() + v.storage_offset())


# in-place methods that change no values (a flag, the graph, where the storage lives)
_NO_WRITE = {"requires_grad_", "detach_", "share_memory_", "retain_grad"}
# the augmented assignments (not __iter__, __index__, __int__, __invert__, ...)
_AUGMENTED = {f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "div", "mod", "pow", "matmul",
                                      "and", "or", "xor", "lshift", "rshift")}


def in_place(func, kwargs) -> bool:
    """Whether a call writes into its first operand: ``relu_``, ``x *= s``, ``inplace=True``,
    ``x[i] = v``."""
    name = getattr(func, "__name__", "")
    if name in _NO_WRITE:
        return False
    return bool(kwargs.get("inplace")) or (name.endswith("_") and not name.startswith("__")) or name in _AUGMENTED or name == "__setitem__"


def _out_of_place(func, kwargs):
    """The out-of-place twin of an in-place call (``relu_`` -> ``relu``, ``__imul__`` ->
    ``__mul__``, ``F.relu(inplace=True)`` -> ``F.relu``), None where there is none."""
    if kwargs.get("inplace"):
        return func
    name = getattr(func, "__name__", "")
    if name in _AUGMENTED:
        return getattr(Tensor, "__" + name[3:], None)
    if name.endswith("_") and not name.startswith("__"):
        for owner in (Tensor, torch):
            if getattr(owner, name, None) is func:
                twin = getattr(owner, name[:-1], None)
                return twin if callable(twin) else None
    return None


class Anchor(torch.autograd.Function):
    """Identity on an output that does not require grad (its parameters were handed out detached
    and its input needs no gradient), attached to the graph through the real parameters so the
    retain backward still reaches it; returns no gradient. Marked dirty (no copy) unless the
    output is a view, which is copied (in-place ops on views made inside a custom Function are
    refused by autograd), or torch.compile is tracing (the traced dirty output loses
    requires_grad under inductor)."""

    @staticmethod
    def forward(ctx, out, *params):
        if out._base is not None or _compiling():
            return out.clone()
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, g):
        return (None,) * len(ctx.needs_input_grad)


def anchored(out, params):
    """``out`` re-attached to the graph (see :class:`Anchor`) when it needs it."""
    if isinstance(out, Tensor) and not out.requires_grad and out.is_floating_point() and torch.is_grad_enabled() and params:
        return Anchor.apply(out, *params)
    return out


def _peel_copy(space, root, args, kwargs, rows):
    x = args[0] if args else None
    if isinstance(x, Tensor) and space.base(x) is not None and x.shape == root.shape:
        return x, rows
    return None


def _peel_add(sign_x: float, sign_other: float):
    """``x + alpha * other`` (signs: sub, rsub): the rows of whichever operand is made of
    parameters, the other a constant; same shape as the output (no broadcast to sum over)."""

    def peel(space, root, args, kwargs, rows):
        if len(args) < 2:
            return None
        x, other = args[0], args[1]
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        if not isinstance(alpha, (int, float)) or set(kwargs) - {"alpha"}:
            return None
        for a, o, sign in ((x, other, sign_x), (other, x, sign_other * alpha)):
            if isinstance(a, Tensor) and space.base(a) is not None and a.shape == root.shape and space._const(o):
                return a, rows if sign == 1 else rows * sign
        return None

    return peel


def _peel_where(space, root, args, kwargs, rows):
    """``where(cond, x, y)`` with a constant cond: the rows of x (or y) masked by cond (or not cond)."""
    if len(args) != 3 or kwargs:
        return None
    cond, x, y = args
    if not isinstance(cond, Tensor) or cond.dtype != torch.bool or not space._const(cond):
        return None
    for a, o, keep in ((x, y, cond), (y, x, ~cond)):
        if isinstance(a, Tensor) and space.base(a) is not None and a.shape == root.shape and space._const(o):
            mask = keep.expand(root.shape).reshape(1, -1).to(rows.dtype)
            return a, rows * mask
    return None


_PEELS = {
    Tensor.contiguous: _peel_copy, Tensor.clone: _peel_copy, torch.clone: _peel_copy,
    torch.add: _peel_add(1, 1), Tensor.add: _peel_add(1, 1), Tensor.__add__: _peel_add(1, 1),
    Tensor.__radd__: _peel_add(1, 1), torch.sub: _peel_add(1, -1), Tensor.sub: _peel_add(1, -1),
    Tensor.__sub__: _peel_add(1, -1), Tensor.__rsub__: _peel_add(-1, 1), torch.where: _peel_where,
}


def _rows_of_root(t: Tensor, root: Tensor, rows: Tensor) -> Tensor:
    """Per-sample rows [B, t.numel()] of a view ``t`` of the contiguous ``root`` -> rows
    [B, root.numel()] (entries outside the view: zero; entries the view repeats: summed)."""
    if same_view(t, root):
        return rows
    B = rows.shape[0]
    idx = torch.arange(root.numel(), device=rows.device).as_strided(t.shape, t.stride(), t.storage_offset() - root.storage_offset())
    full = torch.zeros(B, root.numel(), dtype=rows.dtype, device=rows.device)
    return full.index_add_(1, idx.reshape(-1), rows.reshape(B, -1))
