"""How far is the OrthoGrad direction under torch.autocast from the fp32 one, and whose error is it?

    python -m benchmarks.autocast_error [--models mlp,cnn,...] [--B 32] [--dtypes bf16,fp16] [--out F.md]

For each zoo model (size ``cpu``, tensor scope, alpha 0) and half dtype it computes the direction
d = P_perp(u) four ways and reports each one's distance from the fp32 direction d32 = P32(u32),
relative to ||d32|| (the issue's "within 1e-2 relative of fp32"):

* ``P32(uh)``: the fp32 retain span, the autocast unlearn gradient. The error of the model's own
  half-precision unlearn pass, passed through an exact fp32 projection: no projection of the
  autocast gradient can do better than this.
* ``Ph(u32)``: the autocast retain span (half factors), the fp32 unlearn gradient: the error that
  the half-precision retain factors bring.
* ``Ph(uh)``: both under autocast: what a user gets. The engine's own Gram and solve are float64
  (tests/test_mixed_precision.py asserts it); everything in this column is the half-precision
  arithmetic of the model's passes.

``u err`` is the autocast unlearn gradient's own distance from fp32 (relative to ||u32||), and
``|u|/|d|`` how much the projection shrinks u: an error of e ||u|| in u is e ||u|| / ||d|| relative
to d. Diagnostic script, not part of the timed suite.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
from typing import Dict

import torch

from orthograd_fast import OrthoGrad

from . import zoo

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TARGET = 1e-2  # the direction within 1e-2 relative of fp32


def _norm(d: Dict[str, torch.Tensor]) -> float:
    return float(sum(v.double().square().sum() for v in d.values()) ** 0.5)


def _dist(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    return _norm({n: a[n].double() - b[n].double() for n in b})


def measure(name: str, B: int, dtype: torch.dtype, seed: int = 3) -> dict:
    model, make_batch = zoo.build_model(name, "cpu")
    loss_fn = zoo.per_sample_loss(name)
    g = torch.Generator().manual_seed(seed)
    (xr, yr), (xu, yu) = make_batch(B, g), make_batch(B, g)

    def unlearn_grad(half: bool) -> Dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=half):
            out = model(xu)
        loss_fn(out.float(), yu).mean().backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    def retain_span(half: bool) -> OrthoGrad:
        og = OrthoGrad(model, scope="tensor", alpha=0.0, backend="torch")
        model.zero_grad(set_to_none=True)
        with og.retain():
            with torch.autocast("cpu", dtype=dtype, enabled=half):
                out = model(xr)
            loss_fn(out.float(), yr).mean().backward()
        return og

    u32, uh = unlearn_grad(False), unlearn_grad(True)
    og32, ogh = retain_span(False), retain_span(True)
    d32 = og32.project_vectors(u32)
    ref = _norm(d32)
    return {
        "model": name,
        "dtype": str(dtype).replace("torch.", ""),
        "B": B,
        "u_over_d": _norm(u32) / ref,
        "u_err": _dist(uh, u32) / _norm(u32),
        "P32(uh)": _dist(og32.project_vectors(uh), d32) / ref,
        "Ph(u32)": _dist(ogh.project_vectors(u32), d32) / ref,
        "Ph(uh)": _dist(ogh.project_vectors(uh), d32) / ref,
    }


def _header() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = "?"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"(CPU autocast), git {rev or '?'}, {now}."
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(zoo.MODEL_NAMES))
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    lines = [
        "# OrthoGrad direction under torch.autocast against fp32",
        "",
        _header() + f" Zoo size `cpu`, retain and unlearn batch B = {args.B}, tensor scope, alpha 0. "
        "Distances relative to ||d32|| (u err: relative to ||u32||); "
        "`python -m benchmarks.autocast_error` (see its docstring for the columns).",
        "",
        "| model | dtype | \\|u\\|/\\|d\\| | u err | P32(uh): fp32 span | Ph(u32): half span | Ph(uh): under autocast | <= 1e-2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for name in args.models.split(","):
        for key in args.dtypes.split(","):
            r = measure(name, args.B, DTYPES[key])
            row = (
                f"| {name} | {key} | {r['u_over_d']:.1f} | {r['u_err']:.1e} | {r['P32(uh)']:.1e} | {r['Ph(u32)']:.1e} "
                f"| {r['Ph(uh)']:.1e} | {'yes' if r['Ph(uh)'] <= TARGET else 'no'} |"
            )
            lines.append(row)
            print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
