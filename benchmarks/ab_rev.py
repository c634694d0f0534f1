"""Paired A/B of the working tree's OrthoGrad step against the code of an earlier git revision, in
one process on the same model and data: how far a change moved a row, free of the machine's
drift between runs (a shared machine moves single rows by 0.1x-0.15x from run to run).

    python -m benchmarks.ab_rev --rev 15386c1 --model mlp --B 64 [--order forget|contract] [--rounds 30]

The revision's ``orthograd_fast`` is extracted with ``git archive`` into a temporary directory and
imported under another name (``ogf_rev``); the two run on deep copies of one model, with the same
batches. Each round runs plain, current and revision once, in an order from a cycle of the six
orders in which every side comes at every position, and after every side (itself included), equally
often (:data:`ORDERS`): alternating plain / current / revision with every other round reversed
left current always second and never after itself, which read 1.009x-1.016x for the same code on
both sides (MLP, 100 rounds). Printed: the median step of each and the medians of the per-round
ratios current / plain, revision / plain and current / revision. ``--order forget``: the unlearn
pass first under ``og.forget()`` (the synthetic zoo's order); ``contract``: the retain block first,
then the unlearn backward (the real-model zoo's). Synthetic zoo models (``benchmarks.zoo``) and real-model zoo models
(``benchmarks.real_zoo``, e.g. ``--model lstm --B 32 --Bu 16 --order contract``) at their CPU
size. On the real models the in-process pairs carry a bias of a few percent: the same code on both
sides read 0.98x once (ViT, 20 rounds: current / plain 1.06 against 1.19 for the copy); for effects
of that size alternate whole ``benchmarks.real_zoo_run --models ...`` runs instead. Diagnostic tool,
not part of the timed suite.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from . import real_zoo, zoo

NAME = "ogf_rev"

# (plain, current, revision) = (0, 1, 2): the order of each round, cycled. Over one cycle every side
# runs at each position twice and every ordered pair of consecutive runs (a side after itself too)
# occurs twice, across the rounds' boundaries included: a run right after its own side finds its
# weights in cache, and a fixed order hands that to one side
ORDERS = ((0, 1, 2), (2, 0, 1), (1, 0, 2), (2, 1, 0), (0, 2, 1), (1, 2, 0))


def load_revision(rev: str, root: pathlib.Path, into: pathlib.Path):
    """``orthograd_fast`` as of git revision ``rev``, imported as :data:`NAME`."""
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "orthograd_fast"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    pkg = into / "orthograd_fast"
    for f in pkg.rglob("*.py"):
        f.write_text(f.read_text().replace("orthograd_fast", NAME))
    pkg.rename(into / NAME)
    sys.path.insert(0, str(into))
    try:
        return importlib.import_module(NAME)
    finally:
        sys.path.remove(str(into))  # the modules are loaded; the directory goes with the run


def _step(og, model, opt, loss, retain, unlearn, order: str):
    def run():
        opt.zero_grad(set_to_none=True)
        if order == "forget":
            with og.forget():
                loss(model(unlearn[0]), unlearn[1]).backward()
            with og.retain():
                loss(model(retain[0]), retain[1]).backward()
        else:
            with og.retain():
                loss(model(retain[0]), retain[1]).backward()
            loss(model(unlearn[0]), unlearn[1]).backward()
        og.project_()
        opt.step()

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="git revision to compare against")
    ap.add_argument("--model", default="mlp", choices=["mlp", "cnn", "transformer", "vit_tiny", "resnet18"] + sorted(real_zoo.CONFIGS))
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--Bu", type=int, default=None, help="unlearn batch (default: B)")
    ap.add_argument("--order", default="forget", choices=["forget", "contract"])
    ap.add_argument("--rounds", type=int, default=30, help="rounds; a multiple of 6 balances the orders (ORDERS)")
    args = ap.parse_args(argv)

    import orthograd_fast

    root = pathlib.Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        rev = load_revision(args.rev, root, pathlib.Path(tmp))
        real = args.model in real_zoo.CONFIGS
        model, make_batch = (real_zoo if real else zoo).build_model(args.model, "cpu")
        g = torch.Generator().manual_seed(1)
        retain, unlearn = make_batch(args.B, g), make_batch(args.Bu or args.B, g)
        ce = torch.nn.CrossEntropyLoss()
        per_sample = real_zoo.per_sample_loss(args.model) if real else None

        def loss(out, y):
            if per_sample is not None:  # the real-model zoo's loss (language models: per position)
                return per_sample(out, y).mean()
            return ce(out.reshape(-1, out.shape[-1]), y.reshape(-1))

        models = [model, copy.deepcopy(model), copy.deepcopy(model)]
        opts = [torch.optim.SGD(m.parameters(), lr=1e-6) for m in models]

        def plain():
            opts[0].zero_grad(set_to_none=True)
            loss(models[0](retain[0]), retain[1]).mul(0.0).backward()
            loss(models[0](unlearn[0]), unlearn[1]).neg().backward()
            opts[0].step()

        runs = {
            "plain": plain,
            "current": _step(orthograd_fast.OrthoGrad(models[1], alpha=0.0, backend="torch"), models[1], opts[1], loss, retain, unlearn, args.order),
            args.rev: _step(rev.OrthoGrad(models[2], alpha=0.0, backend="torch"), models[2], opts[2], loss, retain, unlearn, args.order),
        }
        for f in runs.values():
            for _ in range(3):
                f()
        times = {k: [] for k in runs}
        names = list(runs)
        for r in range(args.rounds):
            for i in ORDERS[r % len(ORDERS)]:
                t = time.perf_counter()
                runs[names[i]]()
                times[names[i]].append(time.perf_counter() - t)

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    meds = ", ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in times.items())
    print(f"{args.model} B={args.B} order={args.order}, {args.rounds} rounds, torch threads {torch.get_num_threads()}: {meds}")
    print(
        f"paired medians: current / plain {ratio('current', 'plain'):.3f}, {args.rev} / plain {ratio(args.rev, 'plain'):.3f}, "
        f"current / {args.rev} {ratio('current', args.rev):.3f}"
    )


if __name__ == "__main__":
    main()
