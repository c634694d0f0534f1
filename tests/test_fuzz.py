"""Hypothesis fuzzing over small random architectures against the float64 oracle, plus the
bad-input contract cases of issue 6 (empty batch, a module called twice, retain-span cap, blocks of
different sequence lengths).

Default run: 50 hypothesis examples (tiny sizes, every family) and 100 independent cases of the op
kinds captured by operation (``test_fuzz_op_kinds``: attention with cls tokens, position tables,
coordinate MLPs, relative-position bias tables looked up with ids shared by all samples, also as
``F.scaled_dot_product_attention``'s attn_mask, padding_idx, zero-filled states; tied tables on the
token route; rectangular convs with unequal height/width padding; sequence length == B in about
half). ``-m slow``: 300 more hypothesis examples. All reproducible: hypothesis derives the examples
from the test's name (``derandomize``), the cases from their number. To explore other examples,
reproducibly, set ORTHOGRAD_FUZZ_SEED to an integer (the same value draws the same examples again):
``ORTHOGRAD_FUZZ_SEED=7 python -m pytest tests/test_fuzz.py -m slow``.

Planted bugs each fail several cases (measured when the op cases were added): cross-use terms
dropped on the token route 11 op cases; height/width zero padding swapped in conv_factors 11 op
cases + 8 hypothesis examples; padding_idx ignored for nn.Embedding 9, for F.embedding
with batched ids 4, for lookups with shared ids (batch_layout) 11 + 2.
"""

import os
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from torch import nn

import orthograd_fast.engine.gram as gram
from engine_helpers import compare, og_direction
from models import TinyLM, ce, make
from oracle import oracle_direction, oracle_grads, oracle_unlearn_grad, orthogonality, project_out
from orthograd_fast import OrthoGrad
from orthograd_fast.errors import OrthoGradError
from orthograd_fast.engine.capture import CaptureError

REL = 1e-4
ORTH = 1e-5
# EXPLICIT_MAX = 0 forces tiny tensors (numel ~ B: a 2x2 conv kernel with B = 4) through the tile
# route, whose per-sample tiles are formed in fp32 (then reduced in fp64); on such nearly square,
# ill-conditioned G the fp32 tile rounding is amplified to ~1.3e-4 (orthogonality ~2e-5), found by
# the 300-example run. The default configuration materializes these tensors in fp64 (gram.py,
# docs/math.md section 8), so the factored examples get 10x looser bounds.
REL_FACTORED = 1e-3
ORTH_FACTORED = 1e-4
# The oracle runs a float64 copy of the model, the engine the float32 model. Some random
# architectures make the direction itself sensitive to float32 rounding: per-sample gradients
# nearly collinear (two samples whose softmax rows agree to 1e-4: singular values 1.2 and 1e-4, so
# eps32 / 1e-4 ~ 6e-4 of the small direction is noise), or a tensor whose gradient is a
# near-cancellation (a conv bias in front of a GroupNorm). The same exact projection computed from the
# float32 model's own per-sample gradients (oracle dtype=float32) measures that; a tensor is held to
# max(bound, NOISE_FACTOR x that float32 deviation), which only relaxes where float32 is shown to move
# the exact answer (the mixed-precision tests use the same rule).
NOISE_FACTOR = 10.0
# ORTHOGRAD_FUZZ_SEED: explore with this seed instead of the derandomized examples
FUZZ_SEED = os.environ.get("ORTHOGRAD_FUZZ_SEED")


def reproducible(max_examples):
    """hypothesis settings for the fuzz: derandomized, or seeded by ORTHOGRAD_FUZZ_SEED; no example
    database (a failure saved by one run must not change what the next run draws)."""

    def deco(fn):
        fn = settings(
            max_examples=max_examples,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            derandomize=FUZZ_SEED is None,
            database=None,
        )(fn)
        return fn if FUZZ_SEED is None else seed(int(FUZZ_SEED))(fn)

    return deco


# max error seen over every fuzz example of the session, per route (printed by the summary test);
# "relaxed": examples that passed only by the float32-deviation allowance (NOISE_FACTOR)
SEEN = {"examples": 0, "refused": 0, "factored": 0, "relaxed": 0, "routes": set(), "err": 0.0, "orth": 0.0, "err_factored": 0.0, "orth_factored": 0.0}


class Draws:
    """The choices of :func:`build`: from hypothesis (``st.data()``: shrinkable) or from a
    ``random.Random`` seeded by a case number (the parametrized cases: every case an independent,
    uniformly drawn architecture; hypothesis's derandomized examples are often near-copies of each
    other, so few of them reach a given combination)."""

    def __init__(self, data=None, seed=None):
        self.data = data
        self.rng = None if data is not None else random.Random(seed)

    def int(self, lo, hi):
        return self.data.draw(st.integers(lo, hi)) if self.rng is None else self.rng.randint(lo, hi)

    def pick(self, options):
        return self.data.draw(st.sampled_from(options)) if self.rng is None else self.rng.choice(list(options))

    def bool(self):
        return self.data.draw(st.booleans()) if self.rng is None else self.rng.random() < 0.5


class Twice(nn.Module):
    """One nn.Linear applied twice in a forward (shared weights): both calls add to g_i."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class Seq(nn.Module):
    def __init__(self, body, head, pool, emb=None):
        super().__init__()
        self.emb = emb
        self.body = body
        self.head = head
        self.pool = pool

    def forward(self, x):
        h = self.emb(x) if self.emb is not None else x
        h = self.body(h)
        if self.pool == "mean":
            h = h.mean(1)
        elif self.pool == "flatten":
            h = h.flatten(1)
        return self.head(h)


def _seq_layer(draw, d, rank3):
    kind = draw.pick(["linear", "layernorm", "rmsnorm", "twice", "act"])
    if kind == "linear":
        return nn.Linear(d, d, bias=draw.bool())
    if kind == "layernorm":
        return nn.LayerNorm(d, elementwise_affine=True, bias=draw.bool())
    if kind == "rmsnorm":
        # explicit eps: with eps=None torch uses finfo(dtype).eps, so the fp32 model and the fp64
        # oracle compute different functions on an all-zero input (a padding embedding row through
        # a LayerNorm gives one), with Jacobians 1/sqrt(eps) apart. eps=None is covered by TinyLM.
        return nn.RMSNorm(d, eps=1e-6)
    if kind == "twice":
        return Twice(nn.Linear(d, d))
    return nn.Tanh()


class FuzzAttn(nn.Module):
    """A random transformer-ish block over x [B, T, din] built from the op kinds captured by
    operation: a raw cls token expanded along the batch and concatenated; a position table (raw
    parameter added by broadcasting, or an nn.Embedding looked up with arange ids); a coordinate MLP
    (parameters only) broadcast into the batch; attention with a relative-position bias table
    (nn.Embedding, or a raw parameter looked up by F.embedding or indexing, with non-batched
    [N, N] ids, maybe with a padding_idx) added to the scores by hand or passed to
    F.scaled_dot_product_attention as attn_mask; a zero-filled state (a recurrence from
    torch.zeros(B, d), or a zero token concatenated to the data)."""

    def __init__(self, din, d, heads, T, classes, o):
        super().__init__()
        self.o, self.heads, self.d = o, heads, d
        self.inp = nn.Linear(din, d)
        N = T + (o["cls"] is not None) + (o["state"] == "zero_token")
        self.N = N
        if o["cls"] is not None:
            self.cls = nn.Parameter(torch.randn(1, 1, d) if o["cls"] == "3d" else torch.randn(1, d))
        if o["pos"] == "param":
            self.pos = nn.Parameter(torch.randn(N, d) * 0.5)
        elif o["pos"] == "param3":
            self.pos = nn.Parameter(torch.randn(1, N, d) * 0.5)
        elif o["pos"] == "embedding":
            self.pos = nn.Embedding(N, d, padding_idx=o["pad"] if o["pad"] is not None and o["pad"] < N else None)
        if o["coord"]:
            self.register_buffer("coords", torch.linspace(-1, 1, 2 * N).reshape(N, 2))
            self.coord = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, d))
        if o["attn"] is not None:
            self.qkv = nn.Linear(d, 3 * d, bias=o["qkv_bias"])
            self.proj = nn.Linear(d, d)
            nb = 2 * o["clip"] + 1  # relative offsets -clip..clip
            if o["rel"] == "embedding":
                self.rel = nn.Embedding(nb, heads, padding_idx=o["pad"])
            elif o["rel"] in ("raw", "index"):
                self.rel = nn.Parameter(torch.randn(nb, heads))
            if o["norm"]:
                self.norm = nn.LayerNorm(d)
        if o["state"] in ("zeros", "new_zeros"):
            self.rec = nn.Linear(d, d)
            self.decay = nn.Parameter(torch.rand(d) * 0.5 + 0.25)
        width = N * d if o["pool"] == "flatten" and o["state"] not in ("zeros", "new_zeros") else d
        self.head = nn.Linear(width, classes)

    def _bias(self, N):
        pos = torch.arange(N)
        ids = (pos[None, :] - pos[:, None]).clamp(-self.o["clip"], self.o["clip"]) + self.o["clip"]  # [N, N]
        if self.o["rel"] == "embedding":
            b = self.rel(ids)
        elif self.o["rel"] == "raw":
            b = F.embedding(ids, self.rel, padding_idx=self.o["pad"])
        else:
            b = self.rel[ids]
        b = b.permute(2, 0, 1)  # [H, N, N]
        return b.unsqueeze(0) if self.o["bias4d"] else b

    def _attn(self, h):
        B, N, d = h.shape
        q, k, v = self.qkv(h).reshape(B, N, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = self._bias(N) if self.o["rel"] is not None else None
        if self.o["attn"] == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            s = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
            a = torch.softmax(s if bias is None else s + bias, -1) @ v
        return self.proj(a.transpose(1, 2).reshape(B, N, d))

    def forward(self, x):
        o, B = self.o, x.shape[0]
        h = self.inp(x)
        if o["state"] == "zero_token":
            h = torch.cat([h, torch.zeros(B, 1, self.d, dtype=h.dtype)], 1)
        if o["cls"] == "3d":
            h = torch.cat([self.cls.expand(B, -1, -1), h], 1)
        elif o["cls"] == "2d":
            h = torch.cat([self.cls.expand(B, 1, -1), h], dim=1)
        if o["pos"] in ("param", "param3"):
            h = h + self.pos
        elif o["pos"] == "embedding":
            h = h + self.pos(torch.arange(self.N))
        if o["coord"]:
            h = h + self.coord(self.coords)
        if o["attn"] is not None:
            h = h + self._attn(h)
            if o["norm"]:
                h = self.norm(h)
        if o["state"] in ("zeros", "new_zeros"):
            s = torch.zeros(B, self.d, dtype=h.dtype) if o["state"] == "zeros" else h.new_zeros(B, self.d)
            for t in range(self.N):
                s = self.decay * s + torch.tanh(h[:, t] + self.rec(s))
            return self.head(s)
        if o["pool"] == "flatten":
            return self.head(h.flatten(1))
        return self.head(h[:, 0] if o["pool"] == "first" else h.mean(1))


class FuzzLM(nn.Module):
    """Token model: a table (an nn.Embedding, maybe with padding_idx, or a raw parameter of the root
    looked up by F.embedding with padding_idx or by indexing), an optional shared position table
    (an nn.Embedding looked up with arange ids, or a raw parameter), a body, and a head: untied, an
    nn.Linear sharing the nn.Embedding's weight, or the table written into the forward
    (``h @ W.t()``, ``F.linear(h, W)``). All tied forms take the token route when factored: one-hot
    and dense uses of one tensor, whose cross terms matter.

    ``refused``: the table of an nn.Embedding used again in the root's forward (outside its owner's
    forward): refused with a clear error (README, "Refused with a clear error")."""

    def __init__(self, V, d, T, pad, pos, table, tie, layers):
        super().__init__()
        self.tie, self.T, self.pad, self.table_kind = tie, T, pad, table
        if table == "module":
            self.emb = nn.Embedding(V, d, padding_idx=pad)
        else:
            self.table = nn.Parameter(torch.randn(V, d))
        if pos == "embedding":
            self.pos = nn.Embedding(T, d, padding_idx=0 if pad is not None else None)
        elif pos == "param":
            self.pos = nn.Parameter(torch.randn(T, d) * 0.5)
        else:
            self.pos = None
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, V, bias=tie is None) if tie in (None, "module") else None
        if tie == "module":
            self.head.weight = self.emb.weight

    @property
    def W(self):
        return self.emb.weight if self.table_kind == "module" else self.table

    @property
    def refused(self) -> bool:
        return self.table_kind == "module" and self.tie in ("matmul", "linear") and self.emb.weight.requires_grad

    def forward(self, ids):
        if self.table_kind == "module":
            h = self.emb(ids)
        elif self.table_kind == "raw":
            h = F.embedding(ids, self.table, padding_idx=self.pad)
        else:
            h = self.table[ids]
        if isinstance(self.pos, nn.Embedding):
            h = h + self.pos(torch.arange(ids.shape[1])[None])
        elif self.pos is not None:
            h = h + self.pos[: ids.shape[1]]
        h = self.body(h)
        if self.tie == "matmul":
            return h @ self.W.t()
        if self.tie == "linear":
            return F.linear(h, self.W)
        return self.head(h)


def _seq_len(draw, B, extra=0):
    """A sequence length; in about half the examples the tensors shared by all samples ([N, ...]
    positions, [N, N] bias ids, [N, 2] coordinates, N = T + extra) have dim 0 == B, where telling
    them from the batch by shape goes wrong."""
    if draw.bool() and B - extra >= 1:
        return B - extra
    return draw.int(1, 4)


FAMILIES = ["mlp", "seq", "tokens", "conv1d", "conv2d", "attn"]


def build(draw, families=FAMILIES):
    """(model, retain (x, y), unlearn (x, y)) for a random small architecture."""
    fam = draw.pick(families)
    B = draw.int(1, 5)
    Bu = draw.int(1, 4)
    C = draw.int(2, 4)  # classes
    seed = draw.int(0, 2**31 - 1)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if fam in ("mlp", "seq"):
        # d >= 3: LayerNorm/RMSNorm over 2 features is degenerate (xhat = +-1, a Jacobian ~ eps), so
        # an fp32 model and the fp64 oracle disagree at 1e-3 on the layers below it: not an engine error.
        d = draw.int(3, 6)
        T = draw.int(1, 4) if fam == "seq" else None
        layers = [nn.Linear(d, d)] + [_seq_layer(draw, d, T is not None) for _ in range(draw.int(0, 3))]
        model = Seq(nn.Sequential(*layers), nn.Linear(d, C), "mean" if T else None)
        shape = (d,) if T is None else (T, d)
        mk = lambda n: (torch.randn(n, *shape, generator=g), torch.randint(0, C, (n,), generator=g))
    elif fam == "tokens":
        V = draw.int(3, 9)
        d = draw.int(3, 6)  # see above (norms over 2 features)
        T = _seq_len(draw, B)
        pad = draw.pick([None, 0, 0])
        layers = [_seq_layer(draw, d, True) for _ in range(draw.int(0, 2))]
        table = draw.pick(["module", "module", "raw", "raw", "index"])
        # tied in about 4 of 5 examples; a head written into the forward of an nn.Embedding's
        # table is refused (about 1 in 12 token examples: the refusal is checked, see _run)
        ties = ["module", "module", "matmul", "linear"] if table == "module" else ["matmul", "linear", "matmul"]
        tie = draw.pick([None] + ties)
        if table == "module" and tie in ("matmul", "linear") and draw.bool():
            tie = "module"
        pos = draw.pick([None, None, "embedding", "param"])
        model = FuzzLM(V, d, T, pad, pos, table, tie, layers)

        def mk(n):
            ids = torch.randint(0, V, (n, T), generator=g)
            if pad is not None:  # padding tokens in about a third of the positions (a lookup masks them)
                ids[torch.rand(n, T, generator=g) < 0.35] = pad
            return ids, torch.randint(0, V, (n, T), generator=g)

    elif fam == "attn":
        heads = draw.int(1, 2)
        d = heads * draw.int(2, 3)
        din = draw.int(2, 4)
        o = dict(
            cls=draw.pick([None, "3d", "2d"]),
            pos=draw.pick([None, "param", "param3", "embedding"]),
            coord=draw.bool(),
            attn=draw.pick([None, "manual", "sdpa", "sdpa"]),
            rel=draw.pick([None, "embedding", "raw", "index"]),
            pad=draw.pick([None, 0, 1]),
            clip=draw.int(1, 2),
            bias4d=draw.bool(),
            qkv_bias=draw.bool(),
            norm=d >= 3 and draw.bool(),  # see the d >= 3 note above
            state=draw.pick([None, None, "zeros", "new_zeros", "zero_token"]),
            pool=draw.pick(["mean", "first", "flatten"]),
        )
        extra = (o["cls"] is not None) + (o["state"] == "zero_token")
        T = _seq_len(draw, B, extra)
        model = FuzzAttn(din, d, heads, T, C, o)
        mk = lambda n: (torch.randn(n, T, din, generator=g), torch.randint(0, C, (n,), generator=g))
    else:
        nd = 1 if fam == "conv1d" else 2
        G = draw.pick([1, 1, 2])  # groups = 1: the convolution route (conv_factors), else unfolded patches
        cin, cout = G * draw.int(1, 2), G * draw.int(1, 3)
        # kernel, stride, dilation and zero padding drawn per dimension: a 2-d conv's height and
        # width differ (a (3, 1) kernel with padding (0, 2): swapping them changes the function);
        # the padding differs in at least 2 of 3 examples
        k = tuple(draw.int(1, 3) for _ in range(nd))
        s = tuple(draw.int(1, 2) for _ in range(nd))
        dil = tuple(draw.int(1, 2) for _ in range(nd))
        p0 = draw.int(0, 2)
        p = (p0,) if nd == 1 else (p0, draw.pick([(p0 + 1) % 3, (p0 + 2) % 3, draw.int(0, 2)]))
        L = tuple(dil[i] * (k[i] - 1) + 1 + draw.int(0, 3) for i in range(nd))
        Conv = nn.Conv1d if nd == 1 else nn.Conv2d
        conv = Conv(cin, cout, k, stride=s, padding=p, dilation=dil, groups=G, bias=draw.bool())
        layers = [conv, nn.Tanh()]
        shape = (cin,) + L
        with torch.no_grad():
            # elements per group that depend on the input: positions whose window lies entirely in
            # the padding are constants, and a group with fewer than 3 live values is degenerate
            # for GroupNorm (see the d >= 3 note): e.g. [0, t, 0] normalizes to a constant, whose
            # Jacobian ~ eps differs between the fp32 model and the fp64 oracle.
            probe = Conv(cin, cout, k, stride=s, padding=p, dilation=dil, groups=G, bias=False)
            probe.weight.fill_(1.0)
            per_group = int((probe(torch.ones(1, *shape)) != 0).sum()) // G
        if draw.bool() and per_group >= 3:  # >= 3 live elements per group
            layers.append(nn.GroupNorm(G, cout))
        body = nn.Sequential(*layers)
        with torch.no_grad():
            flat = body(torch.zeros(1, *shape)).numel()
        model = Seq(body, nn.Linear(flat, C), "flatten")
        mk = lambda n: (torch.randn(n, *shape, generator=g), torch.randint(0, C, (n,), generator=g))
    # frozen parts: freeze the own parameters of a random subset of modules (a module's own: the
    # root of an attention model owns its cls token), keep at least one trainable tensor
    mods = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    for m in mods:
        if draw.int(0, 4) == 0:
            for q in m.parameters(recurse=False):
                q.requires_grad_(False)
    if not any(q.requires_grad for q in model.parameters()):
        (model.head if model.head is not None else model).requires_grad_(True)
    return fam, model, mk(B), mk(Bu)


ROUTES = ["default", "factored", "lookup", "factored", "lookup"]


def _run(draw, families=FAMILIES, route_draws=ROUTES):
    """One example: ``draw`` (a :class:`Draws`) builds a model and the settings, the engine's
    direction is compared with the float64 oracle."""
    fam, model, retain, unlearn = build(draw, families)
    scope = draw.pick(["tensor", "global"])
    # "factored": no materialization, so the tile/ghost/token routes run; "lookup": the same, but
    # embedding tables take the slab-wise lookup route wherever it is cheaper than the token route
    routes = draw.pick(route_draws)
    factored = routes != "default"
    # alpha > 0 also checks gbar_r: from the factors (lean retain) or from the kept retain gradient
    alpha = draw.pick([0.0, 0.0, 0.3])
    lean = draw.bool()
    # every draw before the module globals change: a draw that raises must not leave them set
    old = gram.EXPLICIT_MAX, gram.LOOKUP_ROUTE
    try:
        if routes == "factored":
            gram.EXPLICIT_MAX, gram.LOOKUP_ROUTE = 0, False
        elif routes == "lookup":
            gram.EXPLICIT_MAX, gram.LOOKUP_ROUTE = 1, True
        og, got = og_direction(model, ce, retain, unlearn, scope=scope, backend="torch", alpha=alpha, lean_retain=lean)
    except CaptureError as e:
        # a use the hooks cannot see (FuzzLM.refused): refused on leaving retain() (lean retain:
        # the use leaves a retain gradient) with every .grad restored, or by project_()'s capture
        # check with .grad still the unlearn gradient. (Not refused, e.g. B = 1 where the batch
        # gradient is the one per-sample gradient: then it must be exact, checked below.)
        if not getattr(model, "refused", False):
            raise
        assert "outside the forward of the module that owns it" in str(e), e
        params = [q for q in model.parameters() if q.requires_grad]
        u32 = torch.autograd.grad(ce(model(unlearn[0]), unlearn[1]).mean(), params)
        for q, uq in zip(params, u32):
            assert q.grad is None if lean else torch.allclose(q.grad, uq, rtol=1e-5, atol=1e-7), "refused: .grad changed"
        SEEN["refused"] += 1
        return
    finally:
        gram.EXPLICIT_MAX, gram.LOOKUP_ROUTE = old
    ref, G, u = oracle_direction(model, ce, retain, unlearn, scope=scope, alpha=alpha)
    # engine_helpers.compare's per-tensor scale (||d*_t|| + ||u_t||), floored at 1e-9 of the whole
    # model's: random architectures produce tensors with u_t == 0 exactly (a head behind a conv whose
    # output is all padding), where d*_t is fp64 rounding noise and a pure ratio is meaningless.
    whole = sum(float(ref[n].norm() + u[n].norm()) for n in ref)
    # global scope couples every tensor through one solve: a tensor with u_t == 0 still receives the
    # whole model's float32 rounding (5e-10 to 2e-9 of a unit u, found by the slow fuzz), so its
    # floor there is 1e-3 of the whole model's scale: with REL, an absolute error of 1e-7 of the
    # model's direction, float32 rounding level (the orthogonality check stays model-wide)
    floor = (1e-3 if scope == "global" else 1e-9) * whole
    scale = {n: float(ref[n].norm() + u[n].norm()) + floor + 1e-30 for n in ref}
    # the exact projection of the float32 model's own gradients against the float64 one (see NOISE_FACTOR)
    ref32, _, _ = oracle_direction(model, ce, retain, unlearn, scope=scope, dtype=torch.float32, alpha=alpha)
    noise = {n: float((ref32[n] - ref[n]).norm()) / scale[n] for n in ref}
    # the P_perp part of a direction d = alpha * gbar_r - (1 - alpha) * P_perp(u)
    perp = lambda d: {n: (alpha * G[n].mean(0) - d[n]) / (1 - alpha) for n in d}
    orth_noise = orthogonality(G, perp(ref32), u, scope) if whole > 0 else 0.0
    rel, ortho = (REL_FACTORED, ORTH_FACTORED) if factored else (REL, ORTH)
    errs = {n: float((got[n] - ref[n]).norm()) / scale[n] for n in ref}
    bad = {n: f"{e:.2e} (float32 deviation {noise[n]:.1e})" for n, e in errs.items() if e > max(rel, NOISE_FACTOR * noise[n])}
    err = max(errs.values())
    if whole == 0:  # nothing to unlearn: the direction must be exactly zero
        orth = max(float(got[n].abs().max()) for n in got)
    else:
        orth = orthogonality(G, perp(got), u, scope)
    SEEN["examples"] += 1
    SEEN["routes"] |= {t.mode for t in og._terms.values()}
    SEEN["factored"] += int(factored)
    relaxed = any(errs[n] > rel for n in errs) or orth > ortho
    SEEN["relaxed"] += int(relaxed)
    sfx = "_factored" if factored else ""
    if not relaxed:  # the summary reports the examples held to the fixed bounds
        SEEN["err" + sfx] = max(SEEN["err" + sfx], err)
        SEEN["orth" + sfx] = max(SEEN["orth" + sfx], orth)
    where = f"{fam}/{scope}/factored={factored}/alpha={alpha}/lean={lean}"
    assert not bad, f"{where}: relative error {bad}\n{model}"
    assert orth <= max(ortho, NOISE_FACTOR * orth_noise), (
        f"{where}: orthogonality {orth:.2e} (float32 deviation {orth_noise:.1e})\n{model}"
    )


@reproducible(50)
@given(st.data())
def test_fuzz_random_architectures(data):
    _run(Draws(data))


# Independent, uniformly drawn cases (Draws from random.Random(case)) of the op kinds captured by
# operation: cls tokens, position tables, coordinate MLPs, relative-position bias tables with
# shared ids (also as F.scaled_dot_product_attention's attn_mask), padding_idx, zero-filled states;
# tied tables on the token route (half of the cases factored: EXPLICIT_MAX = 0, no lookup route);
# rectangular convs with unequal height/width padding. T == B in about half of the sequence cases.
# ORTHOGRAD_FUZZ_SEED draws other cases (reproducibly).
OP_FAMILIES = ["attn", "attn", "tokens", "tokens", "conv2d"]
OP_ROUTES = ["default", "factored", "factored", "lookup"]
OP_CASES = 100


@pytest.mark.parametrize("case", range(OP_CASES))
def test_fuzz_op_kinds(case):
    _run(Draws(seed=case if FUZZ_SEED is None else 1_000_003 * int(FUZZ_SEED) + case), OP_FAMILIES, OP_ROUTES)


@pytest.mark.slow
@reproducible(300)
@given(st.data())
def test_fuzz_random_architectures_slow(data):
    _run(Draws(data))


def test_fuzz_summary():
    """Prints the max errors seen (run after the fuzz tests, same session: pytest -s to see it)."""
    if SEEN["examples"] == 0:
        pytest.skip("no fuzz example ran in this session (fuzz tests deselected)")
    print(f"\nfuzz: {SEEN}")
    assert SEEN["err"] <= REL and SEEN["orth"] <= ORTH
    assert SEEN["err_factored"] <= REL_FACTORED and SEEN["orth_factored"] <= ORTH_FACTORED
    # the float32-noise allowance is for rare near-cancelling tensors, not a general escape
    assert SEEN["relaxed"] <= max(2, 0.03 * SEEN["examples"]), SEEN
    if SEEN["examples"] >= 50 and FUZZ_SEED is None:  # the CI set (derandomized) reaches every route
        assert {"explicit", "tile", "ghost", "tokens", "lookup", "conv"} <= SEEN["routes"], SEEN["routes"]


# ---- bad-input contract (issue 6) -----------------------------------------------------------
def test_empty_retain_batch_is_clear_error():
    model, (xr, yr), _ = make("mlp")
    og = OrthoGrad(model)
    before = {n: p.grad for n, p in model.named_parameters()}
    with pytest.raises(CaptureError, match=r"empty \(B=0"):
        with og.retain():
            ce(model(xr[:0]), yr[:0]).mean().backward()
    assert all(p.grad is before[n] for n, p in model.named_parameters())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("factored", [False, True])
def test_module_called_twice_is_correct(scope, factored, monkeypatch):
    """Shared weights: the per-sample gradient sums over both calls (not an error)."""
    if factored:
        monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), Twice(nn.Linear(6, 6)), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(4)
    retain = (torch.randn(4, 2, 5, generator=g), torch.randint(0, 3, (4, 2), generator=g))
    unlearn = (torch.randn(3, 2, 5, generator=g), torch.randint(0, 3, (3, 2), generator=g))
    err, orth, _ = compare(model, ce, retain, unlearn, scope=scope, backend="torch")
    assert err <= REL and orth <= ORTH, (err, orth)


def test_max_retain_error_is_clear():
    model, (xr, yr), _ = make("mlp")
    og = OrthoGrad(model, max_retain=len(xr) + 1)
    with og.retain():
        ce(model(xr), yr).mean().backward()
    with pytest.raises(OrthoGradError) as e:
        with og.retain():
            ce(model(xr), yr).mean().backward()
    msg = str(e.value)
    # names the cap, the count that broke it, the memory/solve cost and what to do
    assert f"{2 * len(xr)} samples" in msg and f"max_retain={len(xr) + 1}" in msg
    assert "memory" in msg and "project_()" in msg and "OrthoGrad(max_retain" in msg
    assert og.retain_size == len(xr), "the refused block must not be kept"


@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_blocks_of_different_sequence_lengths(factored, scope, monkeypatch):
    """Retain span over blocks with T = 5, 3, 1 (tied-embedding TinyLM): equal to the oracle on the union."""
    if factored:
        monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)
    torch.manual_seed(5)
    model = TinyLM()
    g = torch.Generator().manual_seed(6)
    blocks = [(torch.randint(0, 23, (n, T), generator=g), torch.randint(0, 23, (n, T), generator=g)) for n, T in ((3, 5), (2, 3), (2, 1))]
    unlearn = (torch.randint(0, 23, (3, 4), generator=g), torch.randint(0, 23, (3, 4), generator=g))
    og = OrthoGrad(model, scope=scope, backend="torch")
    model.zero_grad(set_to_none=True)
    for x, y in blocks:
        with og.retain():
            ce(model(x), y).mean().backward()
    ce(model(unlearn[0]), unlearn[1]).mean().backward()
    assert og.project_()["B"] == 7
    got = {n: p.grad.reshape(-1).double() for n, p in model.named_parameters()}
    Gs = [oracle_grads(model, ce, x, y) for x, y in blocks]
    G = {n: torch.cat([q[n] for q in Gs]) for n in Gs[0]}
    u = oracle_unlearn_grad(model, ce, *unlearn)
    names = list(G)
    if scope == "tensor":
        ref = {n: -project_out(G[n], u[n]) for n in names}
    else:
        r = -project_out(torch.cat([G[n] for n in names], 1), torch.cat([u[n] for n in names]))
        ref, k = {}, 0
        for n in names:
            ref[n] = r[k : k + u[n].numel()]
            k += u[n].numel()
    err = max(float((got[n] - ref[n]).norm() / (ref[n].norm() + u[n].norm())) for n in names)
    assert err <= REL, err
    assert orthogonality(G, {n: -got[n] for n in got}, u, scope) <= ORTH
