"""The ``orthograd-fast demo`` experiment: original model, retrain oracle, OrthoGrad variants and
baselines on a small shipped dataset, over several seeds.

Per seed: build the scenario (:mod:`orthograd_fast.unlearning.data`), train the original MLP on
the training set and the oracle on the retain set only (both cached on disk, keyed by a hash of
everything that determines them), then run every method from a copy of the original with the same
step budget, the same retain budget (``retain_frac`` of the training set) and the same stopping
rule, and score it with :mod:`orthograd_fast.unlearning.metrics` against the oracle.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .baselines import train_model
from .data import make_scenario
from .metrics import METRIC_KEYS, accuracy, avg_gap, evaluate, uis
from .loop import unlearn

__all__ = ["DemoConfig", "METHOD_SPECS", "make_mlp", "run_demo", "format_table", "write_plots"]

# name -> unlearn() keyword arguments, including the default lr and alpha of each method. The
# learning rates differ by method because the gradients differ by orders of magnitude: the original
# model fits its training set, so the forget cross-entropy is saturated and its gradient is tiny,
# while the uniform-target loss and random labels have O(1) gradients. The defaults were picked on
# digits/random forgetting, seeds 0-2 (see the README); --lr / --adam-lr / --alpha override them.
METHOD_SPECS: Dict[str, Dict] = {
    "orthograd": dict(method="orthograd", optimizer="sgd", lr=0.35, alpha=0.3, project="grad", forget_loss="ascent"),
    "orthograd-adam-step": dict(method="orthograd", optimizer="adam", lr=1e-3, alpha=0.3, project="step", forget_loss="ascent"),
    "orthograd-uniform": dict(method="orthograd", optimizer="sgd", lr=0.03, alpha=0.3, project="grad", forget_loss="uniform"),
    "neggrad": dict(method="neggrad", optimizer="sgd", lr=0.05),
    "neggrad+": dict(method="neggrad+", optimizer="sgd", lr=0.2, alpha=0.8),
    "finetune": dict(method="finetune", optimizer="sgd", lr=0.05),
    "random_labels": dict(method="random_labels", optimizer="sgd", lr=0.01),
}
DEFAULT_METHODS = tuple(METHOD_SPECS)


@dataclass
class DemoConfig:
    """Every knob of the demo; ``orthograd-fast demo --help`` documents each one."""

    dataset: str = "digits"
    scenario: str = "random"
    seeds: int = 3
    seed_offset: int = 0
    forget_frac: float = 0.1
    forget_class: int = 0
    retain_frac: float = 0.01
    test_frac: float = 0.2
    hidden: Sequence[int] = (128,)
    epochs: int = 60
    train_lr: float = 1e-2
    train_batch_size: int = 128
    train_weight_decay: float = 0.0
    methods: Sequence[str] = DEFAULT_METHODS
    steps: int = 200
    lr: Optional[float] = None
    adam_lr: Optional[float] = None
    alpha: Optional[float] = None
    retain_batch_size: int = 64
    forget_batch_size: int = 256
    stop_acc: Optional[float] = None
    max_grad_norm: Optional[float] = None
    eval_every: int = 5
    threads: int = 1

    def model_key(self, seed: int, kind: str) -> str:
        """Hash of everything that determines a trained original/oracle model."""
        keys = dict(
            kind=kind, seed=seed, dataset=self.dataset, scenario=self.scenario,
            forget_frac=self.forget_frac, forget_class=self.forget_class, test_frac=self.test_frac,
            retain_frac=self.retain_frac, hidden=list(self.hidden), epochs=self.epochs,
            train_lr=self.train_lr, train_batch_size=self.train_batch_size,
            train_weight_decay=self.train_weight_decay, v=1,
        )
        if self.scenario == "class":
            keys.pop("forget_frac")
        else:
            keys.pop("forget_class")
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def make_mlp(in_dim: int, num_classes: int, hidden: Sequence[int] = (128,), seed: int = 0) -> torch.nn.Module:
    """A ReLU MLP with seeded initialization (the caller's global RNG state is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: List[torch.nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [torch.nn.Linear(d, h), torch.nn.ReLU()]
            d = h
        layers.append(torch.nn.Linear(d, num_classes))
        return torch.nn.Sequential(*layers)


def _trained(cfg: DemoConfig, sc, seed: int, kind: str, cache_dir: Optional[str], progress: bool):
    in_dim = sc.X_train.shape[1]
    model = make_mlp(in_dim, sc.num_classes, cfg.hidden, seed=seed)
    path = os.path.join(cache_dir, f"{kind}-{cfg.model_key(seed, kind)}.pt") if cache_dir else None
    if path and os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model, True
    data = sc.train if kind == "original" else sc.retain
    train_model(
        model, data, epochs=cfg.epochs, lr=cfg.train_lr, batch_size=cfg.train_batch_size,
        weight_decay=cfg.train_weight_decay, seed=seed, progress=progress, desc=f"seed {seed}: train {kind}",
    )
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + f".tmp{os.getpid()}"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)  # atomic: a concurrent run never reads half a file
    return model, False


def _stop_target(cfg: DemoConfig, sc, original_test_acc: float) -> float:
    """The stopping rule: forget accuracy at which unlearning counts as done.

    random: the original model's test accuracy (forget samples should look like unseen ones);
    class: 0 (the oracle never predicts the forgotten class);
    mislabeled: the original's test error spread over the K-1 wrong classes, i.e. how often an
    unseen sample lands on one given wrong label -- the oracle's agreement with flipped labels.
    """
    if cfg.stop_acc is not None:
        return cfg.stop_acc
    if cfg.scenario == "random":
        return original_test_acc
    if cfg.scenario == "class":
        return 0.0
    return (100.0 - original_test_acc) / (sc.num_classes - 1)


def _scores(model, sc, original_test_acc: float, seed: int) -> Dict[str, float]:
    m = evaluate(model, sc.forget, sc.retain, sc.test, seed=seed)
    kind = "class" if sc.scenario == "class" else "random"
    m["UIS"] = uis(original_test_acc, m["TA"], 100.0 - m["UA"], kind=kind)
    return m


def _run_seed(cfg: DemoConfig, seed: int, cache_dir: Optional[str], progress: bool,
              log: Callable[[str], None]) -> Dict:
    """One seed: scenario, original and oracle (cached), every method from a copy of the original."""
    sc = make_scenario(
        cfg.dataset, cfg.scenario, seed=seed, test_frac=cfg.test_frac, forget_frac=cfg.forget_frac,
        forget_class=cfg.forget_class, retain_frac=cfg.retain_frac,
    )
    t0 = time.perf_counter()
    original, cached_o = _trained(cfg, sc, seed, "original", cache_dir, progress)
    t_orig = 0.0 if cached_o else time.perf_counter() - t0
    t0 = time.perf_counter()
    oracle, cached_r = _trained(cfg, sc, seed, "retrain", cache_dir, progress)
    t_retrain = 0.0 if cached_r else time.perf_counter() - t0
    o_ta = accuracy(original, sc.test)
    target = _stop_target(cfg, sc, o_ta)
    ref = _scores(oracle, sc, o_ta, seed)
    ref["Avg. Gap"] = 0.0
    ref["RTE"] = t_retrain
    methods = {"retrain": {"metrics": ref, "steps": None, "seconds": t_retrain, "cached": cached_r}}
    om = _scores(original, sc, o_ta, seed)
    om["Avg. Gap"] = avg_gap(om, ref)
    om["RTE"] = t_orig
    methods["original"] = {"metrics": om, "steps": 0, "seconds": t_orig, "cached": cached_o}
    for name in cfg.methods:
        spec = dict(METHOD_SPECS[name])
        model = copy.deepcopy(original)
        override = cfg.adam_lr if spec["optimizer"] == "adam" else cfg.lr
        if override is not None:
            spec["lr"] = override
        if cfg.alpha is not None and "alpha" in spec:
            spec["alpha"] = cfg.alpha
        res = unlearn(
            model, sc.forget, sc.retain_budget, **spec, steps=cfg.steps,
            retain_batch_size=cfg.retain_batch_size, forget_batch_size=cfg.forget_batch_size,
            stop_forget_acc=target, eval_every=cfg.eval_every, max_grad_norm=cfg.max_grad_norm,
            eval_sets={"retain": sc.retain, "test": sc.test}, seed=seed,
            progress=f"seed {seed}: {name}" if progress else False,
        )
        m = _scores(model, sc, o_ta, seed)
        m["Avg. Gap"] = avg_gap(m, ref)
        m["RTE"] = res.seconds
        methods[name] = {
            "metrics": m, "steps": res.steps, "seconds": res.seconds,
            "stopped_early": res.stopped_early, "history": res.history,
            "config": res.config,
        }
    gaps = ", ".join(f"{k} {v['metrics']['Avg. Gap']:.2f}" for k, v in methods.items() if k != "retrain")
    log(f"seed {seed}: Avg. Gap {gaps}")
    return {"seed": seed, "split": sc.to_json(), "stop_forget_acc": target, "methods": methods}


def run_demo(
    cfg: DemoConfig,
    out_dir: Optional[str] = None,
    cache_dir: Optional[str] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Dict:
    """Run the experiment; return (and, with ``out_dir``, write as ``results.json``) the results.

    Result layout: ``{"config", "runs": [per seed: {"seed", "split", "stop_forget_acc",
    "methods": {name: {"metrics", "steps", "seconds", "stopped_early", "history"}}}],
    "summary": {name: {metric: [mean, std]}}}``. ``original`` and ``retrain`` appear as methods
    (their RTE is the training time, or 0 when loaded from the cache).
    """
    unknown = [m for m in cfg.methods if m not in METHOD_SPECS]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; choose from {list(METHOD_SPECS)}")
    threads = torch.get_num_threads()
    if cfg.threads:
        # A tiny MLP gains nothing from intra-op threads; on a busy 2-core machine two threads
        # were 5-10x slower than one in our measurements.
        torch.set_num_threads(cfg.threads)
    try:
        seeds = range(cfg.seed_offset, cfg.seed_offset + cfg.seeds)
        runs = [_run_seed(cfg, seed, cache_dir, progress, log) for seed in seeds]
    finally:
        torch.set_num_threads(threads)
    names = ["original", "retrain", *cfg.methods]
    cols = (*METRIC_KEYS, "UIS", "Avg. Gap", "RTE")
    summary = {}
    for name in names:
        summary[name] = {}
        for c in cols:
            values = [r["methods"][name]["metrics"][c] for r in runs]
            summary[name][c] = [float(np.mean(values)), float(np.std(values))]
        steps = [r["methods"][name]["steps"] for r in runs]
        summary[name]["steps"] = [float(np.mean(steps)), float(np.std(steps))] if None not in steps else None
    results = {"config": {**asdict(cfg), "hidden": list(cfg.hidden), "methods": list(cfg.methods)}, "runs": runs, "summary": summary}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


def format_table(results: Dict) -> str:
    """The summary as a text table: mean +- std over seeds per method."""
    summary = results["summary"]
    cols = ("steps", *METRIC_KEYS, "UIS", "Avg. Gap", "RTE")
    fmt = {"UIS": "{:.3f}+-{:.3f}", "RTE": "{:.2f}+-{:.2f}"}
    rows = [["method", *cols]]
    for name, s in summary.items():
        row = [name]
        for c in cols:
            if s.get(c) is None:
                row.append("-")
            else:
                row.append(fmt.get(c, "{:.2f}+-{:.2f}").format(*s[c]))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    cfg = results["config"]
    n = len(results["runs"])
    head = (
        f"{cfg['dataset']} / {cfg['scenario']} forgetting, retain budget {100 * cfg['retain_frac']:g}% of the "
        f"training set, {n} seed{'s' if n != 1 else ''}, step budget {cfg['steps']} "
        f"(UA RA TA MIA in %, Avg. Gap vs retrain, RTE in s; mean+-std)"
    )
    return head + "\n" + "\n".join(lines)


def write_plots(results: Dict, out_dir: str) -> List[str]:
    """Write ``curves.png`` (forget/retain/test accuracy over steps per method, first seed) and
    ``avg_gap.png`` (Avg. Gap per method, mean +- std over seeds); return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    run = results["runs"][0]
    names = [n for n in results["config"]["methods"]]
    cols = min(4, max(1, len(names)))
    nrows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.8 * nrows), squeeze=False, sharey=True)
    for ax, name in zip(axes.flat, names):
        hist = run["methods"][name]["history"]
        steps = [h["step"] for h in hist]
        ax.plot(steps, [h["forget_acc"] for h in hist], label="forget")
        ax.plot(steps, [h["retain_acc"] for h in hist], label="retain")
        ax.plot(steps, [h["test_acc"] for h in hist], label="test", linestyle="--")
        ax.axhline(run["methods"]["retrain"]["metrics"]["TA"], color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("accuracy (%)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"seed {run['seed']}: accuracy during unlearning (dotted: retrain TA)", fontsize=10)
    fig.tight_layout()
    p1 = os.path.join(out_dir, "curves.png")
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    summary = results["summary"]
    bar_names = [n for n in summary if n != "retrain"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(bar_names), 3.2))
    means = [summary[n]["Avg. Gap"][0] for n in bar_names]
    stds = [summary[n]["Avg. Gap"][1] for n in bar_names]
    ax.bar(range(len(bar_names)), means, yerr=stds, capsize=3, color="tab:blue")
    ax.set_xticks(range(len(bar_names)))
    ax.set_xticklabels(bar_names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Avg. Gap to retrain\n(lower is better)")
    fig.tight_layout()
    p2 = os.path.join(out_dir, "avg_gap.png")
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]
