"""nn.LSTM / nn.GRU / nn.RNN: exact per-sample gradients from the unrolled forward (oracle)."""

import contextlib

import pytest
import torch
from torch import nn

from engine_helpers import autocast_ok, compare
from models import ce
from oracle import oracle_direction, orthogonality
from orthograd_fast import OrthoGrad
from orthograd_fast.errors import CaptureError

REL = 1e-4


class Seq(nn.Module):
    """A recurrent layer (batch-first or not) with a classifier on its last output and final state."""

    def __init__(self, rnn, head_in, classes=4):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(head_in, classes)

    def forward(self, x):
        if not self.rnn.batch_first:
            x = x.transpose(0, 1)
        out, h = self.rnn(x)
        h = h[0] if isinstance(h, tuple) else h
        last = out[-1] if not self.rnn.batch_first else out[:, -1]
        return self.head(torch.cat([last, h[-1]], -1))


def make(kind, layers=1, bidirectional=False, batch_first=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
    H = 5
    rnn = cls(3, H, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    D = 2 if bidirectional else 1
    model = Seq(rnn, D * H + H).eval()
    r = lambda *s: torch.randn(*s, generator=g)
    ri = lambda *s: torch.randint(0, 4, s, generator=g)
    return model, (r(5, 4, 3), ri(5)), (r(3, 4, 3), ri(3))


CASES = [
    ("lstm", 1, False, True),
    ("lstm", 2, True, True),
    ("gru", 2, False, True),
    ("gru", 1, True, False),
    ("rnn", 2, True, True),
]


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("kind,layers,bidir,batch_first", CASES)
def test_recurrent_matches_oracle(kind, layers, bidir, batch_first, scope, alpha):
    model, retain, unlearn = make(kind, layers, bidir, batch_first)
    err, orth, og = compare(model, ce, retain, unlearn, scope=scope, alpha=alpha, backend="torch")
    assert err <= REL, f"{kind}/{layers}/{bidir}/{scope}/{alpha}: relative error {err:.2e}"
    assert og.stats["fallback"] == []
    assert all(p in og._lean for p in model.rnn.parameters())  # no retain weight gradient formed


@pytest.mark.parametrize("lean", [True, False])
def test_recurrent_lean_off_and_module_restored(lean):
    model, retain, unlearn = make("lstm", 2, True)
    err, _, og = compare(model, ce, retain, unlearn, alpha=0.3, backend="torch", lean_retain=lean)
    assert err <= REL
    assert "forward" not in model.rnn.__dict__  # the unrolled forward is gone after the block


def test_recurrent_mismatch_is_an_error():
    class Odd(nn.GRU):  # a subclass whose forward computes something else
        def forward(self, x, hx=None):
            out, h = super().forward(x, hx)
            return out * 2, h

    model, retain, _ = make("gru")
    model.rnn.__class__ = Odd
    og = OrthoGrad(model)
    with pytest.raises(CaptureError, match="unrolled recurrence"):
        with og.retain():
            ce(model(retain[0]), retain[1]).mean().backward()
    assert "forward" not in model.rnn.__dict__


# in half precision, per tensor relative to ||d*|| + ||u|| (as test_mixed_precision): the half
# rounding of the unlearn gradient and of the head's factors (measured worst, bf16: 8.6e-3, at most
# 0.29 of this bound; orthogonality 1.4e-3)
REL_HALF, ORTH_HALF = 3e-2, 3e-2


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("kind,layers,bidir,batch_first", CASES)
@pytest.mark.parametrize("half", ["autocast-bf16", "autocast-fp16", "bf16-weights"])
def test_recurrent_in_half_precision_runs_in_float32(kind, layers, bidir, batch_first, scope, half):
    # under autocast, or with bf16 weights, the retain pass runs the unrolled recurrence in float32
    # with autocast off: per op it would round differently from the fused module (a raw dtype error
    # for the LSTM under autocast, a failed first-call check otherwise); the outputs come back in
    # the input's dtype, and the direction stays within the half precision's own error
    dtype = torch.float16 if half == "autocast-fp16" else torch.bfloat16
    autocast = half.startswith("autocast")
    if autocast and not autocast_ok(dtype):
        pytest.skip(f"CPU autocast to {dtype} is not supported by this torch build")
    if dtype == torch.float16 and kind == "lstm":
        pytest.skip("the fused CPU LSTM itself refuses fp16 autocast (oneDNN), so the unlearn pass cannot run")
    model, retain, unlearn = make(kind, layers, bidir, batch_first, seed=5)
    if not autocast:
        model = model.to(dtype)
        retain, unlearn = (retain[0].to(dtype), retain[1]), (unlearn[0].to(dtype), unlearn[1])
    run = (lambda: torch.autocast("cpu", dtype=dtype)) if autocast else contextlib.nullcontext
    og = OrthoGrad(model, scope=scope, backend="torch")
    model.zero_grad(set_to_none=True)
    with og.retain():
        with run():
            out = model(retain[0])
        assert out.dtype == dtype  # the head ran in the half dtype, on the recurrence's output
        ce(out.float(), retain[1]).mean().backward()
    with run():
        out = model(unlearn[0])
    ce(out.float(), unlearn[1]).mean().backward()
    u_half = {n: p.grad.reshape(-1).double().clone() for n, p in model.named_parameters()}
    og.project_()
    got = {n: p.grad.reshape(-1).double() for n, p in model.named_parameters()}
    ref, G, u = oracle_direction(model, ce, retain, unlearn, scope=scope)
    for n in got:
        scale = float(ref[n].norm() + u[n].norm()) + 1e-30
        err = float((got[n] - ref[n]).norm()) / scale
        bound = max(REL_HALF, 2 * float((u_half[n] - u[n]).norm()) / scale)
        assert err <= bound, f"{kind}/{scope}/{half} '{n}': direction error {err:.2e} > {bound:.2e}"
    assert orthogonality(G, {n: -got[n] for n in got}, u, scope) <= ORTH_HALF
    assert og.stats["fallback"] == []


class CellLoop(nn.Module):
    """A recurrent cell stepped by hand over the sequence (a seq2seq decoder's pattern)."""

    def __init__(self, kind, bias=True, state=True, H=5, classes=4):
        super().__init__()
        cls = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn_tanh": nn.RNNCell, "rnn_relu": nn.RNNCell}[kind]
        extra = {"nonlinearity": kind[4:]} if kind.startswith("rnn") else {}
        self.cell, self.kind, self.state, self.H = cls(3, H, bias=bias, **extra), kind, state, H
        self.head = nn.Linear(H, classes)

    def forward(self, x):
        B, T, _ = x.shape
        hx = None
        if self.state:  # a state the model makes (else the cell makes its own zeros)
            h = torch.tanh(x[:, 0, :1]).expand(B, self.H)
            hx = (h, 0.5 * h) if self.kind == "lstm" else h
        for t in range(T):
            hx = self.cell(x[:, t], hx)
        return self.head(hx[0] if self.kind == "lstm" else hx)


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("bias,state", [(True, True), (False, False)])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_recurrent_cells_in_a_loop_match_oracle(kind, bias, state, scope):
    # each step's two linear maps captured as dense uses (rules/cells.py), no torch.func fallback;
    # the LSTM cell's h is computed from its c inside the step
    torch.manual_seed(8)
    g = torch.Generator().manual_seed(8)
    model = CellLoop(kind, bias, state)
    retain = (torch.randn(5, 4, 3, generator=g), torch.randint(0, 4, (5,), generator=g))
    unlearn = (torch.randn(3, 4, 3, generator=g), torch.randint(0, 4, (3,), generator=g))
    err, _, og = compare(model, ce, retain, unlearn, scope=scope, alpha=0.3, backend="torch")
    assert err <= REL, f"{kind}/{bias}/{state}/{scope}: relative error {err:.2e}"
    assert og.stats["fallback"] == []


class PackedSeq(nn.Module):
    """Variable-length sequences through pack_padded_sequence (unsorted), the recurrent module, and
    ``use_out``: its final state ("h"), its outputs unpacked batch-first ("out") or time-first
    ("out_t"), or both ("both"). x [B, T, 4]: features, then the length."""

    def __init__(self, kind, layers, bidir, use_out, state=False, H=5, classes=4):
        super().__init__()
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
        self.rnn = cls(3, H, num_layers=layers, bidirectional=bidir, batch_first=True)
        self.use_out, self.state = use_out, state
        D = 2 if bidir else 1
        self.head = nn.Linear({"h": H, "out": D * H, "out_t": D * H, "both": H + D * H}[use_out], classes)

    def forward(self, x):
        lengths = x[:, 0, 3].long()
        packed = nn.utils.rnn.pack_padded_sequence(x[..., :3], lengths.cpu(), batch_first=True, enforce_sorted=False)
        hx = None
        if self.state:  # an initial state per sample, in the caller's batch order
            r = self.rnn
            h0 = torch.tanh(x[:, 0, :1]).expand(-1, r.hidden_size)
            h0 = h0.unsqueeze(0).expand(r.num_layers * (2 if r.bidirectional else 1), -1, -1).contiguous()
            hx = (h0, 0.5 * h0) if r.mode == "LSTM" else h0
        out, h = self.rnn(packed, hx)
        feats = []
        if self.use_out in ("h", "both"):
            feats.append((h[0] if isinstance(h, tuple) else h)[-1])
        if self.use_out in ("out", "both"):
            feats.append(nn.utils.rnn.pad_packed_sequence(out, batch_first=True)[0].sum(1))
        if self.use_out == "out_t":  # [T, B, F]: the samples on dim 1
            feats.append(nn.utils.rnn.pad_packed_sequence(out)[0].sum(0))
        return self.head(torch.cat(feats, -1))


def _packed_data(g, B, T=6):
    x = torch.randn(B, T, 4, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T  # the padded length is the longest
    x[:, :, 3] = lengths[:, None].float()
    return x, torch.randint(0, 4, (B,), generator=g)


@pytest.mark.parametrize("use_out,state", [("h", False), ("out", False), ("out_t", False), ("both", True)])
@pytest.mark.parametrize("kind,layers,bidir", [("lstm", 1, False), ("lstm", 2, True), ("gru", 2, True), ("rnn", 1, True)])
def test_packed_sequences_match_oracle(kind, layers, bidir, use_out, state):
    # each sample's state stops at its own last step (the reverse direction starts there): the
    # oracle packs each sample alone
    torch.manual_seed(12)
    g = torch.Generator().manual_seed(12)
    model = PackedSeq(kind, layers, bidir, use_out, state)
    err, _, og = compare(model, ce, _packed_data(g, 5), _packed_data(g, 3), alpha=0.3, backend="torch")
    assert err <= REL, f"{kind}/{layers}/{bidir}/{use_out}/{state}: relative error {err:.2e}"
    assert og.stats["fallback"] == []


def test_packed_sequences_under_autocast():
    if not autocast_ok(torch.bfloat16):
        pytest.skip("CPU autocast to bfloat16 is not supported by this torch build")
    torch.manual_seed(13)
    g = torch.Generator().manual_seed(13)
    model = PackedSeq("lstm", 1, True, "out")
    retain, unlearn = _packed_data(g, 5), _packed_data(g, 3)
    og = OrthoGrad(model, backend="torch")
    with og.retain():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(retain[0])
        ce(out.float(), retain[1]).mean().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(unlearn[0])
    ce(out.float(), unlearn[1]).mean().backward()
    u_half = {n: p.grad.reshape(-1).double().clone() for n, p in model.named_parameters()}
    og.project_()
    ref, _, u = oracle_direction(model, ce, retain, unlearn)
    for n, p in model.named_parameters():
        scale = float(ref[n].norm() + u[n].norm()) + 1e-30
        err = float((p.grad.reshape(-1).double() - ref[n]).norm()) / scale
        assert err <= max(REL_HALF, 2 * float((u_half[n] - u[n]).norm()) / scale), n
