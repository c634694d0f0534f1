"""Per-operation rules: one intercepted call that consumes a managed parameter -> per-sample uses.

Each rule gets the call's context (:class:`orthograd_fast.engine.op_capture.OpContext`), runs the
operation with the parameters as the context hands them out (detached under lean retain) and
records what it needs (the data input, detached); the output gradient arrives in the backward, and
the uses are built on leaving ``retain()``. A rule returns ``NotImplemented`` when the call is not
the batched form it knows (e.g. an embedding lookup with ids shared by all samples: then it is a
computation on parameters only, see :mod:`orthograd_fast.engine.batch_layout`).

Math per rule: docs/math.md section 2 (Linear, Conv, Embedding, norms); a transposed
convolution's weight gradient is the convolution weight gradient with input and output gradient
swapped; a bilinear weight [O, I1, I2] is a Linear over the outer products x1 (x) x2.
"""

from __future__ import annotations

import types
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from . import rules
from .batch_layout import batch_major, same_view
from ..errors import UnsupportedModule
from .factors import OuterUse


def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _tuple(v, nd):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


def _explicit(space, t: Tensor, rows: Tensor) -> dict:
    """Per-sample rows [B, t.numel()] of an operand -> {param: [use]}."""
    return space.rows_to_uses(t, rows)


def _merge(into: dict, new: dict) -> dict:
    for p, us in new.items():
        into.setdefault(p, []).extend(us)
    return into


def dense_weight_uses(space, w: Tensor, A: Tensor, D: Tensor, transposed: bool) -> dict:
    """y = A w^T (w [O, I]) or y = A w (``transposed``: w [I, O]) over tokens A [B, T, I], D [B, T, O]."""
    B, T, I = A.shape
    O = D.shape[-1]
    kind, p = space.base(w)
    if kind == "param" and p.dim() == 2:
        if same_view(w, p):
            return {p: [OuterUse(A[:, :, None, :], D[:, :, None, :], None, (1, O, I), transposed=transposed)]}
        if w.dim() == 2 and w.shape == p.shape[::-1] and w.stride() == p.stride()[::-1] and w.storage_offset() == p.storage_offset():
            # w is p.t() (a tied head written `h @ emb.weight.t()`)
            return {p: [OuterUse(A[:, :, None, :], D[:, :, None, :], None, (1, O, I), transposed=not transposed)]}
        off = w.storage_offset() - p.storage_offset()
        if (
            not transposed
            and p.is_contiguous()
            and w.dim() == 2
            and w.shape[1] == p.shape[1]
            and w.stride() == p.stride()
            and off % p.stride(0) == 0
        ):
            # a block of rows (the q / k / v part of a packed attention projection): zero rows of D
            r0 = off // p.stride(0)
            Dfull = D.new_zeros(B, T, 1, p.shape[0])
            Dfull[:, :, 0, r0 : r0 + O] = D
            return {p: [OuterUse(A[:, :, None, :], Dfull, None, (1, p.shape[0], I))]}
    eq = "bti,bto->bio" if transposed else "bto,bti->boi"
    return _explicit(space, w, torch.einsum(eq, D.double(), A.double()).reshape(B, -1))


def _bias_uses(space, b, D: Tensor) -> dict:
    if b is None or space.base(b) is None:
        return {}
    return _explicit(space, b, D.sum(1) if D.shape[1] > 1 else D[:, 0])


def _dense(ctx, func, out, x: Tensor, w: Tensor, b, transposed: bool):
    """Record the call of a dense layer over tokens, ``out = x w^T + b`` (w [O, I]) or, when
    ``transposed``, ``out = x w + b`` (w [I, O]): the weight's factors and the bias's token sums."""
    B, seq_first, xd, space = ctx.B, ctx.seq_first, x.detach(), ctx.space

    def build(gy):
        A = batch_major(xd, B, seq_first).reshape(B, -1, xd.shape[-1])
        D = batch_major(gy, B, seq_first).reshape(B, -1, gy.shape[-1])
        uses = dense_weight_uses(space, w, A, D, transposed) if space.base(w) is not None else {}
        return _merge(uses, _bias_uses(space, b, D))

    return ctx.record(func, out, [w, b], build)


# --- rules ---------------------------------------------------------------------------------------
def linear(ctx, func, args, kwargs):
    x, w, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    if not ctx.is_data(x):
        return NotImplemented
    return _dense(ctx, func, func(x, ctx.use(w), ctx.use(b)), x, w, b, transposed=False)


def matmul(ctx, func, args, kwargs):
    x, w = args[0], args[1]
    if not ctx.is_data(x) or ctx.space.base(w) is None or w.dim() != 2 or x.dim() < 2:
        return NotImplemented
    return _dense(ctx, func, func(x, ctx.use(w)), x, w, None, transposed=True)


def addmm(ctx, func, args, kwargs):
    """``torch.addmm(b, x, w)``: a Linear with the weight stored [I, O] (transformers' Conv1D
    written by hand); ``x`` [N, I] holds the batch folded over tokens."""
    b, x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "mat1"), _arg(args, kwargs, 2, "mat2")
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) > 3:
        return NotImplemented
    if not ctx.is_data(x) or ctx.seq_first or not isinstance(w, Tensor) or w.dim() != 2:
        return NotImplemented
    if isinstance(b, Tensor) and ctx.space.base(b) is not None and b.dim() != 1:
        return NotImplemented  # a parameter bias per row: not one bias shared by the tokens
    return _dense(ctx, func, func(ctx.use(b), x, ctx.use(w), **kwargs), x, w, b, transposed=True)


def _conv_padding(x, padding, kernel, dilation, nd):
    if isinstance(padding, str):
        if padding == "valid":
            return x, (0,) * nd
        pad = []
        for d in reversed(range(nd)):  # "same": total d (k - 1), the extra one on the right
            total = dilation[d] * (kernel[d] - 1)
            pad += [total // 2, total - total // 2]
        return F.pad(x, pad), (0,) * nd
    return x, _tuple(padding, nd)


def _conv_call(ctx, func, args, kwargs):
    """(x, w, b, out) of a convolution or transposed convolution run with its weight and bias in
    use, or None where x is not batch-first data with one image per sample (folded images:
    per-sample sums over k images are not factored)."""
    x, w, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    if not ctx.is_data(x) or ctx.fold(x) != 1 or ctx.seq_first:
        return None
    rest = {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}
    return x, w, b, func(x, ctx.use(w), ctx.use(b), *args[3:], **rest)


def conv(ctx, func, args, kwargs):
    got = _conv_call(ctx, func, args, kwargs)
    if got is None:
        return NotImplemented
    x, w, b, out = got
    nd = x.dim() - 2
    stride = _tuple(_arg(args, kwargs, 3, "stride", 1), nd)
    padding = _arg(args, kwargs, 4, "padding", 0)
    dilation = _tuple(_arg(args, kwargs, 5, "dilation", 1), nd)
    groups = _arg(args, kwargs, 6, "groups", 1)
    B, xd, space = ctx.B, x.detach(), ctx.space
    kernel = tuple(w.shape[2:])

    def build(gy):
        uses = {}
        if space.base(w) is not None:
            xp, pad = _conv_padding(xd, padding, kernel, dilation, nd)
            use = rules.conv_weight_use(xp, gy, B, kernel, stride, pad, dilation, groups, w.shape[0])
            uses = _weight_use(space, w, use)
        return _merge(uses, _bias_uses(space, b, gy.reshape(B, gy.shape[1], -1).transpose(1, 2)))

    return ctx.record(func, out, [w, b], build)


def conv_transpose(ctx, func, args, kwargs):
    got = _conv_call(ctx, func, args, kwargs)
    if got is None:
        return NotImplemented
    x, w, b, out = got
    nd = x.dim() - 2
    stride = _tuple(_arg(args, kwargs, 3, "stride", 1), nd)
    padding = _tuple(_arg(args, kwargs, 4, "padding", 0), nd)
    groups = _arg(args, kwargs, 6, "groups", 1)
    dilation = _tuple(_arg(args, kwargs, 7, "dilation", 1), nd)
    B, xd, space = ctx.B, x.detach(), ctx.space
    kernel = tuple(w.shape[2:])

    def build(gy):
        uses = {}
        if space.base(w) is not None:
            # y = C^T x for the convolution C with this weight: dW = conv weight gradient of (gy, x)
            use = rules.conv_weight_use(gy, xd, B, kernel, stride, padding, dilation, groups, w.shape[0])
            uses = _weight_use(space, w, use)
        return _merge(uses, _bias_uses(space, b, gy.reshape(B, gy.shape[1], -1).transpose(1, 2)))

    return ctx.record(func, out, [w, b], build)


def _weight_use(space, w, use) -> dict:
    kind, p = space.base(w)
    if kind == "param" and same_view(w, p):
        return {p: [use]}
    return _explicit(space, w, use.explicit())


def _norm(ctx, func, args, kwargs, x, weight, bias, xhat_fn, channel_first):
    if not ctx.is_data(x) or ctx.seq_first or (channel_first and ctx.fold(x) != 1):
        return NotImplemented  # channels-first statistics are per image: batch-first only
    a = list(args)
    kw = dict(kwargs)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        for i, v in enumerate(a):
            if v is t:
                a[i] = ctx.use(t)
        if kw.get(name) is t:
            kw[name] = ctx.use(t)
    out = func(*a, **kw)
    B, xd, space = ctx.B, x.detach(), ctx.space

    def build(gy):
        xf = xd.float() if xd.dtype in (torch.float16, torch.bfloat16) else xd
        g = gy.to(xf.dtype)
        ref = weight if weight is not None else bias
        n = ref.numel()
        uses = {}
        if weight is not None and space.base(weight) is not None:
            prod = xhat_fn(xf) * g
            rows = prod.reshape(B, n, -1).sum(-1) if channel_first else prod.reshape(B, -1, n).sum(1)
            uses = _explicit(space, weight, rows)
        if bias is not None and space.base(bias) is not None:
            rows = g.reshape(B, n, -1).sum(-1) if channel_first else g.reshape(B, -1, n).sum(1)
            _merge(uses, _explicit(space, bias, rows))
        return uses

    return ctx.record(func, out, [weight, bias], build)


def layer_norm(ctx, func, args, kwargs):
    x, shape = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "normalized_shape")
    w, b, eps = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias"), _arg(args, kwargs, 4, "eps", 1e-5)
    return _norm(ctx, func, args, kwargs, x, w, b, lambda xf: F.layer_norm(xf, shape, None, None, eps), False)


def group_norm(ctx, func, args, kwargs):
    x, groups = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "num_groups")
    w, b, eps = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias"), _arg(args, kwargs, 4, "eps", 1e-5)
    return _norm(ctx, func, args, kwargs, x, w, b, lambda xf: F.group_norm(xf, groups, None, None, eps), True)


def batch_norm(ctx, func, args, kwargs):
    x, rm, rv = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
    w, b = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
    training, eps = _arg(args, kwargs, 5, "training", False), _arg(args, kwargs, 7, "eps", 1e-5)
    if training or rm is None or rv is None:
        raise UnsupportedModule(
            f"{ctx.where()}: batch_norm uses batch statistics (training mode or no running statistics): samples "
            "share the batch mean and variance, so per-sample gradients do not exist. Put the module in eval mode "
            "(module.eval()) for the retain pass, or use GroupNorm/LayerNorm."
        )
    rm, rv = rm.detach().clone(), rv.detach().clone()

    def xhat(xf):
        shape = (1, -1) + (1,) * (xf.dim() - 2)
        return (xf - rm.reshape(shape).to(xf.dtype)) * torch.rsqrt(rv.reshape(shape).to(xf.dtype) + eps)

    return _norm(ctx, func, args, kwargs, x, w, b, xhat, True)


def rms_norm(ctx, func, args, kwargs):
    x, shape = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "normalized_shape")
    w, eps = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "eps")
    dims = tuple(range(-len(_tuple(shape, 1)), 0))

    def xhat(xf):
        e = eps if eps is not None else torch.finfo(xf.dtype).eps
        return xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + e)

    return _norm(ctx, func, args, kwargs, x, w, None, xhat, False)


def embedding(ctx, func, args, kwargs):
    ids, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
    if ctx.seq_first:
        return NotImplemented
    padding_idx = _arg(args, kwargs, 2, "padding_idx")
    if _arg(args, kwargs, 3, "max_norm") is not None or _arg(args, kwargs, 5, "scale_grad_by_freq", False):
        raise UnsupportedModule(
            f"{ctx.where()}: embedding with max_norm or scale_grad_by_freq: the table is renormalized in place / its "
            "gradient depends on the token counts of the whole batch, so per-sample gradients are not defined. "
            "Use max_norm=None and scale_grad_by_freq=False."
        )
    kind, p = ctx.space.base(w)
    if kind != "param" or not same_view(w, p):
        return NotImplemented
    a = list(args)
    a[1] = ctx.use(w)
    if not ctx.is_data(ids):
        # ids shared by all samples (positions, relative-position buckets): a lookup of parameters
        # only, mapped back as an embedding use where it meets the batch
        out = func(*a, **kwargs)
        ctx.space.add_lookup(out, p, ids, padding_idx)
        return out
    out = func(*a, **kwargs)
    B, idsd = ctx.B, ids.detach()

    def build(gy):
        V, d = p.shape
        flat = idsd.reshape(B, -1)
        rows = gy.reshape(B, -1, d)
        if padding_idx is not None:
            pad = padding_idx if padding_idx >= 0 else V + padding_idx
            rows = rows * (flat != pad).unsqueeze(-1).to(rows.dtype)
        return {p: [OuterUse(rows[:, :, None, :], None, flat, (1, V, d))]}

    return ctx.record(func, out, [w], build)


def getitem(ctx, func, args, kwargs):
    """``weight[ids]`` with batched ids: an embedding lookup."""
    w, ids = args[0], args[1]
    if not (isinstance(ids, Tensor) and ids.dtype in (torch.long, torch.int) and ctx.is_data(ids)) or ctx.seq_first:
        return NotImplemented
    kind, p = ctx.space.base(w)
    if kind != "param" or not same_view(w, p) or p.dim() != 2:
        return NotImplemented
    out = func(ctx.use(w), ids)
    B, idsd = ctx.B, ids.detach()

    def build(gy):
        V, d = p.shape
        return {p: [OuterUse(gy.reshape(B, -1, d)[:, :, None, :], None, idsd.reshape(B, -1), (1, V, d))]}

    return ctx.record(func, out, [w], build)


def prelu(ctx, func, args, kwargs):
    x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
    if not ctx.is_data(x) or ctx.fold(x) != 1 or ctx.seq_first or x.dim() < 2:
        return NotImplemented
    out = func(x, ctx.use(w))
    B, xd, space = ctx.B, x.detach(), ctx.space

    def build(gy):
        prod = gy * xd.clamp(max=0)
        rows = prod.reshape(B, -1).sum(1, keepdim=True) if w.numel() == 1 else prod.reshape(B, w.numel(), -1).sum(-1)
        return _explicit(space, w, rows)

    return ctx.record(func, out, [w], build)


def bilinear(ctx, func, args, kwargs):
    x1, x2 = _arg(args, kwargs, 0, "input1"), _arg(args, kwargs, 1, "input2")
    w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    if not (ctx.is_data(x1) and ctx.is_data(x2)) or ctx.seq_first:
        return NotImplemented
    out = func(x1, x2, ctx.use(w), ctx.use(b))
    B, a1, a2, space = ctx.B, x1.detach(), x2.detach(), ctx.space

    def build(gy):
        O, I1, I2 = w.shape
        A = (a1.reshape(B, -1, I1, 1) * a2.reshape(B, -1, 1, I2)).reshape(B, -1, I1 * I2)
        D = gy.reshape(B, -1, O)
        uses = {}
        if space.base(w) is not None:
            kind, p = space.base(w)
            if kind == "param" and same_view(w, p):
                uses = {p: [OuterUse(A[:, :, None, :], D[:, :, None, :], None, (1, O, I1 * I2))]}
            else:
                uses = _explicit(space, w, torch.einsum("bto,bti->boi", D.double(), A.double()).reshape(B, -1))
        return _merge(uses, _bias_uses(space, b, D))

    return ctx.record(func, out, [w, b], build)


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
    """``F.scaled_dot_product_attention`` with batched queries: an operand made of parameters only
    (a relative-position bias as ``attn_mask``, a learned query) is added to or multiplied into the
    scores sample by sample, so it is handed out expanded along the batch (per-sample rows)."""
    q = _arg(args, kwargs, 0, "query")
    if not ctx.is_data(q) or ctx.seq_first:
        return NotImplemented
    a, kw = list(args), dict(kwargs)
    for i, name in enumerate(("query", "key", "value", "attn_mask")):
        t = _arg(args, kwargs, i, name)
        if not isinstance(t, Tensor) or ctx.space.base(t) is None:
            continue
        if not t.is_floating_point() or t.dim() > q.dim():
            return NotImplemented
        src = ctx.use(t)
        while src.dim() < q.dim():
            src = src.unsqueeze(0)
        if src.shape[0] != 1:
            return NotImplemented
        rows = ctx.per_sample(func, t, src, ctx.fold(q))
        if i < len(args):
            a[i] = rows
        else:
            kw[name] = rows
    return func(*a, **kw)


RULES: Dict[Callable, Callable] = {
    F.linear: linear,
    torch.matmul: matmul,
    torch.addmm: addmm,
    Tensor.addmm: addmm,
    torch.einsum: einsum,
    Tensor.matmul: matmul,
    Tensor.__matmul__: matmul,
    torch.conv1d: conv,
    torch.conv2d: conv,
    torch.conv3d: conv,
    torch.conv_transpose1d: conv_transpose,
    torch.conv_transpose2d: conv_transpose,
    torch.conv_transpose3d: conv_transpose,
    F.layer_norm: layer_norm,
    torch.layer_norm: layer_norm,
    F.group_norm: group_norm,
    torch.group_norm: group_norm,
    F.batch_norm: batch_norm,
    torch.batch_norm: batch_norm,
    F.embedding: embedding,
    Tensor.__getitem__: getitem,
    torch.prelu: prelu,
    torch.bilinear: bilinear,
    F.scaled_dot_product_attention: attention,
}
if hasattr(F, "rms_norm"):
    RULES[F.rms_norm] = rms_norm
if hasattr(torch, "rms_norm"):
    RULES[torch.rms_norm] = rms_norm


# Operations that broadcast a parameter against batched data sample by sample (dim 0 of the
# batched operand stays the sample index): a parameter meeting the batch there is handed out
# expanded along the batch (batch_layout.PerSample).
def _names(obj, names):
    return {getattr(obj, n) for n in names if hasattr(obj, n)}


_ARITH = ("add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "addcmul", "addcdiv", "where",
          "maximum", "minimum", "lerp", "rsub")
_DUNDER = ("__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
           "__truediv__", "__rtruediv__", "__itruediv__", "__div__", "__rdiv__")
BROADCAST = (
    _names(torch, _ARITH)
    | _names(Tensor, _ARITH)
    | _names(Tensor, tuple(n + "_" for n in _ARITH))
    | _names(Tensor, _DUNDER)
)
CONCAT = _names(torch, ("cat", "concat", "concatenate"))


def _mha_with_inner_calls():
    """torch's own ``F.multi_head_attention_forward`` with its torch-function dispatch switched
    off, so that called inside the capture mode the mode sees its inner projections (F.linear)."""
    f = F.multi_head_attention_forward
    g = dict(f.__globals__)
    g["has_torch_function"] = lambda *a, **k: False
    return types.FunctionType(f.__code__, g, f.__name__, f.__defaults__, f.__closure__)


MHA_FORWARD = _mha_with_inner_calls()
MHA_FUNCS = {F.multi_head_attention_forward}


def op_name(func) -> str:
    """A readable name: torch.conv2d, torch.nn.functional.layer_norm, Tensor.add, ..."""
    name = getattr(func, "__name__", None) or repr(func)
    mod = getattr(func, "__module__", None)
    return f"{mod}.{name}" if mod else f"Tensor.{name}"


__all__ = ["RULES", "BROADCAST", "CONCAT", "MHA_FORWARD", "MHA_FUNCS", "op_name"]
