"""Markdown table and plots of a real-zoo run (``--og-set=real-cpu`` / ``real-gpu``).

    python -m benchmarks.real_report benchmarks/results/real-cpu-2026-12-05.json [--out DIR] [--name NAME]

Reads the rows of the pytest-benchmark JSON (``orthograd`` key) or of ``benchmarks.real_zoo_run``
(same structure) and writes ``<name>.md``: one row per model with plain ms, step ms (the OrthoGrad
provider, contract order), the paired ratio, the FLOP floor ratio, measured / floor, the peak
memory ratio, the share of parameters on the engine's torch.func fallback, and notes (refusals,
oracle check, noisy rows); and ``<name>-ratios.png`` (paired ratio against the floor per model),
``<name>-times.png`` (plain and step time per model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Dict, List, Optional

from .report import _fmt_time, _fmt_x, load_rows, machine_lines, settings_lines

STEP_PROVIDERS = ("torch-contract", "torch", "triton")  # the measured step, first one present
TARGET_MEDIAN, TARGET_WORST, TARGET_FLOOR = 1.3, 1.6, 1.15  # the numbers (paired ratios)


def model_rows(rows: List[dict]) -> List[dict]:
    """One summary per (model, B): plain and step rows joined, ratios computed."""
    by: "Dict[tuple, Dict[str, dict]]" = {}
    for r in rows:
        by.setdefault((r["model"], int(r["B"])), {})[r["provider"]] = r
    out = []
    for (m, B), provs in by.items():
        plain = provs.get("plain") or {}
        step_name = next((p for p in STEP_PROVIDERS if p in provs), None)
        step = provs.get(step_name) or {}
        fast = provs.get("torch") if step_name == "torch-contract" else None  # the README's order, if run
        floor = step.get("floor") or plain.get("floor") or {}
        fr = floor.get("floor_ratio")
        paired = step.get("paired_ratio")
        ratio = paired if paired is not None else step.get("time_ratio")
        notes = []
        if step and step.get("status") != "ok":
            why = (step.get("reason") or "").replace("|", "/")
            notes.append((why if why.startswith(step.get("status", "")) else f"{step.get('status')}: {why}")[:200])
        if plain and plain.get("status") != "ok":
            notes.append(f"plain {plain.get('status')}: {(plain.get('reason') or '')}"[:120])
        chk = step.get("check") or {}
        if chk.get("ok") is not None:
            notes.append(f"oracle {'ok' if chk['ok'] else 'FAIL'} {chk.get('max_err', float('nan')):.1e}")
        if floor.get("error"):
            notes.append(f"floor: {floor['error']}"[:120])
        elif floor.get("top"):
            t = floor["top"][0]
            notes.append(f"largest floor term {t['param']} ({t['route']})")
        if paired and step.get("paired_iqr"):
            q1, q3 = step["paired_iqr"]
            notes.append(f"{step.get('paired_rounds')} pairs, IQR {q1:.2f}x-{q3:.2f}x")
        tr = step.get("time_ratio")
        if paired and tr and abs(tr / paired - 1.0) > 0.25:
            notes.append(f"noisy: medians ratio {tr:.2f}x")
        out.append(dict(
            model=m, B=B, B_unlearn=step.get("B_unlearn") or plain.get("B_unlearn"), provider=step_name,
            status=step.get("status"), plain_s=plain.get("median_s"), step_s=step.get("median_s") if step.get("status") == "ok" else None,
            ratio=ratio if step.get("status") == "ok" else None, paired=paired is not None, floor=fr,
            over_floor=(ratio / fr) if (ratio and fr and step.get("status") == "ok") else None,
            fast_ratio=(fast.get("paired_ratio") or fast.get("time_ratio")) if fast and fast.get("status") == "ok" else None,
            mem_ratio=step.get("mem_ratio"), fallback_share=step.get("fallback_share"),
            fallback_modules=step.get("fallback_modules"), n_params=step.get("n_params") or plain.get("n_params"),
            notes="; ".join(notes).replace("|", "/").replace("\n", " "),
        ))
    return out


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def table(summary: List[dict]) -> List[str]:
    fast = any(r.get("fast_ratio") is not None for r in summary)  # a column only when `torch` ran
    lines = [
        "| model | params | plain | step | step / plain | floor | measured / floor |"
        + (" forget() order / plain |" if fast else "") + " peak mem / plain | fallback params | notes |",
        "|---|---|---|---|---|---|---|" + ("---|" if fast else "") + "---|---|---|",
    ]
    for r in summary:
        params = f"{r['n_params'] / 1e6:.2f}M" if r.get("n_params") else ""
        ratio = _fmt_x(r["ratio"]) + ("" if r["paired"] or r["ratio"] is None else " (medians)")
        lines.append(
            f"| {r['model']} | {params} | {_fmt_time(r['plain_s'])} | {_fmt_time(r['step_s'])} | {ratio} | {_fmt_x(r['floor'])} | "
            f"{_fmt_x(r['over_floor'])} |" + (f" {_fmt_x(r.get('fast_ratio'))} |" if fast else "")
            + f" {_fmt_x(r['mem_ratio'])} | {_pct(r['fallback_share'])} | {r['notes']} |"
        )
    return lines


def targets(summary: List[dict]) -> List[str]:
    ok = [r for r in summary if r["ratio"] is not None]
    if not ok:
        return []
    ratios = [r["ratio"] for r in ok]
    med, worst = statistics.median(ratios), max(ratios)
    over = [r["over_floor"] for r in ok if r["over_floor"] is not None]
    refused = [r["model"] for r in summary if r["status"] == "refused"]
    lines = [
        "## Targets (paired ratios, measured models only)", "",
        "| target | measured | |", "|---|---|---|",
        f"| median step / plain <= {TARGET_MEDIAN} | {med:.2f}x | {'PASS' if med <= TARGET_MEDIAN else 'MISS'} |",
        f"| worst step / plain <= {TARGET_WORST} | {worst:.2f}x ({max(ok, key=lambda r: r['ratio'])['model']}) | {'PASS' if worst <= TARGET_WORST else 'MISS'} |",
    ]
    if over:
        w = max(ok, key=lambda r: r["over_floor"] or 0)
        lines.append(f"| measured / floor <= {TARGET_FLOOR} on every model | worst {max(over):.2f}x ({w['model']}) | {'PASS' if max(over) <= TARGET_FLOOR else 'MISS'} |")
    if refused:
        lines.append(f"| every model measured | refused: {', '.join(refused)} | MISS |")
    return lines + [""]


def markdown(data: dict, summary: List[dict], pngs: List[str], title: str) -> str:
    lines = [f"# {title}", "", *machine_lines(data), *settings_lines(data), ""]
    lines += [
        "One step = retain fwd+bwd (B) and unlearn fwd+bwd (B_u), as `plain` (NegGrad+) or as the OrthoGrad step in the API "
        "contract's order (`with og.retain(): retain.backward()`, then the unlearn backward, then `og.project_()`; provider "
        "`torch-contract`). `step / plain`: median of per-pair ratios over alternating plain / step runs (`(medians)`: the "
        "ratio of the two medians, where no pairs ran). `floor`: (plain + the least extra work any exact step needs) / plain "
        "in flops (`benchmarks/floor.py`). `measured / floor`: how far the step is from that. `fallback params`: the share of "
        "parameters on the engine's torch.func fallback (`og.stats[\"fallback\"]`; the modules in `fallback_modules` in the "
        "JSON). The direction of every step provider was checked against the "
        "float64 oracle before timing.",
        "",
    ]
    lines += targets(summary)
    lines += table(summary)
    for p in pngs:
        lines += ["", f"![{os.path.basename(p)}]({os.path.basename(p)})"]
    return "\n".join(lines) + "\n"


def plot(data: dict, summary: List[dict], out_dir: str, name: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mi = data.get("orthograd", {}).get("machine") or {}
    caption = f"{mi.get('cpu_model', '?')} x{mi.get('cpu_count', '?')}" + (f", {mi['cuda_device']}" if mi.get("cuda_device") else "")
    caption += f" | torch {mi.get('torch_version', '?')} | {mi.get('date') or data.get('datetime', '')}"
    models = [r["model"] for r in summary]
    xs = list(range(len(models)))
    paths = []

    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(models) + 2), 4.2))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [r["ratio"] or 0 for r in summary], w, label="step / plain (paired)")
    ax.bar([x + w / 2 for x in xs], [r["floor"] or 0 for r in summary], w, label="FLOP floor")
    for x, r in zip(xs, summary):
        if r["ratio"] is None:
            ax.annotate(r["status"] or "n/a", (x - w / 2, 0.05), rotation=90, fontsize=7, ha="center", va="bottom")
    ax.axhline(TARGET_MEDIAN, color="gray", ls="--", lw=0.8)
    ax.set_xticks(xs)
    ax.set_xticklabels(models, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("x plain step")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{name}: OrthoGrad step against plain and the FLOP floor", fontsize=10)
    fig.text(0.5, 0.01, caption, ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    paths.append(os.path.join(out_dir, f"{name}-ratios.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(models) + 2), 4.2))
    ax.bar([x - w / 2 for x in xs], [1e3 * (r["plain_s"] or 0) for r in summary], w, label="plain")
    ax.bar([x + w / 2 for x in xs], [1e3 * (r["step_s"] or 0) for r in summary], w, label="OrthoGrad step")
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels(models, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("time per step [ms]")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(f"{name}: time per step (medians)", fontsize=10)
    fig.text(0.5, 0.01, caption, ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    paths.append(os.path.join(out_dir, f"{name}-times.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write(data: dict, out_dir: str, name: str, plots: bool = True) -> str:
    os.makedirs(out_dir, exist_ok=True)
    rows = load_rows(data)
    if not rows:
        raise SystemExit(f"{name}: no orthograd benchmark rows")
    summary = model_rows(rows)
    pngs = plot(data, summary, out_dir, name) if plots else []
    md_path = os.path.join(out_dir, f"{name}.md")
    with open(md_path, "w") as f:
        f.write(markdown(data, summary, pngs, f"OrthoGrad on the real-model zoo: {name}"))
    return md_path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json")
    ap.add_argument("--out", default=None, help="output folder (default: the JSON's folder)")
    ap.add_argument("--name", default=None, help="output base name (default: the JSON's stem)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    name = args.name or os.path.splitext(os.path.basename(args.json))[0]
    md = write(data, args.out or os.path.dirname(os.path.abspath(args.json)), name, plots=not args.no_plots)
    print(md)
    return md


if __name__ == "__main__":
    main()
