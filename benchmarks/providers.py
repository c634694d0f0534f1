"""The timed implementations of one unlearning step. Every provider leaves its direction in
``p.grad`` (``grads``), and ``step`` then applies ``opt.step()`` (plain SGD, no state).

| provider | what one step does |
|---|---|
| ``plain`` | NegGrad+: retain fwd+bwd of alpha*L_r, unlearn fwd+bwd of -(1-alpha)*L_u, opt.step (the floor) |
| ``reference-qr`` / ``reference-svd`` | ``orthograd_fast.reference.orthograd_direction`` (torch.func per-sample gradients, per-tensor QR / SVD projector), opt.step |
| ``opacus`` | Opacus ``GradSampleModule`` per-sample gradients, unlearn grad with hooks off, per-tensor QR projection (as the paper's code), opt.step |
| ``torch`` / ``triton`` | ``OrthoGrad(backend=...)``: unlearn backward under ``og.forget()``, then retain under ``og.retain()`` (the documented fast, light path), ``og.project_()``, opt.step |
| ``torch-contract`` | ``OrthoGrad(backend="torch")`` in the API contract's order: retain under ``og.retain()`` first, then the unlearn backward (no ``og.forget()``), ``og.project_()``, opt.step |

Losses: L_r and L_u are means of ``per_sample_loss`` over the batch (gbar_r = mean gradient).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .oracle import grads_as_dict

__all__ = ["PROVIDERS", "make_provider", "unavailable_reason", "materialized_bytes"]

Batch = Tuple[torch.Tensor, torch.Tensor]


class Provider:
    name = "?"
    materializes = False  # holds B x P per-sample gradients (used to predict out-of-memory on CPU)
    qr_semantics = False  # projects with QR(G_t^T), no rank tolerance (the paper's code)

    def __init__(self, model: nn.Module, loss_fn, *, alpha: float = 0.0, scope: str = "tensor", lr: float = 1e-4, rtol=None):
        self.model, self.loss_fn, self.alpha, self.scope, self.rtol = model, loss_fn, alpha, scope, rtol
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=lr)

    @classmethod
    def unavailable(cls, device: torch.device, model: nn.Module) -> Optional[str]:
        return None

    def grads(self, retain: Batch, unlearn: Batch) -> None:
        raise NotImplementedError

    def step(self, retain: Batch, unlearn: Batch) -> None:
        self.grads(retain, unlearn)
        self.opt.step()

    def direction(self, retain: Batch, unlearn: Batch) -> Dict[str, Optional[torch.Tensor]]:
        self.grads(retain, unlearn)
        return grads_as_dict(self.model)

    def close(self) -> None:
        pass


class Plain(Provider):
    name = "plain"

    def grads(self, retain, unlearn):
        self.opt.zero_grad(set_to_none=True)
        (self.alpha * self.loss_fn(self.model(retain[0]), retain[1]).mean()).backward()
        (-(1 - self.alpha) * self.loss_fn(self.model(unlearn[0]), unlearn[1]).mean()).backward()


class Reference(Provider):
    materializes = True
    method = "qr"

    @classmethod
    def unavailable(cls, device, model):
        try:
            from orthograd_fast.reference import orthograd_direction  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return f"orthograd_fast.reference not importable: {type(e).__name__}: {e}"
        return None

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        from orthograd_fast.reference import orthograd_direction

        self._fn = orthograd_direction
        self._named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def grads(self, retain, unlearn):
        d = self._fn(self.model, self.loss_fn, retain, unlearn, scope=self.scope, alpha=self.alpha, method=self.method, rtol=self.rtol)
        for n, p in self._named:
            p.grad = d[n].to(p.dtype).reshape(p.shape)


class ReferenceQR(Reference):
    name = "reference-qr"
    method = "qr"
    qr_semantics = True


class ReferenceSVD(Reference):
    name = "reference-svd"
    method = "svd"


class OpacusQR(Provider):
    """Opacus per-sample gradients (GradSampleModule hooks, loss_reduction='sum') + the paper's
    per-tensor projection: Q = qr(G_t^T).Q, P_perp(u_t) = u_t - Q (Q^T u_t)."""

    name = "opacus"
    materializes = True
    qr_semantics = True

    @classmethod
    def unavailable(cls, device, model):
        try:
            import opacus  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return f"opacus not installed ({type(e).__name__}); pip install 'orthograd-fast[bench]'"
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            return "opacus does not support BatchNorm (per-sample gradients undefined in its train-mode hooks)"
        return None

    def __init__(self, model, loss_fn, **k):
        import warnings

        from opacus import GradSampleModule

        super().__init__(model, loss_fn, **k)
        if self.scope != "tensor":
            raise NotImplementedError("the opacus provider implements scope='tensor' only")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
        # Opacus only captures activations of modules in training mode; the zoo has no dropout and
        # no BatchNorm here, so train mode computes the same function as eval mode.
        self.gsm.train()

    def grads(self, retain, unlearn):
        params, a = self.params, self.alpha
        for p in params:
            p.grad = None
            p.grad_sample = None
        self.gsm.enable_hooks()
        self.loss_fn(self.gsm(retain[0]), retain[1]).sum().backward()
        B = retain[0].shape[0]
        G = [p.grad_sample.reshape(B, -1) for p in params]
        gbar = [p.grad / B for p in params]
        for p in params:
            p.grad = None
            p.grad_sample = None
        self.gsm.disable_hooks()
        self.loss_fn(self.gsm(unlearn[0]), unlearn[1]).mean().backward()
        for p, Gt, gb in zip(params, G, gbar):
            u = p.grad.reshape(-1)
            Q, _ = torch.linalg.qr(Gt.T)
            pu = u - Q @ (Q.T @ u)
            p.grad = (a * gb.reshape(-1) - (1 - a) * pu).view_as(p)

    def close(self):
        try:
            self.gsm.disable_hooks()
            self.gsm._close()
        except Exception:  # noqa: BLE001
            pass


class OrthoGradProvider(Provider):
    backend = "torch"

    @classmethod
    def unavailable(cls, device, model):
        try:
            from orthograd_fast import OrthoGrad

            OrthoGrad.retain  # noqa: B018 - the placeholder class has no API yet
        except Exception as e:  # noqa: BLE001
            return f"orthograd_fast.OrthoGrad not usable: {type(e).__name__}: {e}"
        return None

    def __init__(self, model, loss_fn, **k):
        from orthograd_fast import OrthoGrad

        super().__init__(model, loss_fn, **k)
        self.og = OrthoGrad(model, scope=self.scope, alpha=self.alpha, backend=self.backend, rtol=self.rtol)

    def grads(self, retain, unlearn):
        self.opt.zero_grad(set_to_none=True)
        # unlearn pass first (the documented lighter order: the retain factors never coexist
        # with the unlearn activations), under og.forget() (cheaper coefficients, same result)
        with self.og.forget():
            self.loss_fn(self.model(unlearn[0]), unlearn[1]).mean().backward()
        with self.og.retain():
            self.loss_fn(self.model(retain[0]), retain[1]).mean().backward()
        self.og.project_()

    def close(self):
        for meth in ("remove", "close", "detach"):
            f = getattr(self.og, meth, None)
            if callable(f):
                try:
                    f()
                except Exception:  # noqa: BLE001
                    pass
                break


class TorchBackend(OrthoGradProvider):
    name = "torch"
    backend = "torch"


class TorchContract(OrthoGradProvider):
    """The order a user writes from the API contract: retain block first, unlearn after, no forget()."""

    name = "torch-contract"
    backend = "torch"

    def grads(self, retain, unlearn):
        self.opt.zero_grad(set_to_none=True)
        with self.og.retain():
            self.loss_fn(self.model(retain[0]), retain[1]).mean().backward()
        self.loss_fn(self.model(unlearn[0]), unlearn[1]).mean().backward()
        self.og.project_()


class TritonBackend(OrthoGradProvider):
    name = "triton"
    backend = "triton"

    @classmethod
    def unavailable(cls, device, model):
        if device.type != "cuda":
            return "triton backend runs on CUDA only (no CUDA device in this run)"
        try:
            import triton  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return f"triton not importable: {type(e).__name__}: {e}"
        return super().unavailable(device, model)


PROVIDERS = {c.name: c for c in (Plain, ReferenceQR, ReferenceSVD, OpacusQR, TorchBackend, TorchContract, TritonBackend)}


def unavailable_reason(name: str, device: torch.device, model: nn.Module) -> Optional[str]:
    return PROVIDERS[name].unavailable(device, model)


def make_provider(name: str, model: nn.Module, loss_fn, **kw) -> Provider:
    return PROVIDERS[name](model, loss_fn, **kw)


def materialized_bytes(name: str, model: nn.Module, B: int) -> int:
    """Rough bytes a provider needs beyond the plain step (0 when it does not materialize
    per-sample gradients): B x P per-sample gradients, a flattened copy and the QR/SVD factors."""
    if not PROVIDERS[name].materializes:
        return 0
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    elt = next(model.parameters()).element_size()
    return 3 * B * P * elt


def provider_names() -> List[str]:
    return list(PROVIDERS)
