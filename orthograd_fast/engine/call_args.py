"""The leaves of an intercepted call's arguments, with their structure, and the reverse.

torch's pytree helpers build a recursive closure per call: a reference cycle left to the garbage
collector, hundreds per retain pass, whose collections scan the whole heap. These walk the
(args, kwargs) structure (lists, tuples, named tuples, dicts) directly.
"""

from __future__ import annotations


def flatten(args, kwargs) -> tuple:
    """(leaves in order, spec) of a call's ``args`` and ``kwargs``: the spec is the structure itself."""
    out: list = []
    _collect(args, out)
    _collect(kwargs, out)
    return out, (args, kwargs)


def _collect(x, out: list) -> None:
    if isinstance(x, (list, tuple)):
        for y in x:
            _collect(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _collect(y, out)
    else:
        out.append(x)


def unflatten(leaves, spec) -> tuple:
    """(args, kwargs) of ``spec`` (from :func:`flatten`) with ``leaves`` in place of its leaves."""
    it = iter(leaves)
    return _fill(spec[0], it), _fill(spec[1], it)


def _fill(x, it):
    if isinstance(x, (list, tuple)):
        items = [_fill(y, it) for y in x]
        if isinstance(x, list):
            return items
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    if isinstance(x, dict):
        return {k: _fill(v, it) for k, v in x.items()}
    return next(it)


def flat(args, kwargs) -> list:
    """The leaves of a call's arguments (tensors inside lists and tuples too), without a spec."""
    out = []
    stack = [kwargs.values(), args] if kwargs else [args]
    while stack:
        for a in stack.pop():
            if isinstance(a, (list, tuple)):
                stack.append(a)
            else:
                out.append(a)
    return out
