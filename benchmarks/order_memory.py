"""Peak memory of one step by pass order: plain, OrthoGrad retain pass first, unlearn pass first.

    python -m benchmarks.order_memory [--models mlp,cnn,transformer] [--B 64]

Same measurement as the suite (:func:`benchmarks.memory.measure_peak`, a provider's first step).
Retain first, the retain factors (about the size of the retain pass's activations) are held
through the unlearn pass; unlearn first, they are captured after its activations are freed.
"""

from __future__ import annotations

import argparse

import torch

from orthograd_fast import OrthoGrad

from . import zoo
from .memory import measure_peak

ORDERS = ("plain", "retain first", "unlearn first")


def peak(name: str, B: int, order: str) -> int:
    model, make_batch = zoo.build_model(name, "cpu")
    loss_fn = zoo.per_sample_loss(name)
    xr, yr = make_batch(B, torch.Generator().manual_seed(1))
    xu, yu = make_batch(B, torch.Generator().manual_seed(2))
    og = None if order == "plain" else OrthoGrad(model)

    def unlearn_pass():
        with og.forget():
            loss_fn(model(xu), yu).mean().backward()

    def retain_pass():
        with og.retain():
            loss_fn(model(xr), yr).mean().backward()

    def step():
        model.zero_grad(set_to_none=True)
        if og is None:
            loss_fn(model(xr), yr).mean().backward()
            (-loss_fn(model(xu), yu).mean()).backward()
            return
        passes = (retain_pass, unlearn_pass) if order == "retain first" else (unlearn_pass, retain_pass)
        for p in passes:
            p()
        og.project_()

    return measure_peak(step, torch.device("cpu"), model, (xr, yr, xu, yu))[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn,transformer")
    ap.add_argument("--B", type=int, default=64)
    args = ap.parse_args(argv)
    print(f"| model (B={args.B}) | " + " | ".join(ORDERS) + " |")
    print("|---" * (len(ORDERS) + 1) + "|")
    for name in args.models.split(","):
        got = {o: peak(name, args.B, o) for o in ORDERS}
        cells = [f"{got[o] / 2**20:.1f} MiB ({got[o] / got['plain']:.2f}x)" for o in ORDERS]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
