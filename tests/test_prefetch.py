"""The prefetch (orthograd_fast.engine.prefetch): leaving og.retain() forms the large terms' float32
rows and Grams on a background thread; project_() reads them for b and the update. Against the
float64 oracle with the orthogonality read directly, against the same step without it, and through
the call orders and failures a user meets (several retain blocks, parameters changed after the
retain pass, an unlearn pass that raises, a preparation that fails or is refused)."""

import threading

import pytest
import torch
from torch import nn

import orthograd_fast.engine.gram as gram
import orthograd_fast.engine.prefetch as prefetch
from orthograd_fast.engine import threads as og_threads
from engine_helpers import compare, og_direction
from models import ce
from oracle import oracle_direction, orthogonality
from orthograd_fast import OrthoGrad, OrthoGradError
from test_held_rows import Convs, TiedLM, Tokens, _data, collinear, linear_loss

REL = 1e-4
ORTH = 1e-5


@pytest.fixture
def eager(monkeypatch):
    """Small tensors on the factored routes, every holdable term worth a background job, the
    prefetch on whatever thread count this machine gives torch."""
    monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)
    monkeypatch.setattr(gram, "choose_route", lambda *a: gram.TILE)
    monkeypatch.setattr(prefetch, "MIN_WORK", 0)
    monkeypatch.setattr(prefetch, "MIN_THREADS", 1)
    monkeypatch.setattr(prefetch, "DRAIN", True)


def _threads_alive() -> int:
    return sum(t.name == "orthograd-prefetch" and t.is_alive() for t in threading.enumerate())


def _retained(seed: int):
    """(model, og, retain, unlearn) of a fresh Tokens model right after its retain block (the
    prefetch running), in the contract's order."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Tokens()
    retain, unlearn = _data("tokens", g)
    og = OrthoGrad(model, backend="torch")
    model.zero_grad(set_to_none=True)
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    return model, og, retain, unlearn


def _assert_exact(model, retain, unlearn, tag=None):
    """The .grad directions against the float64 oracle, and their orthogonality read directly."""
    got = {n: p.grad.reshape(-1).double() for n, p in model.named_parameters()}
    ref, G, u = oracle_direction(model, ce, retain, unlearn)
    for n in ref:
        assert float((got[n] - ref[n]).norm() / (ref[n].norm() + u[n].norm())) <= REL, (tag, n)
    assert orthogonality(G, {n: -d for n, d in got.items()}, u) <= ORTH, tag


@pytest.mark.parametrize("name", ["tokens", "convs", "tied"])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_prefetch_matches_the_oracle(eager, name, alpha):
    g = torch.Generator().manual_seed(100 + sum(map(ord, name)) + int(10 * alpha))
    torch.manual_seed(int(torch.randint(0, 1000, (1,), generator=g)))
    model = {"tokens": Tokens, "convs": Convs, "tied": TiedLM}[name]()
    retain, unlearn = _data(name, g, B=9, Bu=4)
    err, orth, og = compare(model, ce, retain, unlearn, scope="tensor", alpha=alpha, backend="torch")
    # every held term was prepared (the convolutions' small depthwise weight may be refused, as
    # without the prefetch: badly conditioned at B = 9)
    assert og.stats["prefetched"] == og.stats["held_rows"] >= (1 if name == "convs" else 3), og.stats
    assert err <= REL, err
    assert orth <= ORTH, orth
    assert _threads_alive() == 0


def test_prefetch_gives_the_direction_of_the_step_without_it(eager):
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = Tokens(H=14)
    retain, unlearn = _data("tokens", g, B=11, Bu=5)
    og, on = og_direction(model, ce, retain, unlearn, backend="torch")
    assert og.stats["prefetched"] == 3 and og.stats["held_rows"] == 3, og.stats
    og, off = og_direction(model, ce, retain, unlearn, backend="torch", prefetch_mb=0)
    assert og.stats["prefetched"] == 0 and og.stats["held_rows"] == 3, og.stats
    for n in on:  # (head.bias: 4 entries, 11 samples span them all: its direction is 0 both ways)
        assert float((on[n] - off[n]).norm()) <= 1e-6 * float(off[n].norm()) + 1e-12, n


def test_prefetch_in_the_contract_order_over_steps(eager):
    # the loop a user writes: retain block, unlearn backward, project_, optimizer step; the row
    # buffers are reused from step to step and every step is exact for the weights it starts from
    g = torch.Generator().manual_seed(8)
    torch.manual_seed(8)
    model = Tokens()
    og = OrthoGrad(model, backend="torch")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        retain, unlearn = _data("tokens", g, B=8, Bu=3)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad(set_to_none=True)
        with og.retain():
            ce(model(retain[0]), retain[1]).mean().backward()
        ce(model(unlearn[0]), unlearn[1]).mean().backward()
        og.project_()
        assert og.stats["prefetched"] == 3, (step, og.stats)
        _assert_exact(model, retain, unlearn, step)
        opt.step()
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    held = og.row_buffer_bytes
    assert held == 4 * 8 * sum(p.numel() for n, p in model.named_parameters() if not n.endswith("bias")), held
    og.reset()
    assert og.row_buffer_bytes == 0


def test_two_retain_blocks_discard_the_first_prefetch(eager):
    g = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    model = Tokens()
    (xa, ya), unlearn = _data("tokens", g, B=6, Bu=3)
    (xb, yb), _ = _data("tokens", g, B=5, Bu=3)
    og = OrthoGrad(model, backend="torch")
    model.zero_grad(set_to_none=True)
    with og.retain():
        ce(model(xa), ya).mean().backward()
    with og.retain():
        ce(model(xb), yb).mean().backward()
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    og.project_()
    assert og.stats["B"] == 11 and og.stats["prefetched"] == 3, og.stats
    _assert_exact(model, (torch.cat([xa, xb]), torch.cat([ya, yb])), unlearn)


def test_parameters_changed_after_retain_still_raise(eager):
    model, og, retain, unlearn = _retained(2)
    with torch.no_grad():
        model.fc.weight.add_(0.1)  # an optimizer step between retain() and project_()
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    with pytest.raises(OrthoGradError, match=r"parameter 'fc.weight' was modified after the retain pass"):
        og.project_()
    assert _threads_alive() == 0


def test_an_unlearn_pass_that_raises_leaves_the_next_step_exact(eager):
    model, og, retain, unlearn = _retained(4)
    with pytest.raises(RuntimeError, match="shape"):
        model(unlearn[0][:, :, :5])  # the user's bad unlearn batch, with the prefetch running
    og.reset()  # the user gives up on this span
    assert _threads_alive() == 0
    model.zero_grad(set_to_none=True)
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    og.project_()
    assert og.stats["prefetched"] == 3
    _assert_exact(model, retain, unlearn)


def test_a_failed_preparation_takes_the_usual_route(eager, monkeypatch):
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    model = Tokens()
    retain, unlearn = _data("tokens", g)
    real = gram.PerSampleGrads.prepare_held

    def flaky(self, buf):
        if self.param is model.W:
            raise MemoryError("no room for the rows")
        return real(self, buf)

    monkeypatch.setattr(gram.PerSampleGrads, "prepare_held", flaky)
    err, orth, og = compare(model, ce, retain, unlearn, backend="torch")
    assert og.stats["prefetched"] == 2 and og.stats["held_rows"] == 3, og.stats
    assert err <= REL and orth <= ORTH, (err, orth)


def test_a_refused_gram_goes_to_float64(eager, monkeypatch):
    # nearly collinear rows: the float32 Gram cannot be refined (held_rows.usable); the prepared
    # rows go and the float64 route decides, as without the prefetch (the caller's thread count
    # kept as without it: the same bits of u)
    monkeypatch.setattr(prefetch, "LEND", False)
    model, retain, unlearn = collinear(1e-5 * 3, seed=2)  # cond(K) ~ 3e10
    og, got = og_direction(model, linear_loss, retain, unlearn, backend="torch")
    assert og.stats["prefetched"] == 0 and og.stats["held_rows"] == 0, og.stats
    assert og._terms[model.weight].route.hold_refused
    ref, G, u = oracle_direction(model, linear_loss, retain, unlearn)
    err = float((got["weight"] - ref["weight"]).norm() / (ref["weight"].norm() + u["weight"].norm()))
    assert err <= REL, err
    assert orthogonality(G, {"weight": -got["weight"]}, u) <= ORTH
    _, off = og_direction(model, linear_loss, retain, unlearn, backend="torch", prefetch_mb=0)
    assert torch.equal(got["weight"], off["weight"])


def test_pick_takes_the_largest_terms_within_the_budget(eager):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 10), nn.Tanh(), nn.Linear(10, 4))
    og = OrthoGrad(model, backend="torch", prefetch_mb=0)
    x = torch.randn(6, 3, 20)
    with og.retain():
        model(x).sum().backward()
    terms = [og._build_terms()[p] for p in (model[0].weight, model[2].weight, model[4].weight)]
    sizes = [4 * 6 * t.numel for t in terms]  # 600, 300 and 40 entries
    picked = prefetch.pick(terms, [1e-6] * 3, budget=sizes[0] + sizes[2])
    assert [t.param for t, _ in picked] == [model[0].weight, model[4].weight]
    assert prefetch.pick(terms, [1e-6] * 3, budget=sizes[0] - 1) == [(terms[1], 1e-6), (terms[2], 1e-6)]
    og.reset()


def test_prefetch_off_and_bad_sizes(eager):
    model = Tokens()
    with pytest.raises(ValueError, match=r"prefetch_mb=-1"):
        OrthoGrad(model, prefetch_mb=-1)
    g = torch.Generator().manual_seed(1)
    retain, unlearn = _data("tokens", g)
    og, _ = og_direction(model, ce, retain, unlearn, backend="torch", prefetch_mb=0)
    assert og.stats["prefetched"] == 0 and og.row_buffer_bytes == 0
    og, _ = og_direction(model, ce, retain, unlearn, backend="torch", scope="global")
    assert og.stats["prefetched"] == 0 and og.row_buffer_bytes == 0


def _project_while_preparing(monkeypatch, seed: int):
    """A step of the Tokens model whose project_() comes while the thread is 0.3 s into its first
    term: (model, retain, unlearn, that term's parameter)."""
    monkeypatch.setattr(prefetch, "DRAIN", False)
    real = gram.PerSampleGrads.prepare_held
    started = threading.Event()
    under_way = []

    def slow(self, buf):
        under_way.append(self.param)
        started.set()
        threading.Event().wait(0.3)
        return real(self, buf)

    monkeypatch.setattr(gram.PerSampleGrads, "prepare_held", slow)
    model, og, retain, unlearn = _retained(seed)
    assert started.wait(30)
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    og.project_()
    assert og.stats["prefetched"] == 1 and og.stats["held_rows"] == 3, og.stats
    return model, retain, unlearn, under_way[0]


def test_project_stops_the_thread_after_its_current_term(eager, monkeypatch):
    # project_() does not wait for every picked term: the thread finishes the one it is on, the
    # projection forms the others itself
    model, retain, unlearn, _ = _project_while_preparing(monkeypatch, 9)
    _assert_exact(model, retain, unlearn)


def test_the_job_that_waits_for_the_thread_is_taken_first(eager, monkeypatch):
    # The thread runs at the lowest priority: while the projection's jobs keep every core busy it
    # barely runs. The job that waits for its term goes first, so its thread's core goes to the
    # prefetch while another thread takes every other term (it used to go last: a core then
    # idled at the end of the projection while the prefetch finished alone).
    if torch.get_num_threads() < 2:
        pytest.skip("needs two torch threads: the projection runs its jobs side by side on them")
    real = gram.PerSampleGrads.gram_coef
    ran = {}  # id(parameter) -> the thread that formed its Gram and coefficients

    def logged(self, U, b=None):
        ran[id(self.param)] = threading.get_ident()
        return real(self, U, b)

    monkeypatch.setattr(gram.PerSampleGrads, "gram_coef", logged)
    model, retain, unlearn, under_way = _project_while_preparing(monkeypatch, 10)
    waiting = ran.pop(id(under_way))
    assert len(ran) >= 2 and set(ran.values()) == {next(iter(ran.values()))}, ran  # one thread took the rest
    assert waiting not in ran.values()
    _assert_exact(model, retain, unlearn)


@pytest.mark.parametrize("forget", [False, True])
def test_no_prefetch_when_the_unlearn_pass_came_first(eager, forget):
    # u is already in .grad when retain() ends: project_() comes next, nothing to overlap
    g = torch.Generator().manual_seed(12)
    torch.manual_seed(12)
    model = Tokens()
    retain, unlearn = _data("tokens", g)
    err, orth, og = compare(model, ce, retain, unlearn, backend="torch", forget=forget, unlearn_first=True)
    assert og.stats["prefetched"] == 0 and og.stats["held_rows"] == 3, og.stats
    assert og.row_buffer_bytes == 0
    assert err <= REL and orth <= ORTH, (err, orth)


def test_the_thread_runs_at_the_lowest_priority_and_the_caller_does_not(eager, monkeypatch):
    import os
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread nice is Linux's; elsewhere the thread keeps the default priority")
    seen = []
    real = gram.PerSampleGrads.prepare_held

    def spy(self, buf):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return real(self, buf)

    monkeypatch.setattr(gram.PerSampleGrads, "prepare_held", spy)
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    model, og, retain, unlearn = _retained(13)
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    og.project_()
    assert seen and all(n == 19 for n in seen), seen
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


@pytest.fixture
def lend_n():
    """This thread's intra-op count (the test skipped where nothing can be lent), set back after
    the test whatever it left (a failure must not leave later tests on fewer threads)."""
    n = torch.get_num_threads()
    if n < 2:
        pytest.skip("needs two torch threads: with one there is none to lend")
    if not og_threads.per_thread_counts():
        pytest.skip("this torch build exposes no per-thread OpenMP / MKL setters: nothing is lent")
    yield n
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.mark.parametrize("end", ["project", "forget", "reset", "new_block", "unlearn_raises"])
def test_the_caller_lends_one_thread_until_project(eager, end, lend_n):
    # Between retain() and project_() the thread that left the block runs on n - 1 intra-op
    # threads (the prefetch has a core of its own); every way out of the window gives it back,
    # an unlearn pass that raises included, and the step stays exact
    n = lend_n
    model, og, retain, unlearn = _retained(14)
    assert torch.get_num_threads() == n - 1
    if end == "unlearn_raises":
        with pytest.raises(RuntimeError, match="user error"):
            model(unlearn[0])
            raise RuntimeError("user error")
        assert torch.get_num_threads() == n - 1  # still lent: the window is open
    if end == "reset":
        og.reset()
    elif end == "new_block" or end == "unlearn_raises":
        model.zero_grad(set_to_none=True)
        with og.retain():
            assert torch.get_num_threads() == n
            ce(model(retain[0]), retain[1]).mean().backward()
        assert torch.get_num_threads() == n - 1  # lent again by the new block's prefetch
    if end == "forget":  # the unlearn pass inside og.forget(): still the window the lend is for
        with og.forget():
            assert torch.get_num_threads() == n - 1
            ce(model(unlearn[0]), unlearn[1]).mean().backward()
        og.project_()
        _assert_exact(model, retain, unlearn, tag=end)
    elif end != "reset":
        ce(model(unlearn[0]), unlearn[1]).mean().backward()
        og.project_()
        _assert_exact(model, retain, unlearn, tag=end)
    assert torch.get_num_threads() == n


def test_a_count_the_caller_set_meanwhile_is_kept(eager, lend_n):
    n = lend_n
    model, og, retain, unlearn = _retained(15)
    torch.set_num_threads(n + 1)  # (a count other than the lent n - 1, which it cannot tell apart)
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    og.project_()
    assert torch.get_num_threads() == n + 1
    _assert_exact(model, retain, unlearn)


def test_a_projection_on_another_thread_leaves_the_lend_to_the_lenders_next_call(eager, lend_n):
    # a thread's intra-op count is its own: project_() elsewhere cannot give it back; the lender's
    # next call into the object does (here the next retain block)
    n = lend_n
    model, og, retain, unlearn = _retained(17)
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    seen = {}

    def project():
        seen["count"] = torch.get_num_threads()
        og.project_()

    t = threading.Thread(target=project)
    t.start()
    t.join()
    assert seen["count"] == n  # the other thread's own count, untouched
    _assert_exact(model, retain, unlearn)
    assert torch.get_num_threads() == n - 1
    model.zero_grad(set_to_none=True)
    with og.retain():
        assert torch.get_num_threads() == n
        ce(model(retain[0]), retain[1]).mean().backward()
    og.reset()
    assert torch.get_num_threads() == n


def test_no_thread_is_lent_without_the_prefetch(eager, lend_n):
    n = lend_n
    g = torch.Generator().manual_seed(16)
    model = Tokens()
    retain, _ = _data("tokens", g)
    og = OrthoGrad(model, backend="torch", prefetch_mb=0)
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    assert torch.get_num_threads() == n


# --- the retain block's builds on the prefetch thread (retain_span.DEFER_BUILD) -------------------
class NormsAndHeads(nn.Module):
    """A convolution, a batch norm in eval mode, a LayerNorm over tokens, a one-token Linear
    large enough to stay factored (B * numel > gram.EXPLICIT_MAX at B = 7) and a small head:
    every kind of build the block leaves (norm rows, bias sums, small rows, one-token factors)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6).eval()
        self.ln = nn.LayerNorm(6)
        self.tok = nn.Linear(6, 6)
        self.wide = nn.Linear(6 * 5 * 5, 7000)
        self.head = nn.Linear(7000, 4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))  # [B, 6, 5, 5]
        t = self.tok(self.ln(h.flatten(2).transpose(1, 2)))  # 25 tokens of 6
        return self.head(torch.tanh(self.wide(t.flatten(1)))) / 10


def _norms_data(g, B=7, Bu=3):
    return (
        (torch.randn(B, 3, 5, 5, generator=g), torch.randint(0, 4, (B,), generator=g)),
        (torch.randn(Bu, 3, 5, 5, generator=g), torch.randint(0, 4, (Bu,), generator=g)),
    )


@pytest.fixture
def background(monkeypatch):
    """The prefetch (and with it the deferred build) on any thread count; every term it picks
    prepared before the projection takes over (counts independent of timing)."""
    monkeypatch.setattr(prefetch, "MIN_THREADS", 1)
    monkeypatch.setattr(prefetch, "DRAIN", True)


def _builds_on(monkeypatch) -> list:
    """The names of the threads that run op_capture.build_uses from now on."""
    import orthograd_fast.engine.op_capture as op_capture

    seen = []
    orig = op_capture.build_uses

    def spy(*a, **kw):
        seen.append(threading.current_thread().name)
        return orig(*a, **kw)

    monkeypatch.setattr(op_capture, "build_uses", spy)
    return seen


@pytest.mark.parametrize("name", ["norms", "tokens", "convs"])
def test_block_builds_on_the_prefetch_thread_and_give_the_same_step(name, background, monkeypatch):
    import orthograd_fast.engine.retain_span as retain_span

    seen = _builds_on(monkeypatch)
    # (the unlearn pass on the caller's full thread count either way: the same bits of u)
    monkeypatch.setattr(prefetch, "LEND", False)
    steps, windows = {}, {}
    for defer in (True, False):
        monkeypatch.setattr(retain_span, "DEFER_BUILD", defer)
        g = torch.Generator().manual_seed(31)
        torch.manual_seed(32)
        model = {"norms": NormsAndHeads, "tokens": Tokens, "convs": Convs}[name]()
        retain, unlearn = _norms_data(g) if name == "norms" else _data(name, g)
        og = OrthoGrad(model, backend="torch")
        seen.clear()
        model.zero_grad(set_to_none=True)
        with og.retain():
            ce(model(retain[0]), retain[1]).mean().backward()
        win = og._unlearn.window  # the armed unlearn capture: its layers chosen on leaving
        windows[defer] = sorted(n for n, p in model.named_parameters() if win is not None and any(p is w for w in win.weights))
        ce(model(unlearn[0]), unlearn[1]).mean().backward()
        og.project_()
        assert seen == (["orthograd-prefetch"] if defer else ["MainThread"]), (defer, seen)
        steps[defer] = {n: p.grad.clone() for n, p in model.named_parameters()}
        _assert_exact(model, retain, unlearn, tag=(name, defer))
    for n in steps[True]:  # the same builds, one intra-op thread each either way: the same bits
        assert torch.equal(steps[True][n], steps[False][n]), n
    assert windows[True] == windows[False]
    if name == "norms":
        assert windows[True] == ["wide.weight"]  # the one large one-token weight


def test_deferred_build_failure_is_raised_by_project_and_leaves_the_object_usable(background, monkeypatch):
    import orthograd_fast.engine.op_capture as op_capture

    g = torch.Generator().manual_seed(41)
    torch.manual_seed(42)
    model = NormsAndHeads()
    retain, unlearn = _norms_data(g)
    og = OrthoGrad(model, backend="torch")
    orig = op_capture._build_all

    def boom(recs):
        raise RuntimeError("build failed")

    monkeypatch.setattr(op_capture, "_build_all", boom)
    with og.retain():  # the build runs later: leaving the block does not raise
        ce(model(retain[0]), retain[1]).mean().backward()
    assert all(p.grad is None for p in model.parameters())  # .grad put back
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    u = {n: p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="build failed"):
        og.project_()
    assert all(torch.equal(p.grad, u[n]) for n, p in model.named_parameters())  # untouched
    monkeypatch.setattr(op_capture, "_build_all", orig)
    og.reset()
    model.zero_grad(set_to_none=True)
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    og.project_()
    _assert_exact(model, retain, unlearn, "after reset")


@pytest.mark.parametrize("limit,where", [(16912, "orthograd-prefetch"), (16911, "MainThread")])
def test_deferral_keeps_at_most_DEFER_MAX_BYTES_of_small_tensors_output_gradients(limit, where, background, monkeypatch):
    # the output gradients the deferral keeps alive into the unlearn pass: those of the records
    # whose parameters all become rows (conv, batch norm, LayerNorm and tok: [7, 6, 5, 5] or
    # [7, 25, 6] float32, 4200 bytes each; head: [7, 4], 112), not the wide layer's (its weight
    # stays factored): 16912 bytes; one byte less and the block builds on leaving
    import orthograd_fast.engine.retain_span as retain_span

    monkeypatch.setattr(retain_span, "DEFER_MAX_BYTES", limit)
    seen = _builds_on(monkeypatch)
    g = torch.Generator().manual_seed(51)
    torch.manual_seed(52)
    model = NormsAndHeads()
    retain, unlearn = _norms_data(g)
    og = OrthoGrad(model, backend="torch")
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    og.project_()
    assert seen == [where], seen
    _assert_exact(model, retain, unlearn, where)
