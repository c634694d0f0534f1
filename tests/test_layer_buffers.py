"""The pool of layer buffers: a buffer is handed out again only when nothing else refers to it."""

import pytest
import torch

from orthograd_fast.engine import layer_buffers

pytestmark = pytest.mark.skipif(layer_buffers._use_count is None, reason="this torch exposes no storage use count: the pool allocates")


@pytest.fixture(autouse=True)
def fresh_pool():
    layer_buffers.release()
    yield
    layer_buffers.release()


def _ptr(t):
    return t.untyped_storage().data_ptr()


def test_a_free_buffer_is_handed_out_again():
    like = torch.randn(3)
    a = layer_buffers.take("x", (5, 7), like)
    assert a.shape == (5, 7) and a.dtype == like.dtype
    p = _ptr(a)
    del a
    b = layer_buffers.take("x", (5, 7), like)
    assert _ptr(b) == p


def test_a_buffer_in_use_is_not_handed_out():
    like = torch.randn(3)
    a = layer_buffers.take("x", (4, 6), like)
    view = a[1:].unbind(0)  # only views of it left
    del a
    b = layer_buffers.take("x", (4, 6), like)
    assert _ptr(b) != _ptr(view[0])
    # names, shapes and dtypes are pooled apart
    assert _ptr(layer_buffers.take("y", (4, 6), like)) != _ptr(b)
    assert layer_buffers.take("x", (4, 6), like.double()).dtype == torch.float64


def test_a_buffer_saved_for_backward_waits_for_the_backward():
    class Keep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, buf):
            ctx.save_for_backward(buf)
            return x * 2

        @staticmethod
        def backward(ctx, g):
            (buf,) = ctx.saved_tensors
            return g * buf.sum(), None

    like = torch.randn(3)
    buf = layer_buffers.take("s", (3,), like).copy_(torch.arange(1.0, 4.0))
    p = _ptr(buf)
    x = torch.randn(3, requires_grad=True)
    y = Keep.apply(x, buf)
    del buf
    other = layer_buffers.take("s", (3,), like).fill_(100.0)  # must not overwrite the saved one
    assert _ptr(other) != p
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 6.0))  # 1 + 2 + 3: the saved values
    del y, other
    assert _ptr(layer_buffers.take("s", (3,), like)) == p  # the graph is gone: free again


def test_the_pool_keeps_at_most_its_budget(monkeypatch):
    monkeypatch.setattr(layer_buffers, "POOL_BYTES", 100 * 4)
    like = torch.randn(1)
    a = layer_buffers.take("a", (60,), like)
    b = layer_buffers.take("b", (60,), like)  # over the budget: fresh, not kept
    pa = _ptr(a)
    del a, b
    assert _ptr(layer_buffers.take("a", (60,), like)) == pa
    assert layer_buffers._pool().nbytes == 240
    assert "b" not in {k[0] for k, v in layer_buffers._pool().bufs.items() if v}


def test_release_and_other_devices_allocate(monkeypatch):
    like = torch.randn(2)
    a = layer_buffers.take("r", (8,), like)
    del a
    layer_buffers.release()
    assert layer_buffers._pool().nbytes == 0
    assert layer_buffers.take("r", (8,), torch.empty(1, device="meta")).device.type == "meta"
    monkeypatch.setattr(layer_buffers, "_use_count", None)
    assert layer_buffers._pool().nbytes == 0 and layer_buffers.take("r", (8,), like).shape == (8,)
    assert layer_buffers._pool().nbytes == 0


def test_a_full_pool_drops_free_buffers_of_other_shapes(monkeypatch):
    # a sequence length that changes: the old length's free buffers make room for the new one's
    monkeypatch.setattr(layer_buffers, "POOL_BYTES", 100 * 4)
    like = torch.randn(1)
    old = layer_buffers.take("g", (60,), like)
    del old
    busy = layer_buffers.take("h", (30,), like)  # in use: stays
    new = layer_buffers.take("g", (70,), like)
    pool = layer_buffers._pool()
    assert pool.nbytes == (30 + 70) * 4
    assert [b.numel() for b in pool.bufs[("g", (70,), like.dtype)]] == [70]
    assert ("g", (60,), like.dtype) not in pool.bufs
    assert _ptr(pool.bufs[("h", (30,), like.dtype)][0]) == _ptr(busy)
    del new


def test_eviction_of_one_buffer_among_several_of_a_shape(monkeypatch):
    # the pool drops the free one of two same-shape buffers, keeps the busy one and stays counted
    monkeypatch.setattr(layer_buffers, "POOL_BYTES", 100 * 4)
    like = torch.randn(1)
    a = layer_buffers.take("s", (40,), like)
    b = layer_buffers.take("s", (40,), like)  # a is busy: a second buffer
    pb = _ptr(b)
    del b
    c = layer_buffers.take("t", (50,), like)  # 80 + 50 > 100: b's buffer goes, a's stays
    pool = layer_buffers._pool()
    kept = pool.bufs[("s", (40,), like.dtype)]
    assert [_ptr(x) for x in kept] == [_ptr(a)] and pb != _ptr(a)
    assert pool.nbytes == 90 * 4
    del c
