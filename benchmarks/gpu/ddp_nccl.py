"""DDP on NCCL (issue: scale and harden): every GPU a rank, unequal retain shards; the projected
.grad must be identical on every rank and within 1e-5 of one process on the union of the batches.
Needs >= 2 GPUs; on one GPU it prints a skip line (NCCL refuses two ranks on one device).

    python benchmarks/gpu/ddp_nccl.py        # prints one markdown line for results.md
"""

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bootstrap  # noqa: E402

_bootstrap.ensure_importable()
from orthograd_fast import OrthoGrad  # noqa: E402


def _data(world):
    g = torch.Generator().manual_seed(0)
    retain = [(torch.randn(4 + 2 * r, 64, generator=g), torch.randint(0, 10, (4 + 2 * r,), generator=g)) for r in range(world)]
    unlearn = [(torch.randn(4, 64, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(world)]
    return retain, unlearn


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))


def _step(model, og, retain, unlearn, dev):
    ce = nn.functional.cross_entropy
    model.zero_grad(set_to_none=True)
    for x, y in retain:
        with og.retain():
            ce(model(x.to(dev)), y.to(dev)).backward()
    x, y = unlearn
    ce(model(x.to(dev)), y.to(dev)).backward()
    og.project_()


def _worker(rank, world, port, q):
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    retain, unlearn = _data(world)
    ddp = nn.parallel.DistributedDataParallel(_model().to(dev), device_ids=[rank])
    _step(ddp, OrthoGrad(ddp, backend="torch"), [retain[rank]], unlearn[rank], dev)
    g = torch.cat([p.grad.reshape(-1) for p in ddp.parameters()]).double()
    gathered = [torch.empty_like(g) for _ in range(world)]
    dist.all_gather(gathered, g)
    if rank == 0:
        single = _model().to(dev)
        xu = torch.cat([u[0] for u in unlearn]), torch.cat([u[1] for u in unlearn])
        _step(single, OrthoGrad(single, backend="torch"), retain, xu, dev)
        ref = torch.cat([p.grad.reshape(-1) for p in single.parameters()]).double()
        spread = max(float((x - gathered[0]).abs().max()) for x in gathered)
        q.put((spread, float((gathered[0] - ref).norm() / ref.norm())))
    dist.destroy_process_group()


def main():
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        print(f"| DDP on NCCL | skipped: needs >= 2 GPUs, this machine has {n} |")
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.spawn(_worker, args=(n, port, q), nprocs=n, join=True)
    spread, rel = q.get()
    ok = spread == 0.0 and rel <= 1e-5
    print(f"| DDP on NCCL, {n} ranks | max difference between ranks {spread:.1e}; vs one process on the union {rel:.1e} (<= 1e-5) | {'PASS' if ok else 'FAIL'} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
