"""The rank cutoff of the small solve, end to end: retain rows with singular values placed on both
sides of the cutoff (models.spectrum: exact in any precision), against the float64 oracle with the
same cutoff. A direction 1.5x above the cutoff must be kept and one 4x below dropped; with six
equal leading directions a cutoff taken relative to the trace (6 x the largest eigenvalue) would
drop the kept one, and a cutoff 100x too large both."""

import pytest
import torch

import orthograd_fast.engine.gram as gram
from engine_helpers import og_direction
from models import ce, spectrum
from oracle import oracle_direction, orthogonality

REL = 1e-5
ORTH = 1e-6
LEADING = [1.0, 0.9, 1.1, 1.0, 0.95, 1.05]


def _check(model, retain, unlearn, rtol_engine, rtol_oracle, scope):
    _, got = og_direction(model, ce, retain, unlearn, scope=scope, backend="torch", rtol=rtol_engine)
    ref, G, u = oracle_direction(model, ce, retain, unlearn, scope=scope, rtol=rtol_oracle)
    n = "0.weight"
    err = float((got[n] - ref[n]).norm() / (ref[n].norm() + u[n].norm()))
    assert err <= REL, f"relative error {err:.2e}"
    s = torch.linalg.svdvals(G[n])
    kept = int((s > rtol_oracle * s[0]).sum())
    assert kept == len(retain[0]) - 1, f"the oracle keeps {kept} of {len(retain[0])} directions"
    # the kept small direction is orthogonal to the result (a dropped one would not be)
    assert orthogonality({n: G[n][:kept]}, {n: -got[n]}, {n: u[n]}) <= ORTH


@pytest.fixture(params=["explicit", "factored"])
def route(request, monkeypatch):
    if request.param == "factored":
        monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)
    return request.param


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_explicit_rtol_keeps_and_drops(dtype, scope, route):
    R = 1e-3
    model, retain, unlearn = spectrum(LEADING + [1.5 * R, 0.25 * R], dtype=dtype, seed=1)
    _check(model, retain, unlearn, R, R, scope)


@pytest.mark.parametrize(
    "dtype,default", [(torch.float32, 1e-6), (torch.float64, 1e-8)], ids=["float32", "float64"]
)
def test_default_rtol_keeps_and_drops(dtype, default, route):
    # the documented defaults (solve.py) for float32 and float64 factors
    model, retain, unlearn = spectrum(LEADING + [1.5 * default, 0.25 * default], dtype=dtype, seed=2)
    _check(model, retain, unlearn, None, default, "tensor")
