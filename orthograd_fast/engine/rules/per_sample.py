"""Rules that hand parameter operands out expanded along the batch (per-sample rows): einsum with
a batch letter, scaled-dot-product attention with a parameter bias or query."""

from __future__ import annotations

from torch import Tensor

from .common import arg

def einsum(ctx, func, args, kwargs):
    """``torch.einsum`` with batched operands whose first letter is the batch: each parameter
    operand gets that letter too and is handed out expanded along the batch (per-sample rows)."""
    eq, ops = args[0], list(args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if kwargs or not isinstance(eq, str) or "..." in eq or "->" not in eq or ctx.seq_first:
        return NotImplemented
    ins, out = eq.replace(" ", "").split("->")
    terms = ins.split(",")
    data = [i for i, t in enumerate(ops) if ctx.is_data(t)]
    if len(terms) != len(ops) or not data:
        return NotImplemented
    b = terms[data[0]][:1]
    if not b or not out.startswith(b) or any(not terms[i].startswith(b) for i in data):
        return NotImplemented
    folds = {ctx.fold(ops[i]) for i in data}
    if len(folds) != 1:
        return NotImplemented
    k = folds.pop()
    new = list(ops)
    for i, t in enumerate(ops):
        if i in data or not isinstance(t, Tensor):
            continue
        if ctx.space.base(t) is None or b in terms[i] or not t.is_floating_point():
            return NotImplemented
        new[i] = ctx.per_sample(func, t, ctx.use(t).unsqueeze(0), k)
        terms[i] = b + terms[i]
    return func(",".join(terms) + "->" + out, *new)


def attention(ctx, func, args, kwargs):
    """``F.scaled_dot_product_attention`` with batched operands: an operand made of parameters only
    (a relative-position bias as ``attn_mask``; a learned query, also one projected after its
    expand along the batch: SigLIP's attention pooling) is added to or multiplied into the scores
    sample by sample, so it is handed out expanded along the batch (per-sample rows)."""
    if ctx.seq_first:
        return NotImplemented
    ops = [arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value"))]
    ref = next((t for t in ops if ctx.is_data(t)), None)
    if ref is None:
        return NotImplemented
    k = ctx.fold(ref)
    a, kw = list(args), dict(kwargs)
    for i, name in enumerate(("query", "key", "value", "attn_mask")):
        t = arg(args, kwargs, i, name)
        if not isinstance(t, Tensor) or ctx.space.base(t) is None:
            continue
        if not t.is_floating_point() or t.dim() > ref.dim():
            return NotImplemented
        src = ctx.use(t)
        while src.dim() < ref.dim():
            src = src.unsqueeze(0)
        if ctx.space.one_row(src, ref.shape[0]):
            src = src[:1]  # one row of parameters along the batch
        if src.shape[0] != 1:
            return NotImplemented
        rows = ctx.per_sample(func, t, src, k)
        if i < len(args):
            a[i] = rows
        else:
            kw[name] = rows
    return func(*a, **kw)


def expanded_matmul(ctx, func, args, kwargs):
    """``q @ k`` of batched data and a tensor of parameters with one row, or equal rows along the
    batch (ParamSpace.one_row: a learned query projected after its expand, in an attention written
    out): that row is handed out expanded along the batch (per-sample rows); NotImplemented for any
    other product."""
    if kwargs or len(args) != 2 or ctx.seq_first:
        return NotImplemented
    new = list(args)
    data = [t for t in args if ctx.is_data(t)]
    if len(data) != 1 or data[0].dim() < 3:
        return NotImplemented
    ref = data[0]
    for i, t in enumerate(args):
        if t is ref:
            continue
        if not isinstance(t, Tensor) or ctx.space.base(t) is None or not t.is_floating_point():
            return NotImplemented
        u = ctx.use(t)
        if u.dim() != ref.dim():
            return NotImplemented
        if ctx.space.one_row(u, ref.shape[0]):
            u = u[:1]
        if u.shape[0] != 1:
            return NotImplemented
        new[i] = ctx.per_sample(func, t, u, ctx.fold(ref))
    return func(*new)

