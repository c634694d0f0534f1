"""The projection plan: explicit terms (biases, norm weights, small layers) of one size evaluated
as batched groups, the plan reused while the shapes repeat and rebuilt when they change; against
the float64 oracle, with the grouped path shown to be the one that ran."""

import pytest
import torch
from torch import nn

import orthograd_fast.engine.gram as gram
import orthograd_fast.engine.projection as projection
from benchmarks.host_overhead import Stack  # the many-small-tensors model, shared with the benchmark
from engine_helpers import compare, judge
from models import ce
from orthograd_fast import OrthoGrad

REL = 1e-4
ORTH = 1e-5


def _data(gen, B, Bu=3):
    return (torch.randn(B, 5, generator=gen), torch.randint(0, 4, (B,), generator=gen)), (
        torch.randn(Bu, 5, generator=gen),
        torch.randint(0, 4, (Bu,), generator=gen),
    )


@pytest.fixture(autouse=True)
def default_routes(monkeypatch):
    # the documented defaults (another test that set them without restoring must not change the plan)
    monkeypatch.setattr(gram, "EXPLICIT_MAX", 1 << 18)
    monkeypatch.setattr(gram, "LOOKUP_ROUTE", True)


@pytest.fixture
def group_calls(monkeypatch):
    calls = {"group": 0, "single_explicit": 0}
    orig_g, orig_t = gram.ExplicitGroup.gram_coef, gram.PerSampleGrads.gram_coef

    def spy_g(self, Us, want_K=True):
        calls["group"] += len(self.terms)
        return orig_g(self, Us, want_K)

    def spy_t(self, U, b=None):
        if self.mode == "explicit":
            calls["single_explicit"] += 1
        return orig_t(self, U, b)

    monkeypatch.setattr(gram.ExplicitGroup, "gram_coef", spy_g)
    monkeypatch.setattr(gram.PerSampleGrads, "gram_coef", spy_t)
    return calls


@pytest.mark.parametrize("B", [6, 11])
@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("split", [False, True])
def test_grouped_explicit_terms_match_oracle(B, scope, alpha, split, group_calls, monkeypatch):
    if split:  # groups capped at three 7-entry tensors' rows: several groups, 49-entry ones alone
        monkeypatch.setattr(projection, "GROUP_MAX_BYTES", 3 * 8 * B * 7)
    torch.manual_seed(31)
    model = Stack()
    retain, unlearn = _data(torch.Generator().manual_seed(32 + B), B)
    err, orth, og = compare(model, ce, retain, unlearn, scope=scope, alpha=alpha)
    n = len(og.parameters)
    # (the input layer's tensors have their own sizes; split: the 49-entry weights and one 7-entry tensor go alone)
    assert group_calls["group"] >= n - (9 if split else 3), group_calls
    assert err <= REL, f"relative error {err:.2e}"
    assert orth is None or orth <= ORTH
    sizes = [len(ks) for ks, _, _ in og._plan_cache.plan.spec]
    assert (max(sizes) <= 3) == split, sizes


def test_plan_reused_while_shapes_hold_and_rebuilt_on_change(group_calls):
    torch.manual_seed(33)
    model = Stack()
    gen = torch.Generator().manual_seed(34)
    og = OrthoGrad(model)
    plans = []
    for B in (6, 6, 9):
        retain, unlearn = _data(gen, B)
        model.zero_grad(set_to_none=True)
        with og.retain():
            ce(model(retain[0]), retain[1]).mean().backward()
        ce(model(unlearn[0]), unlearn[1]).mean().backward()
        og.project_()
        plans.append(og._plan_cache.plan)
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
        # the same step with grouping off (every explicit term its own job)
        ref = OrthoGrad(model, arm_forget=False)
        model.zero_grad(set_to_none=True)
        with ref.retain():
            ce(model(retain[0]), retain[1]).mean().backward()
        ce(model(unlearn[0]), unlearn[1]).mean().backward()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(projection, "GROUP_MIN", 10**9)
            ref.project_()
        # over the whole model (a tensor almost inside the span cancels to rounding level: see
        # test_forget); the grouped update is formed in float64, the per-term one in float32
        num = sum(float((got[n] - p.grad).square().sum()) for n, p in model.named_parameters())
        den = sum(float(p.grad.square().sum()) for p in model.parameters())
        assert (num / den) ** 0.5 <= 1e-5
    assert plans[0] is plans[1] and plans[2] is not plans[1]
    assert group_calls["single_explicit"] > 0  # the reference ran per term


def test_project_vectors_through_groups():
    torch.manual_seed(35)
    model = Stack()
    retain, unlearn = _data(torch.Generator().manual_seed(36), 8)
    og = OrthoGrad(model)
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    gen = torch.Generator().manual_seed(37)
    vecs = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    got = og.project_vectors(vecs)
    ref = OrthoGrad(model, arm_forget=False)
    with ref.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(projection, "GROUP_MIN", 10**9)
        want = ref.project_vectors(vecs)
    for n in vecs:
        assert float((got[n] - want[n]).norm()) <= 1e-5 * float(want[n].norm()) + 1e-12, n
    og.close()


class Mixed(nn.Module):
    """Equal-size tensors of different shapes: Linear(1, 6)'s weight [6, 1] shares a group with
    biases and norm weights [6]; the group's members are not consecutive parameters."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.w = nn.Linear(6, 6)  # 36 entries: its own job, between group members
        self.b = nn.Linear(1, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.w(self.norm(self.a(x))) + self.b(x[:, :1])))


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_group_of_different_shapes_matches_oracle(scope, alpha, group_calls):
    torch.manual_seed(38)
    model = Mixed()
    retain, unlearn = _data(torch.Generator().manual_seed(39), 9)
    err, orth, og = compare(model, ce, retain, unlearn, scope=scope, alpha=alpha)
    assert err <= REL, f"relative error {err:.2e}"
    assert orth is None or orth <= ORTH
    spec = og._plan_cache.plan.spec
    shapes = [shape for _, _, shape in spec]
    assert None in shapes, shapes  # the [6, 1] weight and the [6] tensors in one group
    assert og._plan_cache.plan.inv is not None  # stacked out of the parameters' order
    assert group_calls["group"] >= 5


def _oracle_step(og, model, retain, unlearn, step, before=None):
    """One contract-order step (``before`` runs just before project_()), its direction against
    the float64 oracle: per tensor relative error and orthogonality."""
    from oracle import oracle_direction, orthogonality

    model.zero_grad(set_to_none=True)
    with og.retain():
        ce(model(retain[0]), retain[1]).mean().backward()
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    if before is not None:
        before()
    og.project_()
    got = {n: p.grad.detach().double().reshape(-1) for n, p in model.named_parameters()}
    ref, G, u = oracle_direction(model, ce, retain, unlearn)
    for n in ref:
        err = float((got[n] - ref[n]).norm() / (ref[n].norm() + u[n].norm()))
        assert err <= REL, f"step {step} {n}: {err:.2e}"
    orth = orthogonality(G, {n: -got[n] for n in got}, u)
    assert orth <= ORTH, orth


def test_singular_column_groups_go_to_eigh_until_full_rank(monkeypatch):
    # d = 4: each Linear after a LayerNorm at init (bias 0) has 16 weights whose per-sample
    # gradients lie in a 12-dim subspace (the norm's output has zero mean); at B = 24 > 16 their
    # column Grams are singular every step. The first projection learns it (Cholesky refuses the
    # whole group), the next solves that group by eigh directly. Then the LayerNorm biases are
    # drawn at random, as training leaves them: the eigh solve that finds the Grams full rank
    # clears the plan's flag, and the step after tries Cholesky again. Every step matches the oracle.
    eigh_only_calls = []
    orig = projection.gram.ExplicitGroup.solve_columns

    def spy(self, rtol, eigh_only=False, refused=None):
        eigh_only_calls.append(eigh_only)
        return orig(self, rtol, eigh_only, refused)

    monkeypatch.setattr(projection.gram.ExplicitGroup, "solve_columns", spy)
    torch.manual_seed(35)
    model = Stack(d=4, depth=3)
    gen = torch.Generator().manual_seed(36)
    og = OrthoGrad(model, alpha=0.0)
    seen = []
    for step in range(4):
        if step == 2:
            with torch.no_grad():
                for b in model.blocks:
                    b[0].bias.copy_(torch.randn(4, generator=gen))
        retain, unlearn = _data(gen, 24, Bu=5)
        _oracle_step(og, model, retain, unlearn, step, before=eigh_only_calls.clear)
        seen.append((any(eigh_only_calls), any(og._plan_cache.plan.singular)))
    # (eigh_only used, singular afterwards) per step: learned at 0, used at 1, cleared at 2
    assert seen == [(False, True), (True, True), (True, False), (False, False)], seen


@pytest.mark.parametrize("alone", ["group_of_one", "single"])
def test_terms_alone_in_their_size_go_to_eigh_and_stay_exact(alone, monkeypatch):
    # a 3-class head: its bias's rows (softmax gradients) sum to zero, its 12 weights' rows lie in
    # an 8-dim subspace; neither shares a size with another tensor, both have fewer entries than
    # B = 19 samples. By default each is a group of one (its own flag); with groups from two
    # members on they are single terms, solved together (one flag). The first projection learns
    # that Cholesky refuses them, the next solves them by eigh directly; both match the oracle.
    import orthograd_fast.engine.solve as solve

    if alone == "single":
        monkeypatch.setattr(projection, "GROUP_MIN", 2)  # the tensors that share a size still grouped
    calls = []  # (matrices, columns, eigh_only) per batched column solve
    orig = solve.solve_columns_stacked

    def spy(G, u, rtol, eigh_only=False, refused=None):
        calls.append((G.shape[0], G.shape[2], eigh_only))
        return orig(G, u, rtol, eigh_only, refused)

    monkeypatch.setattr(solve, "solve_columns_stacked", spy)
    torch.manual_seed(38)
    model = Stack(d=4, depth=3, classes=3)
    gen = torch.Generator().manual_seed(39)
    og = OrthoGrad(model, alpha=0.0)
    for step in range(2):
        retain = (torch.randn(19, 5, generator=gen), torch.randint(0, 3, (19,), generator=gen))
        unlearn = (torch.randn(5, 5, generator=gen), torch.randint(0, 3, (5,), generator=gen))
        _oracle_step(og, model, retain, unlearn, step, before=calls.clear)
        head = sorted((n, e) for m, n, e in calls if n in (3, 12))
        assert head == [(3, step == 1), (12, step == 1)], calls  # head.bias, head.weight
    plan = og._plan_cache.plan
    if alone == "single":
        assert plan.singles_singular and all(len(ks) > 1 for ks, _, _ in plan.spec), plan
    else:
        assert not plan.single_ks, plan  # every tensor in a group, the two head tensors alone in theirs
        names = {ks[0]: og._params[ks[0]][0] for ks, _, _ in plan.spec if len(ks) == 1}
        flags = {names[ks[0]]: f for (ks, _, _), f in zip(plan.spec, plan.singular) if ks[0] in names}
        assert flags == {"inp.weight": False, "head.weight": True, "head.bias": True}, flags  # (inp.weight: B x B)


class _SmallOneToken(nn.Module):
    """Equal-size one-token layers, plain and transposed (transformers' Conv1D, one group with the
    Linears), after 3-wide LayerNorms: weights with fewer entries than samples."""

    def __init__(self, d=3, depth=4):
        super().__init__()
        from test_engine import Conv1D

        self.inp = nn.Linear(5, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(depth))
        self.lins = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))
        self.convs = nn.ModuleList(Conv1D(d, d) for _ in range(depth))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        for n, a, c in zip(self.norms, self.lins, self.convs):
            h = h + c(torch.tanh(a(n(h))))
        return self.head(h)


@pytest.mark.parametrize("B", [13, 22])
def test_later_steps_solve_column_groups_without_K(B, monkeypatch):
    """From the second projection on (no capture check), groups solved from their column Grams
    form no B x B K (the singles keep theirs, found through the plan's rows). Every step against
    the float64 oracle on fresh data, with the same OrthoGrad."""
    wanted = []
    orig = gram.ExplicitGroup.gram_coef

    def spy(self, Us, want_K=True):
        wanted.append((self.numel < self.B, want_K))
        return orig(self, Us, want_K)

    monkeypatch.setattr(gram.ExplicitGroup, "gram_coef", spy)
    torch.manual_seed(41 + B)
    model = _SmallOneToken()
    gen = torch.Generator().manual_seed(42 + B)
    og = OrthoGrad(model)
    for step in range(3):
        retain, unlearn = _data(gen, B, Bu=5)
        wanted.clear()
        model.zero_grad(set_to_none=True)
        with og.retain():
            ce(model(retain[0]), retain[1]).mean().backward()
        ce(model(unlearn[0]), unlearn[1]).mean().backward()
        og.project_()
        got = {n: p.grad.reshape(-1).double() for n, p in model.named_parameters()}
        err, orth = judge(model, got, ce, retain, unlearn)
        assert err <= REL, f"step {step}: relative error {err:.2e}"
        assert orth <= ORTH, f"step {step}: orthogonality {orth:.2e}"
        col = [w for c, w in wanted if c]
        assert col, wanted  # the 3 x 3 weights (9 entries) and the 3-entry tensors: column groups
        assert all(col) if step == 0 else not any(col), (step, wanted)
        if step > 0:
            terms = list(og._terms.values())  # the projection's positions
            members = [terms[k] for ks, _, _ in og._plan_cache.plan.spec for k in ks if terms[k].numel < B]
            assert members and all(t.K is None for t in members)
    og.close()
