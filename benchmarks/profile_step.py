"""Where does an OrthoGrad step spend its time? Phase timings against plain, per-tensor Gram costs,
and a cProfile of the core's functions. Diagnostic tool, not part of the timed suite.

    python -m benchmarks.profile_step mlp --B 64 [--steps 15] [--size cpu] [--device cpu]
    python -m benchmarks.profile_step hf_convnext --B 32 --Bu 16 --order contract   # real zoo
    python -m benchmarks.profile_step hf_bert --B 32 --Bu 16 --order contract --schedule

``--order forget`` (default): unlearn pass first inside ``og.forget()``; ``--order contract``: the
API contract's order (retain block first, then the unlearn backward, no ``og.forget()``).

Phases are timed with ``time.perf_counter`` on alternating plain / OrthoGrad steps (medians, ms):
retain fwd+bwd (for OrthoGrad: inside ``og.retain()``, hooks and exit included), unlearn fwd+bwd (inside ``og.forget()``,
run before the retain pass on the OrthoGrad side),
``project_()``, ``opt.step()``. The per-tensor table wraps ``PerSampleGrads.gram_coef`` / ``apply_``
of ``orthograd_fast.engine.gram`` at run time (the package is not modified) to attribute the projection
to tensors and routes (explicit / tile / ghost / tokens / lookup / conv). On the CPU the terms run
side by side on Python threads (``orthograd_fast.engine.threads``): the per-tensor times are then each
term's own time on its thread, and their sum exceeds ``project_``'s wall time; cProfile sees the
main thread only. ``--schedule`` adds one projection's jobs as they ran, thread by thread, with
each thread's idle time between the first and the last job (where a misjudged cost leaves one
thread waiting on another).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from collections import defaultdict

import torch

from . import real_zoo, zoo


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=zoo.MODEL_NAMES + real_zoo.MODEL_NAMES)
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--Bu", type=int, default=None, help="unlearn batch (default: B)")
    ap.add_argument("--order", choices=("forget", "contract"), default="forget")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--size", default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--scope", default="tensor")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--schedule", action="store_true", help="also print one projection's jobs per thread (start, end, idle)")
    args = ap.parse_args(argv)

    from orthograd_fast import OrthoGrad
    from orthograd_fast.engine import gram as _gram

    dev = torch.device(args.device)
    Z = real_zoo if args.model in real_zoo.MODEL_NAMES else zoo
    loss_fn = Z.per_sample_loss(args.model)
    m_plain, mb = Z.build_model(args.model, args.size, device=dev)
    m_og, _ = Z.build_model(args.model, args.size, device=dev)
    g = torch.Generator().manual_seed(0)
    (xr, yr), (xu, yu) = mb(args.B, g), mb(args.Bu or args.B, g)
    opt_p = torch.optim.SGD(m_plain.parameters(), lr=1e-4)
    opt_o = torch.optim.SGD(m_og.parameters(), lr=1e-4)
    og = OrthoGrad(m_og, scope=args.scope, alpha=0.0, backend=args.backend)

    def timed(fn):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        return (time.perf_counter() - t) * 1e3

    def plain_step(ph):
        opt_p.zero_grad(set_to_none=True)
        ph["retain fwd+bwd"].append(timed(lambda: (0.0 * loss_fn(m_plain(xr), yr).mean()).backward()))
        ph["unlearn fwd+bwd"].append(timed(lambda: (-loss_fn(m_plain(xu), yu).mean()).backward()))
        ph["opt.step"].append(timed(opt_p.step))

    def og_retain():
        with og.retain():
            loss_fn(m_og(xr), yr).mean().backward()

    def og_unlearn():
        if args.order == "contract":
            loss_fn(m_og(xu), yu).mean().backward()
            return
        with og.forget():
            loss_fn(m_og(xu), yu).mean().backward()

    def og_step(ph):
        opt_o.zero_grad(set_to_none=True)
        if args.order == "contract":
            ph["retain fwd+bwd"].append(timed(og_retain))
            ph["unlearn fwd+bwd"].append(timed(og_unlearn))
        else:
            ph["unlearn fwd+bwd"].append(timed(og_unlearn))  # unlearn first: the lighter order
            ph["retain fwd+bwd"].append(timed(og_retain))
        ph["project_"].append(timed(og.project_))
        ph["opt.step"].append(timed(opt_o.step))

    warm = defaultdict(list)
    for _ in range(2):
        plain_step(warm)
        og_step(warm)
    P, O, tot = defaultdict(list), defaultdict(list), defaultdict(list)
    for _ in range(args.steps):
        tot["plain"].append(timed(lambda: plain_step(P)))
        tot["orthograd"].append(timed(lambda: og_step(O)))
    med = lambda xs: statistics.median(xs) if xs else 0.0  # noqa: E731
    print(f"# {args.model} (size {args.size}) B={args.B} Bu={args.Bu or args.B} order {args.order} on {dev}, torch threads {torch.get_num_threads()}, {args.steps} steps, medians in ms\n")
    print("| phase | plain | orthograd | extra |\n|---|---|---|---|")
    for k in ["retain fwd+bwd", "unlearn fwd+bwd", "project_", "opt.step"]:
        print(f"| {k} | {med(P[k]):.2f} | {med(O[k]):.2f} | {med(O[k]) - med(P[k]):+.2f} |")
    ratios = [o / p for o, p in zip(tot["orthograd"], tot["plain"])]
    print(f"| **step** | {med(tot['plain']):.2f} | {med(tot['orthograd']):.2f} | paired ratio {med(ratios):.2f}x |\n")

    # per-tensor attribution of the projection
    per = defaultdict(lambda: [0.0, 0.0, 0, ""])
    orig_gc, orig_ap = _gram.PerSampleGrads.gram_coef, _gram.PerSampleGrads.apply_

    # pass every argument through: the wrappers must not pin the core's signatures
    def gc_w(self, *a, **kw):
        t = time.perf_counter()
        r = orig_gc(self, *a, **kw)
        _sync(dev)
        e = per[self.name]
        e[0] += time.perf_counter() - t
        e[2] += 1
        e[3] = f"{self.mode} numel={self.numel}" + ("" if self.use is None else f" A={tuple(self.use.A.shape)} D={tuple(self.use.D.shape) if self.use.D is not None else None}")
        return r

    def ap_w(self, *a, **kw):
        t = time.perf_counter()
        r = orig_ap(self, *a, **kw)
        _sync(dev)
        per[self.name][1] += time.perf_counter() - t
        return r

    _gram.PerSampleGrads.gram_coef, _gram.PerSampleGrads.apply_ = gc_w, ap_w
    try:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.steps):
            og_step(defaultdict(list))
        pr.disable()
    finally:
        _gram.PerSampleGrads.gram_coef, _gram.PerSampleGrads.apply_ = orig_gc, orig_ap
    n = args.steps
    print("| tensor | route | gram_coef ms/step | apply_ ms/step |\n|---|---|---|---|")
    for name, (tg, ta, _, desc) in sorted(per.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
        print(f"| {name} | {desc} | {tg / n * 1e3:.2f} | {ta / n * 1e3:.2f} |")
    print(f"| **sum** | | {sum(v[0] for v in per.values()) / n * 1e3:.2f} | {sum(v[1] for v in per.values()) / n * 1e3:.2f} |\n")

    if args.schedule:
        _print_schedule(og_step, _gram)

    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats("cumulative").print_stats(r"orthograd_fast", args.top)
    print("cProfile of the OrthoGrad steps (cumulative, all steps together; includes the wrappers above):\n")
    print("```")
    print(s.getvalue().strip())
    print("```")


def _group_label(g) -> str:
    """A group of explicit terms in the schedule: its member's name when it has one member."""
    return f"{g.terms[0].name} (explicit)" if len(g.ks) == 1 else f"group of {len(g.ks)} explicit"


def _print_schedule(og_step, _gram) -> None:
    """One more OrthoGrad step with the projection's jobs timed on the thread that ran them: each
    term's Gram and coefficients (and, for held rows, its whole projection) and each explicit
    group's, then how long each thread sat idle between the first job's start and the last job's
    end (a term whose cost the spread misjudged shows as one thread's tail)."""
    import threading

    from orthograd_fast.engine import threads as _threads
    from orthograd_fast.engine.routes.explicit import ExplicitGroup

    log = []

    def timed_method(cls, name, label):
        orig = getattr(cls, name)

        def w(self, *a, **kw):
            t = time.perf_counter()
            try:
                return orig(self, *a, **kw)
            finally:
                log.append((threading.current_thread().name, t, time.perf_counter(), label(self)))

        setattr(cls, name, w)
        return orig

    P = _gram.PerSampleGrads
    saved = [
        (P, "gram_coef", timed_method(P, "gram_coef", lambda t: f"{t.name} ({t.mode})")),
        (P, "project_held_", timed_method(P, "project_held_", lambda t: f"{t.name} (held passes)")),
        (ExplicitGroup, "gram_coef", timed_method(ExplicitGroup, "gram_coef", _group_label)),
    ]
    # every item of every side-by-side map too (a term that runs alone spreads its column blocks
    # over the threads): counted in the threads' busy time, not listed
    parts = []
    orig_map = _threads.map_balanced

    def map_w(fn, items, cost, threads):
        def timed(x):
            t = time.perf_counter()
            try:
                return fn(x)
            finally:
                parts.append((threading.current_thread().name, t, time.perf_counter(), None))

        return orig_map(timed, items, cost, threads)

    _threads.map_balanced = map_w
    try:
        ph = defaultdict(list)
        t0 = time.perf_counter()
        og_step(ph)
    finally:
        _threads.map_balanced = orig_map
        for cls, name, orig in saved:
            setattr(cls, name, orig)
    if not log:
        print("(no projection jobs recorded)\n")
        return
    start, end = min(e[1] for e in log), max(e[2] for e in log)
    threads_seen = sorted({e[0] for e in log + parts})
    print(f"Schedule of one projection (project_ {ph['project_'][0]:.2f} ms; jobs from {1e3 * (start - t0):.2f} to {1e3 * (end - t0):.2f} ms after the step began):\n")
    print("| thread | busy ms | idle ms between the first and the last job |\n|---|---|---|")
    for th in threads_seen:
        spans = sorted((a, b) for n, a, b, _ in log + parts if n == th and b > start and a < end)
        busy, last = 0.0, start
        for a, b in spans:  # nested jobs (held passes, blocks inside a term's job) counted once
            a, b = max(a, start), min(b, end)
            if b > last:
                busy += b - max(a, last)
                last = b
        print(f"| {th} | {busy * 1e3:.2f} | {(end - start - busy) * 1e3:.2f} |")
    print("\n| start ms | end ms | thread | job |\n|---|---|---|---|")
    for n, a, b, label in sorted(log, key=lambda e: e[1]):
        print(f"| {1e3 * (a - start):.2f} | {1e3 * (b - start):.2f} | {n} | {label} |")
    print()


if __name__ == "__main__":
    main()
