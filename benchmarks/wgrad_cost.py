"""What the retain weight gradients cost a plain step, against the credit the FLOP floor gives for
skipping them (`benchmarks/floor.py`: an exact step never needs them; lean retain skips them).

    python -m benchmarks.wgrad_cost [--models lstm,hf_bert] [--rounds 30]

Per real-zoo model, the plain retain fwd+bwd (B = 32) is timed two ways, alternating: ``full``
(``loss.backward()``: every parameter's gradient) and ``lean`` (``torch.autograd.grad`` for the
first parameter only: the backward still runs through every layer for the input gradients, but no
other weight gradient is formed). ``full - lean`` is what the weight gradients cost the plain step;
the floor counts their flops (``retain_wgrad_credit_flops``) at the plain step's mean rate, that is
``credit / plain flops x plain step``. Where the plain step does not get faster without them
(``nn.LSTM``: its fused backward takes the same time either way) while the exact step must replace
that kernel anyway, measured / floor reads high by the difference. Diagnostic tool, not part of
the timed suite.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks import real_zoo
from benchmarks.floor import flop_floor


def measure(name: str, rounds: int, B: int = 32, Bu: int = 16) -> dict:
    model, make = real_zoo.build_model(name, size="cpu")
    loss_fn = real_zoo.per_sample_loss(name)
    g = torch.Generator().manual_seed(1)
    xr, yr = make(B, g)
    xu, yu = make(Bu, g)
    first = next(p for p in model.parameters() if p.requires_grad)

    def full():
        model.zero_grad(set_to_none=True)
        loss_fn(model(xr), yr).mean().backward()

    def lean():
        torch.autograd.grad(loss_fn(model(xr), yr).mean(), [first])

    def unlearn():
        (-loss_fn(model(xu), yu).mean()).backward()

    for f in (full, lean, unlearn):
        f()
    tf, tl, tu = [], [], []
    for _ in range(rounds):
        for f, out in ((full, tf), (lean, tl), (unlearn, tu)):
            t = time.perf_counter()
            f()
            out.append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    fl = flop_floor(model, loss_fn, (xr, yr), (xu, yu)).as_dict()
    plain = statistics.median(tf) + statistics.median(tu)  # ~ a plain step (without opt.step)
    credit_ms = fl["retain_wgrad_credit_flops"] / fl["plain_flops"] * plain * 1e3
    return {
        "model": name,
        "plain_ms": plain * 1e3,
        "wgrad_ms": statistics.median([a - b for a, b in zip(tf, tl)]) * 1e3,
        "credit_ms": credit_ms,
        "credit_share": fl["retain_wgrad_credit_flops"] / fl["plain_flops"],
        "floor": fl["floor_ratio"],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="lstm,hf_bert,hf_gpt2,hf_vit")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.rounds} alternating rounds")
    print("| model | plain retain + unlearn | retain weight gradients (full - lean) | the floor's credit for them | credit / plain flops | floor |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        r = measure(name, args.rounds)
        print(f"| {name} | {r['plain_ms']:.1f} ms | {r['wgrad_ms']:.1f} ms | {r['credit_ms']:.1f} ms | {r['credit_share']:.3f} | {r['floor']:.3f}x |")


if __name__ == "__main__":
    main()
