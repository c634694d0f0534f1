"""orthograd-fast: exact OrthoGrad unlearning from per-layer factors.

    from orthograd_fast import OrthoGrad
    og = OrthoGrad(model, scope="tensor", alpha=0.0, backend="auto", rtol=None)
    with og.retain():
        retain_loss_fn(model(x_r), y_r).backward()
    with og.forget():                 # optional: cheaper coefficients for MLP / head layers
        unlearn_loss_fn(model(x_u), y_u).backward()
    og.project_()
    opt.step()
"""

from .api import OrthoGrad, OrthoGradError
from .errors import CaptureError, UnsupportedModule

# The unlearning loop needs torch only (scikit-learn and friends are imported inside the functions
# that use them), so importing it eagerly costs no optional dependency.
from .unlearning import unlearn

__version__ = "0.1.0"

__all__ = ["OrthoGrad", "OrthoGradError", "CaptureError", "UnsupportedModule", "unlearn", "__version__"]
