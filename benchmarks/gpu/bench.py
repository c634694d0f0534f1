"""GPU check and benchmark of the orthograd-fast Triton kernels (run through benchmarks/gpu/run.sh).

(a) every kernel against the torch reference / float64 at large shapes and all dtypes
(b) ceilings: a large bf16 matmul (TFLOP/s) and a large device copy (GB/s)
(c) each kernel timed with triton.testing.do_bench (median) against those ceilings
(d) one OrthoGrad step (triton and torch backends) vs the plain step on a GPT-2-small-shaped model
(e) a markdown table (printed last) and JSON, written to $OUT

--tiny: small shapes, for a dry run on CPU under TRITON_INTERPRET=1 (or a quick GPU smoke run).
Every part is guarded: a failure is recorded in the results and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bootstrap  # noqa: E402

HOW_IMPORTED = _bootstrap.ensure_importable()

import torch  # noqa: E402

from orthograd_fast import gram_schmidt as gs  # noqa: E402
from orthograd_fast.engine import ops_reference as ref  # noqa: E402
from orthograd_fast.engine import triton_ops  # noqa: E402

T0 = time.time()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

FULL = dict(
    # ragged B, T, I, O (one compiled kernel per dtype: the default blocks do not depend on B)
    check_tile=[(64, 128, 1024, 1024), (130, 33, 257, 129), (100, 1, 1000, 999)],
    check_ghost=[(32, 128, 768, 768), (70, 1, 513, 300), (17, 257, 64, 96)],
    check_coef=[(32, 256, 768, 3072), (5, 7, 33, 17)],
    check_cgs=(1_000_003, 64),
    matmul=8192, copy_elems=1 << 29,
    tile=(64, 512, 4096, 4096), ghost=[(32, 256, 768, 768), (256, 1, 4096, 4096)],
    coef=(32, 256, 768, 3072), cgs=(10_000_000, 64),
    e2e=dict(B=32, zoo_kw={}, local_kw={}),
    e2e_scale=dict(B=1024, zoo_kw=dict(T=32), local_kw=dict(T=32)),
    budget_s=180,  # no new section starts after this; run.sh kills the script at 230 s
)
TINY = dict(
    check_tile=[(5, 7, 33, 17)], check_ghost=[(5, 7, 33, 17)], check_coef=[(5, 7, 33, 17)],
    check_cgs=(300, 10),
    matmul=256, copy_elems=1 << 16,
    tile=(8, 16, 64, 64), ghost=[(4, 8, 32, 32)], coef=(4, 8, 32, 48), cgs=(2000, 8),
    e2e=dict(B=2, zoo_kw=dict(vocab=64, n_layer=1, d=16, heads=2, T=8),
             local_kw=dict(vocab=64, n_layer=1, d=16, heads=2, T=8)),
    e2e_scale=dict(B=6, zoo_kw=dict(vocab=64, n_layer=1, d=16, heads=2, T=4),
                   local_kw=dict(vocab=64, n_layer=1, d=16, heads=2, T=4)),
    budget_s=600,
)


# --------------------------------------------------------------------------- helpers
def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def bench_ms(fn, dev, rep_ms=200):
    """Median milliseconds: triton.testing.do_bench on CUDA, a short wall-clock loop otherwise."""
    if dev.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    fn()
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def rand(shape, dtype, dev, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=dev)


def factors(shape, dtype, dev, seed, u_dtype=torch.float32):
    B, T, I, O = shape
    return (rand((B, T, I), dtype, dev, seed), rand((B, T, O), dtype, dev, seed + 1),
            rand((O, I), u_dtype, dev, seed + 2))


def close(actual, expected, dtype, reduction_len, scale=1.0):
    """(passed, max relative error vs max|expected|, message) with the suite's tolerance rule."""
    from tolerance import assert_close

    a, e = actual.double(), expected.double()
    rel = ((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()
    try:
        assert_close(a, e, dtype=dtype, reduction_len=reduction_len, scale=scale)
        return True, rel, ""
    except AssertionError as ex:
        return False, rel, str(ex)[:300]


def guarded(results, section, fn, *a, **k):
    try:
        return fn(*a, **k)
    except Exception as ex:  # noqa: BLE001 - record and go on
        results["errors"].append({"section": section, "error": f"{type(ex).__name__}: {ex}",
                                  "trace": traceback.format_exc()[-2000:]})
        log(f"!! {section}: {type(ex).__name__}: {ex}")
        return None


def out_of_time(cfg):
    return time.time() - T0 > cfg["budget_s"]


# --------------------------------------------------------------------------- (a) checks
def check_kernels(cfg, dev, results):
    rows = results["checks"]
    acc = torch.float32  # same rounded inputs on both sides, fp32 accumulation (see tests)

    def add(kernel, shape, dt, ok, rel, msg):
        rows.append(dict(kernel=kernel, shape=str(shape), dtype=dt, passed=ok, max_rel_err=rel,
                         detail=msg))
        log(f"check {kernel:10s} {str(shape):28s} {dt:10s} {'PASS' if ok else 'FAIL'} rel={rel:.2e}")

    for shape in cfg["check_tile"]:
        B, T, I, O = shape
        for dt, dtype in DTYPES.items():
            A, D, U = factors(shape, dtype, dev, 1)
            Kr, br = ref.tile_gram_ref(A.double(), D.double(), U.double())
            for det in ((True, False) if dt == "fp32" else (True,)):  # atomics: fp32 only
                K, b = triton_ops.tile_gram(A, D, U, deterministic=det)
                ok1, r1, m1 = close(K, Kr, acc, T * T * I * O)
                ok2, r2, m2 = close(b, br, acc, T * I * O)
                add("tile_gram" + ("" if det else "[atomic]"), shape, dt, ok1 and ok2,
                    max(r1, r2), m1 or m2)
            del Kr, br
    for shape in cfg["check_ghost"]:
        B, T, I, O = shape
        for dt, dtype in DTYPES.items():
            A, D, U = factors(shape, dtype, dev, 2)
            K, b = triton_ops.ghost_gram(A, D, U)
            Kr, br = ref.tile_gram_ref(A.double(), D.double(), U.double())
            ok1, r1, m1 = close(K, Kr, acc, T * T * I * O)
            # bf16 A with fp32 U: coef splits U into two bf16 numbers (16 bits): bf16 contract
            ok2, r2, m2 = close(b, br, torch.bfloat16 if dt == "bf16" else acc, T * I * O)
            add("ghost_gram", shape, dt, ok1 and ok2, max(r1, r2), m1 or m2)
    for shape in cfg["check_coef"]:
        B, T, I, O = shape
        for dt, dtype in DTYPES.items():
            for udt in sorted({dt, "fp32"}):
                A, D, U = factors(shape, dtype, dev, 3, DTYPES[udt])
                b = triton_ops.coef(A, D, U)
                br = ref.coef_ref(A.double(), D.double(), U.double())
                tol = torch.bfloat16 if (dt, udt) == ("bf16", "fp32") else acc
                ok, r, m = close(b, br, tol, T * I * O)
                add("coef", shape, f"{dt}/U {udt}", ok, r, m)
    n, m = cfg["check_cgs"]
    for dt, dtype in list(DTYPES.items()) + [("fp64", torch.float64)]:
        G = rand((n, m), dtype, dev, 4)
        G[:, m // 2] = 2 * G[:, 1]  # one dependent column, exactly in every dtype: rank m - 1
        u = rand((n,), torch.float64 if dt == "fp64" else torch.float32, dev, 5)
        for be in ("triton", "torch"):
            Q = gs.cgs2(G, backend=be)
            orth = _orth_fro(Q)
            up = gs.project_out(G, u, backend=be)
            Gd = G.double()
            resid = ((Gd.T @ up.double()).abs() / (Gd.norm(dim=0) * u.double().norm())).max().item()
            lim = 1e-12 if dt == "fp64" else 1e-5
            ok = Q.shape[1] == m - 1 and orth < lim and resid < lim
            add(f"cgs2[{be}]", (n, m), dt, ok, max(orth, resid),
                f"rank {Q.shape[1]} (want {m - 1}), |Q^TQ-I|_F={orth:.2e}, "
                f"max|<g_i,u_perp>|/(|g_i||u|)={resid:.2e}")
            del Q, up


def _orth_fro(Q):
    I = torch.eye(Q.shape[1], dtype=torch.float64, device=Q.device)
    return (gs._gram64(Q) - I).norm().item()


# --------------------------------------------------------------------------- (b) ceilings
def ceilings(cfg, dev, results):
    n = cfg["matmul"]
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b, dev)
    tflops = 2 * n ** 3 / ms / 1e9
    x = torch.empty(cfg["copy_elems"], device=dev, dtype=torch.float32).normal_()
    y = torch.empty_like(x)
    ms_c = bench_ms(lambda: y.copy_(x), dev)
    gbs = 2 * x.numel() * 4 / ms_c / 1e6
    results["ceilings"] = dict(bf16_matmul_tflops=tflops, matmul_n=n, copy_gbs=gbs,
                               copy_bytes=x.numel() * 4)
    log(f"ceilings: bf16 matmul {n}^3 {tflops:.1f} TFLOP/s, copy {gbs:.0f} GB/s")


def _row(results, name, shape, dtype, ms, *, flops=None, bytes_=None, target=None, note=""):
    c = results.get("ceilings") or {}
    row = dict(name=name, shape=str(shape), dtype=dtype, ms=ms, note=note)
    if flops is not None:
        row["tflops"] = flops / ms / 1e9
        if c.get("bf16_matmul_tflops"):
            row["pct_of_ceiling"] = 100 * row["tflops"] / c["bf16_matmul_tflops"]
    if bytes_ is not None:
        row["gbs"] = bytes_ / ms / 1e6
        if c.get("copy_gbs"):
            row["pct_of_ceiling"] = 100 * row["gbs"] / c["copy_gbs"]
    if target:
        row["target"] = target
    results["kernels"].append(row)
    extra = f"{row.get('tflops', row.get('gbs', 0)):.1f} {'TFLOP/s' if flops else 'GB/s'}" \
        if (flops or bytes_) else ""
    log(f"time {name:28s} {str(shape):26s} {dtype:5s} {ms:9.3f} ms {extra} {note}")
    return row


# --------------------------------------------------------------------------- (c) kernel timings
def time_tile(cfg, dev, results):
    from orthograd_fast.kernels.tile_gram import tile_gram as launch

    B, T, I, O = cfg["tile"]
    A, D, U = factors(cfg["tile"], torch.bfloat16, dev, 10)
    flops = 2 * B * T * I * O + B * (B + 1) * I * O  # per-sample tiles + one triangle of G G^T
    if dev.type == "cuda":
        configs = [
            ("default", {}),
            # larger tiles compile spill-free for sm_90 too (benchmarks/gpu/compile_check.py)
            # but use 220-250 of the 255 registers; SB 32 spills 64-144 B per thread
            ("SB16 BO16 BI32", dict(block_b=16, block_o=16, block_i=32, block_t=16)),
            ("SB16 BO32 BI16", dict(block_b=16, block_o=32, block_i=16, block_t=16)),
            ("SB32 BO16 BI16", dict(block_b=32, block_o=16, block_i=16, block_t=16)),
            ("default gram tf32x3", dict(gram_precision="tf32x3")),
        ]
    else:
        configs = [("default", {})]
    Kr, _ = ref.tile_gram_ref(A[:, :, : min(I, 512)], D[:, :, : min(O, 512)])  # for a spot check
    best = None
    for name, kw in configs:
        if out_of_time(cfg):
            break
        try:
            K, b = launch(A, D, U, **kw)
            Ks, _ = launch(A[:, :, : min(I, 512)], D[:, :, : min(O, 512)], None, **kw)
            rel = ((Ks.double() - Kr.double()).abs().max() / Kr.double().abs().max()).item()
            ms = bench_ms(lambda: launch(A, D, U, **kw), dev)
        except Exception as ex:  # noqa: BLE001 - a config may not fit (registers / smem)
            results["kernels"].append(dict(name=f"tile_gram [{name}]", shape=str(cfg["tile"]),
                                           dtype="bf16", error=f"{type(ex).__name__}: {ex}"[:300]))
            log(f"tile_gram [{name}] failed: {type(ex).__name__}: {str(ex)[:200]}")
            continue
        row = _row(results, f"tile_gram [{name}]", cfg["tile"], "bf16", ms, flops=flops,
                   target=">= 60% of bf16 matmul", note=f"spot-check rel err {rel:.1e}")
        if best is None or ms < best["ms"]:
            best = row
    if best is not None:
        best["best"] = True
    # torch baseline at the same shape: materialize G (bf16 bmm) then one GEMM for G G^T
    if not out_of_time(cfg):
        def torch_tile():
            G = torch.bmm(D.transpose(1, 2), A).flatten(1)
            return G @ G.T, G @ U.to(G.dtype).flatten()
        try:
            ms = bench_ms(torch_tile, dev)
            _row(results, "torch bmm(bf16 G) + GEMM", cfg["tile"], "bf16", ms, flops=flops,
                 note=f"materializes {B * I * O * 2 / 2**30:.1f} GiB of bf16 per-sample gradients")
        except Exception as ex:  # noqa: BLE001 - e.g. out of memory
            log(f"torch tile baseline failed: {type(ex).__name__}: {str(ex)[:200]}")


def time_ghost_coef(cfg, dev, results):
    for shape in cfg["ghost"]:
        if out_of_time(cfg):
            return
        B, T, I, O = shape
        A, D, U = factors(shape, torch.bfloat16, dev, 11)
        flops = 2 * (B * T) ** 2 * (I + O)  # two token Grams (all pairs; the kernel does ~half)
        ms = bench_ms(lambda: triton_ops.ghost_gram(A, D), dev)
        _row(results, "ghost_gram", shape, "bf16", ms, flops=flops,
             note="flops counted for all (i, j) pairs")
    B, T, I, O = cfg["coef"]
    for udt in ("bf16", "fp32"):
        if out_of_time(cfg):
            return
        A, D, U = factors(cfg["coef"], torch.bfloat16, dev, 12, DTYPES[udt])
        mult = 2 if udt == "fp32" else 1  # hi/lo split: two tensor-core products
        ms = bench_ms(lambda: triton_ops.coef(A, D, U), dev)
        _row(results, f"coef (U {udt})", cfg["coef"], "bf16", ms, flops=2 * B * T * I * O,
             note="U split hi+lo: 2 products" if mult == 2 else "")
        ms_t = bench_ms(lambda: ((D @ U.to(D.dtype)) * A).float().sum(dim=(1, 2)), dev)
        _row(results, f"torch (D U) * A (U {udt}->bf16)", cfg["coef"], "bf16", ms_t,
             flops=2 * B * T * I * O, note="writes D U (B T x I) to memory")


def time_cgs(cfg, dev, results):
    n, m = cfg["cgs"]
    G = rand((n, m), torch.float32, dev, 13)
    row_qr = None
    stats = {}
    for name, fn in (("cgs2 [triton]", lambda: gs.cgs2(G, backend="triton")),
                     ("cgs2 [torch]", lambda: gs.cgs2(G, backend="torch")),
                     ("torch.linalg.qr", lambda: torch.linalg.qr(G)[0])):
        if out_of_time(cfg):
            break
        Q = fn()
        orth = _orth_fro(Q)
        del Q
        ms = bench_ms(fn, dev, rep_ms=500)
        # bytes: G read once and Q written once is the floor of any method
        row = _row(results, name, (n, m), "fp32", ms, bytes_=2 * n * m * 4,
                   note=f"|Q^TQ-I|_F={orth:.1e}", target="<= 1e-5 and >= 3x faster than qr")
        row["orth_fro"] = orth
        stats[name] = row
        if name == "torch.linalg.qr":
            row_qr = row
    if row_qr:
        for name in ("cgs2 [triton]", "cgs2 [torch]"):
            if name in stats:
                stats[name]["speedup_vs_qr"] = row_qr["ms"] / stats[name]["ms"]


# --------------------------------------------------------------------------- (d) end to end
def _model(cfg, dev, key="e2e"):
    kw = cfg[key]
    try:
        from benchmarks import zoo

        model, make_batch = zoo.build_model("gpt2", "gpu" if dev.type == "cuda" else "cpu",
                                            device=dev, **kw["zoo_kw"])
        x, y = make_batch(1, torch.Generator().manual_seed(0))
        if x.device != dev:  # a zoo batch maker that builds on the CPU
            mb0 = make_batch

            def make_batch(B, g):
                x, y = mb0(B, g)
                return x.to(dev), y.to(dev)
        return model, make_batch, zoo.per_sample_loss("gpt2"), "benchmarks.zoo gpt2"
    except Exception as ex:  # noqa: BLE001 - zoo missing or different: local GPT-2 shape
        import gpt2_shape

        log(f"benchmarks.zoo unavailable ({type(ex).__name__}: {str(ex)[:120]}); local model")
        model, make_batch = gpt2_shape.build_model(dev, **kw["local_kw"])
        return model, make_batch, gpt2_shape.per_sample_loss, "benchmarks/gpu/gpt2_shape.py"


def e2e(cfg, dev, results, key="e2e", steps=(("plain step", None), ("OrthoGrad [triton]", "triton"),
                                               ("OrthoGrad [torch]", "torch"))):
    from orthograd_fast import OrthoGrad

    model, make_batch, loss_fn, source = _model(cfg, dev, key)
    B = cfg[key]["B"]
    g = torch.Generator().manual_seed(1)
    retain, unlearn = make_batch(B, g), make_batch(B, g)
    params = [p for p in model.parameters() if p.requires_grad]
    nparam = sum(p.numel() for p in params)
    opt = torch.optim.SGD(params, lr=1e-6)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else None

    def fwd_loss(batch):
        if amp is None:
            return loss_fn(model(batch[0]), batch[1]).mean()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            return loss_fn(model(batch[0]), batch[1]).mean()

    def plain():
        opt.zero_grad(set_to_none=True)
        fwd_loss(retain).backward()
        (-fwd_loss(unlearn)).backward()
        opt.step()

    def orthograd_step(og):
        opt.zero_grad(set_to_none=True)
        with og.forget():  # unlearn first (the lighter order); cheaper coefficients on T = 1 layers
            fwd_loss(unlearn).backward()
        with og.retain():
            fwd_loss(retain).backward()
        og.project_()
        opt.step()

    shape = f"{source}, {nparam / 1e6:.1f}M params, B={B}"
    plain_ms = None
    for name, backend in steps:
        if out_of_time(cfg):
            break
        if backend == "triton" and dev.type != "cuda" and not triton_ops.kernels_interpreted():
            continue
        og = None
        try:
            if backend is None:
                fn = plain
            else:
                # one OrthoGrad at a time on the model: each owns hooks on its layers
                og = OrthoGrad(model, scope="tensor", alpha=0.0, backend=backend)
                fn = (lambda og=og: orthograd_step(og))
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            fn()
            peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
            ms = bench_ms(fn, dev, rep_ms=1000) if key == "e2e" else _few_ms(fn, dev)
        except Exception as ex:  # noqa: BLE001
            results["e2e"].append(dict(name=name, shape=shape, error=f"{type(ex).__name__}: {ex}"[:300]))
            log(f"e2e {name} failed: {type(ex).__name__}: {str(ex)[:200]}")
            continue
        finally:
            for meth in ("remove", "close", "detach"):
                f = getattr(og, meth, None) if og is not None else None
                if callable(f):
                    f()
                    break
        plain_ms = ms if backend is None else plain_ms
        row = dict(name=name, shape=shape, ms=ms, peak_gib=peak,
                   x_plain=(ms / plain_ms) if plain_ms else None)
        results["e2e"].append(row)
        xp = f"{row['x_plain']:.2f}" if row["x_plain"] else "n/a"
        log(f"e2e {name:20s} {ms:9.2f} ms/step  peak {peak:.2f} GiB  x plain {xp}")


def _few_ms(fn, dev, n=2):
    """Median of n timed steps (steps of seconds: do_bench's warm-up and estimate runs would cost
    minutes)."""
    ts = []
    for _ in range(n):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]


def e2e_scale(cfg, dev, results):
    """The GPT-2-small shape at B = 1024 (T = 32): per-sample gradients as the paper's code forms
    them would take B x 124M x 4 bytes ~ 0.5 TB. Plain and the Triton path: time and peak memory;
    an out-of-memory is recorded as the row's error."""
    e2e(cfg, dev, results, key="e2e_scale", steps=(("plain step", None), ("OrthoGrad [triton]", "triton")))


# --------------------------------------------------------------------------- (e) report
def markdown(results):
    L = [f"# orthograd-fast GPU kernels: {results['device']}", "",
         f"torch {results['torch']}, triton {results['triton']}, package import: "
         f"{results['import']}, mode: {results['mode']}, wall {results['wall_s']:.0f} s", ""]
    ch = results["checks"]
    nfail = sum(not r["passed"] for r in ch)
    L += [f"## (a) correctness: {len(ch) - nfail}/{len(ch)} pass", "",
          "| kernel | shape | dtype | pass | max rel err |", "|---|---|---|---|---|"]
    L += [f"| {r['kernel']} | {r['shape']} | {r['dtype']} | {'yes' if r['passed'] else '**NO**'} "
          f"| {r['max_rel_err']:.1e} |" for r in ch]
    c = results.get("ceilings") or {}
    if c:
        L += ["", "## (b) ceilings", "",
              f"- bf16 matmul {c['matmul_n']}^3: **{c['bf16_matmul_tflops']:.1f} TFLOP/s**",
              f"- device copy {c['copy_bytes'] / 2**30:.2f} GiB: **{c['copy_gbs']:.0f} GB/s** "
              "(read + write)"]
    L += ["", "## (c) kernels (median of do_bench)", "",
          "| kernel | shape | dtype | ms | rate | % of ceiling | note |", "|---|---|---|---|---|---|---|"]
    for r in results["kernels"]:
        if "error" in r:
            L.append(f"| {r['name']} | {r['shape']} | {r['dtype']} | failed | | | {r['error'][:80]} |")
            continue
        rate = f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else f"{r.get('gbs', 0):.0f} GB/s"
        pct = f"{r['pct_of_ceiling']:.0f}%" if "pct_of_ceiling" in r else ""
        note = r.get("note", "")
        if "speedup_vs_qr" in r:
            note += f"; {r['speedup_vs_qr']:.1f}x vs qr"
        if r.get("best"):
            note += "; best config"
        L.append(f"| {r['name']} | {r['shape']} | {r['dtype']} | {r['ms']:.3f} | {rate} | {pct} | {note} |")
    L += ["", "## (d) one unlearning step (bf16 autocast on CUDA)", "",
          "| step | model | ms/step | x plain | peak GiB |", "|---|---|---|---|---|"]
    for r in results["e2e"]:
        if "error" in r:
            L.append(f"| {r['name']} | {r['shape']} | failed: {r['error'][:80]} | | |")
            continue
        xp = f"{r['x_plain']:.2f}" if r.get("x_plain") else ""
        L.append(f"| {r['name']} | {r['shape']} | {r['ms']:.2f} | {xp} | {r['peak_gib']:.2f} |")
    if results["errors"]:
        L += ["", "## errors", ""] + [f"- {e['section']}: {e['error'][:200]}" for e in results["errors"]]
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small shapes (CPU dry run / smoke)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_out")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: "
                    "checks,ceilings,tile,ghost,cgs,e2e,e2e_scale")
    args = ap.parse_args(argv)
    cfg = TINY if args.tiny else FULL
    skip = set(filter(None, args.skip.split(",")))
    os.makedirs(args.out, exist_ok=True)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        name = torch.cuda.get_device_name()
    else:
        dev = torch.device("cpu")
        name = f"CPU ({platform.processor() or platform.machine()})"
        if not triton_ops.kernels_interpreted():
            print("no CUDA device and TRITON_INTERPRET is not 1: nothing to run the kernels on",
                  file=sys.stderr)
            return 2
    # references and baselines in true fp32: no TF32 anywhere in this run
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import triton

    results = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
               "import": HOW_IMPORTED, "mode": "tiny" if args.tiny else "full", "checks": [],
               "ceilings": None, "kernels": [], "e2e": [], "errors": []}
    steps = [("checks", check_kernels), ("ceilings", ceilings), ("tile", time_tile),
             ("ghost", time_ghost_coef), ("cgs", time_cgs), ("e2e", e2e), ("e2e_scale", e2e_scale)]

    def write():  # after every section: a run cut short by run.sh's timeout keeps what it had
        results["wall_s"] = time.time() - T0
        md = markdown(results)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(md)
        return md

    for sec, fn in steps:
        if sec in skip:
            continue
        if out_of_time(cfg) and sec != "ceilings":
            results["errors"].append({"section": sec, "error": "skipped: time budget used up"})
            continue
        log(f"== {sec}")
        guarded(results, sec, fn, cfg, dev, results)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        write()
    md = write()
    print()
    print(md)
    failed = sum(not r["passed"] for r in results["checks"])
    return 1 if (failed or results["errors"]) else 0

if __name__ == "__main__":
    sys.exit(main())
