"""orthograd_fast.engine.call_args: flatten and unflatten an intercepted call's arguments."""

import collections

import torch

from orthograd_fast.engine.call_args import flat, flatten, unflatten

Pair = collections.namedtuple("Pair", "a b")


def _call():
    g = torch.Generator().manual_seed(3)
    t = [torch.randn(2, 3, generator=g) for _ in range(5)]
    args = (t[0], [t[1], (t[2], 7)], Pair(t[3], "x"), torch.Size([4, 5]))
    kwargs = {"w": t[4], "opts": {"k": 2, "m": [None, 1.5]}}
    return t, args, kwargs


def test_round_trip_keeps_structure_and_types():
    t, args, kwargs = _call()
    leaves, spec = flatten(args, kwargs)
    assert [x for x in leaves if isinstance(x, torch.Tensor)] == [t[0], t[1], t[2], t[3], t[4]]
    a, kw = unflatten(leaves, spec)
    assert isinstance(a, tuple) and isinstance(a[1], list) and isinstance(a[2], Pair) and isinstance(a[3], torch.Size)
    assert a[3] == torch.Size([4, 5]) and a[2].b == "x" and a[1][1][1] == 7
    assert kw["opts"] == {"k": 2, "m": [None, 1.5]} and kw["w"] is t[4]


def test_unflatten_puts_new_leaves_in_order():
    t, args, kwargs = _call()
    leaves, spec = flatten(args, kwargs)
    new = [x * 2 if isinstance(x, torch.Tensor) else x for x in leaves]
    a, kw = unflatten(new, spec)
    assert torch.equal(a[0], 2 * t[0]) and torch.equal(a[1][0], 2 * t[1]) and torch.equal(a[1][1][0], 2 * t[2])
    assert torch.equal(a[2].a, 2 * t[3]) and torch.equal(kw["w"], 2 * t[4])


def test_flat_sees_every_tensor():
    t, args, kwargs = _call()
    # (the mode's quick test for a parameter operand: lists, tuples and the top-level kwargs)
    got = [x for x in flat(args, kwargs) if isinstance(x, torch.Tensor)]
    assert len(got) == len(t) and {id(x) for x in got} == {id(x) for x in t}
