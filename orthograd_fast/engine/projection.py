"""One projection: scale * P_perp applied to {param: vector}, from the terms of one retain span.

Data flows one way (docs/math.md sections 3 to 6, 9 and 11):

    terms (one PerSampleGrads per tensor) -> plan (shared_biases, explicit groups, jobs; cached while shapes
    repeat) -> Gram and coefficients per job (threads on the CPU; held-row terms finish their
    whole projection there) -> checks (finite, capture, unlearn factors) -> batched solve ->
    update (threads)

The checks that need the facade's state (names, the retain gradient, og.forget() bookkeeping) come
in as callables; nothing here reads or writes the facade.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import gram
from . import threads as _threads
from .gram import PerSampleGrads
from .solve import COLUMN_MIN_RTOL, resolve_rtol, solve_columns, solve_psd

# CPU: a term (its Gram and coefficients, or its update) of at most this many multiply-adds always
# runs on one intra-op thread, beside other terms (orthograd_fast.engine.threads.run_spread).
SMALL_TERM_WORK = 1 << 25
# explicit terms of one size grouped from this many members on (below: per-term jobs), and at
# most this many bytes of stacked float64 rows per group (a group's stack is a copy of its rows).
# 1: a term alone in its size is a group of one too: its update in float64 without the
# amplification check, no B x B Gram when it takes the column solve, its own singular flag
# (host benchmark, 152 tensors: 0.97x of the time with 2)
GROUP_MIN = 1
GROUP_MAX_BYTES = 32 << 20


@dataclass
class Plan:
    """How one projection's terms are evaluated, by position in the projection's tensor list:
    ``shared_biases`` take their Gram from their weight's job (gram.share_bias_grams); ``spec``
    lists the explicit groups (positions, the same as an index tensor, the members' common shape or None); ``jobs``
    are the other terms, one job each. ``single_ks``: positions of the terms outside groups
    (``single_idx`` as a tensor); ``inv``: the index that puts K and b, stacked as jobs, shared_biases,
    then each group's members, in position order (None when that is already the order)."""

    shared_biases: List[int]
    spec: List[Tuple[List[int], Tensor, Optional[torch.Size]]]
    jobs: List[int]
    single_ks: List[int]
    single_idx: Tensor
    inv: Optional[Tensor]
    # per group: its column Grams were all singular at the last solve (a structural rank
    # deficiency, e.g. a Linear after a LayerNorm with fewer weights than samples): solved by eigh
    # directly, without the Cholesky attempt (the same result)
    singular: List[bool] = field(default_factory=list)
    # the same for the single terms solved from their column Grams, together (e.g. a classifier's
    # bias: its rows, softmax gradients, sum to zero)
    singles_singular: bool = False


@dataclass
class PlanCache:
    """The last plan, reused while the terms' kinds and shapes repeat (every step of a loop)."""

    key: Optional[tuple] = None
    plan: Optional[Plan] = field(default=None)


def make_plan(T: List[PerSampleGrads], triton: bool, cache: PlanCache) -> Plan:
    """The plan for terms ``T`` (cached in ``cache`` while their kinds and shapes repeat)."""
    key = tuple((id(t.param), t.mode, t.B, t.numel, t.gram_source is not None) for t in T)
    if cache.plan is not None and cache.key == key:
        return cache.plan
    ids = {id(t.param) for t in T}
    shared_biases = [k for k, t in enumerate(T) if t.gram_source is not None and id(t.gram_source.param) in ids]
    sharing = set(shared_biases)
    by_key: Dict[tuple, list] = {}
    if not triton:
        for k, t in enumerate(T):
            gk = gram.ExplicitGroup.key(t) if k not in sharing else None
            if gk is not None:
                by_key.setdefault(gk, []).append(k)
    dev = T[0].param.device
    spec = []
    for ks in by_key.values():
        t = T[ks[0]]
        per = max(1, GROUP_MAX_BYTES // (8 * t.B * t.numel))
        for i in range(0, len(ks), per):
            part = ks[i : i + per]
            if len(part) >= GROUP_MIN:
                shapes = {T[k].param.shape for k in part}
                spec.append((part, torch.tensor(part, device=dev), shapes.pop() if len(shapes) == 1 else None))
    grouped = {k for ks, _, _ in spec for k in ks}
    jobs = [k for k in range(len(T)) if k not in sharing and k not in grouped]
    order = jobs + shared_biases + [k for ks, _, _ in spec for k in ks]
    inv = None
    if order != list(range(len(T))):
        inv = torch.empty(len(order), dtype=torch.long)
        inv[torch.tensor(order)] = torch.arange(len(order))
        inv = inv.to(dev)
    single_ks = [k for k in range(len(T)) if k not in grouped]
    cache.key = key
    cache.plan = Plan(shared_biases, spec, jobs, single_ks, torch.tensor(single_ks, dtype=torch.long, device=dev), inv, [False] * len(spec))
    return cache.plan


def needs_exact(K: Tensor, c: Tensor, vecs: List[Tensor]) -> List[bool]:
    """Per tensor: nearly collinear per-sample gradients give large coefficients of opposite
    signs whose terms cancel in the update; its rounding in the tensor's dtype, eps x
    update_amplification, would exceed gram.EXACT_UPDATE_TOL (random rows: amplification
    ~ sqrt(B), float32 fine up to B ~ 10^4). One host sync for all tensors."""
    eps = torch.tensor([torch.finfo(v.dtype).eps if v.dtype != torch.float64 else 0.0 for v in vecs], dtype=K.dtype, device=K.device)
    return (gram.update_amplification(K, c.to(K.dtype)) * eps > gram.EXACT_UPDATE_TOL).tolist()


@dataclass
class Checks:
    """What the facade checks between the Gram jobs and the solve (orthograd_fast.engine.checks).

    ``unlearn_error(param, term, vec, K, b)``: how far one tensor's og.forget() factors (which
    gave ``b``) are from its .grad (a 0-d tensor, in the term's job; None: certified, nothing to
    check);
    ``unlearn_factors(errs, got, terms, vecs)``:
    the verdict on those errors (may replace entries of ``got``); both are needed when the
    projection is given og.forget() factors. ``capture(active, K, b, vecs)`` (first projection
    only, else None): the per-sample gradients against the retain gradient; ``nonfinite(active,
    Ks, bs, vecs)``: raises the error that names the tensor."""

    nonfinite: Callable
    capture: Optional[Callable] = None
    unlearn_factors: Optional[Callable] = None
    unlearn_error: Optional[Callable] = None


def project(
    terms: Dict[Tensor, PerSampleGrads],
    vectors: Dict[Tensor, Tensor],
    *,
    scope: str,
    rtol: Optional[float],
    backend: str,
    checks: Checks,
    plan_cache: PlanCache,
    inplace: bool = False,
    shift: Optional[Dict[Tensor, float]] = None,
    scale: float = 1.0,
    unlearn: Optional[Dict[Tensor, list]] = None,
    pending: Optional[Tuple[PerSampleGrads, Callable[[], None]]] = None,
) -> Tuple[Dict[Tensor, Tensor], dict]:
    """(scale * P_perp applied to {param: tensor}, stats). New tensors unless ``inplace`` (then
    written through). ``shift`` {param: s}: also subtract s * sum_i g_i (the retain gradient from
    the factors, for alpha under lean retain) in the same update GEMM; ``scale`` rides in that GEMM
    too. ``unlearn`` {param: og.forget() factors}: coefficients from them instead of the GEMM.
    ``pending`` (term, wait): a term the prefetch is still preparing (orthograd_fast.engine.prefetch),
    left untouched until its own job, which calls ``wait()`` first and runs last."""
    # .grad needs no detached alias unless it is itself part of a graph (create_graph=True)
    out = {p: ((v.detach() if v.requires_grad else v) if inplace else v.detach().clone()) for p, v in vectors.items()}
    # from here on lists by position in ``active``: a dict lookup keyed by a tensor runs
    # Tensor.__hash__ in Python (~0.3 us), many times per tensor and step
    active, T, U = [], [], []
    for p, t in terms.items():
        v = out.get(p)
        if v is not None:
            active.append(p)
            T.append(t)
            U.append(v)
    if scale != 1.0 and len(out) > len(active):  # tensors the projection does not touch
        for p in out:
            if p not in terms:
                out[p].mul_(scale)
    if not active:
        return out, {}
    S = [shift.get(p, 0.0) for p in active] if shift else None
    X = {k: unlearn[p] for k, p in enumerate(active) if p in unlearn} if unlearn else {}
    # tile, conv and lookup terms that can hold their float32 rows project inside their own job
    # (orthograd_fast.engine.held_rows; per-tensor solves only: the passes use each term's own K)
    holding = scope == "tensor" and backend != "triton"
    wait = None
    if pending is not None:
        k = next(k for k, t in enumerate(T) if t is pending[0])
        if holding and k not in X:
            wait = _Wait(k, pending[1])
        else:  # not held here: nothing to wait for
            pending[1]()
    hold, holders, prefetched = [], [], 0
    for k, t in enumerate(T):
        r = t.route
        if not r.holds:  # never holds rows
            continue
        holders.append(t)
        if wait is not None and k == wait.k:  # untouched until its job
            continue
        if r.rows is not None:  # prepared by the prefetch: kept where held, else dropped
            if holding and k not in X:
                prefetched += 1
            else:
                t.drop_rows()
        if r.rows is None:
            r.hold = False
            if holding and k not in X:
                hold.append(t)
    gram.hold_rows(hold, term_rtols(rtol, hold, exact_gram=True))
    try:
        stats = _project(active, T, U, out, scope, rtol, backend, checks, plan_cache, S, scale, X, wait)
        if wait is not None and wait.prepared:
            prefetched += 1
        stats["prefetched"] = prefetched  # terms whose rows and K were formed before (prefetch)
    finally:
        for t in holders:
            if t.route.rows is not None:
                t.drop_rows()  # held rows live for one projection at most
    return out, stats


@dataclass
class _Wait:
    """The term at position ``k`` that the prefetch is still preparing: its job calls ``wait()``
    first and records whether its rows came ``prepared``."""

    k: int
    wait: Callable[[], None]
    prepared: bool = False


def term_rtols(rtol: Optional[float], T: List[PerSampleGrads], exact_gram: bool = False) -> List[float]:
    """Each term's rank tolerance (solve.resolve_rtol), resolved once per (factor dtype, float32
    Gram) pair; ``exact_gram``: as if every Gram were float64 (the held rows' check)."""
    seen: dict = {}
    out = []
    for t in T:
        key = (t.factor_dtype, False if exact_gram else t.approx)
        r = seen.get(key)
        if r is None:
            r = seen[key] = resolve_rtol(rtol, *key)
        out.append(r)
    return out


def _project(active, T, U, out, scope, rtol, backend, checks, plan_cache, S, scale, X, wait=None):
    """The projection over terms T and vectors U (lists by position); S: shifts or None; X:
    {position: og.forget() factors}; ``wait``: the term the prefetch is still preparing.
    Returns the stats."""
    # On the CPU the terms run side by side on Python threads, one intra-op thread each
    # (orthograd_fast.engine.threads: a projection is many independent small GEMMs, and waking the
    # OpenMP pool for each small op costs more than the op); a dominant term runs on all threads.
    # (Triton terms on the CPU run in its interpreter, which is not thread-safe: one at a time.)
    on_cpu = U[0].device.type == "cpu" and backend != "triton"
    nthreads = torch.get_num_threads() if on_cpu else 1

    # terms projected in their own job (held rows), into copies: .grad stays as it was until every
    # check below has passed; they are copied back with the updates
    staged = {}
    errs = {}  # position -> how far its og.forget() factors are from .grad (checks.unlearn_error)

    def gram_coef(k):
        t = T[k]
        if wait is not None and k == wait.k:
            wait.wait()  # its rows and K, or (refused, failed) its usual route
            wait.prepared = t.route.rows is not None
        if k in X:  # (never held: see project())
            K, b = t.gram_coef(U[k], t.unlearn_coef(X[k]))
            e = checks.unlearn_error(active[k], t, U[k], K, b)
            if e is not None:
                errs[k] = e
            return K, b
        K, b = t.gram_coef(U[k])
        if t.rows is not None:
            Uk = U[k].clone()  # passes that do not converge leave the vector as it was
            if t.project_held_(Uk, b, scale, S[k] if S else 0.0, source=U[k]):
                staged[k] = Uk
            else:  # the float64 route, then the batched solve and update like any term
                K, b = t.gram_coef(U[k])
        return K, b

    # a one-token layer's bias takes its Gram from its weight's job (gram.share_bias_grams): after it
    plan = make_plan(T, backend == "triton", plan_cache)
    groups = [gram.ExplicitGroup([T[k] for k in ks], ks, rows, shape) for ks, rows, shape in plan.spec]
    jobs = plan.jobs

    rtols = term_rtols(rtol, T)
    # groups solved from their n x n column Grams need no B x B K (per-tensor scope; the first
    # projection's capture check reads every K's diagonal)
    col_groups = [gi for gi, g in enumerate(groups) if g.numel < g.B and rtols[g.ks[0]] >= COLUMN_MIN_RTOL]
    no_K = set(col_groups) if scope == "tensor" and checks.capture is None else set()
    want_K = [gi not in no_K for gi in range(len(groups))]

    def gram_job(item):
        if isinstance(item, int):
            return gram_coef(item)
        gi, g = item
        return g.gram_coef([U[k] for k in g.ks], want_K=want_K[gi])

    res = _threads.run_spread(
        gram_job,
        jobs + list(enumerate(groups)),
        # (the prefetch's term first: its job waits for the thread, whose lowest priority starves
        # it while the other jobs keep every core busy; waiting first hands it the waiting
        # thread's core instead of a lone core at the end)
        [math.inf if wait is not None and k == wait.k else T[k].work(k in X) for k in jobs] + [g.work() for g in groups],
        nthreads,
        # while a thread waits for the prefetch, a dominant term runs beside it on one core rather
        # than on all cores after it (the waiting thread's core goes to the prefetch meanwhile)
        small=SMALL_TERM_WORK if wait is None else float("inf"),
        alone=[not T[k].spreadable() for k in jobs] + [False] * len(groups),
    )
    got = dict(zip(jobs, res))
    for k in plan.shared_biases:
        got[k] = gram_coef(k)
    if X:  # the og.forget() factors against .grad (by parameter: the facade's bookkeeping)
        by_param = {active[k]: got[k] for k in X}
        checks.unlearn_factors({active[k]: errs[k] for k in X if k in errs}, by_param, {active[k]: T[k] for k in X}, {active[k]: U[k] for k in X})
        for k in X:
            got[k] = by_param[active[k]]
    # K, b stacked in the plan's order (single terms, then each group's [m, B, B] as it came),
    # then put in position order by one index (no per-member unbind and restack); without the
    # column groups' K, K keeps the plan's order and ``Kr`` maps positions to its rows
    single = jobs + plan.shared_biases
    parts = [(torch.stack([got[k][0] for k in single]), torch.stack([got[k][1] for k in single]))] if single else []
    parts += res[len(jobs) :]
    b = torch.cat([q[1] for q in parts]) if len(parts) > 1 else parts[0][1]
    if plan.inv is not None:
        b = b[plan.inv]
    Ks = [q[0] for q in parts if q[0] is not None]
    K = (torch.cat(Ks) if len(Ks) > 1 else Ks[0]) if Ks else b.new_empty(0, b.shape[1], b.shape[1])
    if not no_K:
        Kr = None
        if plan.inv is not None:
            K = K[plan.inv]
    else:
        kpos = single + [k for gi, (ks, _, _) in enumerate(plan.spec) if gi not in no_K for k in ks]
        Kr = [-1] * len(T)
        for r, k in enumerate(kpos):
            Kr[k] = r
    del got, parts, res
    # the single terms keep their K (a view of the stack) for a later projection of this span;
    # a group forms its members' K again in one bmm (no view per member and step)
    for k in single:
        T[k].K = K[k if Kr is None else Kr[k]]
    finite = torch.isfinite(K.sum() + b.sum())  # NaN and inf propagate: one small reduction, one sync
    if not bool(finite):  # (the error path: the column groups' K formed here from their rows)
        Ks = [K[k] if Kr is None else K[Kr[k]] if Kr[k] >= 0 else T[k].route.G @ T[k].route.G.t() for k in range(len(T))]
        checks.nonfinite(active, Ks, list(b), out)
    if checks.capture is not None:
        checks.capture(active, K, b, out)
    c, rt, Kg = _solve(T, U, scope, _Rows(K, Kr), b, rtols, groups, col_groups, plan)
    if any(t.approx for t in T):
        _update_twice(T, U, scope, K, Kg, c, rt, S, scale)
    else:
        _update(T, U, _Rows(K, Kr), c, plan, groups, staged, S, scale, nthreads)
    # T[0].B: under DDP the union of every rank's retain samples (retain_size is local)
    return {
        "B": T[0].B,
        "backend": backend,
        "scope": scope,
        "tensors": len(T),
        "held_rows": len(staged),  # tensors projected from float32 rows (orthograd_fast.engine.held_rows)
    }


@dataclass
class _Rows:
    """The stacked Grams K and, where some terms have none (column groups), ``rows``: per
    position its row in K (None: K is in position order, every term present)."""

    K: Tensor
    rows: Optional[List[int]]

    def at(self, ks: List[int]) -> Tensor:
        """K of the terms at positions ``ks``."""
        return self.K[ks] if self.rows is None else self.K[[self.rows[k] for k in ks]]


def _solve(T, U, scope, Kr: _Rows, b, rtols, groups, col_groups, plan: Plan):
    """(c [m, B], rt, the global K or None): the batched solve, one thread on the CPU (B x B).
    ``col_groups``: the groups solved from their column Grams (per-tensor scope); the plan's
    ``singular`` and ``singles_singular``: whether those column Grams were all singular last time
    (updated from this solve: a Gram singular at init, e.g. after a LayerNorm whose bias is still
    zero, returns to the Cholesky path once training has made it full rank)."""
    singular = plan.singular
    Kg = None
    K = Kr.K
    with _threads.one_thread(b.device.type == "cpu"):
        if scope == "global":
            rt = max(rtols)
            Kg = K.sum(0)
            c = solve_psd(Kg, b.sum(0), rt).unsqueeze(0).expand(len(T), -1)
            return c, rt, Kg
        rt = torch.tensor(rtols, dtype=torch.float64, device=b.device).unsqueeze(-1)
        # materialized tensors with fewer entries than samples: the same c from their n x n
        # column Gram (K is rank-deficient there: no B x B eigh every step)
        # (groups of explicit terms: one batched column solve per group)
        # (terms outside the groups: the plan's single_ks)
        col = [k for k in plan.single_ks if T[k].mode == "explicit" and T[k].numel < T[k].B and rtols[k] >= COLUMN_MIN_RTOL]
        if not (col or col_groups):
            return solve_psd(K, b, rt), rt, Kg
        cols, colg = set(col), set(col_groups)
        rest = sorted([k for k in plan.single_ks if k not in cols] + [k for gi, g in enumerate(groups) if gi not in colg for k in g.ks])
        c = torch.empty_like(b)
        if rest:
            c[rest] = solve_psd(Kr.at(rest), b[rest], rt[rest])
        if col:
            refused: list = []
            got_c = solve_columns([T[k].G for k in col], [U[k] for k in col], [rtols[k] for k in col], plan.singles_singular, refused)
            plan.singles_singular = bool(refused) and all(refused)  # as found by this solve
            for k, ck in zip(col, got_c):
                c[k] = ck
        for gi in col_groups:
            g, refused = groups[gi], []
            c[g.rows] = g.solve_columns(rtols[g.ks[0]], singular[gi], refused)
            singular[gi] = bool(refused) and all(refused)
    return c, rt, Kg


def _update(T, U, K: _Rows, c, plan, groups, staged, S, scale, nthreads):
    """U <- scale * (U - sum_i (c_i + shift) g_i) for every term not done in its job."""
    # fold the retain-gradient term into the coefficients of the same update GEMM
    if S:
        c = c + torch.tensor(S, dtype=c.dtype, device=c.device).unsqueeze(-1)
    # groups always form their update in float64: only the single terms are checked
    exact = [False] * len(T)
    ks = plan.single_ks
    if ks:
        Ks = K.K[plan.single_idx] if K.rows is None else K.at(ks)
        for k, e in zip(ks, needs_exact(Ks, c[plan.single_idx], [U[k] for k in ks])):
            exact[k] = e

    def update(item):
        if isinstance(item, gram.ExplicitGroup):
            item.apply_([U[k] for k in item.ks], c[item.rows], scale)
        elif item in staged:
            U[item].copy_(staged[item])
        else:
            T[item].apply_(U[item], c[item], scale, exact=exact[item])

    work = [T[k].update_work() for k in ks] + [g.update_work() for g in groups]
    _threads.run_spread(update, ks + groups, work, nthreads, small=SMALL_TERM_WORK)


def _update_twice(T, U, scope, K, Kg, c, rt, S, scale):
    """Float32-accumulated Gram (Triton): the update, then the residual projected once more
    ("twice is enough"); the shift and the scale ride in the second pass."""
    for t, u, ck in zip(T, U, c):
        t.apply_(u, ck)
    b2 = torch.stack([t.coef(u) for t, u in zip(T, U)])
    c2 = solve_psd(Kg, b2.sum(0), rt).unsqueeze(0).expand(len(T), -1) if scope == "global" else solve_psd(K, b2, rt)
    for k, (t, u) in enumerate(zip(T, U)):
        t.apply_(u, c2[k] + S[k] if S else c2[k], scale)
