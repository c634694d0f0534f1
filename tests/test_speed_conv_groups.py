"""Grouped and depthwise convolutions kept as ConvFactors (input, output gradient, groups) against a
float64 per-sample loop: rows, tiles of whole groups, the token form, the update, and the conv
route's Gram and coefficients in slabs of several groups per call."""

import pytest
import torch
import torch.nn.functional as F

from orthograd_fast.engine import gram
from orthograd_fast.engine.conv_factors import ConvFactors
from orthograd_fast.engine.gram import PerSampleGrads

CASES = [  # nd, C, O, groups, spatial, kernel, stride, padding, dilation
    (2, 6, 6, 6, (7, 8), (3, 3), (1, 1), (1, 1), (1, 1)),  # depthwise
    (2, 4, 8, 4, (6, 5), (3, 2), (2, 1), (1, 0), (1, 2)),  # depthwise, channel multiplier 2
    (2, 6, 9, 3, (7, 7), (2, 2), (1, 2), (0, 1), (2, 1)),  # 3 groups of 2 -> 3
    (1, 4, 6, 2, (11,), (3,), (2,), (1,), (1,)),
    (1, 5, 5, 5, (9,), (4,), (1,), (2,), (2,)),
]


def _oracle_rows(x, gy, W, stride, padding, dilation, groups):
    conv = F.conv2d if x.dim() == 4 else F.conv1d
    rows = []
    for i in range(x.shape[0]):
        w = W.detach().double().clone().requires_grad_()
        y = conv(x[i : i + 1].double(), w, stride=stride, padding=padding, dilation=dilation, groups=groups)
        (g,) = torch.autograd.grad((y * gy[i : i + 1].double()).sum(), w)
        rows.append(g.reshape(-1))
    return torch.stack(rows)


def _case(case, B, dtype=torch.float32):
    nd, C, O, G, S, k, s, p, d = case
    g = torch.Generator().manual_seed(sum(S) + O + G)
    x = torch.randn(B, C, *S, generator=g, dtype=dtype)
    W = torch.randn(O, C // G, *k, generator=g, dtype=dtype)
    conv = F.conv2d if nd == 2 else F.conv1d
    L = conv(x, W, stride=s, padding=p, dilation=d, groups=G).shape[2:]
    gy = torch.randn(B, O, *L, generator=g, dtype=dtype)
    return ConvFactors(x, gy, k, s, p, d, G), _oracle_rows(x, gy, W, s, p, d, G), W, g


@pytest.mark.parametrize("case", CASES)
def test_grouped_conv_use_matches_per_sample_loop(case):
    B = 5
    use, G, W, g = _case(case, B)
    O = W.shape[0]
    og = use.channel_step
    tol = 1e-5 * G.abs().max()
    assert use.row * O == W.numel() and use.shape == (case[3], O // case[3], use.row)
    assert (use.explicit() - G).abs().max() <= tol
    o0, o1 = og, O if O // og < 3 else 3 * og  # whole groups, not starting at 0
    rows = G.reshape(B, O, -1)
    assert (use.tiles(o0, o1).double().reshape(B, o1 - o0, -1) - rows[:, o0:o1]).abs().max() <= tol
    b0, b1 = 1, B - 1
    tiles = use.tiles(o0, o1, b0, b1).double().reshape(b1 - b0, o1 - o0, -1)
    assert (tiles - rows[b0:b1, o0:o1]).abs().max() <= tol
    out = use.outer()  # token form, the parameter viewed as [G, O / G, C / G k]
    tok = torch.einsum("btgo,btgi->bgoi", out.D.double(), out.A.double()).reshape(B, -1)
    assert (tok - G).abs().max() <= tol
    assert (out.explicit() - G).abs().max() <= tol
    U = torch.randn(W.shape, generator=g)
    c = torch.randn(B, generator=g, dtype=torch.float64)
    ref = U.double().reshape(-1) - c @ G
    for V in (U.clone(), U.double()):
        use.apply_(V, c)
        vt = (1e-5 if V.dtype == torch.float32 else 1e-12) * ref.abs().max()
        assert (V.double().reshape(-1) - ref).abs().max() <= vt


@pytest.mark.parametrize("case", CASES)
def test_grouped_conv_route_gram_coef_update(case, monkeypatch):
    """The conv route (PerSampleGrads mode "conv") in float64: one convolution call per group (tiny
    CONV_TILE_BYTES) and float64 widening of one channel at a time, against the loop's rows."""
    monkeypatch.setattr(gram, "EXPLICIT_MAX", 0)
    monkeypatch.setattr(gram, "CONV_TILE_BYTES", 1)
    monkeypatch.setattr(gram, "TILE_SLAB_BYTES", 1)
    B = 7
    use, G, W, g = _case(case, B, torch.float64)
    p = torch.nn.Parameter(W.clone())
    t = PerSampleGrads("w", p, [use])
    if t.mode != "conv":  # the cost model picked the ghost route: the token form is tested above
        pytest.skip(f"route {t.mode}")
    U = torch.randn(W.shape, generator=g, dtype=torch.float64)
    K, b = t.gram_coef(U)
    assert torch.allclose(K, G @ G.t(), rtol=1e-12, atol=1e-12 * float(G.abs().max()) ** 2)
    assert torch.allclose(b, G @ U.reshape(-1), rtol=1e-12, atol=1e-10)
    assert torch.allclose(t.coef(U), b, rtol=1e-12, atol=1e-10)
    c = torch.randn(B, generator=g, dtype=torch.float64)
    V = U.clone()
    t.apply_(V, c, scale=-0.5)
    assert torch.allclose(V.reshape(-1), -0.5 * (U.reshape(-1) - c @ G), rtol=1e-12, atol=1e-10)
