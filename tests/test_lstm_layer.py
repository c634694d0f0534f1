"""The LSTM layer's hand-written backward through time against autograd on an unrolled float64
reference: outputs, every input gradient, and the gates' gradients D it keeps for the factors."""

import pytest
import torch

from orthograd_fast.engine import lstm_layer
from orthograd_fast.engine.lstm_layer import GateGrads, LSTMLayer


def unrolled(x, h, c, w_ih, w_hh, bias, reverse):
    """PyTorch's LSTM cell step by step under autograd; the pre-activations keep their gradients."""
    H = w_hh.shape[1]
    T = x.shape[1]
    outs, pres = [None] * T, [None] * T
    for t in range(T - 1, -1, -1) if reverse else range(T):
        pre = x[:, t] @ w_ih.t() + h @ w_hh.t() + (bias if bias is not None else 0)
        pre.retain_grad()
        pres[t] = pre
        i, f, g, o = pre.split(H, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs[t] = h
    return torch.stack(outs, 1), h, c, pres


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("B,T,I,H", [(3, 5, 4, 6), (1, 1, 2, 3), (4, 7, 3, 2)])
def test_lstm_layer_matches_autograd(B, T, I, H, reverse, with_bias):
    _check_against_unrolled(B, T, I, H, reverse, with_bias)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("B,parts", [(5, [(0, 2), (2, 5)]), (7, [(0, 1), (1, 4), (4, 7)])])
def test_lstm_layer_in_batch_parts_matches_autograd(monkeypatch, B, parts, reverse):
    # the recurrences of ragged batch parts, side by side on worker threads, fill the same rows
    monkeypatch.setattr(lstm_layer, "batch_parts", lambda b, device: parts if b == B else [(0, b)])
    _check_against_unrolled(B, 6, 3, 4, reverse, True)


def test_lstm_layer_batch_parts_cover_the_batch():
    cpu = torch.device("cpu")
    for B in (1, 7, 8, 16, 33, 64):
        parts = lstm_layer.batch_parts(B, cpu)
        assert parts[0][0] == 0 and parts[-1][1] == B
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        assert len(parts) <= max(1, torch.get_num_threads())
        assert len(parts) == 1 or min(b1 - b0 for b0, b1 in parts) >= lstm_layer.MIN_PART_ROWS


def _check_against_unrolled(B, T, I, H, reverse, with_bias):
    g = torch.Generator().manual_seed(B * 100 + T * 10 + H)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    leaves = [r(B, T, I), r(B, H), r(B, H), r(4 * H, I) * 0.5, r(4 * H, H) * 0.5, r(4 * H) if with_bias else None]
    mine = [t.clone().requires_grad_(True) if t is not None else None for t in leaves]
    ref = [t.clone().requires_grad_(True) if t is not None else None for t in leaves]
    # weights on the outputs so every output and step gets a different gradient
    wo, wh, wc = r(B, T, H), r(B, H), r(B, H)

    sink = GateGrads()
    out, h_n, c_n = LSTMLayer.apply(*mine, sink, reverse)
    ((out * wo).sum() + (h_n * wh).sum() + (c_n * wc).sum()).backward()
    out_r, h_r, c_r, pres = unrolled(*ref, reverse)
    ((out_r * wo).sum() + (h_r * wh).sum() + (c_r * wc).sum()).backward()

    for got, want in [(out, out_r), (h_n, h_r), (c_n, c_r)]:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for k, (a, b) in enumerate(zip(mine, ref)):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=f"gradient of input {k}")
    torch.testing.assert_close(sink.g, torch.stack([p.grad for p in pres], 1), rtol=1e-10, atol=1e-12)
    # the hidden state each position's step started from (the A of the hidden-to-hidden weight)
    h_prev = torch.stack([h.detach() for h in _h_prev(ref, reverse)], 1)
    torch.testing.assert_close(sink.h_prev, h_prev, rtol=1e-12, atol=1e-12)


def _h_prev(ref, reverse):
    x, h, c, w_ih, w_hh, bias = ref
    T, H = x.shape[1], w_hh.shape[1]
    prev = [None] * T
    with torch.no_grad():
        for t in range(T - 1, -1, -1) if reverse else range(T):
            prev[t] = h
            i, f, g, o = (x[:, t] @ w_ih.t() + h @ w_hh.t() + (bias if bias is not None else 0)).split(H, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
    return prev


def test_lstm_layer_detached_weights_get_no_gradient():
    # lean retain: weights handed out detached, outputs anchored to the real ones, which get no .grad
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 4, generator=g)
    w_ih, w_hh = torch.nn.Parameter(torch.randn(8, 4, generator=g)), torch.nn.Parameter(torch.randn(8, 2, generator=g))
    h0 = torch.zeros(2, 2)
    sink = GateGrads()
    out, h, c = LSTMLayer.apply(x, h0, h0, w_ih.detach(), w_hh.detach(), None, sink, False, w_ih, w_hh)
    assert out.requires_grad
    out.sum().backward()
    assert w_ih.grad is None and w_hh.grad is None
    assert sink.g is not None and sink.g.shape == (2, 3, 8) and bool(sink.g.abs().sum() > 0)




def test_lstm_layer_pooled_buffers_two_forwards_before_the_backwards():
    # two calls in flight at once take different buffers; a later step reuses them (layer_buffers)
    g = torch.Generator().manual_seed(11)
    B, T, I, H = 3, 4, 5, 6
    w_ih, w_hh, bias = torch.randn(4 * H, I, generator=g), torch.randn(4 * H, H, generator=g), torch.randn(4 * H, generator=g)
    for step in range(2):
        runs = []
        for k in range(2):
            x = torch.randn(B, T, I, generator=g, requires_grad=True)
            h0, c0 = torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)
            sink = GateGrads()
            out, _, _ = LSTMLayer.apply(x, h0, c0, w_ih, w_hh, bias, sink, bool(k))
            runs.append((x, h0, c0, sink, out))
        for k, (x, h0, c0, sink, out) in enumerate(runs):
            wo = torch.randn(B, T, H, generator=g)
            (out * wo).sum().backward()
            ref = [x.detach().double().requires_grad_(True), h0.double(), c0.double(), w_ih.double(), w_hh.double(), bias.double()]
            out_r, _, _, pres = unrolled(*ref, bool(k))
            (out_r * wo.double()).sum().backward()
            torch.testing.assert_close(out.double(), out_r, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(x.grad.double(), ref[0].grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(sink.g.double(), torch.stack([p.grad for p in pres], 1), rtol=1e-4, atol=1e-5)
