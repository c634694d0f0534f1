"""Operation-level capture against the float64 oracle: modules other than the stock layers (custom
forwards, raw parameters, nn.MultiheadAttention, ...) exact with no torch.func fallback use."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine_helpers import compare
from models import ce
from orthograd_fast import OrthoGrad
from orthograd_fast.errors import CaptureError

REL = 1e-4


class LayerNorm2d(nn.LayerNorm):
    """Channels-first LayerNorm with its own forward (ConvNeXt style)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class ScaledBlock(nn.Module):
    """A residual block owning a layer-scale parameter ``gamma`` next to its sub-layers."""

    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.gamma = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x + self.gamma * torch.tanh(self.fc(x))


class TinyViT(nn.Module):
    """Patch embedding + raw cls_token / pos_embed parameters of the root + a transformer layer."""

    def __init__(self, d=8, classes=5):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 3, stride=3)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, d) * 0.5)
        self.block = nn.TransformerEncoderLayer(d, 2, 12, dropout=0.0, batch_first=True)
        self.norm = LayerNorm2d(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.norm(self.patch(x)).flatten(2).transpose(1, 2)  # [B, 4, d]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.block(x)[:, 0])


class Decoder(nn.Module):
    def __init__(self, d=8, classes=5):
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.layer = nn.TransformerDecoderLayer(d, 2, 10, dropout=0.0, batch_first=True)
        self.memory = nn.Linear(3, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # x [B, T, 3]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        h = self.layer(self.inp(x), self.memory(x[:, :3]), tgt_mask=mask)
        return self.head(h.mean(1))


class EinsumMix(nn.Module):
    """Raw parameters used through torch.einsum (a weight) and a broadcast division (a temperature)."""

    def __init__(self, d, k):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, k) / d**0.5)
        self.temp = nn.Parameter(torch.tensor(1.3))

    def forward(self, x):
        return torch.einsum("bti,ik->btk", torch.tanh(x), self.w).mean(1) / self.temp


class ScaledEmb(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * self.embedding_dim**0.5


class RMSSub(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-6)


class BNAct(nn.BatchNorm2d):
    """A BatchNorm with a fused activation (eval statistics)."""

    def forward(self, x):
        return F.silu(super().forward(x))


class GNSub(nn.GroupNorm):
    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class NormsNet(nn.Module):
    """Subclasses with their own forward around F.embedding, F.rms_norm, F.batch_norm, F.group_norm."""

    def __init__(self, V=11, d=6, T=4):
        super().__init__()
        self.emb = ScaledEmb(V, d, padding_idx=0)
        self.rms = RMSSub(d)
        self.bn = BNAct(d)
        self.gn = GNSub(2, d)
        self.head = nn.Linear(d * T, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            for p in (self.bn.weight, self.bn.bias, self.gn.weight, self.gn.bias):
                p.uniform_(0.5, 1.5)

    def forward(self, ids):
        h = self.rms(self.emb(ids)).transpose(1, 2).unsqueeze(-1)  # [B, d, T, 1]
        return self.head(self.gn(self.bn(h)).flatten(1))


class RelBiasAttention(nn.Module):
    """T5-style relative position bias owned by the attention module: a table looked up with ids
    shared by all samples (a tensor of parameters only), scaled, and added to batched scores."""

    def __init__(self, d=6, heads=2, T=4, buckets=5):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.table = nn.Parameter(torch.randn(buckets, heads))
        self.heads = heads
        rel = torch.arange(T)[None, :] - torch.arange(T)[:, None]
        self.register_buffer("ids", rel.clamp(-2, 2) + 2)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        bias = (F.embedding(self.ids, self.table).permute(2, 0, 1) * 0.5).unsqueeze(0)  # [1, H, T, T]
        att = torch.softmax(q @ k.transpose(-1, -2) + bias, -1)
        return (att @ v).transpose(1, 2).reshape(B, T, d)


class HandConv1D(nn.Module):
    """transformers' Conv1D written by hand: raw weight [I, O] and bias, torch.addmm over the
    tokens folded into dim 0 ([B * T, I]: T rows per sample)."""

    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(i, o) / i**0.5)
        self.bias = nn.Parameter(torch.randn(o) * 0.1)

    def forward(self, x):
        y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return y.reshape(*x.shape[:-1], -1)


class BilinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.bil = nn.Bilinear(4, 3, 5)

    def forward(self, x):
        return self.bil(x, torch.tanh(self.a(x)))


def _cnn():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.PReLU(4),
        nn.ConvTranspose2d(4, 3, (3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0)),
        nn.PReLU(),
        LayerNorm2d(3),
        nn.Flatten(),
        nn.Linear(3 * 10 * 6, 5),
    )


def make(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    ri = lambda hi, *s: torch.randint(0, hi, s, generator=g)
    if name == "vit_root":
        return TinyViT(), (r(5, 3, 6, 6), ri(5, 5)), (r(3, 3, 6, 6), ri(5, 3))
    if name == "encoder":
        m = nn.Sequential(nn.Linear(3, 8), nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False), nn.Flatten(), nn.Linear(8 * 4, 5))
        return m, (r(5, 4, 3), ri(5, 5)), (r(3, 4, 3), ri(5, 3))
    if name == "decoder":
        return Decoder(), (r(5, 4, 3), ri(5, 5)), (r(3, 4, 3), ri(5, 3))
    if name == "conv_transpose_prelu":
        return _cnn(), (r(5, 2, 5, 5), ri(5, 5)), (r(3, 2, 5, 5), ri(5, 3))
    if name == "layer_scale":
        m = nn.Sequential(nn.Linear(6, 7), ScaledBlock(7), ScaledBlock(7), nn.Linear(7, 4))
        return m, (r(6, 6), ri(4, 6)), (r(4, 6), ri(4, 4))
    if name == "bilinear":
        return BilinearNet(), (r(5, 4), ri(5, 5)), (r(3, 4), ri(5, 3))
    if name == "rel_bias":
        m = nn.Sequential(nn.Linear(3, 6), RelBiasAttention(), nn.Flatten(), nn.Linear(24, 5))
        return m, (r(5, 4, 3), ri(5, 5)), (r(3, 4, 3), ri(5, 3))
    if name == "norms":
        ids = lambda b: torch.randint(0, 11, (b, 4), generator=g)
        return NormsNet().eval(), (ids(5), ri(5, 5)), (ids(3), ri(5, 3))
    if name == "addmm":  # T = 5 == B: dim 0 of the folded input is B * T
        m = nn.Sequential(nn.Linear(3, 6), HandConv1D(6, 4), nn.Tanh(), HandConv1D(4, 4), nn.Flatten(), nn.Linear(20, 5))
        return m, (r(5, 5, 3), ri(5, 5)), (r(3, 5, 3), ri(5, 3))
    if name == "einsum":
        return nn.Sequential(nn.Linear(3, 6), EinsumMix(6, 4)), (r(5, 3, 3), ri(4, 5)), (r(3, 3, 3), ri(4, 3))
    raise KeyError(name)


OP_MODELS = ["vit_root", "encoder", "decoder", "conv_transpose_prelu", "layer_scale", "bilinear", "einsum", "norms", "rel_bias",
             "addmm"]


def assert_no_fallback(og):
    assert og.stats["fallback"] == [], og.stats["fallback"]


@pytest.mark.parametrize("scope,alpha", [("tensor", 0.0), ("global", 0.3)])
@pytest.mark.parametrize("name", OP_MODELS)
def test_op_models_match_oracle(name, scope, alpha):
    _check_op_model(name, scope, alpha)


@pytest.mark.slow
@pytest.mark.parametrize("scope,alpha", [("tensor", 0.3), ("global", 0.0)])
@pytest.mark.parametrize("name", OP_MODELS)
def test_op_models_match_oracle_other_settings(name, scope, alpha):
    _check_op_model(name, scope, alpha)


def _check_op_model(name, scope, alpha):
    model, retain, unlearn = make(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback use warns: fail on it
        err, orth, og = compare(model, ce, retain, unlearn, scope=scope, alpha=alpha, backend="torch")
    assert err <= REL, f"{name}/{scope}/{alpha}: relative error {err:.2e}"
    assert_no_fallback(og)


@pytest.mark.parametrize("name", ["vit_root", "decoder", "layer_scale"])
def test_op_models_lean_off_forget_block_unlearn_first(name):
    # the same models with lean_retain=False (retain gradients kept), og.forget() around the unlearn
    # pass and the unlearn pass first
    model, retain, unlearn = make(name, seed=1)
    err, _, og = compare(model, ce, retain, unlearn, alpha=0.3, backend="torch", lean_retain=False, forget=True, unlearn_first=True)
    assert err <= REL, err
    assert_no_fallback(og)
    model, retain, unlearn = make(name, seed=2)
    err, _, og = compare(model, ce, retain, unlearn, scope="global", backend="torch", forget=True)
    assert err <= REL, err
    assert all(p in og._lean for _, p in og.parameters)


class RBF(nn.Module):
    """Raw centers consumed by an operation with no per-sample rule (torch.cdist)."""

    def __init__(self, d, k=5):
        super().__init__()
        self.w = nn.Parameter(torch.randn(k, d))

    def forward(self, x):
        return torch.exp(-torch.cdist(x, self.w))


def test_op_without_rule_goes_to_fallback_visibly():
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), RBF(5), nn.Linear(5, 3))
    retain = (torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g))
    unlearn = (torch.randn(3, 4, generator=g), torch.randint(0, 3, (3,), generator=g))
    with pytest.warns(RuntimeWarning, match="module '1' .*cdist"):
        err, _, og = compare(model, ce, retain, unlearn, alpha=0.3, backend="torch")
    assert err <= REL, err
    (scope,) = og.stats["fallback"]
    assert scope["module"] == "1" and "cdist" in scope["op"] and scope["params"] == 25
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # warned once per scope, not every step
        with og.retain():
            ce(model(retain[0]), retain[1]).mean().backward()
    assert len(og.stats["fallback"]) == 1


class RBFPair(RBF):
    """Two outputs, the second computed from the first inside the module (an LSTM cell's h from its c)."""

    def forward(self, x):
        d = torch.cdist(x, self.w)
        return d, torch.exp(-d)


class PairHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.rbf, self.head = nn.Linear(4, 5), RBFPair(5), nn.Linear(10, 3)

    def forward(self, x):
        d, e = self.rbf(self.inp(x))
        return self.head(torch.cat([d, e], 1))


def test_fallback_module_whose_outputs_depend_on_each_other_is_exact():
    # the hook on d sees what e sends back through the module too: the replay, which follows
    # that path itself, must get only what the rest of the model sends (else d's path counts twice)
    torch.manual_seed(4)
    g = torch.Generator().manual_seed(4)
    retain = (torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g))
    unlearn = (torch.randn(3, 4, generator=g), torch.randint(0, 3, (3,), generator=g))
    with pytest.warns(RuntimeWarning, match="cdist"):
        err, _, og = compare(PairHead(), ce, retain, unlearn, backend="torch")
    assert err <= REL, err
    assert [s["module"] for s in og.stats["fallback"]] == ["rbf"]


def test_parameter_used_outside_its_module_with_no_rule_is_an_error():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = RBF(4)
            self.head = nn.Linear(5, 3)

        def forward(self, x):  # the child's parameter, used by the parent through an op with no rule
            return self.head(torch.cdist(x, self.inner.w))

    model = Outer()
    og = OrthoGrad(model)
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(CaptureError, match="inner.w"):
        with og.retain():
            model(x).sum().backward()
    assert all(p.grad is None for p in model.parameters())


def test_first_span_checks_then_later_steps_run_lean():
    # until the first projection the operation-captured parameters run with their real tensors
    # (their retain gradient checks the capture); afterwards they get detached aliases (no retain
    # weight gradient), and the direction still matches the oracle
    from oracle import oracle_direction

    model, retain, unlearn = make("vit_root", seed=4)
    og = OrthoGrad(model, alpha=0.3, backend="torch")
    hits = []
    handles = [
        p.register_post_accumulate_grad_hook(lambda q, n=n: hits.append(n) if q.grad is not None else None)
        for n, p in model.named_parameters()
    ]
    try:
        per_step = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            hits.clear()
            with og.retain():
                ce(model(retain[0]), retain[1]).mean().backward()
            per_step.append(set(hits))
            ce(model(unlearn[0]), unlearn[1]).mean().backward()
            og.project_()
    finally:
        for h in handles:
            h.remove()
    op = {n for n, p in model.named_parameters() if p in og._lean}
    assert {"cls_token", "pos_embed", "norm.weight", "block.self_attn.in_proj_weight"} <= op
    assert op <= per_step[0] and not (op & per_step[1]), per_step
    got = {n: p.grad.reshape(-1).double() for n, p in model.named_parameters()}
    ref, G, u = oracle_direction(model, ce, retain, unlearn, scope="tensor", alpha=0.3)
    for n in ref:
        scale = ref[n].norm() + 0.7 * u[n].norm() + 0.3 * G[n].mean(0).norm()
        assert float((got[n] - ref[n]).norm() / scale) <= REL, n


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s):
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        return g * s, (g * x).sum(0)


class HiddenUse(nn.Module):
    """A parameter (through a tensor made from it) consumed by a custom autograd.Function, which
    the operation capture cannot see."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return _Scale.apply(x, self.w * 1.0)


def test_use_hidden_from_the_operations_is_an_error_on_the_first_projection():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), HiddenUse(4), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    og = OrthoGrad(model)
    with og.retain():
        ce(model(x), y).mean().backward()
    ce(model(x[:2]), y[:2]).mean().backward()
    with pytest.raises(CaptureError, match="1.w"):
        og.project_()


class InstanceNormNet(nn.Module):
    def __init__(self, dims, track):
        super().__init__()
        conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dims == 2 else (nn.Conv1d, nn.InstanceNorm1d)
        # (no conv bias: the norm takes each channel's mean out, so its gradient is exactly zero)
        self.conv, self.norm = conv(3, 4, 3, padding=1, bias=False), norm(4, affine=True, track_running_stats=track)
        self.head = nn.Linear(4 * (36 if dims == 2 else 7), 3)
        if track:  # running statistics that are not the identity
            with torch.no_grad():
                self.norm.running_mean.normal_()
                self.norm.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


@pytest.mark.parametrize("dims,track,train", [(2, False, False), (1, False, True), (2, True, False), (2, True, True)])
def test_instance_norm_affine_is_captured(dims, track, train):
    # per-sample statistics (or, in eval with running statistics, an affine x-hat): the weight's
    # rows without the torch.func fallback
    torch.manual_seed(11)
    g = torch.Generator().manual_seed(11)
    shape = (3, 6, 6) if dims == 2 else (3, 7)
    model = InstanceNormNet(dims, track).train(train)
    retain = (torch.randn(5, *shape, generator=g), torch.randint(0, 3, (5,), generator=g))
    unlearn = (torch.randn(3, *shape, generator=g), torch.randint(0, 3, (3,), generator=g))
    err, _, og = compare(model, ce, retain, unlearn, alpha=0.3, backend="torch")
    assert err <= REL, f"{dims}/{track}/{train}: relative error {err:.2e}"
    assert og.stats["fallback"] == []


class LeftWeight(nn.Module):
    """Mamba's time-step projection in its slow path: ``dt_proj.weight @ x.transpose(1, 2)`` (the
    weight on the left of batch-first tokens), its bias added along the channels."""

    def __init__(self, d=3, inner=5, T=4):
        super().__init__()
        self.x_proj = nn.Linear(d, 2)
        self.dt_proj = nn.Linear(2, inner)
        self.head = nn.Linear(inner * T, 3)

    def forward(self, x):  # [B, T, d]
        t = self.x_proj(x)  # [B, T, 2]
        dt = self.dt_proj.weight @ t.transpose(1, 2)  # [B, inner, T]
        dt = torch.nn.functional.softplus(dt + self.dt_proj.bias[:, None])
        return self.head(dt.reshape(x.shape[0], -1))


@pytest.mark.parametrize("B", [1, 4])
def test_weight_on_the_left_of_batched_tokens(B):
    torch.manual_seed(70 + B)
    g = torch.Generator().manual_seed(70 + B)
    model = LeftWeight().double()
    retain = (torch.randn(B, 4, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,), generator=g))
    unlearn = (torch.randn(2, 4, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (2,), generator=g))
    err, _, og = compare(model, ce, retain, unlearn, alpha=0.2, backend="torch")
    assert err <= 1e-8, f"relative error {err:.2e}"
    assert og.stats["fallback"] == []


class SeqFirstLookup(nn.Module):
    """Token ids looked up sequence-first (XLNet transposes its ids to [T, B] before the lookup),
    the rest of the model batch-first: the lookup's ids carry the batch on dim 1."""

    def __init__(self, V=11, d=4, classes=3):
        super().__init__()
        self.emb = nn.Embedding(V, d, padding_idx=0)
        self.lin = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        h = self.emb(ids.t().contiguous()).transpose(0, 1)  # [T, B, d] -> [B, T, d]
        return self.head(torch.tanh(self.lin(h)).mean(1))


@pytest.mark.parametrize("B", [1, 4])
def test_lookup_with_the_batch_on_dim_1(B):
    # the ids were taken as shared by all samples (positions) and their lookup as parameters only
    g = torch.Generator().manual_seed(B)
    torch.manual_seed(B)
    model = SeqFirstLookup().double()
    data = lambda b: (torch.randint(0, 11, (b, 5), generator=g), torch.randint(0, 3, (b,), generator=g))
    err, orth, og = compare(model, ce, data(B), data(3), alpha=0.2, backend="torch")
    assert err <= 1e-9, f"relative error {err:.2e}"
    assert orth <= 1e-9, orth
    assert og.stats["fallback"] == [], og.stats["fallback"]
