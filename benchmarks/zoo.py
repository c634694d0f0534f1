"""Model zoo for the orthograd-fast benchmarks: plain torch.nn modules with random weights.

Nothing is downloaded: every model is built from ``torch.nn`` layers and initialised from a seed,
so the same (name, size, overrides, seed) always gives the same weights on every machine.

API (also used by ``benchmarks/gpu/``)::

    from benchmarks.zoo import build_model, per_sample_loss, MODEL_NAMES

    model, make_batch = build_model("gpt2", size="gpu", T=256, device="cuda")
    g = torch.Generator().manual_seed(0)
    x, y = make_batch(64, g)                 # tensors on the model's device
    losses = per_sample_loss("gpt2")(model(x), y)   # shape [64]

- ``build_model(name, size="cpu"|"gpu", *, seed=0, device=None, dtype=None, **overrides)``
  returns ``(model, make_batch)``. ``size`` picks a config from ``CONFIGS[name]``; any config key
  can be overridden (e.g. ``n_layer=2, T=64``). The model is returned in **eval mode** (no
  dropout anywhere; BatchNorm uses its running statistics, calibrated at build time on random
  data), so a sample's loss depends on that sample only and per-sample gradients are well defined.
- ``make_batch(B, generator=None, device=None) -> (x, y)``: random inputs and targets drawn on the
  CPU from ``generator`` (deterministic) and moved to ``device`` (default: the build device).
  Integer inputs (token ids) are ``int64``; float inputs use the model's dtype.
- ``per_sample_loss(name)`` -> ``fn(outputs, targets) -> [B]`` per-sample losses (cross entropy;
  for the language model the per-token cross entropy averaged over positions).
- ``config(name, size, **overrides)`` -> the resolved config dict; ``MODEL_NAMES`` lists the zoo.

Models (the ``gpu`` config is the full-size one, ``cpu`` is small enough for a 2-core quick run):

| name | what | cpu config | gpu config |
|---|---|---|---|
| ``mlp`` | Linear+ReLU MLP | 512-1024x3-10 | same |
| ``cnn`` | 2 conv (3x3) + maxpool, 2 linear, 32x32x3 input | 32/64 ch, 128 hidden | same |
| ``resnet18`` | CIFAR ResNet-18 (3x3 stem, no maxpool), eval BatchNorm | width 16 | width 64 (11.2M) |
| ``vit_tiny`` | ViT: conv patch embed, cls token, pre-LN blocks | 32px/4, d 192, depth 2 | 224px/16, d 192, depth 12, 1000 cls |
| ``gpt2`` | GPT-2-shaped decoder, causal SDPA, wte tied to the LM head | d 128, 2 layers, V 2048, T 32 | GPT-2 small 124M, T 256 |
| ``whisper_tiny`` | Whisper-tiny-shaped encoder: Conv1d front end + blocks, mean-pool head | 80 mel x 100 frames, d 128, 2 layers | 80 mel x 3000 frames, d 384, 4 layers |
| ``transformer`` | 2-block pre-LN transformer classifier on token ids | d 128, T 64 | same |

Conventions that matter for per-sample gradients: attention is ``nn.Linear`` projections (fused
qkv + output) around ``F.scaled_dot_product_attention`` on batch-first tensors; positions and the
ViT cls token are ``nn.Embedding`` lookups with ids expanded to ``[B, T]`` (so every parameter's
use carries a batch dimension); the GPT-2 LM head shares its weight with ``wte``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["build_model", "per_sample_loss", "config", "CONFIGS", "MODEL_NAMES", "count_params"]


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-head self-attention: fused qkv nn.Linear, SDPA, output nn.Linear. Batch-first."""

    def __init__(self, d: int, heads: int, causal: bool = False):
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} not divisible by heads={heads}")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, d: int, heads: int, mlp_ratio: int = 4, causal: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads, causal)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, mlp_ratio * d)
        self.out = nn.Linear(mlp_ratio * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


def _positions(n: int, B: int, device) -> torch.Tensor:
    return torch.arange(n, device=device).unsqueeze(0).expand(B, n)


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, d_in=512, hidden=1024, depth=3, classes=10):
        super().__init__()
        dims = [d_in] + [hidden] * depth
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    def __init__(self, in_ch=3, img=32, widths=(32, 64), hidden=128, classes=10):
        super().__init__()
        layers, c = [], in_ch
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        side = img // (2 ** len(widths))
        self.fc1 = nn.Linear(c * side * side, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.features(x).flatten(1))))


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stem, no max-pool, stages [2, 2, 2, 2] at widths w, 2w, 4w, 8w."""

    def __init__(self, width=64, classes=10, in_ch=3, img=32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, c = [], width
        for i, w in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            blocks += [BasicBlock(c, w, stride), BasicBlock(w, w, 1)]
            c = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ViT(nn.Module):
    def __init__(self, img=224, patch=16, in_ch=3, d=192, depth=12, heads=3, mlp_ratio=4, classes=1000):
        super().__init__()
        if img % patch:
            raise ValueError("img must be a multiple of patch")
        self.n_tokens = (img // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(in_ch, d, patch, patch)
        self.cls = nn.Embedding(1, d)
        self.pos = nn.Embedding(self.n_tokens, d)
        self.blocks = nn.Sequential(*[Block(d, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        B = x.shape[0]
        p = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, d]
        cls = self.cls(torch.zeros(B, 1, dtype=torch.long, device=x.device))
        h = torch.cat([cls, p], dim=1) + self.pos(_positions(self.n_tokens, B, x.device))
        h = self.norm(self.blocks(h))
        return self.head(h[:, 0])


class GPT2(nn.Module):
    """GPT-2-shaped decoder: wte + wpe, n_layer pre-LN causal blocks, ln_f, LM head tied to wte."""

    def __init__(self, vocab=50257, n_layer=12, d=768, heads=12, n_positions=1024, mlp_ratio=4):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(n_positions, d)
        self.blocks = nn.Sequential(*[Block(d, heads, mlp_ratio, causal=True) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for name, p in self.named_parameters():  # GPT-2 style init
            if name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)
            if name.endswith("out.weight") or name.endswith("attn.proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    def forward(self, ids):
        B, T = ids.shape
        h = self.wte(ids) + self.wpe(_positions(T, B, ids.device))
        return self.lm_head(self.ln_f(self.blocks(h)))


class WhisperEncoder(nn.Module):
    """Whisper-tiny-shaped encoder (Conv1d k3, Conv1d k3 stride 2, GELU, sinusoidal positions,
    pre-LN blocks, ln_post) with a mean-pool + linear classification head for a per-sample loss."""

    def __init__(self, n_mels=80, n_frames=3000, d=384, heads=6, layers=4, classes=10):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        n_ctx = (n_frames + 1) // 2
        pos = torch.arange(n_ctx).unsqueeze(1)
        inv = torch.exp(-math.log(10000.0) * torch.arange(d // 2) / max(d // 2 - 1, 1))
        self.register_buffer("pos", torch.cat([torch.sin(pos * inv), torch.cos(pos * inv)], dim=1))
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, mel):  # [B, n_mels, n_frames]
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)
        x = self.ln_post(self.blocks(x + self.pos.to(x.dtype)))
        return self.head(x.mean(dim=1))


class TokenTransformer(nn.Module):
    """Small transformer classifier on token ids: embedding + positions, pre-LN blocks, mean-pool."""

    def __init__(self, vocab=256, T=64, d=128, heads=4, layers=2, mlp_ratio=4, classes=10):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        self.blocks = nn.Sequential(*[Block(d, heads, mlp_ratio) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        B, T = ids.shape
        h = self.tok(ids) + self.pos(_positions(T, B, ids.device))
        return self.head(self.norm(self.blocks(h)).mean(dim=1))


# ----------------------------------------------------------------------------------------------
# configs and the public API
# ----------------------------------------------------------------------------------------------
CONFIGS: Dict[str, Dict[str, dict]] = {
    "mlp": {
        "cpu": dict(d_in=512, hidden=1024, depth=3, classes=10),
        "gpu": dict(d_in=512, hidden=1024, depth=3, classes=10),
    },
    "cnn": {
        "cpu": dict(in_ch=3, img=32, widths=(32, 64), hidden=128, classes=10),
        "gpu": dict(in_ch=3, img=32, widths=(32, 64), hidden=128, classes=10),
    },
    "resnet18": {
        "cpu": dict(width=16, classes=10, in_ch=3, img=32),
        "gpu": dict(width=64, classes=10, in_ch=3, img=32),
    },
    "vit_tiny": {
        "cpu": dict(img=32, patch=4, in_ch=3, d=192, depth=2, heads=3, mlp_ratio=4, classes=10),
        "gpu": dict(img=224, patch=16, in_ch=3, d=192, depth=12, heads=3, mlp_ratio=4, classes=1000),
    },
    "gpt2": {
        "cpu": dict(vocab=2048, n_layer=2, d=128, heads=4, T=32, n_positions=None),
        "gpu": dict(vocab=50257, n_layer=12, d=768, heads=12, T=256, n_positions=1024),
    },
    "whisper_tiny": {
        "cpu": dict(n_mels=80, n_frames=100, d=128, heads=4, layers=2, classes=10),
        "gpu": dict(n_mels=80, n_frames=3000, d=384, heads=6, layers=4, classes=10),
    },
    "transformer": {
        "cpu": dict(vocab=256, T=64, d=128, heads=4, layers=2, mlp_ratio=4, classes=10),
        "gpu": dict(vocab=256, T=64, d=128, heads=4, layers=2, mlp_ratio=4, classes=10),
    },
}
MODEL_NAMES = tuple(CONFIGS)


def lookup_config(configs: dict, name: str, size: str, overrides: dict, zoo: str = "the zoo") -> dict:
    """configs[name][size] updated with ``overrides`` (known keys only), as a new dict."""
    if name not in configs:
        raise KeyError(f"unknown model {name!r}; {zoo} has {', '.join(configs)}")
    if size not in configs[name]:
        raise KeyError(f"unknown size {size!r} for {name!r}; use one of {sorted(configs[name])}")
    cfg = dict(configs[name][size])
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise TypeError(f"{name}: unknown config keys {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(overrides)
    return cfg


def config(name: str, size: str = "cpu", **overrides) -> dict:
    cfg = lookup_config(CONFIGS, name, size, overrides)
    if name == "gpt2" and cfg["n_positions"] is None:
        cfg["n_positions"] = cfg["T"]
    return cfg


def _calibrate_batchnorm(model: nn.Module, make_batch, generator: torch.Generator, batches=2, B=16):
    """Give eval-mode BatchNorm realistic running statistics: cumulative averages over a few random
    batches (no gradients), then back to eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(make_batch(B, generator)[0])
    for m in bns:
        m.momentum = 0.1
    model.eval()


def build_model(
    name: str,
    size: str = "cpu",
    *,
    seed: int = 0,
    device=None,
    dtype: Optional[torch.dtype] = None,
    **overrides,
) -> Tuple[nn.Module, Callable]:
    """Build zoo model ``name`` at ``size`` ("cpu" small / "gpu" full), eval mode, seeded weights.

    Returns ``(model, make_batch)`` with ``make_batch(B, generator=None, device=None) -> (x, y)``.
    """
    cfg = config(name, size, **overrides)
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or torch.get_default_dtype()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "mlp":
            model = MLP(**cfg)
        elif name == "cnn":
            model = SmallCNN(**cfg)
        elif name == "resnet18":
            model = ResNet18(**cfg)
        elif name == "vit_tiny":
            model = ViT(**cfg)
        elif name == "gpt2":
            model = GPT2(**{k: v for k, v in cfg.items() if k != "T"})
        elif name == "whisper_tiny":
            model = WhisperEncoder(**cfg)
        elif name == "transformer":
            model = TokenTransformer(**cfg)
        else:  # pragma: no cover - config() already rejected it
            raise KeyError(name)

    model = model.to(dtype=dtype)

    def make_batch(B: int, generator: Optional[torch.Generator] = None, device=None):
        dev = device if device is not None else build_device
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        if name == "mlp":
            x = torch.randn(B, cfg["d_in"], generator=g, dtype=dtype)
            y = torch.randint(cfg["classes"], (B,), generator=g)
        elif name in ("cnn", "resnet18", "vit_tiny"):
            x = torch.randn(B, cfg["in_ch"], cfg["img"], cfg["img"], generator=g, dtype=dtype)
            y = torch.randint(cfg["classes"], (B,), generator=g)
        elif name == "gpt2":
            x = torch.randint(cfg["vocab"], (B, cfg["T"]), generator=g)
            y = torch.randint(cfg["vocab"], (B, cfg["T"]), generator=g)
        elif name == "whisper_tiny":
            x = torch.randn(B, cfg["n_mels"], cfg["n_frames"], generator=g, dtype=dtype)
            y = torch.randint(cfg["classes"], (B,), generator=g)
        else:  # transformer
            x = torch.randint(cfg["vocab"], (B, cfg["T"]), generator=g)
            y = torch.randint(cfg["classes"], (B,), generator=g)
        return x.to(dev), y.to(dev)

    build_device = torch.device("cpu")  # read by make_batch; the build device once the model moved
    _calibrate_batchnorm(model, make_batch, torch.Generator().manual_seed(seed + 1))
    model = model.to(device).eval()
    build_device = device
    make_batch.config = cfg  # type: ignore[attr-defined]
    make_batch.model_name = name  # type: ignore[attr-defined]
    return model, make_batch


def _ce_per_sample(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def _lm_per_sample(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    B, T, V = outputs.shape
    return F.cross_entropy(outputs.reshape(B * T, V), targets.reshape(B * T), reduction="none").view(B, T).mean(1)


def per_sample_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``fn(outputs, targets) -> [B]`` per-sample losses for zoo model ``name``."""
    if name not in CONFIGS:
        raise KeyError(f"unknown model {name!r}")
    return _lm_per_sample if name == "gpt2" else _ce_per_sample


def count_params(model: nn.Module) -> int:
    """Trainable parameters, tied tensors counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
