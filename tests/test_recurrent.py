"""nn.LSTM / nn.GRU / nn.RNN: exact per-sample gradients from the unrolled forward (oracle)."""

import pytest
import torch
from torch import nn

from engine_helpers import compare
from models import ce
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
