"""OrthoGrad on a torch.compile'd model: the hook path works (forward hooks and tensor hooks on
layer outputs are traced by dynamo, with graph breaks where needed) and matches the float64 oracle.

The inductor test compiles C++ kernels (gcc) and takes well over 30 s on a 2-core CPU: marked slow.
The dynamo-only test (backend="eager": same tracing, hooks and guards, no code generation) runs in
the default selection.
"""

import pytest
import torch

import orthograd_fast.engine.gram as gram
from models import ce, make
from oracle import oracle_direction, orthogonality
from orthograd_fast import OrthoGrad

REL = 1e-4
ORTH = 1e-5


def _check(compile_backend, name, factored, monkeypatch):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available in this torch build")
    if factored:
        monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, retain, unlearn = make(name, torch.Generator().manual_seed(0))
    cm = torch.compile(model, backend=compile_backend)
    og = OrthoGrad(cm, backend="torch")
    cm.zero_grad(set_to_none=True)
    with og.retain():
        ce(cm(retain[0]), retain[1]).mean().backward()
    ce(cm(unlearn[0]), unlearn[1]).mean().backward()
    og.project_()
    # the compiled wrapper shares the parameters of `model` (named "_orig_mod.<name>")
    got = {n: p.grad.reshape(-1).double() for n, p in model.named_parameters() if p.requires_grad}
    ref, G, u = oracle_direction(model, ce, retain, unlearn)  # the uncompiled model, float64
    err = max(float((got[n] - ref[n]).norm() / (ref[n].norm() + u[n].norm() + 1e-30)) for n in ref)
    assert err <= REL, f"{name}/{compile_backend}: relative error {err:.2e}"
    assert orthogonality(G, {n: -got[n] for n in got}, u) <= ORTH


@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize("name", ["mlp", "speech"])
def test_compiled_dynamo_eager_matches_oracle(name, factored, monkeypatch):
    _check("eager", name, factored, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "lm"])
def test_compiled_inductor_matches_oracle(name, monkeypatch):
    _check("inductor", name, False, monkeypatch)
