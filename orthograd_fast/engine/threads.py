"""CPU threading for the per-tensor terms of a projection.

A projection is many independent terms (one per trainable tensor). Most of their ops (B x B
products over a few thousand columns, float64 copies of B x width factors) are too small for the
intra-op pool: waking it for each op costs more than the op, and on 2 cores the same ops run faster
on one thread (measured, B = 64: a 64 x 1024 float64 Gram 296 us on one thread against 406 us on
two; its float64 copy 94 us against 140 us). Even large GEMMs gain from running side by side (a
float64 Gram: 32 GFLOP/s on one thread, 50 on two, ~60 for two on one thread each). So terms run on
one intra-op thread each, side by side on Python threads (the ops release the GIL), except a term
that dominates the work (:func:`run_spread`).

A thread's intra-op count is set through the OpenMP runtime's per-thread setting and MKL's
thread-local one (:func:`set_intra_op`), not ``torch.set_num_threads``: that one also resizes a
process-wide pool and clears oneDNN's primitive cache, and the model's next convolutions pay for it
(measured on 2 cores: an unlearn pass after one 2 -> 1 -> 2 toggle 1.02x to 1.055x slower on BERT,
MobileNetV2 and ConvNeXt). MKL's GEMMs read MKL's own count: with the OpenMP setting alone a
side-by-side job's large GEMMs still ran on every core, n jobs x n threads (on 2 cores the
real-model steps measured the same either way, paired 0.97x to 1.04x: the jobs' skinny GEMMs
mostly run on one thread anyway; on more cores the oversubscription grows with the square).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Optional, Sequence, TypeVar

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


# MKL's own count for the calling thread (its BLAS and LAPACK calls read that, not OpenMP's):
# (MKL_Set_Num_Threads_Local, MKL_Get_Max_Threads) of the MKL inside torch; () where torch has
# no MKL; False where it has one whose setter is not found; None: not looked up yet
_mkl_local = None


def _find_mkl_local():
    """MKL's thread-local count setter and reader (the C entry points of mkl_service.h, which
    torch.set_num_threads calls too) from the torch library that links MKL in, or from a shared
    MKL the process loaded; () where this torch build has no MKL, False where they are not found."""
    if "mkl_get_max_threads" not in torch.__config__.parallel_info():
        return ()
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    try:
        with open("/proc/self/maps") as f:
            mapped = {line.split()[-1] for line in f if ".so" in line}
    except OSError:
        return False
    # torch's own libraries (the wheels link MKL into libtorch_cpu) first, then a shared MKL
    paths = [p for p in mapped if p.startswith(torch_dir)] + [p for p in mapped if re.search(r"/libmkl_(rt|core)[^/]*\.so", p)]
    for path in sorted(paths, key=lambda p: (not p.startswith(torch_dir), "libtorch_cpu" not in p, p)):
        try:
            lib = ctypes.CDLL(path)
            put, get = lib.MKL_Set_Num_Threads_Local, lib.MKL_Get_Max_Threads
        except (OSError, AttributeError):
            continue
        put.argtypes, put.restype = [ctypes.c_int], ctypes.c_int
        get.argtypes, get.restype = [], ctypes.c_int
        return put, get
    return False


def set_intra_op(n: int) -> Optional[int]:
    """The calling thread's intra-op thread count: its OpenMP setting and MKL's thread-local one
    where both are found (checked by reading them back), else ``torch.set_num_threads``. Both:
    MKL's GEMMs read MKL's count, not OpenMP's (measured on 2 cores: a 1024 x 1024 GEMM after
    the OpenMP setting alone still ran on both, 155 GFLOP/s against 88 on one). Returns MKL's
    thread-local count before the call (0: MKL's global one) where it set it, else None."""
    global _omp_set
    torch.get_num_threads()  # a new thread's first query initializes its count: do it before
    if per_thread_counts():
        _omp_set(n)
        ok, prev = torch.get_num_threads() == n, None
        if _mkl_local:
            prev = _mkl_local[0](n)
            ok = ok and _mkl_local[1]() == n
        if ok:
            return prev
        _omp_set = False  # not the runtimes torch's pool and its BLAS read
    torch.set_num_threads(n)
    return None


def per_thread_counts() -> bool:
    """Whether this process can set a thread's intra-op count on its own (OpenMP's and MKL's
    per-thread setters found; :func:`set_intra_op` then leaves the process-wide pool alone)."""
    global _omp_set, _mkl_local
    if _omp_set is None:
        _omp_set = _find_omp_set() or False
    if _mkl_local is None:
        _mkl_local = _find_mkl_local()
    return bool(_omp_set) and _mkl_local is not False


def _restore(n: int, mkl_before: Optional[int]) -> None:
    """The calling thread's count back at ``n``, and MKL's own setting as it was before the
    :func:`set_intra_op` call that returned ``mkl_before`` (0: its global count)."""
    set_intra_op(n)
    if mkl_before is not None and _mkl_local:
        _mkl_local[0](mkl_before)


# the outstanding lend of each thread (thread ident -> LentThread): one at a time per thread
_lent: dict = {}


class LentThread:
    """One intra-op thread the calling thread lent to a background job (:func:`lend_one`)."""

    def __init__(self, n: int, mkl_before: Optional[int]):
        self.n, self.mkl_before = n, mkl_before
        self.ident = threading.get_ident()

    def give_back(self) -> bool:
        """The lending thread's count as it was. False where called from another thread (a
        thread's count is its own: the lend stays outstanding until the lender calls
        :func:`give_back_own` or this); a count the caller changed meanwhile
        (torch.set_num_threads) to another value than n - 1 is left as the caller set it."""
        if threading.get_ident() != self.ident:
            return False
        if _lent.get(self.ident) is self:
            del _lent[self.ident]
            if torch.get_num_threads() == self.n - 1:
                _restore(self.n, self.mkl_before)
        return True


def lend_one() -> Optional[LentThread]:
    """The calling thread's intra-op count lowered by one, so that a background thread of one
    intra-op thread has a core of its own; None (nothing changed) with fewer than two threads,
    while this thread has a lend outstanding, or without per-thread setters (torch.set_num_threads
    would resize the process's pool)."""
    n = torch.get_num_threads()
    if n < 2 or threading.get_ident() in _lent or not per_thread_counts():
        return None
    lent = LentThread(n, set_intra_op(n - 1))
    _lent[lent.ident] = lent
    return lent


def give_back_own() -> None:
    """The calling thread's outstanding lend given back (one its background job's end left
    outstanding because that end ran on another thread)."""
    lent = _lent.get(threading.get_ident())
    if lent is not None:
        lent.give_back()


@contextlib.contextmanager
def one_thread(on: bool) -> Iterator[None]:
    """The calling thread's intra-op pool at one thread inside the block (when ``on``), restored
    after."""
    if not on or torch.get_num_threads() == 1:
        yield
        return
    n = torch.get_num_threads()
    mkl_before = set_intra_op(1)
    try:
        yield
    finally:
        _restore(n, mkl_before)


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


def _pull(fn: Callable[[T], R], items: Sequence[T], queue: "_Queue", worker: bool) -> List:
    """Take the next item off ``queue`` and run it until none is left: [(index, result)]."""
    done: List = []
    with torch.no_grad() if worker else contextlib.nullcontext():
        # worker threads start with autograd enabled: the projection never records a graph
        if worker:
            set_intra_op(1)  # this thread's own setting (a fresh thread reads the default)
        while True:
            k = queue.next()
            if k is None:
                return done
            try:
                done.append((k, fn(items[k])))
            except BaseException:
                queue.stop()  # the other threads take nothing more
                raise


class _Queue:
    """Item indices handed out one at a time, in the given order, to whichever thread asks."""

    def __init__(self, order: List[int]):
        self._order, self._next, self._lock = order, 0, threading.Lock()

    def next(self) -> "int | None":
        with self._lock:
            if self._next >= len(self._order):
                return None
            self._next += 1
            return self._order[self._next - 1]

    def stop(self) -> None:
        with self._lock:
            self._next = len(self._order)


def map_balanced(fn: Callable[[T], R], items: Sequence[T], cost: Sequence[float], threads: int) -> List[R]:
    """[fn(x) for x in items], spread over ``threads`` Python threads (the caller's thread is one of
    them): each thread takes the next item, largest ``cost`` first, as it finishes its last one, so
    a misjudged cost leaves no thread idle while items are left. Call it with torch's intra-op
    pool at one thread (:func:`one_thread`): an item's result is then the same whichever thread
    runs it. Results keep the items' order; an exception in any item is raised here after every
    thread has stopped (the others take no new item once one has failed)."""
    items = list(items)
    threads = max(1, min(int(threads), len(items)))
    if threads == 1:
        return [fn(x) for x in items]
    queue = _Queue(sorted(range(len(items)), key=lambda k: -float(cost[k])))
    pool = _workers(threads - 1)
    futures = [pool.submit(_pull, fn, items, queue, True) for _ in range(threads - 1)]
    out: List = [None] * len(items)
    err = None
    try:
        for k, r in _pull(fn, items, queue, False):
            out[k] = r
    except BaseException as e:  # wait for the workers before raising: they touch the same terms
        err = e
    for f in futures:
        try:
            for k, r in f.result():
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
