"""CPU buffers of a layer's forward and backward (the LSTM layer's gates, states and gradients), kept
from step to step and handed out again once nothing refers to them.

On the CPU a fresh allocation of a few MiB comes from the system and faults in every page again when
first written (measured, LSTM B = 32, T = 32, H = 256 on 2 cores: its forward and backward allocate
~23 MiB per step; in processes of one code each, 60 pairs, its OrthoGrad step read 1.364x-1.417x a
plain step with the buffers kept against 1.377x-1.451x without). The pool lends views of its
buffers: a buffer is taken again only when no tensor other than the pool's own refers to its storage
(read through torch's storage use count), so a buffer saved for a backward still to come, or kept by
the projection, is never overwritten. Each thread has its own pool of at most POOL_BYTES (a buffer
that would not fit first drops the free ones, oldest first: sequence lengths that change);
:func:`release` frees the calling thread's (``OrthoGrad.reset()``). Elsewhere than the CPU, and
where torch does not expose the use count, every call allocates.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

# bytes of buffers one thread keeps (beyond them a call allocates as usual)
POOL_BYTES = 64 << 20

_use_count = getattr(torch._C, "_storage_Use_Count", None)
_local = threading.local()


class _Pool:
    def __init__(self):
        self.bufs: Dict[Tuple, List[Tensor]] = {}
        self.free_count: Optional[int] = None  # the use count of a buffer only the pool refers to

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for held in self.bufs.values() for b in held)


def _pool() -> _Pool:
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = _Pool()
    return pool


def _count(t: Tensor) -> int:
    return _use_count(t.untyped_storage()._cdata)


def take(name: str, shape: Sequence[int], like: Tensor) -> Tensor:
    """An uninitialized tensor of ``shape`` with ``like``'s dtype and device: on the CPU a view of
    a pooled buffer named ``name`` that nothing else refers to, else a fresh one (pooled while the
    thread's pool has room)."""
    shape = tuple(shape)
    if like.device.type != "cpu" or _use_count is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    pool = _pool()
    key = (name, shape, like.dtype)
    held = pool.bufs.get(key, ())
    if pool.free_count is None:
        pool.free_count = _count(torch.empty(1))  # the pool's own reference (and the reading's)
    for buf in held:
        if _count(buf) == pool.free_count:
            return buf.view(shape)
    buf = torch.empty(shape, dtype=like.dtype)
    size = buf.numel() * buf.element_size()
    if pool.nbytes + size > POOL_BYTES:
        _evict(pool, POOL_BYTES - size)  # free buffers of other shapes (a sequence length that changed)
    if pool.nbytes + size <= POOL_BYTES:
        pool.bufs.setdefault(key, []).append(buf)  # (the eviction may have dropped the key's list)
    return buf.view(shape)


def _evict(pool: _Pool, target: int) -> None:
    """Drop pooled buffers nothing refers to, oldest first, until the pool holds at most
    ``target`` bytes (lists rebuilt by position: a tensor's == compares its elements)."""
    left = pool.nbytes
    for key in list(pool.bufs):
        keep = []
        for buf in pool.bufs[key]:
            if left > target and _count(buf) == pool.free_count:
                left -= buf.numel() * buf.element_size()
            else:
                keep.append(buf)
        if keep:
            pool.bufs[key] = keep
        else:
            del pool.bufs[key]
        if left <= target:
            return


def release() -> None:
    """Free the calling thread's pooled buffers (a buffer still in use lives on with its user)."""
    _local.pool = None
