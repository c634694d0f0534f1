"""Data-parallel OrthoGrad: retain and unlearn batches sharded over DistributedDataParallel ranks.

What is global and what is local
--------------------------------
DDP all-reduces (averages) ``.grad`` in every backward, the retain one inside ``og.retain()`` and
the unlearn one, so ``u`` and the retain gradient ``gbar_r`` are already global (identical on every
rank) and OrthoGrad adds no gradient all-reduce of its own. The factors the hooks capture (layer
inputs A, output gradients D, ids, explicit rows) are local: rank r sees only its B_r samples.

Why the factors are all-gathered (and not partial Grams)
---------------------------------------------------------
The projection needs the Gram K of the *union* of the retain samples, B x B with B = sum_r B_r.
Its diagonal blocks K_rr could be computed locally, but an off-diagonal entry <g_i, g_j> with i on
rank r and j on rank s needs both ranks' factors, so partial Grams alone cannot give K; a reduction
of partial Grams would only be possible after shipping factors anyway. The bytes moved:

* all-gather of the factors: every rank receives sum_r B_r * T * (I + O) numbers per layer (the
  size of the activations and output gradients of the retain batch); for explicit tensors
  (biases, norm weights) B_r * numel.
* the alternative (each rank ships its factors to every other rank to form its row block of K,
  then an all-reduce/all-gather of the B x B blocks) moves the same factor bytes plus B^2 per
  tensor, so it is never smaller.

So every rank all-gathers the factors, concatenates them in rank order and computes the *same*
K, b, c and update from identical inputs (deterministic: same ops on the same data), so ``.grad``
ends identical on every rank without a broadcast. The per-sample rows of different ranks differ
in scale (each rank's loss is its own batch mean, 1/B_r); the projection is invariant to scaling
each g_i, so this is exact.

Unequal per-rank batch sizes and sequence lengths: the sizes are all-gathered first, every tensor
is zero-padded to the largest B_r (rows dropped again after the gather) and the largest token
count T (zero tokens add nothing to any Gram, coefficient or update, the same argument as
:mod:`orthograd_fast.engine.span_blocks`). Half-precision factors travel as int16 bit patterns (gloo has no
bfloat16 all-gather).

Contract
--------
* The model passed to :class:`~orthograd_fast.OrthoGrad` must be the
  ``DistributedDataParallel`` wrapper; gathering is on when its process group has more than one
  rank. Every rank must call ``project_()`` / ``project_vectors()`` (they are collectives).
* ``alpha > 0`` uses the retain gradient DDP produced: the average of the per-rank batch means,
  which is the mean over the union when every rank has the same batch size (DDP's own semantics).
* The capture consistency check compares sum_i <g_i, u> over the gathered samples with
  ``world_size * <gbar_r, u>`` (DDP's gradient is the rank average of the local gradients).
* FSDP / ``fully_shard`` (DTensor parameters) is refused by :func:`check_supported`: the hooks
  would see sharded, resharded parameters and the factor shapes would not match the local shards.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ..errors import DistributedError
from .factors import ExplicitRows, OuterFactors


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return False
    return isinstance(t, DTensor) or isinstance(getattr(t, "data", None), DTensor)


def check_supported(model: nn.Module) -> None:
    """Refuse FSDP (classic wrapper or fully_shard / DTensor parameters) with a clear error."""
    fsdp_types = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp_types.append(FullyShardedDataParallel)
    except ImportError:  # pragma: no cover
        pass
    try:
        from torch.distributed.fsdp import FSDPModule

        fsdp_types.append(FSDPModule)
    except ImportError:  # pragma: no cover
        pass
    sharded = None
    for name, m in model.named_modules():
        if fsdp_types and isinstance(m, tuple(fsdp_types)):
            sharded = f"module '{name or type(model).__name__}' is FSDP-wrapped ({type(m).__name__})"
            break
    if sharded is None:
        for name, p in model.named_parameters():
            if _is_dtensor(p):
                sharded = f"parameter '{name}' is a DTensor (sharded by FSDP fully_shard or tensor parallel)"
                break
    if sharded:
        raise DistributedError(
            f"OrthoGrad does not support FSDP / sharded parameters: {sharded}. The hooks capture factors "
            "of full layers while FSDP holds parameter shards, so the per-sample Gram cannot be formed. "
            "Use DistributedDataParallel (OrthoGrad all-gathers the factors), or unlearn with a "
            "non-sharded copy of the model."
        )


def ddp_group(model: nn.Module):
    """The process group when ``model`` is a DistributedDataParallel wrapper over > 1 rank, else None."""
    from torch.nn.parallel import DistributedDataParallel

    dist = _dist()
    if dist is None or not isinstance(model, DistributedDataParallel):
        return None
    group = getattr(model, "process_group", None)
    if dist.get_world_size(group) <= 1:
        return None
    return group


def world_size(group) -> int:
    dist = _dist()
    return 1 if dist is None or group is None else dist.get_world_size(group)


# ------------------------------------------------------------------------------------------------
def _tensors_of(u) -> List[Optional[Tensor]]:
    if isinstance(u, ExplicitRows):
        return [u.G]
    return [u.A, u.D, u.ids]


def _signature(uses: Dict[Tensor, list], order: List[Tensor]) -> list:
    """Per parameter (in OrthoGrad's parameter order): the kinds and shapes of its uses."""
    sig = []
    for p in order:
        row = []
        for u in uses.get(p, []):
            if isinstance(u, ExplicitRows):
                row.append(("explicit", None, None, [(tuple(u.G.shape), str(u.G.dtype))]))
            else:
                row.append(
                    (
                        "outer",
                        tuple(u.shape),
                        bool(u.transposed),
                        [None if t is None else (tuple(t.shape), str(t.dtype)) for t in _tensors_of(u)],
                    )
                )
        sig.append(row)
    return sig


def _strip_bt(sig: list) -> list:
    """The signature without the sample (dim 0) and token (dim 1 of outer factors) sizes."""
    out = []
    for row in sig:
        r = []
        for kind, shape, tr, ts in row:
            keep = 1 if kind == "explicit" else 2
            r.append((kind, shape, tr, [None if t is None else (t[0][keep:], t[1]) for t in ts]))
        out.append(r)
    return out


def _pad(t: Tensor, B: int, T: Optional[int]) -> Tensor:
    shape = list(t.shape)
    if shape[0] == B and (T is None or shape[1] == T):
        return t.contiguous()
    shape[0] = B
    if T is not None:
        shape[1] = T
    out = t.new_zeros(shape)
    if T is None:
        out[: t.shape[0]] = t
    else:
        out[: t.shape[0], : t.shape[1]] = t
    return out


def _all_gather(t: Tensor, group) -> List[Tensor]:
    dist = _dist()
    wire = t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t
    bufs = [torch.empty_like(wire) for _ in range(dist.get_world_size(group))]
    dist.all_gather(bufs, wire, group=group)
    return [b.view(t.dtype) if b.dtype != t.dtype else b for b in bufs]


def gather_uses(uses: Dict[Tensor, list], order: List[Tensor], names: Dict[Tensor, str], B_local: int, group) -> Dict[Tensor, list]:
    """{param: [local uses over B_local samples]} -> the same over the union of every rank's
    samples (rank order), identical on every rank."""
    dist = _dist()
    W = dist.get_world_size(group)
    sig = _signature(uses, order)
    allsig = [None] * W
    dist.all_gather_object(allsig, (B_local, sig), group=group)
    Bs = [s[0] for s in allsig]
    base = _strip_bt(sig)
    for r, (_, s) in enumerate(allsig):
        if _strip_bt(s) != base:
            bad = next(
                (names[p] for p, a, b in zip(order, base, _strip_bt(s)) if a != b),
                "<unknown>",
            )
            raise DistributedError(
                f"DDP rank {r} captured different layer uses than rank {dist.get_rank(group)} for parameter "
                f"'{bad}' (a layer skipped or called a different number of times on some ranks, or different "
                "dtypes). Every rank must run the same retain forward (same modules, same autocast)."
            )
    Bmax = max(Bs)
    out: Dict[Tensor, list] = {}
    for k, p in enumerate(order):
        if not uses.get(p):
            continue
        new = []
        for j, u in enumerate(uses[p]):
            if isinstance(u, ExplicitRows):
                parts = _all_gather(_pad(u.G, Bmax, None), group)
                new.append(ExplicitRows(torch.cat([x[:b] for x, b in zip(parts, Bs)], 0)))
                continue
            Tmax = max(s[k][j][3][0][0][1] for _, s in allsig)
            got = []
            for t in _tensors_of(u):
                if t is None:
                    got.append(None)
                    continue
                parts = _all_gather(_pad(t, Bmax, Tmax), group)
                got.append(torch.cat([x[:b] for x, b in zip(parts, Bs)], 0))
            new.append(OuterFactors(got[0], got[1], got[2], u.shape, u.transposed))
        out[p] = new
    return out
