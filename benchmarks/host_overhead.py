"""Host time of ``project_()`` per parameter tensor: a deep stack of tiny LayerNorm + Linear blocks
(width 4: every term is a few hundred flops, so the time is Python and op launches).

    python -m benchmarks.host_overhead [--depth 37] [--B 32] [--Bu 16] [--steps 30] [--threads 1]

depth 37 gives 152 tensors (a ViT-tiny's count). Prints the median ``project_()`` wall time over
``--steps`` contract-order steps and its share per tensor (and the main thread's CPU time, steadier
on a shared machine), for two states of the LayerNorms, their steps alternating: ``trained``
(weights near 1, biases near 0, drawn at random, as any training step leaves them) and ``init``
(weight 1, bias 0). At init every LayerNorm output sums to zero, so each following width-4
Linear's 16 x 16 column Gram is singular and 38 of them go to LAPACK's eigh every step (~1 ms of
compute, not launch overhead); in the ``trained`` state 35 of them are full rank and take the
Cholesky path (3 stay singular, the head's among them: its output gradients, softmax rows, sum to
zero). ``--state`` picks one; ``--profile`` adds a cProfile of the projections alone; ``--rev REV``
times a git revision's code instead, paired step by step with this tree's on copies of the same
model (the ratio a change made, free of the machine's drift). Diagnostic tool, not part of the
timed suite.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pathlib
import pstats
import statistics
import tempfile
import time
from typing import Callable, List, Optional, Tuple

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


def build(d: int, depth: int, state: str, seed: int = 0) -> Stack:
    """The stack with its LayerNorms at ``init`` (weight 1, bias 0) or ``trained`` (random)."""
    torch.manual_seed(seed)
    model = Stack(d, depth)
    if state == "trained":
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for b in model.blocks:
                b[0].weight.copy_(1 + 0.1 * torch.randn(d, generator=g))
                b[0].bias.copy_(0.1 * torch.randn(d, generator=g))
    return model


def stepper(model: nn.Module, B: int, Bu: int, og_class=None) -> Callable[[Optional[cProfile.Profile]], Tuple[float, float, int]]:
    """``step(prof=None)``: one contract-order step of ``model``; returns (wall s, main-thread CPU
    s) of its ``project_()`` and the number of tensors projected (``prof``: profiled).
    ``og_class``: the OrthoGrad class to use (another revision's; default this tree's)."""
    from orthograd_fast import OrthoGrad

    OrthoGrad = og_class or OrthoGrad
    g = torch.Generator().manual_seed(0)
    xr, yr = torch.randn(B, 5, generator=g), torch.randint(0, 4, (B,), generator=g)
    xu, yu = torch.randn(Bu, 5, generator=g), torch.randint(0, 4, (Bu,), generator=g)
    og = OrthoGrad(model, alpha=0.0, backend="torch")
    loss = nn.CrossEntropyLoss()

    def step(prof=None):
        model.zero_grad(set_to_none=True)
        with og.retain():
            loss(model(xr), yr).backward()
        loss(model(xu), yu).backward()
        t, c = time.perf_counter(), time.thread_time()
        if prof is not None:
            prof.enable()
        og.project_()
        if prof is not None:
            prof.disable()
        return time.perf_counter() - t, time.thread_time() - c, og.stats["tensors"]

    return step


def measure(models: List[nn.Module], B: int, Bu: int, steps: int) -> List[Tuple[float, float, int]]:
    """Per model: (median wall s, median main-thread CPU s, tensors) of ``project_()`` over
    ``steps`` contract-order steps, after 3 warm-up steps; the models' steps alternate, so a
    busy spell of a shared machine falls on all of them alike."""
    steps_of = [stepper(m, B, Bu) for m in models]
    for _ in range(3):
        for st in steps_of:
            st()
    times: List[list] = [[] for _ in models]
    for _ in range(steps):
        for st, ts in zip(steps_of, times):
            ts.append(st())
    return [(statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts), ts[-1][2]) for ts in times]


def paired(B: int, Bu: int, steps: int, d: int, depth: int, state: str, og_classes) -> Tuple[float, float, float]:
    """Two OrthoGrad classes on copies of one model, steps alternating (which goes first swaps
    every step): (median project_() s of each, median of the per-step ratios first / second)."""
    steps_of = [stepper(build(d, depth, state), B, Bu, c) for c in og_classes]
    for _ in range(3):
        for st in steps_of:
            st()
    ts: List[list] = [[], []]
    for i in range(steps):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            ts[j].append(steps_of[j]()[0])
    return statistics.median(ts[0]), statistics.median(ts[1]), statistics.median(a / b for a, b in zip(*ts))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=37)
    ap.add_argument("--d", type=int, default=4)
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--Bu", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--state", choices=("trained", "init", "both"), default="both")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--rev", default=None, help="also time a git revision's code, paired step by step with this tree's")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    states = ("trained", "init") if args.state == "both" else (args.state,)
    if args.rev is not None:
        import orthograd_fast

        from .ab_rev import load_revision

        with tempfile.TemporaryDirectory() as tmp:
            old = load_revision(args.rev, pathlib.Path(__file__).resolve().parents[1], pathlib.Path(tmp))
            for state in states:
                new_s, old_s, r = paired(args.B, args.Bu, args.steps, args.d, args.depth, state, [orthograd_fast.OrthoGrad, old.OrthoGrad])
                print(
                    f"[{state:7s}] this tree {new_s * 1e3:.2f} ms, {args.rev} {old_s * 1e3:.2f} ms per project_(); "
                    f"paired median this tree / {args.rev} {r:.3f} ({args.steps} steps each, alternating)"
                )
        return
    got = measure([build(args.d, args.depth, st) for st in states], args.B, args.Bu, args.steps)
    for state, (med, cpu, n) in zip(states, got):
        print(
            f"[{state:7s}] project_() {med * 1e3:.2f} ms for {n} tensors: {med / n * 1e6:.1f} us per tensor, "
            f"main-thread CPU {cpu / n * 1e6:.1f} us per tensor (median of {args.steps}, B={args.B}, Bu={args.Bu}, "
            f"d={args.d}, torch threads {torch.get_num_threads()})"
        )
    if args.profile:
        for state in states:
            pr, step = cProfile.Profile(), stepper(build(args.d, args.depth, state), args.B, args.Bu)
            for _ in range(3):
                step()
            for _ in range(args.steps):
                step(pr)
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
            print(f"[{state}] cProfile of the projections\n{s.getvalue()}")


if __name__ == "__main__":
    main()
