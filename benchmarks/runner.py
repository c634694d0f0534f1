"""One benchmark case = (model, retain batch B, provider): check, memory, timing, recorded as a row.

Used by the pytest-benchmark suite (``benchmarks/test_bench_orthograd.py``, which passes a timer
wrapping ``benchmark.pedantic``) and reusable from scripts (``benchmarks/gpu/``): the timer is any
``timer(fn, rounds, warmup_rounds) -> median seconds``.

Order of work per case, on a fresh model (same seed => same weights as the oracle's):

1. carried failure: a provider that ran out of memory or time at a smaller B for this model is
   recorded the same way at larger B without running (``reason`` says at which B);
2. predicted OOM on CPU: providers that materialise B x P per-sample gradients are not started
   when ~3 B P element bytes exceed the memory cap (Linux would kill the process instead of
   raising);
3. first step of a fresh provider instance, under a SIGALRM step timeout: peak memory measured
   (``benchmarks.memory``) and the direction left in ``.grad`` compared with the float64 oracle
   (``benchmarks.oracle``, cached per (model, B)). A direction off by more than ``tol`` makes the
   row ``wrong`` and the case fails: it is not timed. The engine's own refusal
   (``UnsupportedModule`` / ``CaptureError``) is a ``refused`` row with its message, not a failure;
   the row also records the parameters on the engine's fallback, and with ``Settings.floor`` the
   FLOP floor of (model, B) (``benchmarks.floor``);
4. timing: ``rounds = clamp(case_budget / t_step, 1, max_rounds)`` (at least ``min_rounds`` when
   one step fits the budget), median reported;
5. paired ratio (cheap cases only): ``paired_rounds`` alternations (up to 3x as many when they fit
   ``case_budget``) of a plain step and a provider step on two model copies; the median of the
   per-pair ratios is robust to load changes on a shared machine, unlike two medians taken minutes
   apart (``paired_iqr``: the quartiles of the single pairs' ratios);
6. torch only, when reference-qr ran on the same (model, B) and ``paired_ref_rounds`` pairs fit
   ``paired_ref_budget``: alternating reference-qr / torch steps, ``ref_qr_paired`` = the median
   of their ratios (the >= 100x target; one reference step takes seconds, so few pairs).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from orthograd_fast.engine.threads import one_thread

from . import real_zoo, zoo
from .memory import measure_peak
from .oracle import compare, grads_as_dict, oracle_direction
from .providers import PROVIDERS, make_provider, materialized_bytes, unavailable_reason

__all__ = ["Settings", "BenchSession", "SETS", "StepTimeout", "mem_available_bytes", "machine_info", "machine_info_end", "host_probe", "steal_share"]

ALL_MODELS = list(zoo.MODEL_NAMES)
REAL_MODELS = list(real_zoo.MODEL_NAMES)
ZOOS = {"zoo": zoo, "real_zoo": real_zoo}  # Settings.zoo -> the module building the models
ALL_PROVIDERS = list(PROVIDERS)  # plain first: the others' ratios use its median


MATERIALIZING = ("reference-qr", "reference-svd", "opacus")


def _sweep(models, batches, providers=None):
    """Cases (model, B, providers or None = every selected provider)."""
    return [(m, B, None if providers is None else tuple(providers)) for m in models for B in batches]


CHEAP = ("plain", "torch", "triton")
# Seconds the oracle through the batched forward may take (B backward passes of the whole batch);
# it only runs to diagnose a failed check.
BATCHED_ORACLE_BUDGET = 120.0

# The sets. "cases": (model, B, providers-or-None); providers run in PROVIDERS order, plain first.
SETS: Dict[str, dict] = {
    # 2 CPU cores, < 5 minutes. The three target models: every provider at B=8; plain, torch,
    # reference-qr and opacus at the target B=64; plain and torch at 128. The rest of the zoo
    # (small configs): every provider at B=8, plain and torch at 32. The per-sample-gradient
    # providers at larger B are what cpu-full is for (seconds to minutes per step).
    "cpu-quick": dict(
        device="cpu",
        size="cpu",
        cases=_sweep(["mlp", "cnn", "transformer"], [8])
        + _sweep(["mlp", "cnn", "transformer"], [64], CHEAP + ("reference-qr", "opacus"))
        + _sweep(["mlp", "cnn", "transformer"], [128], CHEAP)
        + _sweep(["resnet18", "vit_tiny", "gpt2", "whisper_tiny"], [8])
        + _sweep(["resnet18", "vit_tiny", "gpt2", "whisper_tiny"], [32], CHEAP),
        step_timeout=20.0,
        # at least 5 timed rounds and a paired ratio for the slowest target (transformer B=64),
        # while the set stays under 5 minutes
        case_budget=1.5,
        min_rounds=5,
        max_rounds=25,
        paired_rounds=9,
        paired_budget=10.0,
    ),
    # The full sweep on CPU (long: the per-sample-gradient providers take minutes per step
    # before they time out).
    "cpu-full": dict(
        device="cpu",
        size="cpu",
        cases=_sweep(ALL_MODELS, [8, 32, 128, 512, 1024]),
        step_timeout=60.0,
        case_budget=3.0,
        max_rounds=50,
        paired_rounds=9,
        paired_budget=10.0,
    ),
    # The real-model zoo (benchmarks/real_zoo.py) in the API contract's order (retain block
    # first, unlearn backward after, no forget()) against plain, B = 32 retain / 16 unlearn, with
    # the FLOP floor (benchmarks/floor.py). Refused models are recorded as "refused" rows.
    "real-cpu": dict(
        device="cpu",
        size="cpu",
        zoo="real_zoo",
        cases=_sweep(REAL_MODELS, [32], ("plain", "torch-contract")),
        unlearn_batch=16,
        floor=True,
        step_timeout=30.0,
        case_budget=3.0,
        min_rounds=5,
        max_rounds=25,
        # 31 pairs: single pairs spread widely on a shared 2-core machine (TransformerEncoder,
        # 40 pairs: IQR 1.10x-1.35x), which gave the median of ~11 pairs a 90% range of
        # about +-0.09x; 31 pairs narrow it to about +-0.05x (all 12 models: ~6 min)
        paired_rounds=31,
        paired_budget=40.0,
    ),
    "real-gpu": dict(
        device="cuda",
        size="gpu",
        zoo="real_zoo",
        cases=_sweep(REAL_MODELS, [32], ("plain", "torch-contract")),
        unlearn_batch=16,
        floor=True,
        step_timeout=30.0,
        case_budget=1.0,
        max_rounds=50,
        paired_rounds=11,
        paired_budget=5.0,
    ),
    # What benchmarks/gpu runs: full-size models on one CUDA device.
    "gpu": dict(
        device="cuda",
        size="gpu",
        cases=_sweep(ALL_MODELS, [8, 32, 128, 512, 1024]),
        step_timeout=30.0,
        case_budget=1.0,
        max_rounds=50,
        paired_rounds=11,
        paired_budget=3.0,
    ),
}


def set_cases(settings: "Settings") -> List[Tuple[str, int, str]]:
    """(model, B, provider) in run order: per (model, B) plain first, then the others."""
    out = []
    for case in settings.cases:
        model, B = case[0], case[1]
        allowed = case[2] if len(case) > 2 and case[2] is not None else None
        for p in settings.providers:
            if allowed is None or p in allowed:
                out.append((model, B, p))
    return out



def parse_overrides(specs) -> Dict[str, dict]:
    """``["model:key=value,key=value", ...]`` -> {model: {key: value}} (ints, floats, true/false/none
    parsed, anything else kept as a string)."""
    out: Dict[str, dict] = {}
    for spec in specs:
        model, _, kvs = spec.partition(":")
        for kv in kvs.split(","):
            k, _, v = kv.partition("=")
            out.setdefault(model, {})[k] = _parse_value(v)
    return out


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


@dataclass
class Settings:
    set_name: str = "cpu-quick"
    device: str = "cpu"
    size: str = "cpu"
    cases: List[tuple] = field(default_factory=list)  # (model, B) or (model, B, providers)
    providers: List[str] = field(default_factory=lambda: list(ALL_PROVIDERS))
    alpha: float = 0.0
    scope: str = "tensor"
    unlearn_batch: Optional[int] = None  # None: same as the retain batch B
    tol: float = 1e-3
    step_timeout: float = 20.0
    case_budget: float = 1.0
    max_rounds: int = 25
    min_rounds: int = 3
    paired_rounds: int = 9
    paired_budget: float = 3.0
    paired_providers: Tuple[str, ...] = ("torch", "torch-contract", "triton")
    # torch against reference-qr, alternating steps (the >= 100x target): rounds within a budget
    paired_ref_rounds: int = 3
    paired_ref_budget: float = 20.0
    mem_cap_bytes: Optional[int] = None  # None: 70% of available memory at start (CPU) / device total
    oracle_max_bytes: Optional[int] = None  # None: 30% of available memory
    overrides: Dict[str, dict] = field(default_factory=dict)  # per-model zoo config overrides
    seed: int = 0
    zoo: str = "zoo"  # "zoo" (benchmarks/zoo.py) or "real_zoo" (benchmarks/real_zoo.py)
    floor: bool = False  # compute the FLOP floor per (model, B) (benchmarks/floor.py)

    @classmethod
    def from_set(cls, name: str, **kw) -> "Settings":
        if name not in SETS:
            raise KeyError(f"unknown set {name!r}; known: {sorted(SETS)}")
        base = dict(SETS[name])
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(set_name=name, **base)


class StepTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: Optional[float]):
    """Raise StepTimeout in the main thread after ``seconds`` (between Python bytecodes: a single
    long torch op finishes first). No-op off the main thread or without SIGALRM."""
    usable = seconds and hasattr(signal, "setitimer") and _is_main_thread()
    if not usable:
        yield
        return

    def handler(signum, frame):
        raise StepTimeout(f"step exceeded {seconds:g} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _is_main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()


def mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _cpu_family_model() -> Optional[str]:
    """'family F model M' from /proc/cpuinfo (hosts sold under one name differ: an AMD EPYC guest
    may be Zen 3 or Zen 4, whose AVX-512 speeds up the plain step's GEMMs more than ours)."""
    fam = mod = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu family"):
                    fam = line.split(":", 1)[1].strip()
                elif line.startswith("model") and not line.startswith("model name"):
                    mod = line.split(":", 1)[1].strip()
                if fam is not None and mod is not None:
                    return f"family {fam} model {mod}"
    except OSError:
        pass
    return None


def host_probe() -> dict:
    """The host's speed now (~0.5 s): a float32 512 x 512 GEMM's GFLOP/s on one thread and on
    torch's threads, a 64 MiB copy's GB/s (read + write) on one thread, best of a few, and the
    CPU time counters of /proc/stat (Linux) for :func:`steal_share`. Taken at a run's start and
    end: a shared machine's slow spells (other guests' work) show here, beside ratios that pairing
    keeps comparable."""
    a = torch.randn(512, 512)
    src = torch.empty(16 << 20)
    dst = torch.empty_like(src)
    a @ a
    gemm_all = min(_seconds(lambda: a @ a) for _ in range(20))
    # (the engine's per-thread setting: torch.set_num_threads would also clear oneDNN's cache)
    with one_thread(True):
        a @ a
        dst.copy_(src)
        gemm = min(_seconds(lambda: a @ a) for _ in range(20))
        copy = min(_seconds(lambda: dst.copy_(src)) for _ in range(5))
    flops = 2 * 512**3 / 1e9
    return {"sgemm_gflops": round(flops / gemm, 1), "sgemm_gflops_all_threads": round(flops / gemm_all, 1),
            "copy_gbs": round(2 * src.numel() * 4 / copy / 1e9, 1), "cpu_ticks": _cpu_ticks()}


def _cpu_ticks() -> Optional[list]:
    """The aggregate ``cpu`` line of /proc/stat (user nice system idle iowait irq softirq steal
    ...), None where there is none."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def steal_share(start: dict, end: dict) -> Optional[float]:
    """The share of CPU time the hypervisor gave other guests between two probes (steal / all
    ticks), None without the counters."""
    t0, t1 = start.get("cpu_ticks"), end.get("cpu_ticks")
    if not t0 or not t1 or len(t0) < 8 or len(t1) < 8:
        return None
    total = sum(t1[:8]) - sum(t0[:8])
    return (t1[7] - t0[7]) / total if total > 0 else None


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def machine_info_end(start: dict) -> dict:
    """:func:`machine_info` taken at a run's start, with what is read again at its end: the load
    average and, where the start had one, the host probe."""
    info = dict(start)
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if "host_probe_start" in info:
        info["host_probe_end"] = host_probe()
    return info


def machine_info(device: str = "cpu") -> dict:
    import platform

    info = {
        "cpu_model": _cpu_model(),
        "cpu_family_model": _cpu_family_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the SIMD level torch's kernels use
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mem_total_gib": round(_meminfo("MemTotal") / 2**30, 1),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device == "cpu":
        info["host_probe_start"] = host_probe()
    info["orthograd_fast_src_sha1"] = _source_hash()
    try:
        import opacus

        info["opacus_version"] = opacus.__version__
    except Exception:  # noqa: BLE001
        info["opacus_version"] = None
    if device == "cuda" and torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
        info["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


def _source_hash() -> Optional[str]:
    """sha1 of the package's source files (the measured code, even with uncommitted changes)."""
    import hashlib

    try:
        import orthograd_fast
    except Exception:  # noqa: BLE001
        return None
    roots = [os.path.dirname(orthograd_fast.__file__)]
    kernels = os.path.join(os.path.dirname(roots[0]), "kernels")
    if os.path.isdir(kernels):
        roots.append(kernels)
    h = hashlib.sha1()
    for root in roots:
        for dirpath, _, files in sorted(os.walk(root)):
            for f in sorted(files):
                if f.endswith(".py"):
                    with open(os.path.join(dirpath, f), "rb") as fh:
                        h.update(f.encode() + b"\0" + fh.read())
    return h.hexdigest()[:12]


def _meminfo(key: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e)
    return "out of memory" in msg.lower() or "can't allocate memory" in msg or "not enough memory" in msg.lower()


def _refusals() -> tuple:
    try:
        from orthograd_fast.errors import CaptureError, UnsupportedModule
    except Exception:  # noqa: BLE001
        return ()
    return (CaptureError, UnsupportedModule)


REFUSALS = _refusals()


def fallback_stats(og, model) -> dict:
    """Parameters on the engine's torch.func fallback, from ``og.stats["fallback"]`` (one entry per
    module and op set; a module listed under several op sets counts once)."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_module: Dict[str, int] = {}
    for scope in og.stats["fallback"]:
        per_module[scope["module"]] = max(per_module.get(scope["module"], 0), int(scope["params"]))
    n = sum(per_module.values())
    return {"fallback_params": n, "fallback_share": n / total if total else None, "fallback_modules": sorted(per_module)}


class CaseFailed(Exception):
    """The case is recorded; the test should fail (error / wrong direction)."""


class CaseSkipped(Exception):
    """The case is recorded (OOM / timeout / unavailable); the test should be skipped."""


class BenchSession:
    def __init__(self, settings: Settings):
        self.s = settings
        self.device = torch.device(settings.device)
        self.rows: List[dict] = []
        self._oracles: Dict[Tuple[str, int], object] = {}
        self._carried: Dict[Tuple[str, str], Tuple[str, int, str]] = {}
        self._first_step: Dict[Tuple[str, str], Tuple[int, float]] = {}  # (model, provider) -> (B, s)
        self._oracles_same: Dict[Tuple[str, int, bool], object] = {}
        self._plain_median: Dict[Tuple[str, int], float] = {}
        self._ref_median: Dict[Tuple[str, int], float] = {}  # reference-qr, for the torch case's pairs
        self._floors: Dict[Tuple[str, int], object] = {}  # (model, B) -> floor dict or the exception
        if settings.zoo not in ZOOS:
            raise KeyError(f"Settings(zoo={settings.zoo!r}): use one of {sorted(ZOOS)}")
        self.zoo = ZOOS[settings.zoo]
        self.machine = machine_info(settings.device)
        avail = mem_available_bytes()
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            self.mem_cap = settings.mem_cap_bytes or int(0.9 * total)
            self.oracle_max_bytes = settings.oracle_max_bytes or int(0.3 * total)
        else:
            self.mem_cap = settings.mem_cap_bytes or int(0.7 * avail)
            self.oracle_max_bytes = settings.oracle_max_bytes or int(0.3 * avail)

    # ------------------------------------------------------------------ helpers
    def build(self, name: str):
        return self.zoo.build_model(name, self.s.size, seed=self.s.seed, device=self.device, **self.s.overrides.get(name, {}))

    def batches(self, name: str, B: int, make_batch):
        Bu = self.s.unlearn_batch or B
        retain = make_batch(B, torch.Generator().manual_seed(10_000 + B))
        unlearn = make_batch(Bu, torch.Generator().manual_seed(20_000 + Bu))
        return retain, unlearn

    def oracle(self, name: str, B: int, model, loss_fn, retain, unlearn):
        key = (name, B)
        if key not in self._oracles:
            try:
                self._oracles[key] = oracle_direction(
                    model, loss_fn, retain, unlearn, scope=self.s.scope, alpha=self.s.alpha, max_bytes=self.oracle_max_bytes
                )
            except Exception as e:  # noqa: BLE001
                self._oracles[key] = e
            self._free()
        return self._oracles[key]

    def oracle_same_precision(self, name, B, model, loss_fn, retain, unlearn, names, batched=False):
        """The oracle with its per-sample loop in the model's own dtype (float32), projection in
        float64: tells a ReLU-kink flip (a sample's gradient that changes between float32 and
        float64 evaluation of the same weights) from a wrong projection. ``batched``: per-sample
        gradients through one forward of the whole batch (the providers' own rounding), for a ReLU
        input within rounding of zero that switches between the batched and the one-sample
        evaluation."""
        key = (name, B, batched)
        if key not in self._oracles_same:
            dt = next(model.parameters()).dtype
            try:
                self._oracles_same[key] = oracle_direction(
                    model, loss_fn, retain, unlearn, scope=self.s.scope, alpha=self.s.alpha, names=names, loop_dtype=dt,
                    batched=batched,
                )
            except Exception as e:  # noqa: BLE001
                self._oracles_same[key] = e
            self._free()
        return self._oracles_same[key]

    def _diagnose(self, chk, direction, name, B, loss_fn, retain, unlearn, names, provider, qr):
        """A failed check against the float64 one-sample oracle, diagnosed: the float32 one-sample
        oracle (a ReLU kink between float32 and float64), then, within BATCHED_ORACLE_BUDGET seconds
        (B backward passes of the whole batch, estimated from plain's first step), the oracle
        through the batched forward. The first one the provider matches makes the check pass,
        naming the kink; otherwise the failure says what each found."""
        s = self.s
        ref = lambda o: o.negrad() if provider == "plain" else o  # noqa: E731
        plain = self._first_step.get((name, "plain"))
        budget_ok = plain is not None and plain[0] == B and B * plain[1] / 2 <= BATCHED_ORACLE_BUDGET
        for batched, what, why in (
            (False, "the float32-loop oracle", "per-sample gradients change between float32 and float64 evaluation (ReLU kink)"),
            (True, "the oracle through the batched forward", "a ReLU input within rounding of zero switches between the batched and the one-sample evaluation"),
        ):
            if batched and not budget_ok:
                chk.message += f"; {what} was not run ({'over its time budget' if plain is not None else 'no plain step time to bound it'})"
                break
            fresh, _ = self.build(name)  # ``model`` has taken the provider's step
            other = self.oracle_same_precision(name, B, fresh, loss_fn, retain, unlearn, names, batched=batched)
            del fresh
            if isinstance(other, Exception):
                # say so: otherwise a kink flip and a wrong projection read the same
                chk.message += f"; {what} did not run ({type(other).__name__}: {str(other)[:120]})"
                continue
            chk2 = compare(direction, ref(other), tol=s.tol, qr_semantics=qr)
            if chk2.ok:
                chk2.message += f"; the float64 oracle differs by {chk.max_err:.1e} at {chk.worst}: {why}"
                return chk2, chk.max_err
            chk.message += f"; {what} disagrees too: {chk2.message}"
        return chk, None

    def floor(self, name, B, model, loss_fn, retain, unlearn) -> dict:
        """The FLOP floor of (model, B) (cached; an error is recorded in the dict, not raised)."""
        key = (name, B)
        if key not in self._floors:
            from .floor import flop_floor

            try:
                self._floors[key] = flop_floor(model, loss_fn, retain, unlearn).as_dict()
            except Exception as e:  # noqa: BLE001
                self._floors[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            self._free()
        return self._floors[key]

    def _free(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ one case
    def run_case(self, name: str, B: int, provider: str, timer: Callable) -> dict:
        s = self.s
        row = dict(
            model=name, size=s.size, B=B, B_unlearn=s.unlearn_batch or B, provider=provider, device=str(self.device),
            alpha=s.alpha, scope=s.scope, status="running", reason="", median_s=None, rounds=0, peak_mem_bytes=None,
            mem_method=None, check=None, ratio_to_plain=None, paired_ratio=None, n_params=None,
            loadavg=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        )
        self.rows.append(row)
        try:
            self._run(row, name, B, provider, timer)
        except (CaseFailed, CaseSkipped):
            raise
        except Exception as e:  # noqa: BLE001
            row["status"] = "error"
            row["reason"] = f"{type(e).__name__}: {e}"[:500]
            row["traceback"] = traceback.format_exc()[-3000:]
            raise CaseFailed(row["reason"]) from e
        finally:
            self._free()
        return row

    def _record_limit(self, row, status, reason, name, provider, B):
        row["status"], row["reason"] = status, reason
        self._carried.setdefault((name, provider), (status, B, reason))
        raise CaseSkipped(f"{status}: {reason}")

    def _run(self, row, name, B, provider, timer):
        s = self.s
        carried = self._carried.get((name, provider))
        if carried is not None and carried[1] < B:
            row["status"], row["reason"] = carried[0], f"as at B={carried[1]} ({carried[2]})"
            raise CaseSkipped(row["reason"])
        prev = self._first_step.get((name, provider))
        if prev is not None and prev[0] < B and prev[1] * B / prev[0] > s.step_timeout:
            # step cost grows at least linearly in B: a lower bound already over the limit
            self._record_limit(
                row, "timeout", f"predicted: {prev[1]:.2g} s at B={prev[0]} x {B / prev[0]:g} > {s.step_timeout:g} s", name, provider, B
            )

        model, make_batch = self.build(name)
        row["n_params"] = self.zoo.count_params(model)
        why = unavailable_reason(provider, self.device, model)
        if why:
            row["status"], row["reason"] = "skipped", why
            raise CaseSkipped(why)
        need = materialized_bytes(provider, model, B)
        if self.device.type == "cpu" and need > self.mem_cap:
            self._record_limit(row, "OOM", f"predicted: ~{need / 2**30:.1f} GiB of per-sample gradients > cap {self.mem_cap / 2**30:.1f} GiB", name, provider, B)

        loss_fn = self.zoo.per_sample_loss(name)
        retain, unlearn = self.batches(name, B, make_batch)
        if s.floor:
            row["floor"] = self.floor(name, B, model, loss_fn, retain, unlearn)
        orc = self.oracle(name, B, model, loss_fn, retain, unlearn)

        # 3. first step of a fresh instance: memory + direction check
        prov = None
        try:
            prov = make_provider(provider, model, loss_fn, alpha=s.alpha, scope=s.scope)
            t = time.perf_counter()
            with time_limit(s.step_timeout):
                peak, method = measure_peak(lambda: prov.step(retain, unlearn), self.device, model, [*retain, *unlearn])
            kept = getattr(getattr(prov, "og", None), "row_buffer_bytes", 0)
            if kept and self.device.type == "cpu":  # allocated on the prefetch's thread: unseen by the profiler
                peak, method = peak + kept, method + " + the prefetch's row buffers"
            t_first = time.perf_counter() - t
            self._first_step[(name, provider)] = (B, t_first)
            row["peak_mem_bytes"], row["mem_method"] = peak, method
            direction = grads_as_dict(model)
            if getattr(prov, "og", None) is not None:
                row.update(fallback_stats(prov.og, model))
        except StepTimeout as e:
            self._record_limit(row, "timeout", f"first step > {s.step_timeout:g} s ({e})", name, provider, B)
        except REFUSALS as e:
            # the engine's own refusal (unsupported module, layout): a row, not a crash
            row["status"], row["reason"] = "refused", f"refused: {type(e).__name__}: {e}"[:500]
            raise CaseSkipped(row["reason"]) from None
        except Exception as e:  # noqa: BLE001
            if _is_oom(e):
                prov = None
                self._record_limit(row, "OOM", f"{type(e).__name__}: {str(e)[:200]}", name, provider, B)
            raise

        if isinstance(orc, Exception):
            row["check"] = {"ok": None, "message": f"unchecked: oracle failed ({type(orc).__name__}: {str(orc)[:200]})"}
        else:
            qr = PROVIDERS[provider].qr_semantics
            ref = orc.negrad() if provider == "plain" else orc
            chk = compare(direction, ref, tol=s.tol, qr_semantics=qr)
            row["check"] = chk.as_dict()
            if not chk.ok:
                chk, f64_err = self._diagnose(chk, direction, name, B, loss_fn, retain, unlearn, orc.checked, provider, qr)
                row["check"] = chk.as_dict() if f64_err is None else dict(chk.as_dict(), f64_max_err=f64_err)
            if not chk.ok:
                row["status"], row["reason"] = "wrong", chk.message
                raise CaseFailed(f"{provider} disagrees with the float64 oracle on {name} B={B}: {chk.message}")
        del direction

        # 4. timing
        def step():
            prov.step(retain, unlearn)
            self._sync()

        try:
            if t_first <= s.case_budget:
                with time_limit(s.step_timeout):
                    t = time.perf_counter()
                    step()
                    t0 = time.perf_counter() - t
            else:
                t0 = t_first
            rounds = int(max(1, min(s.max_rounds, s.case_budget // max(t0, 1e-9))))
            if t0 <= s.case_budget:
                rounds = max(rounds, s.min_rounds)
            with time_limit(max(s.step_timeout, 3 * rounds * t0 + 10)):
                median = timer(step, rounds, 1 if t0 < 0.05 else 0)
        except StepTimeout as e:
            self._record_limit(row, "timeout", str(e), name, provider, B)
        except Exception as e:  # noqa: BLE001
            if _is_oom(e):
                self._record_limit(row, "OOM", f"{type(e).__name__}: {str(e)[:200]}", name, provider, B)
            raise
        row["median_s"], row["rounds"], row["status"] = median, rounds, "ok"
        if provider == "plain":
            self._plain_median[(name, B)] = median
        elif (name, B) in self._plain_median:
            row["ratio_to_plain"] = median / self._plain_median[(name, B)]

        # 5. paired ratio to plain (alternating steps on two model copies)
        if provider in s.paired_providers and "plain" in s.providers and s.paired_rounds > 0:
            t_plain = self._plain_median.get((name, B))
            if t_plain is not None and s.paired_rounds * (t0 + t_plain) <= s.paired_budget:
                pmodel, _ = self.build(name)
                plain = make_provider("plain", pmodel, loss_fn, alpha=s.alpha, scope=s.scope)
                ratios = []

                def timed(fn):
                    t = time.perf_counter()
                    fn()
                    self._sync()
                    return time.perf_counter() - t

                timed(lambda: plain.step(retain, unlearn))
                # cheap steps: more pairs, up to 3x, within the case budget (the noise is per pair)
                pairs = max(s.paired_rounds, min(3 * s.paired_rounds, int(s.case_budget // max(t0 + t_plain, 1e-9))))
                for _ in range(pairs):
                    tp = timed(lambda: plain.step(retain, unlearn))
                    tq = timed(lambda: prov.step(retain, unlearn))
                    ratios.append(tq / tp)
                row["paired_ratio"] = statistics.median(ratios)
                row["paired_rounds"] = pairs
                if pairs >= 4:  # the spread of single pairs (how far one pair may be off)
                    q = statistics.quantiles(ratios, n=4)
                    row["paired_iqr"] = [q[0], q[2]]
                plain.close()

        # 6. torch paired with reference-qr (which runs first: PROVIDERS order), like 5
        if provider == "reference-qr":
            self._ref_median[(name, B)] = median
        t_ref = self._ref_median.get((name, B))
        if provider == "torch" and t_ref is not None and s.paired_ref_rounds > 0 and s.paired_ref_rounds * (t0 + t_ref) <= s.paired_ref_budget:
            rmodel, _ = self.build(name)
            ref = make_provider("reference-qr", rmodel, loss_fn, alpha=s.alpha, scope=s.scope)
            ratios = []
            for _ in range(s.paired_ref_rounds):
                t = time.perf_counter()
                ref.step(retain, unlearn)
                self._sync()
                tq = time.perf_counter() - t
                t = time.perf_counter()
                prov.step(retain, unlearn)
                self._sync()
                ratios.append(tq / (time.perf_counter() - t))
            row["ref_qr_paired"] = statistics.median(ratios)
            row["ref_qr_paired_rounds"] = s.paired_ref_rounds
            ref.close()
        prov.close()
        row["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        return row
