"""Weights computed from parameters in the forward (torch.nn.utils.parametrizations): a weight norm,
a spectral norm, an orthogonal map. Their per-sample rows map back to the parameters by the
vector-Jacobian product of the recomputation (ParamSpace.rows_to_params), in float64 with the
float32 constants it meets (the spectral norm's power-iteration vectors, the orthogonal map's
identity) cast to it. Against the float64 per-sample loop."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as P

from engine_helpers import compare
from models import ce

REL = 1e-4


def _model(kind):
    if kind == "weight_norm":
        first = P.weight_norm(nn.Linear(4, 6))
    elif kind == "weight_norm_conv":
        first = nn.Sequential(nn.Unflatten(1, (1, 4)), P.weight_norm(nn.Conv1d(1, 2, 2)), nn.Flatten())
    elif kind == "spectral_norm":
        first = P.spectral_norm(nn.Linear(4, 6))
    else:
        first = P.orthogonal(nn.Linear(4, 6))
    return nn.Sequential(first, nn.Tanh(), nn.Linear(6, 3)).eval()  # (eval: no power iteration)


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("kind", ["weight_norm", "weight_norm_conv", "spectral_norm", "orthogonal"])
def test_parametrized_weight_matches_oracle(kind, scope):
    torch.manual_seed(9)
    g = torch.Generator().manual_seed(9)
    retain = (torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g))
    unlearn = (torch.randn(3, 4, generator=g), torch.randint(0, 3, (3,), generator=g))
    err, _, og = compare(_model(kind), ce, retain, unlearn, scope=scope, alpha=0.3, backend="torch")
    assert err <= REL, f"{kind}/{scope}: relative error {err:.2e}"
    assert og.stats["fallback"] == []


def _exact_step(model, seed, shape, classes, label=""):
    """One step in float64 on fresh data (retain 4, unlearn 2), against the oracle."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = model.double()
    retain = (torch.randn(4, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (4,), generator=g))
    unlearn = (torch.randn(2, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (2,), generator=g))
    err, _, og = compare(model, ce, retain, unlearn, alpha=0.2, backend="torch")
    assert err <= 1e-8, f"{label}: relative error {err:.2e}"
    return og


class PositionBiasMLP(nn.Module):
    """Swin V2's continuous position bias: an MLP over a constant coordinates table, written in
    place (``nn.ReLU(inplace=True)``, ``relu_``, ``*=``), added to attention scores over tokens."""

    def __init__(self, write, T=5, heads=2, d=4):
        super().__init__()
        self.qk = nn.Linear(d, 2 * d)
        self.mlp1 = nn.Linear(2, 8)
        self.mlp2 = nn.Linear(8, heads, bias=False)
        self.head = nn.Linear(heads * T, 3)
        self.register_buffer("coords", torch.randn(T * T, 2))
        self.write, self.T, self.heads = write, T, heads

    def forward(self, x):  # [B, T, d]
        B, T, d = x.shape
        q, k = self.qk(x).chunk(2, -1)
        h = self.mlp1(self.coords)
        if self.write == "module":
            h = nn.ReLU(inplace=True)(h)
        elif self.write == "method":
            h.relu_()
        elif self.write == "operator":
            h *= 0.5  # (the linear's backward does not read its output)
            h = torch.relu(h)
        else:
            h = torch.relu(h)
        bias = 16 * torch.sigmoid(self.mlp2(h)).transpose(0, 1).reshape(self.heads, T, T)
        scores = (q @ k.transpose(-2, -1)).unsqueeze(1) + bias  # [B, heads, T, T]
        return self.head(scores.softmax(-1).mean(-1).reshape(B, -1))


@pytest.mark.parametrize("write", ["none", "module", "method", "operator"])
def test_in_place_write_into_a_tensor_of_parameters(write):
    # the write's out-of-place twin applied to a snapshot of the value before it: the per-sample
    # rows map back through the ReLU (they once mapped through the recipe from before the write)
    og = _exact_step(PositionBiasMLP(write), 60, (5, 4), 3, write)
    assert og.stats["fallback"] == []


class PartialWrite(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.w = nn.Linear(3, 3)
        self.how = how

    def forward(self, x):
        t = self.w(torch.eye(3, dtype=x.dtype))  # parameters only
        if self.how == "slice":
            t[:, 0].mul_(2.0)
        else:
            t[0] = 0.0
        return x @ t


@pytest.mark.parametrize("how", ["slice", "setitem"])
def test_write_into_part_of_a_tensor_of_parameters_is_refused(how):
    from orthograd_fast import CaptureError, OrthoGrad

    model = PartialWrite(how)
    og = OrthoGrad(model)
    with pytest.raises(CaptureError, match="writes in place into"):
        with og.retain():
            model(torch.randn(4, 3)).sum().backward()
    assert all(p.grad is None for p in model.parameters())


def test_write_into_a_parameter_in_the_forward_still_runs():
    # a constraint applied to the weight's values in the forward (grad enabled): the capture reads
    # the written values as the forward does, as before
    class Clamped(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            self.lin.weight.data.clamp_(-0.4, 0.4)
            return self.lin(x)

    _exact_step(Clamped(), 61, (3,), 2, "clamped")


def test_reading_a_tensor_of_parameters_as_a_number_is_no_write():
    # __int__ (like __index__) starts with "__i" and writes nothing
    class Rows(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(3, 4))
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            k = int((self.table * 0.0).sum() + 2.0)  # Tensor.__int__ on parameters only
            return self.head(x + self.table[k] + self.table[0])

    _exact_step(Rows(), 62, (4,), 2, "int()")


class WrittenLookup(nn.Module):
    """A table looked up with ids shared by the samples (T5's relative-position bias), written in
    place before it meets the batch: its rows no longer map back as the lookup's."""

    def __init__(self, T=4):
        super().__init__()
        self.rel = nn.Embedding(7, 1)
        self.lin = nn.Linear(T, T)
        self.head = nn.Linear(T * T, 2)
        pos = torch.arange(T)
        self.register_buffer("ids", (pos[None, :] - pos[:, None]).clamp(-3, 3) + 3)

    def forward(self, x):  # [B, T, T]
        bias = self.rel(self.ids)  # [T, T, 1], parameters only
        bias.mul_(2.0).tanh_()
        bias = bias[..., 0]
        return self.head((self.lin(x) + bias).reshape(x.shape[0], -1))


def test_in_place_write_into_a_lookup_of_parameters():
    _exact_step(WrittenLookup(), 63, (4, 4), 2, "lookup")
