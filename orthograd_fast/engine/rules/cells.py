"""Recurrent cells (nn.LSTMCell, nn.GRUCell, nn.RNNCell: ``torch.lstm_cell`` and the others), one
step per call: written out as their two linear maps and the gates, so that the capture sees the
linear maps (F.linear: dense uses of both weights, token sums for the biases) and no cell goes to
the torch.func fallback. Formulas and gate order are ATen's (LSTM i, f, g, o; GRU r, z, n with
the hidden bias inside r * (W_hn h + b_hn)); the op capture calls these with its mode re-entered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lstm_gates(gx, gh, c):
    """(h', c') of one LSTM step from the input's and the hidden state's gate products (i, f, g, o),
    biases included (also the unrolled recurrence's step: engine/recurrent.py)."""
    i, f, g, o = (gx + gh).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gru_gates(gx, gh, h):
    """h' of one GRU step from the input's and the hidden state's gate products (r, z, n), biases
    included: the hidden bias sits inside r * (W_hn h + b_hn)."""
    xr, xz, xn = gx.chunk(3, -1)
    hr, hz, hn = gh.chunk(3, -1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """(h', c') of one LSTM step from x [B, I] and hx = (h, c) [B, H]."""
    h, c = hx
    return lstm_gates(F.linear(input, w_ih, b_ih), F.linear(h, w_hh, b_hh), c)


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """h' of one GRU step from x [B, I] and h [B, H]."""
    return gru_gates(F.linear(input, w_ih, b_ih), F.linear(hx, w_hh, b_hh), hx)


def rnn_tanh_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return torch.tanh(F.linear(input, w_ih, b_ih) + F.linear(hx, w_hh, b_hh))


def rnn_relu_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return torch.relu(F.linear(input, w_ih, b_ih) + F.linear(hx, w_hh, b_hh))


# the cell operation -> its written-out step
CELLS = {
    torch.lstm_cell: lstm_cell,
    torch.gru_cell: gru_cell,
    torch.rnn_tanh_cell: rnn_tanh_cell,
    torch.rnn_relu_cell: rnn_relu_cell,
}
