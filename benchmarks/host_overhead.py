"""Host time of ``project_()`` per parameter tensor: a deep stack of tiny LayerNorm + Linear blocks
(width 4: every term is a few hundred flops, so the time is Python and op launches).

    python -m benchmarks.host_overhead [--depth 37] [--B 32] [--Bu 16] [--steps 30] [--threads 1]

depth 37 gives 152 tensors (a ViT-tiny's count). Prints the median ``project_()`` wall time over
``--steps`` contract-order steps and its share per tensor (and the main thread's CPU time, steadier
on a shared machine); ``--profile`` adds a cProfile of the
projections alone. Diagnostic tool, not part of the timed suite.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch
from torch import nn


class Stack(nn.Module):
    """Many small tensors: LayerNorm + Linear blocks (also the model of tests/test_plan.py: at d = 7
    the weights have 49 entries, norm weights and biases 7, both more and fewer than its samples)."""

    def __init__(self, d: int = 7, depth: int = 5, classes: int = 4):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.Tanh()) for _ in range(depth))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=37)
    ap.add_argument("--d", type=int, default=4)
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--Bu", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)

    from orthograd_fast import OrthoGrad

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Stack(args.d, args.depth)
    g = torch.Generator().manual_seed(0)
    xr, yr = torch.randn(args.B, 5, generator=g), torch.randint(0, 4, (args.B,), generator=g)
    xu, yu = torch.randn(args.Bu, 5, generator=g), torch.randint(0, 4, (args.Bu,), generator=g)
    og = OrthoGrad(model, alpha=0.0, backend="torch")
    loss = nn.CrossEntropyLoss()

    def step(pr=None):
        model.zero_grad(set_to_none=True)
        with og.retain():
            loss(model(xr), yr).backward()
        loss(model(xu), yu).backward()
        t, c = time.perf_counter(), time.thread_time()
        if pr is not None:
            pr.enable()
        og.project_()
        if pr is not None:
            pr.disable()
        return time.perf_counter() - t, time.thread_time() - c

    for _ in range(3):
        step()
    times = [step() for _ in range(args.steps)]
    n = og.stats["tensors"]
    med = statistics.median(t for t, _ in times)
    cpu = statistics.median(c for _, c in times)
    print(
        f"project_() {med * 1e3:.2f} ms for {n} tensors: {med / n * 1e6:.1f} us per tensor, main-thread CPU "
        f"{cpu / n * 1e6:.1f} us per tensor (median of {args.steps}, B={args.B}, Bu={args.Bu}, d={args.d}, "
        f"torch threads {torch.get_num_threads()})"
    )
    if args.profile:
        pr = cProfile.Profile()
        for _ in range(args.steps):
            step(pr)
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
        print(s.getvalue())


if __name__ == "__main__":
    main()
