"""orthograd-fast: exact OrthoGrad unlearning from per-layer factors.

    from orthograd_fast import OrthoGrad
    og = OrthoGrad(model, scope="tensor", alpha=0.0, backend="auto", rtol=None)
    with og.retain():
        retain_loss_fn(model(x_r), y_r).backward()
    unlearn_loss_fn(model(x_u), y_u).backward()
    og.project_()
    opt.step()
"""

from .api import OrthoGrad

__version__ = "0.1.0"

__all__ = ["OrthoGrad", "unlearn", "__version__"]


def __getattr__(name):
    # The unlearning loop pulls in optional pieces (metrics, data); import it on first use only.
    if name == "unlearn":
        from .unlearn import unlearn

        return unlearn
    raise AttributeError(f"module 'orthograd_fast' has no attribute {name!r}")
