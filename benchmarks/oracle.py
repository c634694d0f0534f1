"""Float64 oracle for OrthoGrad directions, independent of the orthograd_fast package.

The slowest honest way: copy the model to float64, loop over the retain samples one at a time with
``torch.autograd.grad`` (no vmap, no hooks), stack each tensor's per-sample gradients into
G_t (B x numel) and project the unlearn gradient with an SVD projector:

    G_t = U S V^T,  r = #{s > rtol * s_max},  P_perp(u_t) = u_t - V_r^T (V_r u_t)
    direction_t = alpha * gbar_t - (1 - alpha) * P_perp(u_t)        gbar_t = mean_i g_i,t

``rtol`` defaults to 1e-6: the exact projector onto the span of the retain gradients, except
directions whose singular value is below 1e-6 of the largest -- below what a float32 per-sample
gradient resolves (its own rounding is ~1e-7 of its norm), so no float32 provider can be judged
on them; exactly rank-deficient directions (s ~ 1e-16 s_max) always drop out. ``scope="global"``
stacks all tensors into one B x P matrix.

When the per-sample gradients of every tensor would not fit ``max_bytes`` (large models at large
B), ``oracle_direction`` checks a subset of tensors (scope "tensor" only: each tensor's projection
is independent), smallest first; ``OracleResult.checked`` names them and ``compare`` only
judges those.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

DEFAULT_RTOL = 1e-6
# A tensor's error is scaled by at least this share of the whole model's gradient size: a tensor
# with no gradient in exact arithmetic (an attention key bias, which softmax cancels) holds only
# rounding noise in every provider, which is no error of the projection.
SCALE_FLOOR = 1e-6

__all__ = ["OracleResult", "CheckResult", "oracle_direction", "compare", "grads_as_dict", "per_sample_grads", "svd_project_out"]


@dataclass
class OracleResult:
    direction: Dict[str, torch.Tensor]  # float64, CPU, only the checked tensors
    u: Dict[str, torch.Tensor]  # unlearn gradient (float64, CPU)
    gbar: Dict[str, torch.Tensor]  # mean retain gradient (float64, CPU)
    rank: Dict[str, int]
    checked: List[str]
    all_names: List[str]
    alpha: float
    scope: str
    B: int
    notes: List[str] = field(default_factory=list)
    numel: Dict[str, int] = field(default_factory=dict)
    loop_dtype: str = "float64"

    def rank_deficient(self, n: str) -> bool:
        """G_t has fewer independent rows than min(B, numel) (under the oracle's cutoff)."""
        return self.scope == "tensor" and self.rank[n] < min(self.B, self.numel[n])

    def negrad(self) -> "OracleResult":
        """The same data with no projection: alpha * gbar - (1 - alpha) * u (what ``plain`` does)."""
        a = self.alpha
        d = {n: a * self.gbar[n] - (1 - a) * self.u[n] for n in self.checked}
        return replace(self, direction=d, notes=self.notes + ["unprojected (NegGrad+) oracle"])


@dataclass
class CheckResult:
    ok: bool
    max_err: float  # max over tensors of |d_t - o_t| / (alpha |gbar_t| + (1 - alpha) |u_t|)
    worst: Optional[str]
    global_rel_err: float  # |d - o| / |o| over all checked tensors (nan when |o| ~ 0)
    n_checked: int
    n_total: int
    message: str

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "max_err": self.max_err,
            "worst": self.worst,
            "global_rel_err": self.global_rel_err,
            "n_checked": self.n_checked,
            "n_total": self.n_total,
            "message": self.message,
        }


def _trainable(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    # named_parameters() yields a tied tensor once, under its first name.
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def per_sample_grads(m, loss_fn, x, y, params, B):
    """{id(p): [B, numel] float64}: one forward and one ``torch.autograd.grad`` per retain sample
    (no vmap, no hooks); a parameter a sample does not reach gets a zero row. ``y`` may be a
    tensor (sliced with the sample) or anything else (passed as is). The one per-sample loop of the
    project: tests/oracle.py uses it too."""
    G = {id(p): torch.zeros(B, p.numel(), dtype=torch.float64, device=p.device) for p in params}
    pair = any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())
    for i in range(B):
        yi = y[i : i + 1] if torch.is_tensor(y) else y
        out = None
        if pair:
            # the sample twice, its loss on the first row: torch's CPU batch norm backward at N = 1
            # with an output gradient in another memory format than its input (a channels-last
            # stride order: a transpose to tokens after the norm, XCiT's patch embedding) returns
            # a wrong weight and input gradient (torch 2.13: relative error ~1; N >= 2 is exact)
            both = m(torch.cat([x[i : i + 1], x[i : i + 1]]))
            out = both[:1] if torch.is_tensor(both) and both.shape[:1] == (2,) else None
        loss = loss_fn(out if out is not None else m(x[i : i + 1]), yi).sum()
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, gs):
            if g is not None:
                G[id(p)][i] = g.reshape(-1)
    return G


def _per_sample_grads_batched(m, loss_fn, x, y, params, B):
    """Per-sample gradients through one forward of the whole batch: autograd of each sample's loss
    in the batched graph (B backward passes). A ReLU whose input is within rounding of zero can
    switch between this and a one-sample forward (different GEMM shapes round differently); the
    providers all evaluate the batch, so this is the loop that sees what they see."""
    G = {id(p): torch.zeros(B, p.numel(), dtype=torch.float64, device=p.device) for p in params}
    losses = loss_fn(m(x), y)
    for i in range(B):
        gs = torch.autograd.grad(losses[i], params, retain_graph=i < B - 1, allow_unused=True)
        for p, g in zip(params, gs):
            if g is not None:
                G[id(p)][i] = g.reshape(-1)
    return G


def svd_project_out(G: torch.Tensor, u: torch.Tensor, rtol: float) -> Tuple[torch.Tensor, int]:
    """(P_perp(u), rank) for the rows of G (float64) by the SVD G^T = V S W^T, rank r = #{s > rtol
    s_max}, P = I - V_r V_r^T applied twice (the second pass removes what roundoff left). The
    projector of the project's oracle: tests/oracle.py uses it too."""
    V, S, _ = torch.linalg.svd(G.T, full_matrices=False)
    if S.numel() == 0 or S[0] == 0:
        return u.clone(), 0
    r = int((S > rtol * S[0]).sum())
    V = V[:, :r]
    pu = u - V @ (V.T @ u)
    return pu - V @ (V.T @ pu), r


def _project(G: torch.Tensor, u: torch.Tensor, rtol: Optional[float]) -> Tuple[torch.Tensor, int]:
    """P_perp(u) for the rows of G (float64), rank r = #{s > rtol s_max}.

    Small tensors (numel <= 16 B): :func:`svd_project_out`. Large ones: the same projector from the
    Gram matrix's eigendecomposition K = G G^T = U S^2 U^T, V_r V_r^T = G^T U_r S_r^-2 U_r^T G,
    applied twice (LAPACK's SVD/QR of a tall 1M x 128 matrix takes minutes on 2 cores; the Gram is
    one GEMM). In float64 this resolves singular values down to ~1e-7 s_max, below the default
    cutoff.
    """
    rtol = DEFAULT_RTOL if rtol is None else rtol
    B, n = G.shape
    if n <= 16 * B:
        return svd_project_out(G, u, rtol)
    lam, U = torch.linalg.eigh(G @ G.T)
    lam, U = lam.flip(0), U.flip(1)  # descending
    if lam[0] <= 0:
        return u.clone(), 0
    r = int((lam > (rtol**2) * lam[0]).sum())
    U, lam = U[:, :r], lam[:r]
    pu = u
    for _ in range(2):  # project twice: removes what roundoff left of the span
        pu = pu - G.T @ (U @ ((U.T @ (G @ pu)) / lam))
    return pu, r


def oracle_direction(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    retain: Tuple[torch.Tensor, torch.Tensor],
    unlearn: Tuple[torch.Tensor, torch.Tensor],
    *,
    scope: str = "tensor",
    alpha: float = 0.0,
    rtol: Optional[float] = None,
    max_bytes: Optional[int] = None,
    names: Optional[Sequence[str]] = None,
    loop_dtype: torch.dtype = torch.float64,
    batched: bool = False,
) -> OracleResult:
    """The float64 OrthoGrad direction for ``model`` at its current weights (model is not touched).

    ``loss_fn(outputs, targets) -> [B]`` per-sample losses. Returns float64 CPU tensors keyed by
    ``named_parameters()`` names. ``max_bytes`` caps the stacked per-sample gradients (the oracle
    then checks the smallest tensors that fit); ``names`` restricts the check explicitly.
    ``loop_dtype``: precision of the model copy in the per-sample loop (float64 by default; the
    model's own dtype gives the "same-precision" oracle used to diagnose ReLU-kink flips, see
    ``compare``). Gradients are stacked and projected in float64 either way. ``batched``: the
    per-sample gradients through one forward of the whole retain batch
    (:func:`_per_sample_grads_batched`) instead of one forward per sample.
    """
    if scope not in ("tensor", "global"):
        raise ValueError(f"scope must be 'tensor' or 'global', got {scope!r}")
    x_r, y_r = retain
    x_u, y_u = unlearn
    B = x_r.shape[0]
    m64 = copy.deepcopy(model).to(loop_dtype)
    m64.eval()
    cast = lambda t: t.to(loop_dtype) if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
    x_r, y_r, x_u, y_u = map(cast, (x_r, y_r, x_u, y_u))
    named = _trainable(m64)
    all_names = [n for n, _ in named]
    notes = []

    if names is not None:
        chosen = [n for n in all_names if n in set(names)]
    elif max_bytes is None:
        chosen = list(all_names)
    else:
        budget, chosen = max_bytes, []
        for n, p in sorted(named, key=lambda np_: np_[1].numel()):
            cost = B * p.numel() * 8 * (3 if p.numel() <= 16 * B else 1.2)  # G (+ SVD factors when small)
            if cost <= budget:
                chosen.append(n)
                budget -= cost
        if scope == "global" and len(chosen) != len(all_names):
            raise MemoryError(f"global-scope oracle needs ~{1.2 * B * sum(p.numel() for _, p in named) * 8 / 2**30:.1f} GiB > max_bytes")
        if len(chosen) < len(all_names):
            notes.append(f"oracle checks {len(chosen)}/{len(all_names)} tensors (max_bytes={max_bytes})")
    chosen_set = set(chosen)
    params = [p for n, p in named if n in chosen_set]
    pnames = [n for n, p in named if n in chosen_set]

    with torch.enable_grad():
        lu = loss_fn(m64(x_u), y_u).mean()
        ug = torch.autograd.grad(lu, params, allow_unused=True)
        G = (_per_sample_grads_batched if batched else per_sample_grads)(m64, loss_fn, x_r, y_r, params, B)

    u = {n: (torch.zeros_like(p) if g is None else g).reshape(-1).double() for n, p, g in zip(pnames, params, ug)}
    gbar = {n: G[id(p)].mean(0) for n, p in zip(pnames, params)}
    direction, rank = {}, {}
    if scope == "tensor":
        for n, p in zip(pnames, params):
            pu, rank[n] = _project(G[id(p)], u[n], rtol)
            direction[n] = alpha * gbar[n] - (1 - alpha) * pu
    else:
        Gall = torch.cat([G[id(p)] for p in params], dim=1)
        uall = torch.cat([u[n] for n in pnames])
        pu, r = _project(Gall, uall, rtol)
        off = 0
        for n, p in zip(pnames, params):
            k = p.numel()
            direction[n] = alpha * gbar[n] - (1 - alpha) * pu[off : off + k]
            rank[n] = r
            off += k

    shapes = {n: p.shape for n, p in zip(pnames, params)}
    cpu = lambda d: {n: v.reshape(shapes[n]).detach().cpu() for n, v in d.items()}  # noqa: E731
    numel = {n: p.numel() for n, p in zip(pnames, params)}
    loop = str(loop_dtype).replace("torch.", "") + (", through the batched forward" if batched else "")
    return OracleResult(cpu(direction), cpu(u), cpu(gbar), rank, pnames, all_names, alpha, scope, B, notes, numel, loop)


def grads_as_dict(model: nn.Module) -> Dict[str, Optional[torch.Tensor]]:
    """Current ``.grad`` of every trainable parameter (a copy), keyed like the oracle."""
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in _trainable(model)}


def compare(
    direction: Dict[str, Optional[torch.Tensor]], oracle: OracleResult, tol: float = 1e-3, qr_semantics: bool = False
) -> CheckResult:
    """Judge a provider's direction against the oracle on the oracle's checked tensors.

    Per tensor the error is |d_t - o_t| scaled by alpha |gbar_t| + (1 - alpha) |u_t| (the size of
    what went into the direction: the projection is a contraction, so this stays meaningful when a
    tensor's projected gradient is ~0), or by ``SCALE_FLOOR`` times that size over all checked
    tensors where it is larger (tensors whose exact gradient is zero). Fails on a missing,
    mis-shaped or non-finite tensor.

    ``qr_semantics``: the provider projects with a QR of G_t^T and no rank tolerance (the paper's
    code). Where G_t is rank-deficient that differs from the exact projector by definition
    (docs/math.md section 1): with numel <= B its Q is a complete basis, P_perp(u_t) = 0, and
    that is what is checked; with numel > B its extra columns are arbitrary directions, and the
    tensor is not compared (the message counts them).
    """
    a = oracle.alpha
    worst, max_err, problems, skipped, qr_zero = None, 0.0, [], [], []
    num = den = 0.0
    whole = math.sqrt(sum(float(a * oracle.gbar[n].norm() + (1 - a) * oracle.u[n].norm()) ** 2 for n in oracle.checked))
    for n in oracle.checked:
        o = oracle.direction[n]
        if qr_semantics and oracle.rank_deficient(n):
            if oracle.numel[n] <= oracle.B:
                o = (a * oracle.gbar[n]).reshape(o.shape)
                qr_zero.append(n)
            else:
                skipped.append(n)
                continue
        d = direction.get(n)
        if d is None:
            problems.append(f"{n}: no direction")
            continue
        if tuple(d.shape) != tuple(o.shape):
            problems.append(f"{n}: shape {tuple(d.shape)} != {tuple(o.shape)}")
            continue
        d = d.detach().double().cpu()
        if not torch.isfinite(d).all():
            problems.append(f"{n}: non-finite values")
            continue
        scale = max(float(a * oracle.gbar[n].norm() + (1 - a) * oracle.u[n].norm()), SCALE_FLOOR * whole)
        diff = (d - o).norm()
        err = float(diff / scale) if scale > 0 else float(diff)
        num += float(diff) ** 2
        den += float(o.norm()) ** 2
        if err > max_err or worst is None:
            max_err, worst = err, n
    glob = math.sqrt(num / den) if den > 1e-30 else float("nan")
    ok = not problems and max_err <= tol
    msg = "; ".join(problems) if problems else f"max err {max_err:.2e} at {worst} (tol {tol:.0e})"
    if not ok and worst is not None and not qr_semantics and oracle.rank_deficient(worst):
        msg += f" [G_t of {worst} is rank-deficient: rank {oracle.rank[worst]} < min(B, numel) = {min(oracle.B, oracle.numel[worst])}]"
    if qr_zero:
        msg += f" [QR semantics: {len(qr_zero)} rank-deficient tensor(s) with numel <= B checked as fully removed]"
    if skipped:
        msg += f" [QR semantics: {len(skipped)} rank-deficient tensor(s) not compared: {', '.join(skipped[:3])}]"
    if oracle.loop_dtype != "float64":
        msg += f" [oracle per-sample loop in {oracle.loop_dtype}]"
    if oracle.notes:
        msg += " [" + "; ".join(oracle.notes) + "]"
    n_checked = len(oracle.checked) - len(skipped)
    return CheckResult(ok, max_err, worst, glob, n_checked, len(oracle.all_names), msg)
