"""The unlearning loop: steps checked against the float64 per-sample oracle (tests/oracle.py),
the step-projecting optimizer wrapper, the stopping rule, determinism, errors, and a real
forgetting run on digits."""

import copy

import pytest
import torch
import torch.nn.functional as F

from oracle import oracle_direction, oracle_grads, project_out  # tests/ is on sys.path, see conftest.py

from orthograd_fast.optim_wrap import wrap
from orthograd_fast.unlearning import unlearn


def mlp(seed=0, d=6, h=8, k=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.Tanh(), torch.nn.Linear(h, k))


def toy(n, seed, d=6, k=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def flat_delta(before, model):
    return {n: (p.detach() - before[n]).double().reshape(-1) for n, p in model.named_parameters()}


def ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_orthograd_sgd_step_matches_oracle(alpha, scope):
    model = mlp()
    retain, forget = toy(5, 1), toy(7, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # batch sizes = set sizes: the step sees exactly these samples (order does not matter)
    unlearn(model, forget, retain, steps=1, lr=0.1, alpha=alpha, scope=scope,
            retain_batch_size=5, forget_batch_size=7)
    d, G, u = oracle_direction(_with_weights(model, before), ce, retain, forget, scope=scope, alpha=alpha)
    delta = flat_delta(before, model)
    for n in d:
        torch.testing.assert_close(delta[n], -0.1 * d[n], rtol=1e-4, atol=1e-7)
    if alpha == 0.0 and scope == "tensor":
        for n in G:  # the update is orthogonal to every retain sample's gradient, tensor by tensor
            # (the bound is float32 rounding of the weights, ~1e-7 |p|, against a ~1e-3 step)
            if float(delta[n].norm()) == 0.0:  # the whole tensor lies in the retain span (the last bias)
                continue
            cos = (G[n] @ delta[n]).abs() / (G[n].norm(dim=1) * delta[n].norm())
            assert float(cos.max()) < 1e-4, n


def _with_weights(model, weights):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(weights[n])
    return m


def test_uniform_forget_loss_step_matches_oracle():
    model = mlp(1)
    retain, forget = toy(4, 3), toy(6, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unlearn(model, forget, retain, steps=1, lr=0.5, forget_loss="uniform",
            retain_batch_size=4, forget_batch_size=6)

    # independent oracle: ascend -CE(uniform, softmax) = descend mean_k -log softmax_k
    def neg_uniform_ce(logits, y):
        return torch.log_softmax(logits, -1).mean(-1)

    m0 = _with_weights(model, before)
    G = oracle_grads(m0, ce, *retain)
    m64 = copy.deepcopy(m0).double()
    loss = neg_uniform_ce(m64(forget[0].double()), forget[1]).mean()
    grads = torch.autograd.grad(loss, list(m64.parameters()))
    delta = flat_delta(before, model)
    for (n, _), g in zip(m64.named_parameters(), grads):
        expected = -0.5 * -project_out(G[n], g.reshape(-1))
        torch.testing.assert_close(delta[n], expected, rtol=1e-4, atol=1e-7)


def test_step_projection_with_adam_is_orthogonal():
    """Adam rescales coordinates: a projected gradient gives a non-orthogonal step (project="grad"),
    the wrapped optimizer's projected step is orthogonal (project="step")."""
    retain, forget = toy(5, 5), toy(8, 6)
    worst = {}
    for project in ("grad", "step"):
        model = mlp(2)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        unlearn(model, forget, retain, steps=1, lr=0.01, optimizer="adam", project=project,
                retain_batch_size=5, forget_batch_size=8)
        G = oracle_grads(_with_weights(model, before), ce, *retain)
        delta = flat_delta(before, model)
        worst[project] = max(
            float(((G[n] @ delta[n]).abs() / (G[n].norm(dim=1) * delta[n].norm())).max())
            for n in G
            if float(delta[n].norm()) > 0  # a tensor inside the retain span does not move
        )
    assert worst["step"] < 1e-6
    assert worst["grad"] > 1e-3  # not orthogonal: why project="step" exists


def test_wrap_projects_an_arbitrary_optimizer_step():
    from orthograd_fast import OrthoGrad

    model = mlp(3)
    retain, forget = toy(4, 7), toy(4, 8)
    og = OrthoGrad(model)
    base = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    opt = wrap(og, base)
    assert opt.param_groups is base.param_groups and opt.state_dict() == base.state_dict()
    opt.zero_grad()
    with og.retain():
        F.cross_entropy(model(retain[0]), retain[1]).backward()
    (-F.cross_entropy(model(forget[0]), forget[1])).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().double().reshape(-1) for n, p in model.named_parameters()}
    opt.step()
    G = oracle_grads(_with_weights(model, before), ce, *retain)
    delta = flat_delta(before, model)
    for n in G:  # first momentum step = -lr * grad; projected: -lr * P_perp(grad)
        torch.testing.assert_close(delta[n], -0.2 * project_out(G[n], grads[n]), rtol=1e-4, atol=1e-7)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_baseline_steps_match_manual_gradients():
    retain, forget = toy(5, 9), toy(6, 10)
    m0 = mlp(4)

    def manual(loss_terms):
        m = copy.deepcopy(m0)
        loss = sum(w * F.cross_entropy(m(x), y) for w, (x, y) in loss_terms)
        gs = torch.autograd.grad(loss, list(m.parameters()))
        return [p.detach() - 0.1 * g for p, g in zip(m.parameters(), gs)]

    cases = {
        "neggrad": manual([(-1.0, forget)]),
        "neggrad+": manual([(0.5, retain), (-0.5, forget)]),
        "finetune": manual([(1.0, retain)]),
    }
    for method, expected in cases.items():
        m = copy.deepcopy(m0)
        unlearn(m, forget, retain, method=method, steps=1, lr=0.1, retain_batch_size=5, forget_batch_size=6)
        for p, e in zip(m.parameters(), expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6, msg=method)


def test_random_labels_are_wrong_labels():
    """With 2 classes the only wrong label is 1 - y, so the random-labels step is determined:
    descent on CE(forget, 1 - y) + CE(retain, y)."""
    retain, forget = toy(5, 11, k=2), toy(6, 12, k=2)
    m0 = mlp(5, k=2)
    m = copy.deepcopy(m0)
    unlearn(m, forget, retain, method="random_labels", steps=1, lr=0.1, retain_batch_size=5, forget_batch_size=6)
    ref = copy.deepcopy(m0)
    loss = F.cross_entropy(ref(forget[0]), 1 - forget[1]) + F.cross_entropy(ref(retain[0]), retain[1])
    gs = torch.autograd.grad(loss, list(ref.parameters()))
    for p, p0, g in zip(m.parameters(), ref.parameters(), gs):
        torch.testing.assert_close(p.detach(), p0.detach() - 0.1 * g, rtol=1e-5, atol=1e-6)


def test_stopping_rule_history_and_determinism():
    retain, forget = toy(6, 13), toy(6, 14)
    m = mlp(6)
    res = unlearn(m, forget, retain, steps=10, lr=0.1, stop_forget_acc=100.0)
    assert res.steps == 0 and res.stopped_early and res.history[0]["step"] == 0
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), mlp(6).parameters()))

    runs = []
    for _ in range(2):
        m = mlp(6)
        res = unlearn(m, forget, retain, steps=7, lr=0.1, eval_every=3, retain_batch_size=2,
                      forget_batch_size=3, seed=5, eval_sets={"test": toy(5, 15)},
                      eval_fn=lambda model: {"norm": float(sum(p.detach().norm() for p in model.parameters()))})
        runs.append((res, [p.detach().clone() for p in m.parameters()]))
    (r1, w1), (r2, w2) = runs
    assert [h["step"] for h in r1.history] == [0, 3, 6, 7]
    assert set(r1.history[-1]) == {"step", "forget_acc", "test_acc", "norm"}
    assert r1.history == r2.history and all(torch.equal(a, b) for a, b in zip(w1, w2))
    assert not r1.stopped_early and r1.steps == 7 and r1.seconds > 0


def test_dataset_inputs_and_factory_optimizer():
    retain, forget = toy(6, 16), toy(6, 17)
    m = mlp(7)
    res = unlearn(m, torch.utils.data.TensorDataset(*forget), torch.utils.data.TensorDataset(*retain),
                  steps=2, optimizer=lambda params: torch.optim.SGD(params, lr=0.05))
    assert res.steps == 2 and res.config["optimizer"] == "<lambda>"


def test_bad_arguments_name_the_argument():
    retain, forget = toy(4, 18), toy(4, 19)
    m = mlp()
    for kwargs, match in [
        (dict(method="nope", lr=0.1), "method"),
        (dict(project="nope", lr=0.1), "project"),
        (dict(method="neggrad", project="step", lr=0.1), "project"),
        (dict(forget_loss="nope", lr=0.1), "forget_loss"),
        (dict(alpha=1.5, lr=0.1), "alpha"),
        (dict(steps=-1, lr=0.1), "steps"),
        (dict(retain_batch_size=0, lr=0.1), "retain_batch_size"),
        (dict(), "lr"),
        (dict(optimizer="lbfgs", lr=0.1), "optimizer"),
        (dict(max_grad_norm=0.0, lr=0.1), "max_grad_norm"),
    ]:
        with pytest.raises(ValueError, match=match):
            unlearn(m, forget, retain, **kwargs)
    with pytest.raises(TypeError, match="forget"):
        unlearn(m, [1, 2, 3], retain, lr=0.1)


def test_forget_accuracy_drops_on_digits(one_thread):
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (extra [demo])")
    from orthograd_fast.unlearning.baselines import train_model
    from orthograd_fast.unlearning.data import make_scenario
    from orthograd_fast.unlearning.metrics import accuracy

    sc = make_scenario("digits", "random", seed=0, retain_frac=0.01)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    train_model(model, sc.train, epochs=15, lr=1e-2, batch_size=128, seed=0)
    f0, t0 = accuracy(model, sc.forget), accuracy(model, sc.test)
    assert f0 > 97.0
    res = unlearn(model, sc.forget, sc.retain_budget, steps=60, lr=1.0, alpha=0.3, max_grad_norm=0.2,
                  forget_batch_size=256, stop_forget_acc=t0)
    f1, t1 = accuracy(model, sc.forget), accuracy(model, sc.test)
    assert res.stopped_early and f1 <= t0 < f0
    assert t1 > t0 - 5.0  # forgetting, not destroying the model
