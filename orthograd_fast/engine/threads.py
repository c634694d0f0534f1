"""CPU threading for the per-tensor terms of a projection.

A projection is many independent terms (one per trainable tensor). Most of their ops (B x B
products over a few thousand columns, float64 copies of B x width factors) are too small for the
intra-op pool: waking it for each op costs more than the op, and on 2 cores the same ops run faster
on one thread (measured, B = 64: a 64 x 1024 float64 Gram 296 us on one thread against 406 us on
two; its float64 copy 94 us against 140 us). Even large GEMMs gain from running side by side (a
float64 Gram: 32 GFLOP/s on one thread, 50 on two, ~60 for two on one thread each). So terms run on
one intra-op thread each, side by side on Python threads (the ops release the GIL), except a term
that dominates the work (:func:`run_spread`).

A thread's intra-op count is set through the OpenMP runtime's per-thread setting
(:func:`set_intra_op`), not ``torch.set_num_threads``: that one also resizes a process-wide pool
and clears oneDNN's primitive cache, and the model's next convolutions pay for it (measured on 2
cores: an unlearn pass after one 2 -> 1 -> 2 toggle 1.02x to 1.055x slower on BERT, MobileNetV2
and ConvNeXt).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_pool_lock = threading.Lock()
_pool: "ThreadPoolExecutor | None" = None
_pool_size = 0
_pool_pid = 0  # a forked child inherits the executor but not its threads: it makes its own


# omp_set_num_threads of the OpenMP runtime behind torch's intra-op pool; None: not looked up
# yet, False: not found (torch.set_num_threads is used instead)
_omp_set = None


def _find_omp_set():
    """The OpenMP runtime's ``omp_set_num_threads`` (it sets the calling thread's count only), from
    the runtime torch loaded (Linux: the process's mapped libraries, torch's own first); None
    where torch's pool is not OpenMP or the runtime is not found."""
    info = torch.__config__.parallel_info()
    if "ATen parallel backend: OpenMP" not in info:
        return None
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return None
    libs = sorted(p for p in paths if re.search(r"/lib(g|i|i5)?omp[^/]*\.so", p))
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    own = [p for p in libs if p.startswith(torch_dir)] or libs
    if len(own) != 1:
        return None
    try:
        fn = ctypes.CDLL(own[0]).omp_set_num_threads
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], None
    return fn


def set_intra_op(n: int) -> None:
    """The calling thread's intra-op thread count: its OpenMP setting alone where the runtime is
    found (checked by reading it back), else ``torch.set_num_threads``."""
    global _omp_set
    torch.get_num_threads()  # a new thread's first query initializes its count: do it before
    if _omp_set is None:
        _omp_set = _find_omp_set() or False
    if _omp_set:
        _omp_set(n)
        if torch.get_num_threads() == n:
            return
        _omp_set = False  # not the runtime torch's pool reads
    torch.set_num_threads(n)


@contextlib.contextmanager
def one_thread(on: bool) -> Iterator[None]:
    """The calling thread's intra-op pool at one thread inside the block (when ``on``), restored
    after."""
    if not on or torch.get_num_threads() == 1:
        yield
        return
    n = torch.get_num_threads()
    set_intra_op(1)
    try:
        yield
    finally:
        set_intra_op(n)


def _workers(n: int) -> ThreadPoolExecutor:
    # one pool for the process, grown on demand; created on first use (never at import)
    global _pool, _pool_size, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_size < n or _pool_pid != os.getpid():
            if _pool is not None and _pool_pid == os.getpid():
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="orthograd-small")
            _pool_size, _pool_pid = n, os.getpid()
        return _pool


def _run(fn: Callable[[T], R], items: List[T]) -> List[R]:
    # worker threads start with autograd enabled: the projection never records a graph
    with torch.no_grad():
        set_intra_op(1)  # this thread's own setting (a fresh thread reads the default)
        return [fn(x) for x in items]


def map_balanced(fn: Callable[[T], R], items: Sequence[T], cost: Sequence[float], threads: int) -> List[R]:
    """[fn(x) for x in items], spread over ``threads`` Python threads (the caller's thread is one of
    them) with the items balanced by ``cost`` (largest first onto the least loaded thread). Call it
    with torch's intra-op pool at one thread (:func:`one_thread`). Results keep the items' order; an
    exception in any item is raised here after every thread has stopped."""
    items = list(items)
    threads = max(1, min(int(threads), len(items)))
    if threads == 1:
        return [fn(x) for x in items]
    bins: List[List[int]] = [[] for _ in range(threads)]
    load = [0.0] * threads
    for k in sorted(range(len(items)), key=lambda k: -float(cost[k])):
        j = min(range(threads), key=load.__getitem__)
        bins[j].append(k)
        load[j] += float(cost[k])
    pool = _workers(threads - 1)
    futures = [pool.submit(_run, fn, [items[k] for k in ks]) for ks in bins[1:]]
    out: List = [None] * len(items)
    err = None
    try:
        for k, r in zip(bins[0], [fn(items[k]) for k in bins[0]]):
            out[k] = r
    except BaseException as e:  # wait for the workers before raising: they touch the same terms
        err = e
    for ks, f in zip(bins[1:], futures):
        try:
            for k, r in zip(ks, f.result()):
                out[k] = r
        except BaseException as e:
            err = err or e
    if err is not None:
        raise err
    return out


def side_by_side(fn: Callable[[T], R], items: Sequence[T], cost: Sequence[float], device) -> List[R]:
    """[fn(x) for x in items]: on the CPU with several intra-op threads, side by side on one
    intra-op thread each (:func:`map_balanced`, the caller's thread included); else in order
    (also under autocast, whose state is the calling thread's: the items run as the caller would)."""
    n = torch.get_num_threads() if torch.device(device).type == "cpu" and not autocast_on() else 1
    if n < 2 or len(items) < 2:
        return [fn(x) for x in items]
    with one_thread(True):
        return map_balanced(fn, items, cost, n)


def autocast_on() -> bool:
    """Whether the calling thread runs under autocast (a per-thread state)."""
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


def run_spread(
    fn: Callable[[T], R],
    items: Sequence[T],
    cost: Sequence[float],
    threads: int,
    *,
    small: float,
    alone: Sequence[bool] = (),
) -> List[R]:
    """[fn(x) for x in items] over ``threads`` CPU threads, each item on one intra-op thread and
    the items side by side (:func:`map_balanced`), except items that run one after another on all
    threads: those flagged in ``alone`` (large scratch memory) and, largest first, those above
    both ``small`` and a fair share (1 / threads) of the work left: one dominant GEMM is faster on
    all threads than on one thread beside idle ones. Measured on 2 CPU cores: a float64 Gram
    32 GFLOP/s on one thread, 50 on two, two side by side ~60; the fp32 update GEMM 70 / 87."""
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    alone_k = {k for k, a in enumerate(alone) if a}
    left = sum(float(cost[k]) for k in range(len(items)) if k not in alone_k)
    for k in sorted((k for k in range(len(items)) if k not in alone_k), key=lambda k: -float(cost[k])):
        c = float(cost[k])
        if c <= small or c <= left / threads:
            break
        alone_k.add(k)
        left -= c
    out: List = [None] * len(items)
    side = [k for k in range(len(items)) if k not in alone_k]
    if side:
        with one_thread(True):
            for k, r in zip(side, map_balanced(fn, [items[k] for k in side], [cost[k] for k in side], threads)):
                out[k] = r
    for k in sorted(alone_k):
        out[k] = fn(items[k])
    return out
