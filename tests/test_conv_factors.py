"""ConvFactors (orthograd_fast.engine.conv_factors) against a float64 per-sample loop: per-sample weight
gradients g_i = d/dW <conv(x_i, W), gy_i>, then U - sum c_i g_i, tiles and the token form."""

import pytest
import torch
import torch.nn.functional as F

from orthograd_fast.engine.conv_factors import ConvFactors

CASES = [  # nd, C, O, spatial, kernel, stride, padding, dilation, groups
    (2, 3, 5, (7, 9), (3, 2), (1, 2), (1, 0), (1, 1), 1),
    (2, 4, 6, (8, 5), (2, 3), (2, 1), (0, 2), (2, 1), 1),
    (1, 3, 7, (11,), (3,), (2,), (1,), (1,), 1),
    (1, 2, 4, (13,), (4,), (1,), (0,), (3,), 1),
    # depthwise (one input channel per group: the forward-conv tiles), with a channel multiplier,
    # and grouped with several input channels per group
    (2, 5, 5, (9, 7), (3, 3), (1, 1), (1, 1), (1, 1), 5),
    (2, 3, 6, (10, 7), (3, 2), (2, 1), (2, 1), (1, 2), 3),
    (1, 4, 8, (12,), (5,), (2,), (2,), (2,), 4),
    (2, 6, 4, (7, 8), (2, 3), (1, 2), (0, 1), (2, 1), 2),
    # depthwise with padding as wide as the output gradient (a late stage's 7 x 7 on 2 x 2 maps:
    # x padded before the grouped convolution), uneven per axis, strided, and 1-d
    (2, 6, 6, (2, 3), (7, 5), (1, 1), (3, 2), (1, 1), 6),
    (2, 4, 8, (2, 2), (3, 3), (2, 1), (2, 2), (1, 1), 4),
    (1, 3, 3, (2,), (5,), (1,), (2,), (1,), 3),
    # 1 x 1 without padding (the batched-GEMM tiles), strided and not, 2-d and 1-d
    (2, 5, 7, (6, 9), (1, 1), (1, 1), (0, 0), (1, 1), 1),
    (2, 3, 6, (7, 10), (1, 1), (2, 3), (0, 0), (1, 1), 1),
    (1, 4, 5, (11,), (1,), (2,), (0,), (1,), 1),
]


def _oracle_rows(x, gy, W, stride, padding, dilation, groups=1):
    conv = F.conv2d if x.dim() == 4 else F.conv1d
    rows = []
    for i in range(x.shape[0]):
        w = W.detach().double().clone().requires_grad_()
        y = conv(x[i : i + 1].double(), w, stride=stride, padding=padding, dilation=dilation, groups=groups)
        (g,) = torch.autograd.grad((y * gy[i : i + 1].double()).sum(), w)
        rows.append(g.reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("case", CASES)
def test_conv_use_matches_per_sample_loop(case):
    nd, C, O, S, k, s, p, d, groups = case
    g = torch.Generator().manual_seed(sum(S) + O + groups)
    B = 5
    x = torch.randn(B, C, *S, generator=g)
    W = torch.randn(O, C // groups, *k, generator=g)
    conv = F.conv2d if nd == 2 else F.conv1d
    L = conv(x, W, stride=s, padding=p, dilation=d, groups=groups).shape[2:]
    gy = torch.randn(B, O, *L, generator=g)
    use = ConvFactors(x, gy, k, s, p, d, groups)
    G = _oracle_rows(x, gy, W, s, p, d, groups)  # [B, numel] float64
    U = torch.randn(O, C // groups, *k, generator=g)
    c = torch.randn(B, generator=g, dtype=torch.float64)
    assert (use.explicit() - G).abs().max() <= 1e-5 * G.abs().max()
    step = O // groups  # slabs of output channels are whole groups
    o0, o1 = (1, O - 1) if groups == 1 else (step, O - step if O > 2 * step else O)
    tiles = use.tiles(o0, o1).double().reshape(B, o1 - o0, -1)
    assert (tiles - G.reshape(B, O, -1)[:, o0:o1]).abs().max() <= 1e-5 * G.abs().max()
    b0, b1 = 1, B - 1  # a chunk of samples (the engine's sample chunks)
    tiles = use.tiles(o0, o1, b0, b1).double().reshape(b1 - b0, o1 - o0, -1)
    assert (tiles - G.reshape(B, O, -1)[b0:b1, o0:o1]).abs().max() <= 1e-5 * G.abs().max()
    ref = U.double().reshape(-1) - c @ G
    for V in (U.clone(), U.double()):  # the float32 update and the engine's exact (float64) one
        use.apply_(V, c)
        tol = (1e-5 if V.dtype == torch.float32 else 1e-12) * ref.abs().max()
        assert (V.double().reshape(-1) - ref).abs().max() <= tol
    out = use.outer()  # token form: sum_t D_t (x) A_t
    tok = torch.einsum("btgo,btgi->bgoi", out.D.double(), out.A.double()).reshape(B, -1)
    assert (tok - G).abs().max() <= 1e-5 * G.abs().max()
    # the token form unfolded on first use: the same factors, shapes known before unfolding
    later = use.outer_later()
    assert later._form is None
    assert (later.B, later.shape, later.a_dtype) == (B, out.shape, out.A.dtype)
    assert later.a_shape == out.A.shape and later._form is None
    assert torch.equal(later.A, out.A) and torch.equal(later.D, out.D)


def test_ghost_conv_terms_unfold_in_their_job_not_when_built():
    # a late convolution (few positions, many channels): the ghost route, its im2col deferred
    from orthograd_fast.engine.gram import PerSampleGrads

    g = torch.Generator().manual_seed(3)
    B, C, O = 9, 64, 64  # B * numel above EXPLICIT_MAX
    x = torch.randn(B, C, 3, 3, generator=g)
    W = torch.nn.Parameter(torch.randn(O, C, 3, 3, generator=g))
    gy = torch.randn(B, O, 3, 3, generator=g)
    term = PerSampleGrads("late.weight", W, [ConvFactors(x, gy, (3, 3), (1, 1), (1, 1), (1, 1))])
    assert term.mode == "ghost"
    assert term.route.use._form is None  # building the term and its cost formed nothing
    assert term.work() > 0 and term.update_work() > 0 and term.factor_dtype == torch.float32
    assert term.route.use._form is None
    U = torch.randn_like(W)
    K, b = term.gram_coef(U)
    G = _oracle_rows(x, gy, W, 1, 1, 1)
    assert (K - G @ G.t()).abs().max() <= 1e-5 * (G @ G.t()).abs().max()
    assert (b - G @ U.double().reshape(-1)).abs().max() <= 1e-5 * G.abs().max() * U.abs().max() * G.shape[1] ** 0.5
