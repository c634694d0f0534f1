"""DDP (2 CPU ranks, gloo) against one process on the union of the batches and the float64 oracle;
FSDP refused with a clear error."""

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from models import TinyLM, ce
from oracle import oracle_grads, oracle_unlearn_grad, orthogonality, project_out
from orthograd_fast import OrthoGrad

REL = 1e-4
DDP_VS_SINGLE = 1e-5


def _mlp():
    return nn.Sequential(nn.Linear(13, 31), nn.Tanh(), nn.Linear(31, 17), nn.ReLU(), nn.Linear(17, 7))


def _case(name):
    """(model, [retain chunk per rank], [unlearn chunk per rank], scope, alpha, options).

    Retain chunks have unequal sizes (and, for the LM, unequal sequence lengths): the projection is
    invariant to the per-rank 1/B_r scaling. Unlearn chunks are equal, so DDP's averaged gradient is
    the mean over the union (DDP's semantics); alpha > 0 only with equal retain chunks for the same reason.
    """
    g = torch.Generator().manual_seed(1234 + len(name))
    torch.manual_seed(99)
    r = lambda *s: torch.randn(*s, generator=g)
    ri = lambda hi, *s: torch.randint(0, hi, s, generator=g)
    if name == "mlp_unequal":
        return _mlp(), [(r(4, 13), ri(7, 4)), (r(2, 13), ri(7, 2))], [(r(3, 13), ri(7, 3)), (r(3, 13), ri(7, 3))], "tensor", 0.0, {}
    if name == "mlp_global_alpha_bucketview":
        return (_mlp(), [(r(3, 13), ri(7, 3)), (r(3, 13), ri(7, 3))], [(r(2, 13), ri(7, 2)), (r(2, 13), ri(7, 2))],
                "global", 0.3, {"gradient_as_bucket_view": True})
    if name == "lm_unequal_T_factored":
        # tied embedding/head (token route), MultiheadAttention (generic fallback), different T per rank
        return (TinyLM(), [(ri(23, 3, 5), ri(23, 3, 5)), (ri(23, 2, 4), ri(23, 2, 4))],
                [(ri(23, 2, 5), ri(23, 2, 5)), (ri(23, 2, 5), ri(23, 2, 5))], "tensor", 0.0, {"factored": True})
    raise KeyError(name)


CASES = ["mlp_unequal", "mlp_global_alpha_bucketview", "lm_unequal_T_factored"]


def _worker(rank, world, port, outdir):
    import orthograd_fast.engine.gram as gram

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        for name in CASES:
            model, retain, unlearn, scope, alpha, opt = _case(name)
            old = gram.EXPLICIT_MAX
            if opt.get("factored"):
                gram.EXPLICIT_MAX = 0
            ddp = nn.parallel.DistributedDataParallel(
                model, gradient_as_bucket_view=opt.get("gradient_as_bucket_view", False)
            )
            og = OrthoGrad(ddp, scope=scope, alpha=alpha, backend="torch")
            ddp.zero_grad(set_to_none=False if opt.get("gradient_as_bucket_view") else True)
            xr, yr = retain[rank]
            with og.retain():
                ce(ddp(xr), yr).mean().backward()
            xu, yu = unlearn[rank]
            ce(ddp(xu), yu).mean().backward()
            stats = og.project_()
            gram.EXPLICIT_MAX = old
            grads = {n[len("module."):]: p.grad.detach().clone() for n, p in ddp.named_parameters()}
            torch.save({"grads": grads, "B": stats["B"]},
                       os.path.join(outdir, f"{name}.{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process(name):
    """One process, no DDP: one retain() block per rank chunk (blocks = union, T may differ)."""
    import orthograd_fast.engine.gram as gram

    model, retain, unlearn, scope, alpha, opt = _case(name)
    old = gram.EXPLICIT_MAX
    if opt.get("factored"):
        gram.EXPLICIT_MAX = 0
    try:
        og = OrthoGrad(model, scope=scope, alpha=alpha, backend="torch")
        model.zero_grad(set_to_none=True)
        for xr, yr in retain:
            with og.retain():
                ce(model(xr), yr).mean().backward()
        xu = torch.cat([x for x, _ in unlearn])
        yu = torch.cat([y for _, y in unlearn])
        ce(model(xu), yu).mean().backward()
        og.project_()
    finally:
        gram.EXPLICIT_MAX = old
    return model, retain, (xu, yu), scope, alpha, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _oracle(model, retain, unlearn, scope, alpha):
    Gs = [oracle_grads(model, ce, x, y) for x, y in retain]
    G = {n: torch.cat([g[n] for g in Gs]) for n in Gs[0]}
    # DDP's retain gradient: the average of the per-rank batch means
    gbar = {n: torch.stack([g[n].mean(0) for g in Gs]).mean(0) for n in G}
    u = oracle_unlearn_grad(model, ce, *unlearn)
    names = list(G)
    if scope == "tensor":
        perp = {n: project_out(G[n], u[n]) for n in names}
    else:
        rr = project_out(torch.cat([G[n] for n in names], 1), torch.cat([u[n] for n in names]))
        perp, k = {}, 0
        for n in names:
            perp[n] = rr[k : k + u[n].numel()]
            k += u[n].numel()
    return {n: alpha * gbar[n] - (1 - alpha) * perp[n] for n in names}, G, u, gbar


def _rel(a, b, scale):
    return float((a.double().reshape(-1) - b.double().reshape(-1)).norm() / scale)


@pytest.fixture(scope="module")
def ddp_results():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, _free_port(), d), nprocs=2, join=True)
        yield {(n, r): torch.load(os.path.join(d, f"{n}.{r}.pt")) for n in CASES for r in (0, 1)}


@pytest.mark.parametrize("name", CASES)
def test_ddp_matches_single_process_and_oracle(ddp_results, name):
    r0, r1 = ddp_results[(name, 0)], ddp_results[(name, 1)]
    # identical .grad on every rank (every rank computes the same K, b, c from the same gathered factors)
    for n in r0["grads"]:
        assert torch.equal(r0["grads"][n], r1["grads"][n]), f"{name}: '{n}' differs between ranks"
    model, retain, unlearn, scope, alpha, single = _single_process(name)
    assert r0["B"] == sum(x.shape[0] for x, _ in retain) == r1["B"], "stats['B'] must count the union"
    ref, G, u, gbar = _oracle(model, retain, unlearn, scope, alpha)
    worst_single = worst_oracle = 0.0
    for n, got in r0["grads"].items():
        scale = ref[n].norm() + (1 - alpha) * u[n].norm() + alpha * gbar[n].norm() + 1e-30
        worst_single = max(worst_single, _rel(got, single[n], scale))
        worst_oracle = max(worst_oracle, _rel(got, ref[n], scale))
    assert worst_single <= DDP_VS_SINGLE, f"{name}: DDP vs single process on the union {worst_single:.2e}"
    assert worst_oracle <= REL, f"{name}: DDP vs float64 oracle {worst_oracle:.2e}"
    got = {n: g.double().reshape(-1) for n, g in r0["grads"].items()}
    perp = {n: (alpha * gbar[n] - got[n]) / (1 - alpha) for n in got}
    assert orthogonality(G, perp, u, scope) <= 1e-5


def test_fsdp_dtensor_parameters_refused():
    pytest.importorskip("torch.distributed.tensor", reason="this torch has no DTensor (torch.distributed.tensor)")
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    # single-rank gloo group: enough to build DTensor parameters, as fully_shard would
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = nn.Linear(4, 3)
        model.weight = nn.Parameter(DTensor.from_local(model.weight.detach(), mesh, [Replicate()]))
        with pytest.raises(RuntimeError, match="FSDP") as e:
            OrthoGrad(model)
        assert "weight" in str(e.value) and "DistributedDataParallel" in str(e.value)
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6 (the DTensor import above implies it)

        m2 = nn.Sequential(nn.Linear(4, 3))
        fully_shard(m2, mesh=mesh)
        with pytest.raises(RuntimeError, match="FSDP"):
            OrthoGrad(m2)
    finally:
        dist.destroy_process_group()
