"""Turn a pytest-benchmark JSON from the orthograd suite into a markdown report and PNG plots.

    python -m benchmarks.report benchmarks/results/run.json [--out benchmarks/results] [--name cpu-2026-01-01]

Writes ``<out>/<name>.md`` (machine, settings, targets, one table per model) and
``<out>/<name>-<model>.png`` (time per step and peak memory vs retain batch B, one line per
provider, log-log; OOM / timeout shown as markers at the top edge). ``name`` defaults to the JSON's
file name without extension. Timings are pytest-benchmark medians; "x plain" divides by the
``plain`` median of the same (model, B) in the same run; "paired" is the median ratio of
alternating plain / provider steps (robust to load changes).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import OrderedDict
from typing import Dict, List, Optional

PROVIDER_ORDER = ["plain", "torch", "triton", "opacus", "reference-qr", "reference-svd"]
# The numbers the issue asks for (CPU, 2 cores, B = 64).
TARGET_B = 64
TARGET_MODELS = ["mlp", "cnn", "transformer"]
TARGET_TIME_RATIO = 1.3
TARGET_MEM_RATIO = 1.3
TARGET_SPEEDUP_VS_QR = 100.0


def load_rows(data: dict) -> List[dict]:
    """Rows keyed by (model, B, provider): timed ones from pytest-benchmark's ``benchmarks`` list
    (median from its stats), the rest (OOM, timeout, skipped, wrong, error) from ``orthograd.rows``."""
    rows: "OrderedDict[tuple, dict]" = OrderedDict()
    for r in data.get("orthograd", {}).get("rows", []):
        rows[(r["model"], int(r["B"]), r["provider"])] = dict(r)
    for b in data.get("benchmarks", []):
        ei = b.get("extra_info", {})
        if "model" not in ei:
            continue
        key = (ei["model"], int(ei["B"]), ei["provider"])
        r = rows.setdefault(key, dict(ei))
        r.update({k: v for k, v in ei.items() if k not in r or r[k] is None})
        r["median_s"] = b["stats"]["median"]
        r["rounds"] = b["stats"]["rounds"]
        r["iqr_s"] = b["stats"].get("iqr")
        r["status"] = "ok"
    out = list(rows.values())
    plain = {(r["model"], int(r["B"])): r for r in out if r["provider"] == "plain" and r.get("status") == "ok"}
    for r in out:
        p = plain.get((r["model"], int(r["B"])))
        r["time_ratio"] = r["median_s"] / p["median_s"] if (p and r.get("median_s")) else None
        pm = p.get("peak_mem_bytes") if p else None
        r["mem_ratio"] = r["peak_mem_bytes"] / pm if (pm and r.get("peak_mem_bytes")) else None
    return out


def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return ""
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _fmt_mib(b: Optional[int]) -> str:
    return "" if not b else f"{b / 2**20:.1f}"


def _fmt_x(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.2f}x"


def _status_cell(r: dict) -> str:
    st = r.get("status", "?")
    if st == "ok":
        return "ok"
    reason = (r.get("reason") or "").replace("|", "/").replace("\n", " ")
    if len(reason) > 90:
        reason = reason[:87] + "..."
    label = {"OOM": "**OOM**", "timeout": "**timeout**", "wrong": "**WRONG**", "error": "**ERROR**"}.get(st, st)
    return f"{label}: {reason}" if reason else label


def _check_cell(r: dict) -> str:
    c = r.get("check") or {}
    if c.get("ok") is None:
        return "unchecked" if c else ""
    err = c.get("max_err")
    cov = "" if c.get("n_checked") == c.get("n_total") else f" ({c.get('n_checked')}/{c.get('n_total')} tensors)"
    return ("" if c["ok"] else "FAIL ") + (f"{err:.1e}" if err is not None else "") + cov


def _ordered_providers(rows):
    seen = {r["provider"] for r in rows}
    return [p for p in PROVIDER_ORDER if p in seen] + sorted(seen - set(PROVIDER_ORDER))


def machine_lines(data: dict) -> List[str]:
    mi = data.get("orthograd", {}).get("machine") or data.get("machine_info", {}).get("orthograd") or {}
    bmi = data.get("machine_info", {})
    cpu = mi.get("cpu_model") or bmi.get("cpu", {}).get("brand_raw") or bmi.get("processor", "?")
    detail = ", ".join(x for x in (mi.get("cpu_family_model"), mi.get("cpu_capability") and f"torch CPU capability {mi['cpu_capability']}") if x)
    cpu = f"{cpu} ({detail})" if detail else cpu
    lines = [
        f"- Machine: {cpu}, {mi.get('cpu_count', '?')} cores (torch threads {mi.get('torch_threads', '?')}), "
        f"{mi.get('mem_total_gib', '?')} GiB RAM" + (f"; GPU {mi['cuda_device']} (CUDA {mi.get('cuda_version')})" if mi.get("cuda_device") else ""),
        f"- torch {mi.get('torch_version', '?')}, Python {mi.get('python', bmi.get('python_version', '?'))}, opacus {mi.get('opacus_version')}, "
        f"OMP_WAIT_POLICY={mi.get('omp_wait_policy') or 'unset'}",
        f"- Date: {mi.get('date') or data.get('datetime', '?')}",
    ]
    ci = data.get("commit_info") or {}
    if ci.get("id"):
        lines.append(
            f"- Code: git {ci['id'][:10]}" + (" + uncommitted changes" if ci.get("dirty") else "")
            + (f"; orthograd_fast sources sha1 {mi['orthograd_fast_src_sha1']}" if mi.get("orthograd_fast_src_sha1") else "")
        )
    la0, la1 = mi.get("loadavg_start"), mi.get("loadavg_end")
    la0 = [round(x, 2) for x in la0] if la0 else la0
    la1 = [round(x, 2) for x in la1] if la1 else la1
    if la0:
        warn = ""
        cores = mi.get("cpu_count") or 1
        if max(la0[0], (la1 or [0])[0]) > 1.25 * cores:  # the run itself accounts for ~cores
            warn = " -- **machine was loaded by other processes: absolute times are noisy; prefer the paired ratios**"
        lines.append(f"- Load average (1/5/15 min) at start {la0}" + (f", at end {la1}" if la1 else "") + warn)
    hp0, hp1 = mi.get("host_probe_start"), mi.get("host_probe_end")
    if hp0:
        from .runner import steal_share

        both = [hp0] + ([hp1] if hp1 else [])

        def each(key):
            return " / ".join(f"{h.get(key)}" for h in both)

        steal = steal_share(hp0, hp1) if hp1 else None
        lines.append(
            "- Host probe (start" + (" / end" if hp1 else "") + f"): float32 512 x 512 GEMM {each('sgemm_gflops')} GFLOP/s on one "
            + f"thread, {each('sgemm_gflops_all_threads')} on {mi.get('torch_threads', '?')}; 64 MiB copy {each('copy_gbs')} GB/s"
            + (f"; steal time during the run {100 * steal:.1f}% of CPU time" if steal is not None else "")
        )
    return lines


def settings_lines(data: dict) -> List[str]:
    s = data.get("orthograd", {}).get("settings")
    if not s:
        return []
    return [
        f"- Set `{s.get('set_name')}` on {s.get('device')} (zoo size `{s.get('size')}`), scope `{s.get('scope')}`, alpha {s.get('alpha')}, "
        f"unlearn batch {s.get('unlearn_batch') or '= B'}, oracle tolerance {s.get('tol')}, step timeout {s.get('step_timeout')} s, "
        f"timed budget {s.get('case_budget')} s/case (max {s.get('max_rounds')} rounds, median reported)"
        + (f", zoo overrides {s.get('overrides')}" if s.get("overrides") else ""),
    ]


# A medians ratio this far from the paired ratio of the same row is marked noisy in the targets.
NOISY_DISAGREEMENT = 0.25


def targets_table(rows: List[dict]) -> List[str]:
    idx = {(r["model"], int(r["B"]), r["provider"]): r for r in rows}
    out = []
    for m in TARGET_MODELS:
        t = idx.get((m, TARGET_B, "torch"))
        if t is None:
            continue
        if t.get("status") != "ok":
            out.append(f"| {m} | torch step / plain <= {TARGET_TIME_RATIO} | {_status_cell(t)} | MISS |")
            continue
        for label, val, lim in (
            (f"torch step / plain <= {TARGET_TIME_RATIO} (medians)", t.get("time_ratio"), TARGET_TIME_RATIO),
            (f"torch step / plain <= {TARGET_TIME_RATIO} (paired)", t.get("paired_ratio"), TARGET_TIME_RATIO),
            (f"torch peak memory / plain <= {TARGET_MEM_RATIO}", t.get("mem_ratio"), TARGET_MEM_RATIO),
        ):
            if val is None:
                continue
            verdict = "PASS" if val <= lim else "MISS"
            paired = t.get("paired_ratio")
            if "(medians)" in label and paired and abs(val / paired - 1.0) > NOISY_DISAGREEMENT:
                # the two medians came from different moments of a shared machine: trust the pairs
                verdict += " (noisy: median and paired ratios differ by > 25%)"
            out.append(f"| {m} | {label} | {val:.2f}x | {verdict} |")
        if m == "mlp":
            q = idx.get((m, TARGET_B, "reference-qr"))
            if q is not None and q.get("status") == "ok" and t.get("median_s"):
                sp = q["median_s"] / t["median_s"]
                out.append(f"| {m} | reference-qr / torch >= {TARGET_SPEEDUP_VS_QR:g} (medians) | {sp:.1f}x | {'PASS' if sp >= TARGET_SPEEDUP_VS_QR else 'MISS'} |")
                pq = t.get("ref_qr_paired")
                if pq:
                    n = t.get("ref_qr_paired_rounds")
                    out.append(f"| {m} | reference-qr / torch >= {TARGET_SPEEDUP_VS_QR:g} (paired, {n} pairs) | {pq:.1f}x | {'PASS' if pq >= TARGET_SPEEDUP_VS_QR else 'MISS'} |")
            elif q is not None:
                out.append(f"| {m} | reference-qr / torch >= {TARGET_SPEEDUP_VS_QR:g} | reference-qr {_status_cell(q)} | n/a |")
    if not out:
        return []
    return [f"## Targets (B = {TARGET_B})", "", "| model | target | measured | |", "|---|---|---|---|", *out, ""]


def markdown(data: dict, rows: List[dict], pngs: Dict[str, str], title: str) -> str:
    lines = [f"# {title}", "", *machine_lines(data), *settings_lines(data), ""]
    lines += [
        "Time: pytest-benchmark median of one full step (retain fwd+bwd, unlearn fwd+bwd, direction, `opt.step()`). "
        "`x plain`: median / plain's median, same (model, B), same run. `paired`: median of per-pair ratios over "
        "alternating plain / provider steps. Memory: peak of one step (see method below); `mem x plain` likewise. "
        "Check: max over tensors of |d - d_oracle| / |u| against the float64 oracle (per-sample loop + SVD projector).",
        "",
    ]
    lines += targets_table(rows)
    methods = sorted({r.get("mem_method") for r in rows if r.get("mem_method")})
    if methods:
        lines += ["Memory method: " + "; ".join(methods), ""]
    by_model: "OrderedDict[str, List[dict]]" = OrderedDict()
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    provs = _ordered_providers(rows)
    for m, rs in by_model.items():
        n_params = next((r.get("n_params") for r in rs if r.get("n_params")), None)
        lines += [f"## {m}" + (f" ({n_params / 1e6:.2f}M params)" if n_params else ""), ""]
        lines += ["| B | provider | time/step | x plain | paired | rounds | peak MiB | mem x plain | check | status |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rs, key=lambda r: (int(r["B"]), provs.index(r["provider"]))):
            lines.append(
                f"| {r['B']} | {r['provider']} | {_fmt_time(r.get('median_s'))} | {_fmt_x(r.get('time_ratio'))} | "
                f"{_fmt_x(r.get('paired_ratio'))} | {r.get('rounds') or ''} | {_fmt_mib(r.get('peak_mem_bytes'))} | "
                f"{_fmt_x(r.get('mem_ratio'))} | {_check_cell(r)} | {_status_cell(r)} |"
            )
        if m in pngs:
            lines += ["", f"![{m}]({os.path.basename(pngs[m])})"]
        lines.append("")
    return "\n".join(lines)


def plot(data: dict, rows: List[dict], out_dir: str, name: str) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    mi = data.get("orthograd", {}).get("machine") or {}
    caption = f"{mi.get('cpu_model', '?')} x{mi.get('cpu_count', '?')}" + (f", {mi['cuda_device']}" if mi.get("cuda_device") else "")
    caption += f" | torch {mi.get('torch_version', '?')} | {mi.get('date') or data.get('datetime', '')}"
    provs = _ordered_providers(rows)
    # fixed style per provider, the same in every figure
    names = PROVIDER_ORDER + [p for p in provs if p not in PROVIDER_ORDER]
    markers = dict(zip(names, "osP^Dv<>ph*"))
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    paths = {}
    by_model: "OrderedDict[str, List[dict]]" = OrderedDict()
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    for m, rs in by_model.items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, key, ylabel in ((axes[0], "median_s", "time per step [s]"), (axes[1], "peak_mem_bytes", "peak memory [MiB]")):
            ax.set_yscale("log")
            ymax, ymin = 0.0, float("inf")
            for p in provs:
                pts = sorted((int(r["B"]), r[key]) for r in rs if r["provider"] == p and r.get("status") == "ok" and r.get(key))
                if not pts:
                    continue
                xs = [b for b, _ in pts]
                ys = [v / 2**20 if key == "peak_mem_bytes" else v for _, v in pts]
                ymax, ymin = max(ymax, max(ys)), min(ymin, min(ys))
                ax.plot(xs, ys, marker=markers[p], color=colors[p], label=p)
            fails = [(int(r["B"]), r["provider"], r["status"]) for r in rs if r.get("status") in ("OOM", "timeout", "wrong", "error")]
            if fails and ymax > 0:
                # one row of markers per failing provider above the data: x timeout, X OOM, ! wrong/error
                frow = {p: k for k, p in enumerate(dict.fromkeys(p for _, p, _ in fails))}
                for b, p, st in fails:
                    y = ymax * 2.0 * (1.8 ** frow[p])
                    mk = {"OOM": "X", "timeout": "x"}.get(st, "$!$")
                    ax.scatter([b], [y], marker=mk, color=colors[p], s=45, zorder=3)
                    ax.annotate(f"{p}: {st}", (b, y), xytext=(6, 0), textcoords="offset points", fontsize=6, ha="left", va="center", color=colors[p])
                ax.set_ylim(ymin / 1.5, ymax * 2.0 * (1.8 ** len(frow)))
            ax.set_xscale("log", base=2)
            bs = sorted({int(r["B"]) for r in rs})
            ax.set_xticks(bs)
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel("retain batch B")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        if axes[0].lines:
            axes[0].legend(fontsize=8)
        if any(r.get("status") in ("OOM", "timeout", "wrong", "error") for r in rs):
            axes[1].text(0.99, 0.01, "above the data: x timeout, X OOM, ! wrong/error", transform=axes[1].transAxes, fontsize=6, ha="right", va="bottom")
        fig.suptitle(f"{m}: OrthoGrad step providers", fontsize=11)
        fig.text(0.5, 0.01, caption, ha="center", fontsize=7)
        fig.tight_layout(rect=(0, 0.04, 1, 0.95))
        path = os.path.join(out_dir, f"{name}-{m}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[m] = path
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="pytest-benchmark JSON written with --benchmark-json")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default=None, help="output base name (default: the JSON's stem)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    name = args.name or os.path.splitext(os.path.basename(args.json))[0]
    os.makedirs(args.out, exist_ok=True)
    rows = load_rows(data)
    if not rows:
        raise SystemExit(f"{args.json}: no orthograd benchmark rows")
    pngs = {} if args.no_plots else plot(data, rows, args.out, name)
    md = markdown(data, rows, pngs, f"OrthoGrad step benchmarks: {name}")
    md_path = os.path.join(args.out, f"{name}.md")
    with open(md_path, "w") as f:
        f.write(md)
    print(md_path)
    for p in pngs.values():
        print(p)
    return md_path


if __name__ == "__main__":
    main()
