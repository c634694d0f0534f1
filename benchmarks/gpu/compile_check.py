"""Compile every Triton kernel for an NVIDIA target on a machine without a GPU, and check that
each launch configuration the launchers pick fits the chip.

    python -m benchmarks.gpu.compile_check [--arch 90] [--quick] [--out DIR]

Why: CI runs the kernels in the Triton interpreter, which checks their arithmetic but not whether
they compile, nor whether a configuration fits the hardware. A kernel whose pipelined tiles need
more shared memory than a block may have (227 KiB on Hopper) raises ``OutOfResources`` at its
first launch on a GPU; one that spills registers runs, slowly. Triton's wheel bundles ptxas and
cuobjdump, so both are checkable here: each launcher is called with CPU tensors at a realistic
shape (no interpreter: the launchers then pick their GPU blocks), the launch is recorded instead of
run, compiled ahead of time for ``sm_<arch>``, and its cubin read back: dynamic shared memory,
registers, stack (spill) bytes and the kinds of multiply instructions in the SASS (HGMMA: Hopper's
warpgroup tensor-core MMA; HMMA: the older tensor-core MMA; FFMA/DFMA: scalar fp32/fp64 FMAs).

A configuration fails when it does not compile, its shared memory exceeds the target's per-block
limit, or it spills more than ``SPILL_LIMIT`` bytes per thread.
The table goes to stdout (and ``DIR/compile_check.md`` / ``.json`` with ``--out``); exit status 1
on any failure. tests/kernels/test_compile_check.py runs the quick set in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

# Largest dynamic shared memory a block may opt into, by compute capability (CUDA C Programming
# Guide, "Technical Specifications per Compute Capability").
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}

# Stack bytes per thread above which a configuration counts as spilling. A few dozen bytes are a
# handful of values kept across the loop; kilobytes mean the tile state does not fit in registers.
SPILL_LIMIT = 128

_TORCH_TO_TRITON = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
}


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its arguments by name, its options."""
    kernel: object
    args: Dict[str, object]
    options: Dict[str, int]


@dataclass
class Result:
    case: str
    kernel: str
    constexprs: str
    options: str
    shared: int = 0
    regs: int = 0
    stack: int = 0
    mma: Dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""
    problems: List[str] = field(default_factory=list)


@contextlib.contextmanager
def record_launches(kernels):
    """Within the block, launching any of ``kernels`` (``@triton.jit`` functions) records a
    :class:`Launch` in the yielded list and runs nothing."""
    got: List[Launch] = []
    saved = []
    for k in kernels:
        if type(k).__name__ == "InterpretedFunction":
            raise RuntimeError(
                "compile_check: the kernels were imported under TRITON_INTERPRET=1; run it without "
                "that variable (it compiles, it does not interpret)")

        def run(*args, grid=None, warmup=False, _k=k, **kw):
            opts = {o: kw.pop(o) for o in ("num_warps", "num_stages", "num_ctas") if o in kw}
            named = dict(zip(_k.arg_names, args))
            named.update(kw)
            got.append(Launch(_k, named, opts))

        saved.append((k, k.__dict__.get("run")))
        k.run = run  # instance attribute: shadows JITFunction.run, which kernel[grid](...) calls
    try:
        yield got
    finally:
        for k, old in saved:
            if old is None:
                del k.run
            else:
                k.run = old


def _signature(launch: Launch):
    sig, const = {}, {}
    for p in launch.kernel.params:
        v = launch.args[p.name]
        if p.is_constexpr:
            sig[p.name], const[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _TORCH_TO_TRITON[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -(1 << 31) <= v < (1 << 31) else "i64"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"compile_check: argument {p.name} of {launch.kernel.__name__}: "
                            f"unsupported type {type(v).__name__}")
    # what the JIT assumes at run time for torch allocations: 16-byte aligned pointers
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(launch.kernel.params)
             if sig[p.name].startswith("*")}
    return sig, const, attrs


def _tool(name: str) -> str:
    import triton.backends.nvidia as nv

    path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"compile_check: {name} not found in the triton wheel ({path})")
    return path


def compile_launch(case: str, launch: Launch, arch: int) -> Result:
    """Compile ``launch`` for sm_<arch> and read its resources back from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, const, attrs = _signature(launch)
    shown = {k: (str(v).replace("triton.language.", "") if not isinstance(v, (bool, int)) else v)
             for k, v in const.items()}
    res = Result(case, launch.kernel.__name__, ", ".join(f"{k}={v}" for k, v in shown.items()),
                 ", ".join(f"{k}={v}" for k, v in launch.options.items()))
    t = time.perf_counter()
    try:
        src = ASTSource(fn=launch.kernel, signature=sig, constexprs=const, attrs=attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    except Exception as e:  # noqa: BLE001 - a compile error is the finding
        msg = str(e).strip()
        where = msg.splitlines()[0][:200] if msg else ""  # CompilationError: "at LINE:COL:"
        cause = f" ({type(e.__cause__).__name__}: {str(e.__cause__)[:300]})" if e.__cause__ else ""
        res.error = f"{type(e).__name__}: {where}{cause}"
        res.problems.append("does not compile")
        res.seconds = time.perf_counter() - t
        return res
    res.seconds = time.perf_counter() - t
    res.shared = int(ck.metadata.shared)
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(ck.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if m:
        res.regs, res.stack = int(m.group(1)), int(m.group(2)) + int(m.group(4))
        res.shared = max(res.shared, int(m.group(3)))
    for op in re.findall(r"\b(HGMMA|HMMA|DMMA|FFMA|DFMA)\b", sass):
        res.mma[op] = res.mma.get(op, 0) + 1
    limit = SHARED_LIMIT.get(arch)
    if limit is not None and res.shared > limit:
        res.problems.append(f"shared {res.shared} B > {limit} B per block on sm_{arch}")
    if res.stack > SPILL_LIMIT:
        res.problems.append(f"{res.stack} B of stack per thread > {SPILL_LIMIT} (register spills)")
    return res


# ----------------------------------------------------------------------------------------------
# the cases: each launcher at a realistic shape, per dtype and per block-size regime
# ----------------------------------------------------------------------------------------------
def _factors(B, T, I, O, dtype):
    return torch.empty(B, T, I, dtype=dtype), torch.empty(B, T, O, dtype=dtype)


def cases(quick: bool = False) -> List[tuple]:
    """(name, kernels, fn) triples; fn() calls a launcher once."""
    from orthograd_fast.kernels import cgs_step as cg
    from orthograd_fast.kernels import coef as co
    from orthograd_fast.kernels import ghost_gram as gg
    from orthograd_fast.kernels import tile_gram as tg

    out = []
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    # tile Gram: GPT-2-small-like layer, 32 tokens
    for dt in ((f32, bf16) if quick else (f32, bf16, f16)):
        def fn(dt=dt):
            A, D = _factors(64, 32, 768, 768, dt)
            tg.tile_gram(A, D, torch.empty(768, 768, dtype=dt))
        out.append((f"tile_gram {str(dt)[6:]}", [tg._tile_gram_kernel], fn))
    if not quick:
        def fn_atomic():
            A, D = _factors(64, 32, 768, 768, f32)
            tg.tile_gram(A, D, None, deterministic=False)
        out.append(("tile_gram B=64 fp32 atomic, no U", [tg._tile_gram_kernel], fn_atomic))
    for dt in ((f32, bf16) if quick else (f32, bf16, f16)):
        def fn(dt=dt):
            A, D = _factors(64, 1, 1024, 1024, dt)
            gg.ghost_gram(A, D)
        out.append((f"ghost_gram T=1 {str(dt)[6:]}", [gg._ghost_gram_kernel], fn))
    for dt in ((f32, bf16) if quick else (f32, bf16, f16)):
        def fn(dt=dt):
            A, D = _factors(64, 32, 768, 768, dt)
            gg.ghost_gram(A, D)
        out.append((f"ghost_gram T=32 {str(dt)[6:]}", [gg._ghost_gram_kernel], fn))
    for dt, udt in ((f32, f32), (bf16, f32)) + (() if quick else ((bf16, bf16), (f16, f16))):
        def fn(dt=dt, udt=udt):
            A, D = _factors(64, 32, 768, 768, dt)
            co.coef(A, D, torch.empty(768, 768, dtype=udt))
        out.append((f"coef A {str(dt)[6:]} U {str(udt)[6:]}", [co._coef_kernel], fn))
    for work in ((torch.float64,) if quick else (torch.float32, torch.float64)):
        def fn(work=work):
            n = 1 << 16
            Q, X = torch.empty(n, 48, dtype=work), torch.empty(n, 64, dtype=work)
            cg.cgs_step(Q, X, torch.empty(64, 64, dtype=work), torch.empty(48, 64, dtype=work))
        out.append((f"cgs_step {str(work)[6:]}", [cg._cgs_step_kernel], fn))
    if not quick:  # the other passes of blocked CGS2: first block (no Q), no transform, Y only
        def fn_first():
            X = torch.empty(1 << 16, 40, dtype=torch.float64)
            cg.cgs_step(None, X, None, None)
        out.append(("cgs_step fp64 first block", [cg._cgs_step_kernel], fn_first))

        def fn_y_only():
            Q, X = torch.empty(1 << 16, 20), torch.empty(1 << 16, 16)
            cg.cgs_step(Q, X, None, torch.empty(20, 16), want_sq=False, want_sy=False)
        out.append(("cgs_step fp32 update only", [cg._cgs_step_kernel], fn_y_only))
    return out


def run(arch: int = 90, quick: bool = False, only: Optional[Callable[[str], bool]] = None) -> List[Result]:
    results = []
    for name, kernels, fn in cases(quick):
        if only is not None and not only(name):
            continue
        with record_launches(kernels) as got:
            fn()
        if not got:
            raise RuntimeError(f"compile_check: case {name!r} launched no kernel")
        for launch in got:
            results.append(compile_launch(name, launch, arch))
    return results


def table(results: List[Result], arch: int) -> str:
    import triton

    lines = [
        f"# Triton kernels compiled for sm_{arch} (no GPU: ahead-of-time, bundled ptxas)",
        "",
        f"triton {triton.__version__}, torch {torch.__version__}; shared limit "
        f"{SHARED_LIMIT.get(arch, 0) // 1024} KiB per block; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| case | constexprs | options | shared KiB | regs | spill B | MMA / FMA in SASS | compile s | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mma = ", ".join(f"{k} {v}" for k, v in sorted(r.mma.items())) or "-"
        verdict = "ok" if not r.problems else "FAIL: " + "; ".join(r.problems + ([r.error] if r.error else []))
        lines.append(f"| {r.case} | {r.constexprs} | {r.options} | {r.shared / 1024:.1f} | {r.regs} | "
                     f"{r.stack} | {mma} | {r.seconds:.1f} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--quick", action="store_true", help="the CI subset")
    ap.add_argument("--out", default=None, help="write compile_check.md / .json here")
    ap.add_argument("-k", default=None, help="only cases whose name contains this")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        print("compile_check: unset TRITON_INTERPRET (this compiles the kernels)", file=sys.stderr)
        return 2
    results = run(args.arch, args.quick, (lambda n: args.k in n) if args.k else None)
    md = table(results, args.arch)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compile_check.md"), "w") as f:
            f.write(md)
        with open(os.path.join(args.out, "compile_check.json"), "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
