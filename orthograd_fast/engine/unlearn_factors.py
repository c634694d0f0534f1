"""The unlearn pass's factors of one retain span: ``og.forget()`` blocks and the armed capture.

Each window (:class:`orthograd_fast.engine.forget_window.ForgetWindow`) keeps, for one-token calls of
dense layers, the layer input and output gradient of the unlearn backward; where they describe
``.grad`` exactly and are cheaper, the coefficients <g_i, u> come from B x B_u products of factors
instead of the coefficient GEMM (:meth:`PerSampleGrads.unlearn_coef`). This module holds that
bookkeeping for the facade: which weights' factors are valid, the windows, and the check of the
factors against ``.grad`` at each projection.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from ..errors import CaptureError
from .forget_window import ForgetWindow

# Layer inputs an armed unlearn capture may hold (one-token dense layers: B_u x I each); past it
# the window gives up and those weights use the coefficient GEMM.
MAX_BYTES = 256 << 20


def worth_a_window(B: int, tokens: List[int], shape: Tuple[int, ...]) -> Optional[str]:
    """Whether a dense weight of ``shape`` whose retain uses had ``tokens`` tokens per sample each
    (B samples) gets an armed window: "one" (every use one token: an MLP layer or a head), "many"
    (a few tokens, B T (I + O) < O I: b from B x B_u token products is cheaper than the GEMM when
    the unlearn pass has about as many tokens as the retain block, e.g. a late stage of a
    ConvNeXt over 2 x 2 positions; its calls over several tokens are kept), else None."""
    if all(t == 1 for t in tokens):
        return "one"
    O, I = shape
    return "many" if B * sum(tokens) * (I + O) < O * I else None


class UnlearnFactors:
    """og.forget() factors of the current span, {param: [OuterFactors]}, and the state around them.

    ``explicit``: an og.forget() block ran in this span (no arming; a failed check raises).
    ``arm_off``: why arming stopped for good (a parameter whose armed factors failed a check).
    ``checked``: the first use (checked against the GEMM) has happened."""

    def __init__(self, params: List[Tuple[str, Tensor]], arm: bool):
        self.params = params
        self._shapes = {id(p): tuple(p.shape) for _, p in params if p.dim() == 2}  # (worth_a_window)
        self.arm_enabled = arm
        self.factors: Dict[Tensor, list] = {}
        self.grad_seen: Dict[Tensor, tuple] = {}  # param -> (.grad object, its _version) at the window's exit
        self.bad: set = set()
        # params whose factors some window could not certify (ForgetWindow.certified): checked
        # against the GEMM at every projection, not only the first
        self.uncertified: set = set()
        self.explicit = False
        self.arm_off: Optional[str] = None
        self.window: Optional[ForgetWindow] = None
        self.checked = False
        # dense layers confirmed by retain blocks, id(weight) -> (module, weight, transposed), and
        # id(weight) of refuted ones (observe)
        self.dense: Dict[int, tuple] = {}
        self.not_dense: set = set()

    def reset_span(self) -> None:
        self.explicit = False
        self.factors.clear()
        self.grad_seen.clear()
        self.bad.clear()
        self.uncertified.clear()

    # --- windows ----------------------------------------------------------------------------------
    def observe(self, confirmed: Dict[int, tuple], refuted: set) -> None:
        """What a retain block saw of the dense layers (op_capture.OpContext.dense_verdict): a
        layer whose every call is one dense op from its input to its output, and whose weight
        nothing else consumes, may have its unlearn gradient factored; a refuted one never is."""
        self.not_dense |= refuted
        for k in refuted:
            self.dense.pop(k, None)
        for k, v in confirmed.items():
            if k not in self.not_dense:
                self.dense[k] = v

    def start(self, units, only: Optional[set] = None, many: frozenset = frozenset()) -> Optional[ForgetWindow]:
        """Hooks of one unlearn window (an og.forget() block or the armed capture), attached, on the
        dense layers retain blocks have confirmed; before any retain block, on every module owning
        just a 2-D weight (and a bias): factors of one that is not confirmed by the projection are
        not used (:meth:`usable`). ``only``: id() of the weights worth a window (else all);
        ``many``: id() of those whose calls over several tokens are kept too (else one-token calls
        only)."""
        owners: Dict[int, int] = {}
        for u in units:
            for q in u.parameters():  # (its trainable ones, read once per unit)
                owners[id(q)] = owners.get(id(q), 0) + 1
        layers = []
        for u in units:
            m = u.module
            w = m._parameters.get("weight") if u.kind == "ops" and not u.whole else None
            if not isinstance(w, Tensor) or not w.requires_grad or w.dim() != 2 or id(w) in self.not_dense:
                continue
            if (self.dense and id(w) not in self.dense) or (only is not None and id(w) not in only):
                continue
            if not all(n in ("weight", "bias") for n, q in m._parameters.items() if q is not None):
                continue
            if owners[id(w)] > 1:
                # also owned by another module (tied to an embedding): it would get unlearn gradient
                # the captured factors do not hold
                self.bad.add(w)
                continue
            layers.append((m, w, self.dense[id(w)][2] if id(w) in self.dense else None))
        if not layers:
            return None
        win = ForgetWindow(layers, dict(self.grad_seen), MAX_BYTES, many)
        win.attach()
        return win

    def finish(self, win: ForgetWindow, ok: bool) -> None:
        """Hooks off; the window's factors join the span for the weights whose .grad they describe."""
        win.detach()
        uses = win.uses() if ok and not win.overflow else {}
        for p in win.weights:
            us = uses.get(p, [])
            if p not in win.seen and not us and p not in win.bad and p not in win.partial:
                continue  # untouched by this window (what earlier windows left still holds)
            if not ok or win.overflow or p in self.bad or p in win.partial or p in win.bad or p not in win.seen or not us:
                self.bad.add(p)
                self.factors.pop(p, None)
                continue
            self.factors.setdefault(p, []).extend(us)
            self.grad_seen[p] = win.seen[p]
            if not win.certified(p):
                self.uncertified.add(p)

    @contextlib.contextmanager
    def block(self, units) -> Iterator[None]:
        """One og.forget() block: a window for the unlearn backward inside it."""
        self.explicit = True
        win = self.start(units)
        ok = False
        try:
            yield
            ok = True
        finally:
            if win is not None:
                self.finish(win, ok)

    def arm(self, units, B: int, tokens: Dict[int, List[int]]) -> None:
        """On leaving retain(): keep an unlearn capture attached until project_() (or reset(), the
        next retain() or forget(), close()), unless an og.forget() block ran in this span.
        ``tokens`` (RetainSpan.dense_tokens of the block of B samples): the window goes on the
        weights whose factors could be used (:func:`worth_a_window`): a window on the others
        costs hooks in the unlearn pass for nothing (measured: 3-4% of the step on ViT, BERT and
        Whisper, whose dense layers all have many tokens); no window when there is none."""
        if not self.arm_enabled or self.arm_off or self.explicit or self.window is not None:
            return
        kinds = {k: worth_a_window(B, ts, self._shapes[k]) for k, ts in tokens.items() if k in self._shapes}
        only = {k for k, v in kinds.items() if v is not None}
        self.window = self.start(units, only, frozenset(k for k, v in kinds.items() if v == "many"))

    def disarm(self, keep: bool = True) -> None:
        """Detach the armed capture; ``keep``: its factors join the span (else dropped)."""
        win, self.window = self.window, None
        if win is None:
            return
        if keep:
            self.finish(win, True)
        else:
            win.detach()

    # --- use at a projection ----------------------------------------------------------------------
    def usable(self, terms, active, vecs) -> Dict[Tensor, list]:
        """{param: factors} where they are valid for .grad and b from them is cheaper (the
        coefficients themselves are formed per tensor, next to its Gram)."""
        out = {}
        for p in active if self.factors else ():
            fu = self.factors.get(p)
            if not fu or p in self.bad:
                continue
            layer = self.dense.get(id(p))
            if layer is None or layer[1] is not p or any(u.transposed != layer[2] for u in fu):
                continue  # not confirmed as one dense op by the retain capture
            g, ver = self.grad_seen[p]
            if vecs[p] is not g or g._version != ver or not terms[p].unlearn_coef_cheaper(fu):
                continue
            out[p] = fu
        return out

    def error(self, p: Tensor, term, U: Tensor, K: Tensor, b: Tensor) -> Optional[Tensor]:
        """How far the unlearn factors of weight ``p`` are from its .grad ``U`` (0-d float64, no
        host sync), in the term's own job beside the others: the coefficients ``b`` they gave
        against the GEMM's (K: the term's Gram) at the first use, and at every later one where a
        window could not certify the factors (a loss term that appears later, e.g. a penalty
        switched on after some steps, or a layer called twice in one backward); None where they
        are certified."""
        if self.checked and p not in self.uncertified:
            return None
        return _coef_error(K, b, term.coef(U), U)

    def verify(self, errs, got, terms, vecs, *, half: bool) -> None:
        """The unlearn factors must reproduce .grad (``errs`` {param: :meth:`error`}): a mismatch
        raises under og.forget(); factors of the armed capture are replaced by the GEMM (``got``
        {param: (K, b)} gets the GEMM's b from ``terms`` and ``vecs``) and arming stops for this
        object, with a warning."""
        if not errs:
            return
        tol = 3e-2 if half else 1e-3
        # one host sync; a NaN from a non-finite retain Gram is left to the finite check that follows
        bad = [p for p, e in zip(errs, torch.stack(list(errs.values())).tolist()) if e > tol or (e != e and bool(torch.isfinite(got[p][0]).all()))]
        self.checked = True
        if not bad:
            return
        names = {q: n for n, q in self.params}
        if self.explicit:
            raise CaptureError(
                f"parameter '{names[bad[0]]}': the unlearn factors captured by og.forget() do not reproduce its "
                "unlearn gradient (a use outside the owning module's forward, or a loss term such as a weight "
                "penalty). Run the unlearn backward outside og.forget() for this model."
            )
        for p in bad:
            got[p] = (got[p][0], terms[p].coef(vecs[p]))
        self.arm_off = names[bad[0]]
        warnings.warn(
            f"OrthoGrad: the unlearn pass after retain() does not come from the modules' forwards alone for "
            f"parameter '{names[bad[0]]}' (a loss term such as a weight penalty?); its coefficients use the GEMM "
            "and the unlearn capture is no longer armed (OrthoGrad(arm_forget=False) skips it from the start).",
            RuntimeWarning,
            stacklevel=6,  # verify <- projection (2) <- the facade's _project <- project_() <- caller
        )


def _coef_error(K, b_factors, b_gemm, u) -> Tensor:
    """max_i |b_factors - b_gemm| / (|g_i| |u|), a 0-d tensor (no host sync)."""
    unorm = torch.linalg.vector_norm(u).double()  # in u's dtype: dtype=float64 would copy u
    scale = K.diagonal().clamp_min(0).sqrt() * unorm + 1e-30
    return ((b_factors - b_gemm).abs() / scale).max()
