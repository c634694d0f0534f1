"""orthograd_fast.engine.threads: small projection terms side by side on Python threads.

The helper must keep the items' order, really use several threads, stop every thread before it
raises, run workers without autograd, and restore torch's thread count; the engine's result must
not depend on how the terms were spread (each term runs on one intra-op thread either way)."""

import threading
import time

import pytest
import torch
from torch import nn

import orthograd_fast.engine.gram as gram
from engine_helpers import compare
from models import ce
from orthograd_fast import OrthoGrad
from orthograd_fast.engine import threads as og_threads


@pytest.mark.parametrize("n", [1, 2, 3])
def test_map_balanced_keeps_order_and_uses_threads(n):
    gen = torch.Generator().manual_seed(n)
    costs = torch.randint(1, 50, (11,), generator=gen).tolist()
    seen = []

    def fn(k):
        seen.append(threading.get_ident())
        time.sleep(0.002)  # long enough that one thread cannot take every item
        return k * k

    out = og_threads.map_balanced(fn, list(range(11)), costs, n)
    assert out == [k * k for k in range(11)]
    assert len(set(seen)) == n


def test_map_balanced_balances_by_cost():
    where = {}

    def fn(k):
        where[k] = threading.get_ident()
        time.sleep(0.03 if k == 0 else 0.002)
        return k

    # one heavy item (taken first) and four light ones: the other thread takes the light ones
    og_threads.map_balanced(fn, [0, 1, 2, 3, 4], [100, 1, 1, 1, 1], 2)
    assert all(where[k] != where[0] for k in (1, 2, 3, 4))


def test_map_balanced_hands_out_items_to_the_thread_that_is_free():
    # the costs misjudge item 1 (cheap by its cost, the longest by far): the items after it go to
    # the thread that is free, not to a plan made beside item 1
    where = {}
    sleep = {0: 0.02, 1: 0.08}

    def fn(k):
        where[k] = threading.get_ident()
        time.sleep(sleep.get(k, 0.004))
        return k

    out = og_threads.map_balanced(fn, list(range(7)), [10, 3, 2, 2, 2, 2, 2], 2)
    assert out == list(range(7))
    assert where[0] != where[1]
    assert all(where[k] == where[0] for k in range(2, 7)), where


def test_map_balanced_raises_after_every_thread_stopped():
    done = []

    def fn(k):
        if k == 3:
            raise ValueError("item 3 failed")
        time.sleep(0.005)
        done.append(k)
        return k

    with pytest.raises(ValueError, match="item 3 failed"):
        og_threads.map_balanced(fn, list(range(8)), [1.0] * 8, 2)
    # items are taken in order; once item 3 failed no thread takes another, the ones running finish
    assert len(done) >= 3 and 3 not in done and len(done) < 7
    n_before = len(done)
    time.sleep(0.05)
    assert len(done) == n_before  # nothing still running after the raise


def test_workers_run_without_autograd():
    w = torch.randn(3, requires_grad=True)

    def fn(_):
        time.sleep(0.01)  # long enough that both threads take items
        return (w * 2).requires_grad, torch.get_num_threads()

    with og_threads.one_thread(True):
        got = og_threads.map_balanced(fn, [0, 1, 2, 3], [1, 1, 1, 1], 2)
    # the caller's thread has autograd on (no no_grad here): its items record a graph
    assert {r for r, _ in got} == {True, False}
    assert all(nt == 1 for _, nt in got)


def test_one_thread_restores_the_count_on_error():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with og_threads.one_thread(True):
                assert torch.get_num_threads() == 1
                raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)


class _Layers(nn.Module):
    """Eight small tensors (weights and biases of ragged widths): all go to the small-term group."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(13, 29), nn.Tanh(), nn.Linear(29, 22), nn.ReLU(), nn.Linear(22, 17), nn.Tanh(), nn.Linear(17, 5))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("forget", [False, True])
def test_engine_same_result_spread_or_serial(forget, monkeypatch):
    monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)  # factored routes for the small weights too
    gen = torch.Generator().manual_seed(11)
    retain = (torch.randn(7, 13, generator=gen), torch.randint(0, 5, (7,), generator=gen))
    unlearn = (torch.randn(5, 13, generator=gen), torch.randint(0, 5, (5,), generator=gen))
    spreads = []
    orig = og_threads.map_balanced

    def spy(fn, items, cost, threads):
        if fn.__qualname__.startswith(("_project", "_update")):  # the projection's terms, not the retain exit's
            spreads.append(threads)
        return orig(fn, items, cost, threads)

    monkeypatch.setattr(og_threads, "map_balanced", spy)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for serial in (False, True):
            if serial:
                monkeypatch.setattr(og_threads, "map_balanced", lambda fn, items, cost, threads: orig(fn, items, cost, 1))
            torch.manual_seed(0)
            model = _Layers()
            og = OrthoGrad(model)
            model.zero_grad(set_to_none=True)
            with og.forget() if forget else torch.enable_grad():
                ce(model(unlearn[0]), unlearn[1]).mean().backward()
            with og.retain():
                ce(model(retain[0]), retain[1]).mean().backward()
            og.project_()
            grads.append([p.grad.clone() for p in model.parameters()])
        assert spreads and spreads[0] == 2  # the parallel path was taken
        for a, b in zip(*grads):
            assert torch.equal(a, b)
        torch.manual_seed(0)
        err, orth, _ = compare(_Layers(), ce, retain, unlearn, forget=forget, unlearn_first=True)
        assert err < 1e-5 and orth < 1e-5
    finally:
        torch.set_num_threads(n)


def test_run_spread_dominant_and_flagged_terms_run_on_all_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = {}

        def fn(k):
            seen[k] = torch.get_num_threads()
            return -k

        # item 0 dominates (above `small` and above half of the work); item 4 is flagged alone
        out = og_threads.run_spread(fn, list(range(6)), [1000, 5, 5, 5, 1, 5], 2, small=10, alone=[False, False, False, False, True, False])
        assert out == [0, -1, -2, -3, -4, -5]
        assert seen[0] == 2 and seen[4] == 2
        assert all(seen[k] == 1 for k in (1, 2, 3, 5))
        # below `small`, even a dominant item runs beside the others on one thread
        seen.clear()
        og_threads.run_spread(fn, list(range(3)), [9, 1, 1], 2, small=10)
        assert all(v == 1 for v in seen.values())
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)


def _child_spread(q):
    q.put(og_threads.map_balanced(lambda k: k + 1, [1, 2, 3, 4], [1, 1, 1, 1], 2))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork start method: POSIX only")
def test_forked_child_gets_its_own_workers():
    import multiprocessing as mp

    og_threads.map_balanced(lambda k: k, [0, 1], [1, 1], 2)  # the parent's pool exists
    # Python 3.12+ warns about forking a process with threads; the child only runs map_balanced
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_spread, args=(q,))
    p.start()
    p.join(30)
    alive = p.is_alive()
    if alive:
        p.kill()
    assert not alive, "the forked child hung on the parent's worker threads"
    assert q.get(timeout=5) == [2, 3, 4, 5]


def test_set_intra_op_is_per_thread_and_leaves_torch_pool_alone(monkeypatch):
    if og_threads._find_omp_set() is None:
        pytest.skip("torch's intra-op pool is not an OpenMP runtime found in this process")
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    calls = []
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda k: (calls.append(k), real_set(k)))
    try:
        seen = {}

        def worker():
            og_threads.set_intra_op(1)
            seen["worker"] = torch.get_num_threads()

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert seen["worker"] == 1 and torch.get_num_threads() == 2  # the caller's count is untouched
        with og_threads.one_thread(True):
            assert torch.get_num_threads() == 1
            got = og_threads.map_balanced(lambda k: torch.get_num_threads(), [0, 1, 2, 3], [1, 1, 1, 1], 2)
        assert got == [1, 1, 1, 1] and torch.get_num_threads() == 2
        assert calls == []  # no process-wide resize (it clears oneDNN's primitive cache)
    finally:
        monkeypatch.undo()
        torch.set_num_threads(n)


def test_set_intra_op_sets_mkls_own_count_too(monkeypatch):
    # MKL's BLAS reads its thread-local count, not OpenMP's: a side-by-side job whose GEMMs still
    # ran on every core oversubscribed them. The count MKL reports follows set_intra_op on the
    # calling thread only, and one_thread gives the caller's back
    mkl = og_threads._find_mkl_local()
    if not mkl:
        pytest.skip("this torch build has no MKL whose thread-local count is reachable")
    if og_threads._find_omp_set() is None:
        pytest.skip("torch's intra-op pool is not an OpenMP runtime found in this process")
    mkl_threads = mkl[1]
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert mkl_threads() == 2
        seen = {}

        def worker():
            og_threads.set_intra_op(1)
            seen["worker"] = mkl_threads()

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert seen["worker"] == 1 and mkl_threads() == 2
        with og_threads.one_thread(True):
            assert mkl_threads() == 1
            got = og_threads.map_balanced(lambda k: mkl_threads(), [0, 1, 2, 3], [1, 1, 1, 1], 2)
        assert got == [1, 1, 1, 1] and mkl_threads() == 2
        # MKL's own setting comes back as it was, also when it was "use the global count" (0)
        put = mkl[0]
        put(0)
        with og_threads.one_thread(True):
            assert mkl_threads() == 1
        assert put(0) == 0
    finally:
        torch.set_num_threads(n)


def test_set_intra_op_falls_back_to_torch_where_mkls_count_is_not_reachable(monkeypatch):
    # MKL inside torch but its setter not found: the per-thread OpenMP setting alone would leave
    # MKL's GEMMs on every core, so torch.set_num_threads it is
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    calls = []
    real_set = torch.set_num_threads
    monkeypatch.setattr(og_threads, "_mkl_local", False)
    monkeypatch.setattr(torch, "set_num_threads", lambda k: (calls.append(k), real_set(k)))
    try:
        with og_threads.one_thread(True):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2 and calls == [1, 2]
    finally:
        monkeypatch.undo()
        torch.set_num_threads(n)


def test_set_intra_op_falls_back_to_torch_where_no_runtime(monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(og_threads, "_omp_set", False)
    try:
        with og_threads.one_thread(True):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)


class _Norms(nn.Module):
    """LayerNorms and Linears over tokens: many records whose rows the retain exit builds."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 11)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(11), nn.Linear(11, 11), nn.GELU()) for _ in range(3))
        self.head = nn.Linear(11, 4)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h.mean(1))


def test_retain_exit_builds_side_by_side_with_the_serial_result(monkeypatch):
    from orthograd_fast.engine import op_capture, retain_span

    gen = torch.Generator().manual_seed(5)
    retain = (torch.randn(9, 7, 6, generator=gen), torch.randint(0, 4, (9,), generator=gen))
    unlearn = (torch.randn(4, 7, 6, generator=gen), torch.randint(0, 4, (4,), generator=gen))
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    spreads = []
    orig = og_threads.map_balanced

    def spy(fn, items, cost, threads):
        if fn.__qualname__.startswith("_build_all"):
            spreads.append((threads, len(items)))
        return orig(fn, items, cost, threads)

    monkeypatch.setattr(og_threads, "map_balanced", spy)
    monkeypatch.setattr(op_capture, "BUILD_SPREAD_MIN", 0)  # these records are tiny
    monkeypatch.setattr(retain_span, "DEFER_BUILD", False)  # built on leaving, not on the prefetch thread
    try:
        grads = []
        for serial in (False, True):
            if serial:
                monkeypatch.setattr(op_capture, "_build_all", lambda recs: [r.build(r.grad) for r in recs])
            torch.manual_seed(0)
            model = _Norms()
            og = OrthoGrad(model)
            model.zero_grad(set_to_none=True)
            with og.retain():
                ce(model(retain[0]), retain[1]).mean().backward()
            ce(model(unlearn[0]), unlearn[1]).mean().backward()
            og.project_()
            grads.append([p.grad.clone() for p in model.parameters()])
        assert spreads and spreads[0][0] == 2 and spreads[0][1] > 2  # the records were spread
        for a, b in zip(*grads):
            assert torch.equal(a, b)
        torch.manual_seed(0)
        err, orth, _ = compare(_Norms(), ce, retain, unlearn)
        assert err < 1e-5 and orth < 1e-5
    finally:
        torch.set_num_threads(n)


def test_retain_exit_builds_small_records_in_the_calling_thread(monkeypatch):
    # below BUILD_SPREAD_MIN output-gradient elements in all, handing the builds to threads costs
    # more than they do: they run in order on the caller's thread, at one intra-op thread
    from orthograd_fast.engine import op_capture, retain_span

    gen = torch.Generator().manual_seed(6)
    retain = (torch.randn(9, 7, 6, generator=gen), torch.randint(0, 4, (9,), generator=gen))
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    spreads, inner = [], []
    orig_map, orig_init = og_threads.map_balanced, op_capture.OpRecord.__init__

    def init(self, build, *a, **k):  # each record's build notes the intra-op threads it ran with
        orig_init(self, lambda g: inner.append(torch.get_num_threads()) or build(g), *a, **k)

    def spy(fn, *a, **k):
        if fn.__qualname__.startswith("_build_all"):
            spreads.append(1)
        return orig_map(fn, *a, **k)

    monkeypatch.setattr(og_threads, "map_balanced", spy)
    monkeypatch.setattr(op_capture.OpRecord, "__init__", init)
    monkeypatch.setattr(retain_span, "DEFER_BUILD", False)  # built on leaving, not on the prefetch thread
    try:
        model = _Norms()
        og = OrthoGrad(model)
        with og.retain():
            ce(model(retain[0]), retain[1]).mean().backward()
        assert inner and set(inner) == {1} and not spreads
        assert torch.get_num_threads() == 2  # restored after the builds
        og.close()
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("B,T,spread", [(32, 4, True), (9, 5, True), (64, 64, False)])
def test_multi_token_ghost_terms_run_beside_others_when_their_token_grams_are_small(B, T, spread):
    from orthograd_fast.engine.factors import OuterFactors
    from orthograd_fast.engine.routes import ghost

    gen = torch.Generator().manual_seed(B + T)
    A, D = torch.randn(B, T, 1, 7, generator=gen), torch.randn(B, T, 1, 5, generator=gen)
    route = ghost.GhostRoute(torch.zeros(5, 7), B, OuterFactors(A, D, None, (1, 5, 7)))
    assert route.spreadable() == spread
    assert (2 * (B * T) ** 2 * 8 <= ghost.SPREAD_BYTES) == spread  # the rule, at these sizes


def test_side_by_side_runs_on_the_callers_thread_under_autocast():
    # autocast is per thread: under it the items run in order where the caller would run them
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        where = []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = og_threads.side_by_side(lambda k: (where.append(threading.get_ident()), torch.is_autocast_enabled("cpu"))[1], [0, 1, 2], [1, 1, 1], "cpu")
        assert out == [True, True, True] and set(where) == {threading.get_ident()}
        where.clear()
        og_threads.side_by_side(lambda k: (where.append(threading.get_ident()), time.sleep(0.002)), [0, 1, 2, 3], [1, 1, 1, 1], "cpu")
        assert len(set(where)) == 2  # and spread without it
    finally:
        torch.set_num_threads(n)


def test_lend_one_lowers_only_the_callers_count_and_gives_it_back():
    n = torch.get_num_threads()
    if n < 2:
        pytest.skip("needs two torch threads: with one there is none to lend")
    if not og_threads.per_thread_counts():
        pytest.skip("this torch build exposes no per-thread OpenMP / MKL setters: lend_one lends nothing")
    lent = og_threads.lend_one()
    try:
        assert torch.get_num_threads() == n - 1
        other = {}

        def elsewhere():  # another thread: its own count, and it cannot give the caller's back
            other["count"] = torch.get_num_threads()
            other["gave"] = lent.give_back()

        t = threading.Thread(target=elsewhere)
        t.start()
        t.join()
        assert other == {"count": n, "gave": False}
        assert torch.get_num_threads() == n - 1
        assert og_threads.lend_one() is None  # one lend per thread at a time
        assert torch.get_num_threads() == n - 1
    finally:
        assert lent.give_back()
    assert torch.get_num_threads() == n
    assert lent.give_back() and torch.get_num_threads() == n  # twice: no change
    again = og_threads.lend_one()  # lent again, given back by the thread's own call
    assert torch.get_num_threads() == n - 1
    og_threads.give_back_own()
    assert torch.get_num_threads() == n and again.give_back() and torch.get_num_threads() == n


def test_lend_one_lends_nothing_from_a_single_thread():
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert og_threads.lend_one() is None
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)
