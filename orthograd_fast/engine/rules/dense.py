"""Rules for dense layers and table lookups: F.linear, matmul / addmm with a weight, F.bilinear,
F.embedding and ``weight[ids]`` (docs/math.md section 2).

A bilinear weight [O, I1, I2] is a Linear over the outer products x1 (x) x2.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..batch_layout import batch_major, same_view
from ...errors import CaptureError, UnsupportedModule
from ..factors import OuterFactors
from ..factors import ExplicitRows
from .common import arg, bias_uses, explicit, merge
from .per_sample import expanded_matmul


def dense_weight_uses(space, w: Tensor, A: Tensor, D: Tensor, transposed: bool, D4=None) -> dict:
    """y = A w^T (w [O, I]) or y = A w (``transposed``: w [I, O]) over tokens A [B, T, I], D [B, T, O].
    ``D4``: D as [B, T, 1, O] when the caller already holds it (shared with a one-token bias)."""
    B, T, I = A.shape
    O = D.shape[-1]
    kind, p = space.base(w)
    if kind == "param" and p.dim() == 2:
        if same_view(w, p):
            D4 = D[:, :, None, :] if D4 is None else D4
            return {p: [OuterFactors(A[:, :, None, :], D4, None, (1, O, I), transposed=transposed)]}
        if w.dim() == 2 and w.shape == p.shape[::-1] and w.stride() == p.stride()[::-1] and w.storage_offset() == p.storage_offset():
            # w is p.t() (a tied head written `h @ emb.weight.t()`)
            return {p: [OuterFactors(A[:, :, None, :], D[:, :, None, :], None, (1, O, I), transposed=not transposed)]}
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
            return {p: [OuterFactors(A[:, :, None, :], Dfull, None, (1, p.shape[0], I))]}
    eq = "bti,bto->bio" if transposed else "bto,bti->boi"
    return explicit(space, w, torch.einsum(eq, D.double(), A.double()).reshape(B, -1))


def _dense(ctx, func, out, x: Tensor, w: Tensor, b, transposed: bool):
    """Record the call of a dense layer over tokens, ``out = x w^T + b`` (w [O, I]) or, when
    ``transposed``, ``out = x w + b`` (w [I, O]): the weight's factors and the bias's token sums."""
    B, seq_first, xd, space = ctx.B, ctx.seq_first, x.detach(), ctx.space

    def build(gy):
        A = batch_major(xd, B, seq_first).reshape(B, -1, xd.shape[-1])
        D = batch_major(gy, B, seq_first).reshape(B, -1, gy.shape[-1])
        D4 = D[:, :, None, :]
        uses = dense_weight_uses(space, w, A, D, transposed, D4) if space.base(w) is not None else {}
        if D.shape[1] == 1 and _own(space, w) and _own(space, b) and b.dim() == 1:
            # one token per sample: the bias's rows are the weight's D (gram.share_bias_grams
            # computes D D^T once for both)
            return merge(uses, {b: [ExplicitRows(D[:, 0], weight_D=D4)]})
        return merge(uses, bias_uses(space, b, D))

    # the weight itself: the build gives it one dense factor over this many tokens per sample
    own = _own(space, w)
    out = ctx.record(func, out, [w, b], build, dense=w if own else None, tokens=xd.numel() // max(1, B * xd.shape[-1]) if own else 0)
    ctx.note_dense(x, out, w, transposed)
    return out


def _own(space, t) -> bool:
    """``t`` is a managed parameter itself (not a view or a computation on one)."""
    if not isinstance(t, Tensor) or space.base(t) is None:
        return False
    kind, p = space.base(t)
    return kind == "param" and p is t


# --- rules ---------------------------------------------------------------------------------------
def linear(ctx, func, args, kwargs):
    x, w, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    if not ctx.is_data(x):
        return NotImplemented
    return _dense(ctx, func, func(x, ctx.use(w), ctx.use(b)), x, w, b, transposed=False)


def matmul(ctx, func, args, kwargs):
    x, w = args[0], args[1]
    if not ctx.is_data(x) or ctx.space.base(w) is None or w.dim() != 2 or x.dim() < 2:
        if not kwargs and _left_weight(ctx, x, w):
            return _left_matmul(ctx, func, x, w)
        return expanded_matmul(ctx, func, args, kwargs)
    return _dense(ctx, func, func(x, ctx.use(w)), x, w, None, transposed=True)


def _left_weight(ctx, w, x) -> bool:
    """``w @ x``: a 2-D weight on the left of batch-first data [B, ..., I, T] (Mamba's
    ``dt_proj.weight @ time_step.transpose(1, 2)``)."""
    return (
        isinstance(w, Tensor) and ctx.space.base(w) is not None and w.dim() == 2
        and isinstance(x, Tensor) and x.dim() >= 3 and ctx.fold(x) == 1 and ctx.is_data(x) and not ctx.seq_first
    )


def _left_matmul(ctx, func, w: Tensor, x: Tensor):
    """``out = w @ x`` (w [O, I], x [B, ..., I, T]): the transpose of a Linear over the tokens,
    ``out^T = x^T w^T``: the weight's factors are x^T and the output gradient transposed."""
    out = func(ctx.use(w), x)
    B, xd, space = ctx.B, x.detach(), ctx.space

    def build(gy):
        A = xd.transpose(-1, -2).reshape(B, -1, xd.shape[-2])
        D = gy.transpose(-1, -2).reshape(B, -1, gy.shape[-2])
        return dense_weight_uses(space, w, A, D, False)

    return ctx.record(func, out, [w], build)


_BADDBMM = (torch.baddbmm, Tensor.baddbmm)


def grouped_bmm(ctx, func, args, kwargs):
    """``torch.bmm(x, w)`` / ``torch.baddbmm(b, x, w)`` with a 3-D weight [G, I, O], one matrix per
    group (a block-diagonal Linear: RecurrentGemma's RG-LRU gates), over data x [G, N, I] whose
    batch is on dim 1, ``k`` rows per sample (each sample's tokens folded there); ``b`` a bias
    [G, 1, O] or data. Per group the weight's gradient is sum over tokens of x_t (x) dy_t."""
    if func in _BADDBMM:
        b, x, w = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "batch1"), arg(args, kwargs, 2, "batch2")
        if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) > 3:
            return NotImplemented
    else:
        b, x, w = None, arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "mat2")
    space, B = ctx.space, ctx.B
    if ctx.seq_first or not isinstance(x, Tensor) or not isinstance(w, Tensor) or x.dim() != 3 or w.dim() != 3:
        return NotImplemented
    if space.base(x) is not None or space.base(w) is None or not w.is_floating_point():
        return NotImplemented
    lay = ctx.prov.layout(x, B)
    if lay is None or lay[1] != 1:
        return NotImplemented
    has_b = isinstance(b, Tensor) and space.base(b) is not None
    if has_b and not (b.dim() == 3 and b.shape[1] == 1 and b.shape[0] == x.shape[0]):
        return NotImplemented  # a parameter bias per row, not one shared by the tokens
    out = func(ctx.use(b), x, ctx.use(w)) if b is not None else func(x, ctx.use(w))
    xd, k = x.detach(), lay[0]

    def build(gy):
        G, _, I = xd.shape
        O = gy.shape[-1]
        A = xd.reshape(G, B, k, I).permute(1, 2, 0, 3).contiguous()  # [B, k, G, I]
        D = gy.reshape(G, B, k, O).permute(1, 2, 0, 3).contiguous()  # [B, k, G, O]
        kind, p = space.base(w)
        if kind == "param" and same_view(w, p):  # p [G, I, O]: per group sum_t x_t (x) dy_t
            uses = {p: [OuterFactors(D, A, None, (G, I, O))]}
        elif kind == "param" and p.dim() == 3 and same_view(w, p.transpose(1, 2)):  # w = p.mT, p [G, O, I]
            uses = {p: [OuterFactors(A, D, None, (G, O, I))]}
        else:
            uses = explicit(space, w, torch.einsum("bkgi,bkgo->bgio", A.double(), D.double()).reshape(B, -1))
        if has_b:
            merge(uses, explicit(space, b, D.sum(1).reshape(B, -1)))
        return uses

    return ctx.record(func, out, [w, b] if has_b else [w], build)


def addmm(ctx, func, args, kwargs):
    """``torch.addmm(b, x, w)``: a Linear with the weight stored [I, O] (transformers' Conv1D
    written by hand); ``x`` [N, I] holds the batch folded over tokens."""
    b, x, w = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "mat1"), arg(args, kwargs, 2, "mat2")
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) > 3:
        return NotImplemented
    if not ctx.is_data(x) or ctx.seq_first or not isinstance(w, Tensor) or w.dim() != 2:
        return NotImplemented
    if isinstance(b, Tensor) and ctx.space.base(b) is not None and b.dim() != 1:
        return NotImplemented  # a parameter bias per row: not one bias shared by the tokens
    return _dense(ctx, func, func(ctx.use(b), x, ctx.use(w), **kwargs), x, w, b, transposed=True)


def embedding(ctx, func, args, kwargs):
    ids, w = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight")
    if ctx.seq_first:
        return NotImplemented
    padding_idx = arg(args, kwargs, 2, "padding_idx")
    _refuse_renorm(ctx, "embedding", arg(args, kwargs, 3, "max_norm"), arg(args, kwargs, 5, "scale_grad_by_freq", False))
    kind, p = ctx.space.base(w)
    if kind != "param" or not same_view(w, p):
        return NotImplemented
    a = list(args)
    a[1] = ctx.use(w)
    lay = ctx.prov.layout(ids, ctx.B) if isinstance(ids, Tensor) and ctx.space.base(ids) is None else None
    if lay is None:
        # ids shared by all samples (positions, relative-position buckets): a lookup of parameters
        # only, mapped back as an embedding use where it meets the batch
        out = func(*a, **kwargs)
        ctx.space.add_lookup(out, p, ids, padding_idx)
        return out
    out = func(*a, **kwargs)
    B, idsd, bdim = ctx.B, ids.detach(), lay[1]  # (the batch on dim bdim: [T, B] ids of a sequence-first model)
    if bdim:
        ctx.prov.mark(out, lay)  # ids.shape + (d,): the batch where the ids hold it

    def build(gy):
        V, d = p.shape
        flat = idsd.movedim(bdim, 0).reshape(B, -1)
        rows = gy.movedim(bdim, 0).reshape(B, -1, d)
        keep = _not_padding(flat, padding_idx, V, rows.dtype)
        if keep is not None:
            rows = rows * keep.unsqueeze(-1)
        return {p: [OuterFactors(rows[:, :, None, :], None, flat, (1, V, d))]}

    return ctx.record(func, out, [w], build)


def _refuse_renorm(ctx, what: str, max_norm, scale_grad_by_freq) -> None:
    """A lookup whose table is renormalized in place or whose gradient is scaled by the batch's token
    counts has no per-sample gradients: say so."""
    if max_norm is not None or scale_grad_by_freq:
        raise UnsupportedModule(
            f"{ctx.where()}: {what} with max_norm or scale_grad_by_freq: the table is renormalized in place / its "
            "gradient depends on the token counts of the whole batch, so per-sample gradients are not defined. "
            "Use max_norm=None and scale_grad_by_freq=False."
        )


def _not_padding(ids: Tensor, padding_idx, V: int, dtype: torch.dtype):
    """1 where ``ids`` is not ``padding_idx`` (negative: counted from the end of a V-row table), 0
    where it is, in ``dtype``; None without a padding index."""
    if padding_idx is None:
        return None
    return (ids != (padding_idx if padding_idx >= 0 else V + padding_idx)).to(dtype)


_BAG_ARGS = ("input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq", "mode", "sparse",
             "per_sample_weights", "include_last_offset", "padding_idx")


# max mode keeps one token per output entry (B x d x d rows): above this many elements the 2-D
# form goes to the fallback and the offsets form is refused
BAG_MAX_ROWS = 1 << 24


def embedding_bag(ctx, func, args, kwargs):
    """``F.embedding_bag`` with one bag per sample: ids [B, L], or flat ids with ``offsets`` of B
    bags (B + 1 entries with ``include_last_offset``; bag i is sample i). A lookup whose tokens
    are the bag's ids (sum: each carries the bag's output gradient times its
    ``per_sample_weights``; mean: divided by the bag's count of ids other than ``padding_idx``;
    bags padded to the longest with zero rows), or for mode max one token per output entry: entry
    (i, j) hands its gradient to column j of the row the max picked (an empty bag hands none)."""
    a = {n: arg(args, kwargs, i, n) for i, n in enumerate(_BAG_ARGS)}
    ids, w, offsets, psw, padding_idx = a["input"], a["weight"], a["offsets"], a["per_sample_weights"], a["padding_idx"]
    _refuse_renorm(ctx, "embedding bag", a["max_norm"], a["scale_grad_by_freq"])
    mode = a["mode"] if a["mode"] is not None else "mean"
    last = bool(a["include_last_offset"])
    base = ctx.space.base(w)
    if (
        ctx.seq_first
        or mode not in ("sum", "mean", "max")
        or not isinstance(ids, Tensor)
        or base is None
        or base[0] != "param"
        or not same_view(w, base[1])
        or (isinstance(psw, Tensor) and ctx.space.base(psw) is not None)
    ):
        return NotImplemented
    p, B = base[1], ctx.B
    V, d = p.shape
    if offsets is None:
        if ids.dim() != 2 or not ctx.is_data(ids):
            return NotImplemented
        if mode == "max" and B * d * d > BAG_MAX_ROWS:
            return NotImplemented
        flat = ids.detach().reshape(-1)
        L = ids.shape[1]
        offs = torch.arange(0, flat.numel(), L, dtype=flat.dtype, device=flat.device)
        starts, ends = offs, offs + L
    else:
        if ids.dim() != 1 or not isinstance(offsets, Tensor) or offsets.dim() != 1:
            return NotImplemented  # (F.embedding_bag's own error says what is wrong)
        bags = offsets.shape[0] - (1 if last else 0)
        if bags != B:
            declared = ctx.capture.declared_B is not None
            raise CaptureError(
                f"{ctx.where()}: embedding bag with offsets makes {bags} bags, one per sample, but the retain batch is "
                f"B={B} (" + ("og.retain(batch_size=...)" if declared else "dim 0 of the model's first tensor input, "
                f"shape {tuple(ids.shape)} when that is the flat ids") + "). Give the number of samples: "
                "`with og.retain(batch_size=len(offsets)):` (one bag per sample; with include_last_offset, "
                "len(offsets) - 1)."
            )
        if mode == "max" and B * d * d > BAG_MAX_ROWS:
            raise CaptureError(
                f"{ctx.where()}: embedding bag in mode max with offsets: its per-sample factors would hold "
                f"B x d x d = {B * d * d} entries (above {BAG_MAX_ROWS}). Use a smaller retain batch (several "
                "retain() blocks accumulate), mode sum or mean, or 2-D ids."
            )
        flat, offs = ids.detach(), offsets.detach().to(ids.dtype)
        N = flat.numel()
        starts = offs[:B]
        ends = offs[1 : B + 1] if last else torch.cat([offs[1:], offs.new_full((1,), N)])
    picked = None  # max: the rows the max picked, per output entry [B, d]
    if mode == "max" and psw is None and not a["sparse"]:
        # what F.embedding_bag runs, called here for its picked rows too (F returns the output only)
        out, _, _, picked = torch.embedding_bag(ctx.use(w), flat, offs, False, 2, False, None, last and offsets is not None, padding_idx)
    else:  # (max with weights or sparse: F.embedding_bag's own error)
        args = list(args)
        if len(args) > 1:
            args[1] = ctx.use(w)
        else:
            kwargs = dict(kwargs, weight=ctx.use(w))
        out = func(*args, **kwargs)
    if offsets is not None:
        ctx.prov.mark(out)  # [B, d]: bag i is sample i
    pswd = psw.detach().reshape(-1) if isinstance(psw, Tensor) else None

    def build(gy):
        tok, wt = _bag_tokens(flat, starts, ends, padding_idx, V, gy.dtype)
        if picked is not None:
            rows = torch.diag_embed(gy.reshape(B, d) * (wt.sum(1) > 0).to(gy.dtype)[:, None])
            return {p: [OuterFactors(rows[:, :, None, :], None, picked, (1, V, d))]}
        if mode == "mean":
            wt = wt / wt.sum(1, keepdim=True).clamp_min(1)
        if pswd is not None:
            wt = wt * _bag_gather(pswd, starts, ends, wt.shape[1]).to(gy.dtype)
        rows = gy.reshape(B, 1, d) * wt[:, :, None]
        return {p: [OuterFactors(rows[:, :, None, :], None, tok, (1, V, d))]}

    return ctx.record(func, out, [w], build)


def _bag_gather(flat: Tensor, starts: Tensor, ends: Tensor, L: int) -> Tensor:
    """[B, L]: bag i's entries of ``flat`` (``starts[i]`` to ``ends[i]``), padded with its entry 0."""
    pos = torch.arange(L, device=flat.device)
    idx = starts[:, None] + pos[None, :]
    inside = idx < ends[:, None]
    if flat.numel() == 0:
        return flat.new_zeros(idx.shape)
    return torch.where(inside, flat[idx.clamp(0, flat.numel() - 1)], flat.new_zeros(()))


def _bag_tokens(flat: Tensor, starts: Tensor, ends: Tensor, padding_idx, V: int, dtype: torch.dtype):
    """(ids [B, L], weights [B, L]) of the bags padded to the longest L: weight 1 on an id of
    the bag, 0 on the padding and on ``padding_idx``."""
    lengths = (ends - starts).clamp_min(0)
    L = max(1, int(lengths.max())) if lengths.numel() else 1
    tok = _bag_gather(flat, starts, ends, L)
    wt = (torch.arange(L, device=flat.device)[None, :] < lengths[:, None]).to(dtype)
    keep = _not_padding(tok, padding_idx, V, dtype)
    return tok, (wt if keep is None else wt * keep)


def getitem(ctx, func, args, kwargs):
    """``weight[ids]`` with batched ids: an embedding lookup. With ids shared by all samples (Swin's
    relative-position index into its bias table): a lookup of parameters only, mapped back as an
    embedding use where it meets the batch (as F.embedding's)."""
    w, ids = args[0], args[1]
    if not (isinstance(ids, Tensor) and ids.dtype in (torch.long, torch.int)):
        return NotImplemented
    if not ctx.is_data(ids):
        base = ctx.space.base(w)
        if base is None or base[0] != "param" or not same_view(w, base[1]) or w.dim() != 2 or ctx.is_activation(ids):
            return NotImplemented
        out = func(ctx.use(w), ids)
        # negative ids count from the end, as indexing reads them
        ctx.space.add_lookup(out, base[1], torch.where(ids < 0, ids + w.shape[0], ids), None)
        return out
    if ctx.seq_first:
        return NotImplemented
    kind, p = ctx.space.base(w)
    if kind != "param" or not same_view(w, p) or p.dim() != 2:
        return NotImplemented
    out = func(ctx.use(w), ids)
    B, idsd = ctx.B, ids.detach()

    def build(gy):
        V, d = p.shape
        return {p: [OuterFactors(gy.reshape(B, -1, d)[:, :, None, :], None, idsd.reshape(B, -1), (1, V, d))]}

    return ctx.record(func, out, [w], build)


def bilinear(ctx, func, args, kwargs):
    x1, x2 = arg(args, kwargs, 0, "input1"), arg(args, kwargs, 1, "input2")
    w, b = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
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
                uses = {p: [OuterFactors(A[:, :, None, :], D[:, :, None, :], None, (1, O, I1 * I2))]}
            else:
                uses = explicit(space, w, torch.einsum("bto,bti->boi", D.double(), A.double()).reshape(B, -1))
        return merge(uses, bias_uses(space, b, D))

    return ctx.record(func, out, [w, b], build)
