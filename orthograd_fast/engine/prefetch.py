"""Held rows and their Grams formed on a background thread while the unlearn pass runs (CPU).

Between leaving ``og.retain()`` and ``og.project_()`` the user runs the unlearn forward and
backward. The large terms' float32 rows and K = Y Y^T (held_rows) depend on the retain factors
only, so one background thread forms them meanwhile, largest first, within a byte budget; the
projection then reads each prepared term's rows once for b and updates from them.

The thread that left the block lends the prefetch one of its intra-op threads until ``project_()``
(:func:`threads.lend_one`, that thread's own OpenMP / MKL count): the unlearn pass runs on the
others and the prefetch on a core of its own. Without it the prefetch had only what the unlearn
pass left idle, which its parallel regions take back op by op (measured on 2 cores: 1.05 to 1.58
busy cores during the zoo's unlearn passes; the LSTM's largest term, ~18 ms of one core's work,
took 20 to 40 ms and finished after the unlearn pass). The unlearn pass pays where its ops use
the pool well: on 2 cores the zoo's plain unlearn passes (B = 16) ran 0.65x (MobileNetV2) to
1.45x (GPT-2) as long on one thread as on two; every model's step was as fast or faster with
the lend.

The rows live in buffers kept across steps (:class:`RowBuffers`: a fresh allocation of tens of MiB
faults in every page again each step). The thread holds one intra-op thread and touches only the
terms it was given. ``project_()`` gives the lent thread back, stops the prefetch from taking
another term (:meth:`Prefetch.handoff`) and waits for the term under way only in that term's own
job; a new retain block, ``og.reset()`` and the interpreter's exit stop and join it
(:meth:`Prefetch.finish`). A term whose preparation fails keeps no rows: the projection then
takes its usual route, which reports any error by name.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import weakref
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from . import threads
from .gram import can_hold_rows

# default budget (OrthoGrad(prefetch_mb=...)): bytes of prepared rows at once
DEFAULT_MB = 256
# torch intra-op threads from which the prefetch runs (the projection then runs side by side too)
MIN_THREADS = 2
# finish() lets the thread prepare every picked term instead of stopping it (tests: counts that do
# not depend on how far the thread got while the unlearn pass ran)
DRAIN = False
# the thread that leaves retain() lends the prefetch one of its intra-op threads until project_()
# (threads.lend_one): the unlearn pass runs on the others and the prefetch on a core of its own
LEND = True
# terms below this many multiply-adds are not worth a background job (Python-bound: they would hold
# the GIL the user's forward needs)
MIN_WORK = 1 << 22


def _lowest_priority() -> None:
    """The calling thread at the lowest scheduling priority (Linux: nice is per thread): it takes
    the cores the unlearn pass leaves idle, not the ones its parallel regions run on (measured on
    2 cores, ViT: at the default priority the unlearn pass ran 1.6x longer beside it)."""
    if not sys.platform.startswith("linux"):  # elsewhere the id names a process, not this thread
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:  # not allowed: the default priority
        pass


class RowBuffers:
    """One float32 buffer per parameter, kept from step to step (same size: reused)."""

    def __init__(self):
        self._bufs: Dict[int, Tensor] = {}

    def get(self, param: Tensor, numel: int) -> Tensor:
        buf = self._bufs.get(id(param))
        if buf is None or buf.numel() != numel or buf.device != param.device:
            self._bufs.pop(id(param), None)  # the old buffer goes before the new one comes
            buf = self._bufs[id(param)] = torch.empty(numel, dtype=torch.float32, device=param.device)
        return buf

    def clear(self) -> None:
        self._bufs.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


def pick(terms: list, rtols: List[float], budget: int) -> list:
    """(term, rtol) of the holdable terms worth a background job, largest first, within ``budget``
    bytes of rows."""
    cand = [(t, rt) for t, rt in zip(terms, rtols) if can_hold_rows(t) and t.route.work() >= MIN_WORK]
    cand.sort(key=lambda x: -x[0].route.work())
    out, used = [], 0
    for t, rt in cand:
        n = 4 * t.B * t.numel
        if used + n <= budget:
            out.append((t, rt))
            used += n
    return out


class Prefetch:
    """The background thread preparing ``picked`` [(term, rtol)] into buffers of ``bufs``;
    ``setup``: instead of ``picked``, a callable the thread runs first that returns them (it
    builds the retain block's uses and the terms: retain_span.DEFER_BUILD); :meth:`handoff` and
    :meth:`finish` wait for it."""

    def __init__(self, picked: Optional[list], bufs: RowBuffers, setup: Optional[Callable[[], list]] = None):
        # the caller's thread runs on one intra-op thread fewer until handoff() / finish()
        self._lent = threads.lend_one() if LEND else None
        self._todo = picked or []
        self._setup = setup
        self._ready = threading.Event()  # the setup has run
        self._bufs = bufs
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._current = None  # the term being prepared
        if setup is None:
            self._mark()
            self._ready.set()
        self._thread: Optional[threading.Thread] = threading.Thread(target=self._run, name="orthograd-prefetch", daemon=True)
        _live.add(self)
        self._thread.start()

    def _mark(self) -> None:
        for t, rt in self._todo:
            t.route.hold, t.route.hold_rtol = True, rt

    def _run(self) -> None:
        _lowest_priority()
        with torch.no_grad(), threads.one_thread(True):
            if self._setup is not None:
                picked: list = []
                try:
                    picked = self._setup()  # (its own errors: reported by project_())
                finally:
                    self._setup = None
                    with self._lock:
                        if not self._stop.is_set():
                            self._todo = picked
                            self._mark()
                    self._ready.set()
            for t, _ in self._todo:
                with self._lock:
                    if self._stop.is_set():
                        return
                    self._current = t
                try:
                    t.prepare_held(self._bufs.get(t.param, t.B * t.numel))
                except Exception:  # noqa: BLE001 - the projection's own route reports it by name
                    t.drop_rows()
                    t.route.K = None
                finally:
                    with self._lock:
                        self._current = None

    def handoff(self):
        """Take no further term; the term being prepared now (None: none), which the caller must
        not touch before :meth:`finish` returns (the projection waits for it in that term's job)."""
        with self._lock:
            if not DRAIN:
                self._stop.set()
        self._give_back()
        self._ready.wait()  # the terms are the setup's until it has run
        with self._lock:
            return self._current if not DRAIN else None

    def finish(self) -> None:
        """Stop after the current term and wait for the thread."""
        self._give_back()
        if self._thread is not None:
            if not DRAIN:
                self._stop.set()
            self._thread.join()
            self._thread = None
            _live.discard(self)

    def _give_back(self) -> None:
        """The lent intra-op thread back to the thread that started this (a call from another
        thread leaves it to a later one from there: a thread's count is its own)."""
        if self._lent is not None and self._lent.give_back():
            self._lent = None

    def discard(self) -> None:
        """finish(), then drop every prepared row (the terms are not projected)."""
        self.finish()
        for t, _ in self._todo:
            t.drop_rows()


# a daemon thread still inside a torch op when the interpreter exits aborts the process: the ones
# left running (a script that ends between retain() and project_()) are stopped first
_live: "weakref.WeakSet[Prefetch]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for pf in list(_live):
        pf.finish()
