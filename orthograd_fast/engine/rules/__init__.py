"""Per-operation rules: one intercepted call that consumes a managed parameter -> per-sample uses.

Each rule gets the call's context (:class:`orthograd_fast.engine.op_capture.OpContext`), runs the
operation with the parameters as the context hands them out (detached under lean retain) and
records what it needs (the data input, detached); the output gradient arrives in the backward, and
the uses are built on leaving ``retain()``. A rule returns ``NotImplemented`` when the call is not
the batched form it knows (e.g. an embedding lookup with ids shared by all samples: then it is a
computation on parameters only, see :mod:`orthograd_fast.engine.param_space`).

One module per family: :mod:`.dense` (linear, matmul, addmm, bilinear, embedding, bags),
:mod:`.conv`, :mod:`.norm` (norms, PReLU), :mod:`.per_sample` (einsum, attention); :mod:`.cells`
writes the recurrent cells out as their linear maps (``CELLS``, captured like ``MHA_FUNCS``).
"""

from __future__ import annotations

import types
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import UnsupportedModule  # re-exported
from .cells import CELLS
from .conv import conv, conv_transpose
from .dense import addmm, bilinear, embedding, embedding_bag, getitem, grouped_bmm, linear, matmul
from .norm import batch_norm, group_norm, instance_norm, layer_norm, prelu, rms_norm
from .per_sample import attention, einsum

RULES: Dict[Callable, Callable] = {
    F.linear: linear,
    torch.matmul: matmul,
    torch.addmm: addmm,
    Tensor.addmm: addmm,
    torch.bmm: grouped_bmm,
    Tensor.bmm: grouped_bmm,
    torch.baddbmm: grouped_bmm,
    Tensor.baddbmm: grouped_bmm,
    torch.einsum: einsum,
    Tensor.matmul: matmul,
    Tensor.__matmul__: matmul,
    torch.conv1d: conv,
    torch.conv2d: conv,
    torch.conv3d: conv,
    torch.conv_transpose1d: conv_transpose,
    torch.conv_transpose2d: conv_transpose,
    torch.conv_transpose3d: conv_transpose,
    F.layer_norm: layer_norm,
    torch.layer_norm: layer_norm,
    F.group_norm: group_norm,
    torch.group_norm: group_norm,
    F.batch_norm: batch_norm,
    F.instance_norm: instance_norm,
    torch.batch_norm: batch_norm,
    F.embedding: embedding,
    F.embedding_bag: embedding_bag,
    Tensor.__getitem__: getitem,
    torch.prelu: prelu,
    torch.bilinear: bilinear,
    F.scaled_dot_product_attention: attention,
}
if hasattr(F, "rms_norm"):
    RULES[F.rms_norm] = rms_norm
if hasattr(torch, "rms_norm"):
    RULES[torch.rms_norm] = rms_norm


# Operations that broadcast a parameter against batched data sample by sample (dim 0 of the
# batched operand stays the sample index): a parameter meeting the batch there is handed out
# expanded along the batch (param_space.PerSample).
def _names(obj, names):
    return {getattr(obj, n) for n in names if hasattr(obj, n)}


_ARITH = ("add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "addcmul", "addcdiv", "where",
          "maximum", "minimum", "lerp", "rsub")
_DUNDER = ("__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
           "__truediv__", "__rtruediv__", "__itruediv__", "__div__", "__rdiv__")
BROADCAST = (
    _names(torch, _ARITH)
    | _names(Tensor, _ARITH)
    | _names(Tensor, tuple(n + "_" for n in _ARITH))
    | _names(Tensor, _DUNDER)
)
CONCAT = _names(torch, ("cat", "concat", "concatenate"))

# Operations that act on each row of dim 0 alone: on parameters only, one row expanded along the
# batch gives equal rows too (op_capture._row_wise). ROWWISE_FIRST: those whose row operand is the first.
_UNARY = ("relu", "gelu", "silu", "sigmoid", "tanh", "neg", "exp", "float", "half", "bfloat16", "to", "type_as", "contiguous", "clone")
ROWWISE_FIRST = {F.linear, F.layer_norm, torch.layer_norm} | _names(F, ("rms_norm",)) | _names(torch, ("rms_norm",))
ROWWISE = BROADCAST | ROWWISE_FIRST | _names(F, _UNARY) | _names(torch, _UNARY) | _names(Tensor, _UNARY) | _names(Tensor, ("__neg__",))


def _mha_with_inner_calls():
    """torch's own ``F.multi_head_attention_forward`` with its torch-function dispatch switched
    off, so that called inside the capture mode the mode sees its inner projections (F.linear)."""
    f = F.multi_head_attention_forward
    g = dict(f.__globals__)
    g["has_torch_function"] = lambda *a, **k: False
    return types.FunctionType(f.__code__, g, f.__name__, f.__defaults__, f.__closure__)


MHA_FORWARD = _mha_with_inner_calls()
MHA_FUNCS = {F.multi_head_attention_forward}


def op_name(func) -> str:
    """A readable name: torch.conv2d, torch.nn.functional.layer_norm, Tensor.add, ..."""
    name = getattr(func, "__name__", None) or repr(func)
    mod = getattr(func, "__module__", None)
    return f"{mod}.{name}" if mod else f"Tensor.{name}"


__all__ = ["RULES", "BROADCAST", "CONCAT", "ROWWISE", "ROWWISE_FIRST", "CELLS", "MHA_FORWARD", "MHA_FUNCS", "op_name", "UnsupportedModule"]
