"""Blocked CGS2 against the Gram route, where per-sample rows exist explicitly.

    python -m benchmarks.cgs2_vs_gram                       # CPU grid below, markdown to stdout
    python -m benchmarks.cgs2_vs_gram --out benchmarks/results/cgs2-vs-gram-cpu-$(date +%F).md
    python -m benchmarks.cgs2_vs_gram --device cuda --backends torch,triton --B 32,128 --n 1000000

Both compute P_perp(u) = u minus its component in the span of the rows of G [B, n] (the engine's
explicit terms hold per-sample gradients this way, and ``project_vectors`` projects any vectors
with the same span):

* gram: what the engine does (orthograd_fast.engine.gram explicit terms, orthograd_fast.engine.solve): rows
  widened to float64, K = G G^T and b = G u in float64, c = K^+ b by ``solve_psd`` (Cholesky
  where provably well conditioned, else eigh with the rank cutoff), update u - G^T c.
* cgs2: ``orthograd_fast.gram_schmidt.project_out(G^T, u)``: an orthonormal basis of the rows by
  blocked CGS2 in the work dtype (float32 for float32 rows), then u projected off it twice.

Each cell times both alternately (one warm-up each, then ``--reps`` rounds, fewer for slow cells)
and reports medians.
``data``: ``random`` rows (full rank, well conditioned) or ``duplicated`` (B / 2 distinct rows,
each twice: a rank-deficient span, the eigh path of the solve and dropped columns in CGS2).
Accuracy columns: ``orth`` = max_i |<g_i, out>| / (|g_i| |u|) in float64 (0 for an exact
projection), ``diff`` = |out_gram - out_cgs2| / |u|; rank = directions each route kept.
``--accuracy`` (on by default) adds float64 rows in near-duplicate pairs, where the Gram's squared
condition number shows: each route against the exact SVD projector with its own cutoff.
"""

from __future__ import annotations

import os
import sys

if "torch" not in sys.modules:  # passive OpenMP waits: see benchmarks/conftest.py
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from orthograd_fast import gram_schmidt as gs  # noqa: E402
from orthograd_fast.engine.solve import default_rtol, rank, solve_psd  # noqa: E402

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# cells whose slowest warm-up call takes longer than LONG_S get LONG_REPS repetitions at most;
# those under SHORT_S get SHORT_FACTOR times --reps (millisecond cells are noisy on a shared machine)
LONG_S, LONG_REPS = 2.0, 3
SHORT_S, SHORT_FACTOR = 0.1, 4


def gram_route(G: torch.Tensor, u: torch.Tensor, rtol: float) -> torch.Tensor:
    """u - G^T K^+ G u with K = G G^T, all in float64, as the engine's explicit terms do."""
    G64 = G.double()
    K = G64 @ G64.T
    c = solve_psd(K, G64 @ u.double(), rtol)
    return (u.double() - c @ G64).to(u.dtype)


def cgs2_route(G: torch.Tensor, u: torch.Tensor, backend: str) -> torch.Tensor:
    return gs.project_out(G.T, u, backend=backend)


def _rows(B: int, n: int, dtype, device, data: str, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    distinct = B if data == "random" else max(1, B // 2)
    G = torch.randn(distinct, n, generator=g, dtype=dtype)
    if distinct < B:
        G = G.repeat((B + distinct - 1) // distinct, 1)[:B]
    u = torch.randn(n, generator=g, dtype=dtype)
    return G.to(device), u.to(device)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _orth(G: torch.Tensor, out: torch.Tensor, u: torch.Tensor) -> float:
    G64 = G.double()
    dots = (G64 @ out.double()).abs()
    scale = G64.norm(dim=1).clamp_min(1e-300) * u.double().norm()
    return float((dots / scale).max())


def run_cell(B, n, dtype, data, device, backends, reps, seed=0):
    G, u = _rows(B, n, dtype, device, data, seed)
    rtol = default_rtol(dtype)
    fns = {"gram": lambda: gram_route(G, u, rtol)}
    for be in backends:
        fns[f"cgs2[{be}]"] = (lambda be=be: cgs2_route(G, u, be))
    outs, times, warm = {}, {k: [] for k in fns}, 0.0
    for k, fn in fns.items():  # warm-up, kept for the accuracy columns
        outs[k], t = _timed(fn, device)
        warm = max(warm, t)
    if warm > LONG_S:
        reps = min(reps, LONG_REPS)
    elif warm < SHORT_S:
        reps *= SHORT_FACTOR
    for _ in range(reps):  # alternating, so that load changes hit every route alike
        for k, fn in fns.items():
            times[k].append(_timed(fn, device)[1])
    row = {"dtype": str(dtype).replace("torch.", ""), "B": B, "n": n, "data": data, "reps": reps}
    G64 = G.double()
    row["rank_gram"] = int(rank(G64 @ G64.T, rtol))
    for k in fns:
        row[f"ms_{k}"] = 1e3 * statistics.median(times[k])
        row[f"orth_{k}"] = _orth(G, outs[k], u)
        if k != "gram":
            row[f"diff_{k}"] = float((outs["gram"].double() - outs[k].double()).norm()
                                     / u.double().norm())
    for be in backends:
        row[f"rank_cgs2[{be}]"] = gs.cgs2(G.T, backend=be).shape[1]
    return row


def _fmt_n(n: int) -> str:
    e = len(str(n)) - 1
    return f"1e{e}" if n == 10 ** e else str(n)


def table(rows, backends) -> str:
    head = ["dtype", "B", "n", "data", "gram (ms)"]
    for be in backends:
        head += [f"cgs2[{be}] (ms)", f"cgs2[{be}] / gram"]
    head += ["rank gram"] + [f"rank cgs2[{be}]" for be in backends]
    head += ["orth gram"] + [f"orth cgs2[{be}]" for be in backends]
    head += [f"diff [{be}]" for be in backends]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dtype"], str(r["B"]), _fmt_n(r["n"]), r["data"], f"{r['ms_gram']:.3g}"]
        for be in backends:
            k = f"cgs2[{be}]"
            cells += [f"{r['ms_' + k]:.3g}", f"{r['ms_' + k] / r['ms_gram']:.2f}"]
        cells += [str(r["rank_gram"])]
        cells += [str(r[f"rank_cgs2[{be}]"]) for be in backends]
        cells += [f"{r['orth_gram']:.1e}"] + [f"{r[f'orth_cgs2[{be}]']:.1e}" for be in backends]
        cells += [f"{r[f'diff_cgs2[{be}]']:.1e}" for be in backends]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows, backends) -> str:
    out = []
    for be in backends:
        k = f"ms_cgs2[{be}]"
        ratios = [r[k] / r["ms_gram"] for r in rows]
        wins = [r for r in rows if r[k] < r["ms_gram"]]
        line = (f"cgs2[{be}] / gram: {min(ratios):.2f} to {max(ratios):.2f} (median "
                f"{statistics.median(ratios):.2f}); CGS2 faster in {len(wins)} of {len(rows)} cells")
        if wins:
            line += ": " + ", ".join(f"{r['dtype']} B={r['B']} n={_fmt_n(r['n'])} {r['data']}"
                                     for r in wins)
        out.append(line + ".")
    return "\n".join(out)


def _svd_project_out(G: torch.Tensor, u: torch.Tensor, rtol: float) -> torch.Tensor:
    """The exact projector with the cutoff sigma_k > rtol * sigma_max, float64."""
    _, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    V = Vh[S > rtol * S[0]]
    return u.double() - V.T @ (V @ u.double())


def accuracy_table(device, backend: str, seed: int = 1) -> str:
    """float64 rows in near-duplicate pairs (B / 2 rows, then each plus a relative perturbation):
    the weak directions have sigma / sigma_max ~ perturbation / 2. Each route against the SVD
    projector with its own default cutoff (gram: solve.default_rtol, cgs2: gram_schmidt.cgs2_rtol)."""
    rt_g, rt_c = default_rtol(torch.float64), gs.cgs2_rtol(torch.float64)
    lines = ["| B | n | perturbation | weakest sigma / sigma_max | gram err | cgs2 err |",
             "|---|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(seed)
    for B, n in ((128, 1000), (128, 100000)):
        for pert in (1e-10, 1e-8, 1e-6, 1e-4):
            G0 = torch.randn(B // 2, n, generator=g, dtype=torch.float64)
            G = torch.cat([G0, G0 + pert * torch.randn(B // 2, n, generator=g, dtype=torch.float64)])
            u = torch.randn(n, generator=g, dtype=torch.float64)
            S = torch.linalg.svdvals(G)
            scale = u.norm()
            eg = (gram_route(G.to(device), u.to(device), rt_g).cpu() - _svd_project_out(G, u, rt_g)).norm()
            ec = (cgs2_route(G.to(device), u.to(device), backend).cpu().double()
                  - _svd_project_out(G, u, rt_c)).norm()
            lines.append(f"| {B} | {_fmt_n(n)} | {pert:.0e} | {float(S[-1] / S[0]):.1e} | "
                         f"{float(eg / scale):.1e} | {float(ec / scale):.1e} |")
    return "\n".join(lines)


def _machine(device) -> str:
    try:
        from benchmarks.runner import _cpu_model

        cpu = _cpu_model()
    except Exception:  # noqa: BLE001 - the suite's optional imports (opacus, ...) are not needed here
        import platform

        cpu = platform.processor() or platform.machine()
    s = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
         f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    if torch.device(device).type == "cuda":
        s += f", {torch.cuda.get_device_name(0)}"
    return s


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", default="8,32,128")
    p.add_argument("--n", default="1000,100000,1000000")
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--data", default="random,duplicated")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backends", default="torch", help="CGS2 backends: torch, triton")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True,
                   help="also the float64 near-duplicate accuracy table")
    p.add_argument("--out", default=None, help="also write the markdown here")
    a = p.parse_args(argv)
    Bs = [int(x) for x in a.B.split(",")]
    ns = [int(float(x)) for x in a.n.split(",")]
    backends = a.backends.split(",")
    la0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.time()
    rows = []
    for dt in a.dtypes.split(","):
        for data in a.data.split(","):
            for n in ns:
                for B in Bs:
                    rows.append(run_cell(B, n, _DTYPES[dt], data, a.device, backends, a.reps))
                    print(f"# {dt} {data} n={n} B={B} done ({time.time() - t0:.0f} s)",
                          file=sys.stderr, flush=True)
    la1 = os.getloadavg() if hasattr(os, "getloadavg") else None
    md = "\n\n".join([
        "# Blocked CGS2 against the Gram route (explicit per-sample rows)",
        f"Machine: {_machine(a.device)}; device {a.device}; {time.strftime('%Y-%m-%d %H:%M %Z')}; "
        f"load average {la0 and round(la0[0], 2)} at the start, {la1 and round(la1[0], 2)} at the end; "
        f"median of {a.reps} alternating repetitions after one warm-up each ({LONG_REPS} where a "
        f"warm-up call took over {LONG_S:g} s, {SHORT_FACTOR * a.reps} where under {SHORT_S:g} s); "
        f"`python -m benchmarks.cgs2_vs_gram {' '.join(argv if argv is not None else sys.argv[1:])}`.",
        table(rows, backends),
        verdict(rows, backends),
    ] + ([
        "Accuracy, float64 rows in near-duplicate pairs: |out - exact| / |u| against the SVD "
        "projector with each route's own default cutoff (gram 1e-8, cgs2 1e-12; "
        f"cgs2 on backend {backends[0]}).",
        accuracy_table(a.device, backends[0]),
    ] if a.accuracy else [])) + "\n"
    print(md)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md)
    return md


if __name__ == "__main__":
    main()
