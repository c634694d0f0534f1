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
