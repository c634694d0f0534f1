"""Real-model zoo: models from libraries this project does not control, at a CPU and a GPU size.

The ``transformers`` models are built from small configs with random weights (nothing is
downloaded); ``transformer_encoder`` is ``nn.TransformerEncoder`` (batch_first=True) and
``lstm`` an ``nn.LSTM`` classifier. Same API as :mod:`benchmarks.zoo`, so the runner and the
pytest-benchmark suite take either zoo::

    from benchmarks.real_zoo import build_model, per_sample_loss, MODEL_NAMES
    model, make_batch = build_model("hf_vit", size="cpu")
    x, y = make_batch(32, torch.Generator().manual_seed(0))
    losses = per_sample_loss("hf_vit")(model(x), y)     # [32]

Every model is wrapped in :class:`Wrapped` (``forward(x) -> logits``), returned in eval mode
(dropout off, BatchNorm on calibrated running statistics) with every dropout probability of its
config set to 0. The CPU size is chosen so a plain NegGrad+ step (B = 32 retain, 16 unlearn)
takes roughly 20-200 ms on 2 cores; the GPU size is the model family's small public size.

Inputs are used as a user would pass them: ids / pixels / features only (no explicit
position ids), so a library that builds an index tensor without a batch dimension shows up as
such. Models the engine refuses give a "refused" row in the benchmarks, not a crash.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from . import zoo as _zoo

__all__ = ["build_model", "per_sample_loss", "config", "CONFIGS", "MODEL_NAMES", "KIND", "count_params"]

count_params = _zoo.count_params

# Inputs and loss per model: "image" [B, C, H, W] -> class; "tokens" [B, T] -> class;
# "lm" [B, T] -> next-token logits [B, T, V] (per-sample loss = mean over positions);
# "audio" [B, mels, frames] -> class.
KIND = {
    "hf_vit": "image",
    "hf_convnext": "image",
    "hf_resnet": "image",
    "hf_swin": "image",
    "hf_mobilenet_v2": "image",
    "hf_gpt2": "lm",
    "hf_llama": "lm",
    "hf_bert": "tokens",
    "hf_t5": "lm",
    "hf_whisper": "audio",
    "transformer_encoder": "tokens",
    "lstm": "tokens",
}

CONFIGS: Dict[str, Dict[str, dict]] = {
    "hf_vit": {
        "cpu": dict(image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, num_labels=10),
        "gpu": dict(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, num_labels=1000),
    },
    "hf_convnext": {
        "cpu": dict(image_size=32, patch_size=2, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1], num_labels=10),
        "gpu": dict(image_size=224, patch_size=4, hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3], num_labels=1000),
    },
    "hf_resnet": {
        "cpu": dict(image_size=32, embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], layer_type="basic", num_labels=10),
        "gpu": dict(image_size=224, embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3], layer_type="bottleneck", num_labels=1000),
    },
    "hf_swin": {
        "cpu": dict(image_size=32, patch_size=2, embed_dim=48, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=10),
        "gpu": dict(image_size=224, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, num_labels=1000),
    },
    "hf_mobilenet_v2": {
        "cpu": dict(image_size=48, depth_multiplier=0.5, num_labels=10),
        "gpu": dict(image_size=224, depth_multiplier=1.0, num_labels=1000),
    },
    "hf_gpt2": {
        "cpu": dict(T=32, vocab_size=2048, n_embd=128, n_layer=2, n_head=4, n_positions=64),
        "gpu": dict(T=256, vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    },
    "hf_llama": {
        "cpu": dict(T=32, vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
        "gpu": dict(T=256, vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024),
    },
    "hf_bert": {
        "cpu": dict(T=32, vocab_size=2048, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, max_position_embeddings=64, num_labels=10),
        "gpu": dict(T=128, vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512, num_labels=10),
    },
    "hf_t5": {
        "cpu": dict(T=32, vocab_size=1024, d_model=128, d_kv=32, d_ff=384, num_layers=2, num_heads=4, relative_attention_num_buckets=16),
        "gpu": dict(T=128, vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, relative_attention_num_buckets=32),
    },
    "hf_whisper": {
        "cpu": dict(num_mel_bins=80, frames=100, d_model=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=512, num_labels=10),
        "gpu": dict(num_mel_bins=80, frames=3000, d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536, num_labels=10),
    },
    "transformer_encoder": {
        "cpu": dict(T=64, vocab=1024, d=128, nhead=4, layers=2, dim_ff=512, classes=10),
        "gpu": dict(T=256, vocab=32000, d=768, nhead=12, layers=12, dim_ff=3072, classes=10),
    },
    "lstm": {
        "cpu": dict(T=32, vocab=1024, d=128, hidden=256, layers=1, classes=10),
        "gpu": dict(T=256, vocab=32000, d=512, hidden=1024, layers=2, classes=10),
    },
}
MODEL_NAMES = tuple(CONFIGS)


def config(name: str, size: str = "cpu", **overrides) -> dict:
    return _zoo.lookup_config(CONFIGS, name, size, overrides, zoo="the real zoo")


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
class Wrapped(nn.Module):
    """A library model behind ``forward(x) -> logits`` (the providers call ``model(x)``)."""

    def __init__(self, inner: nn.Module, call: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.inner = inner
        self._call = call

    def forward(self, x):
        return self._call(self.inner, x)


class EncoderClassifier(nn.Module):
    """Token embedding + learned positions, nn.TransformerEncoder (batch_first), mean-pool head."""

    def __init__(self, T, vocab, d, nhead, layers, dim_ff, classes):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        layer = nn.TransformerEncoderLayer(d, nhead, dim_ff, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        B, T = ids.shape
        pos = torch.arange(T, device=ids.device).unsqueeze(0).expand(B, T)
        return self.head(self.encoder(self.tok(ids) + self.pos(pos)).mean(1))


class LSTMClassifier(nn.Module):
    def __init__(self, T, vocab, d, hidden, layers, classes):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids):
        out, _ = self.lstm(self.tok(ids))
        return self.head(out[:, -1])


def _no_dropout(cfg) -> None:
    for k in list(vars(cfg)):
        if ("dropout" in k or k.endswith("_pdrop") or "drop_path" in k) and isinstance(getattr(cfg, k), float):
            setattr(cfg, k, 0.0)


def _hf(name: str, c: dict) -> nn.Module:
    import transformers as tf

    frames = c.get("frames", 0)
    c = {k: v for k, v in c.items() if k not in ("T", "frames")}
    logits = lambda m, x: m(x).logits  # noqa: E731
    if name == "hf_vit":
        cfg, cls = tf.ViTConfig(**c), tf.ViTForImageClassification
    elif name == "hf_convnext":
        cfg, cls = tf.ConvNextConfig(**c), tf.ConvNextForImageClassification
    elif name == "hf_resnet":
        cfg, cls = tf.ResNetConfig(**c), tf.ResNetForImageClassification
    elif name == "hf_swin":
        cfg, cls = tf.SwinConfig(**c), tf.SwinForImageClassification
    elif name == "hf_mobilenet_v2":
        cfg, cls = tf.MobileNetV2Config(**c), tf.MobileNetV2ForImageClassification
    elif name == "hf_gpt2":
        last = c["vocab_size"] - 1  # GPT-2's default special ids are outside a small vocabulary
        cfg, cls = tf.GPT2Config(**dict(c, bos_token_id=last, eos_token_id=last)), tf.GPT2LMHeadModel
    elif name == "hf_llama":
        cfg, cls = tf.LlamaConfig(**c), tf.LlamaForCausalLM
    elif name == "hf_bert":
        cfg, cls = tf.BertConfig(**c), tf.BertForSequenceClassification
    elif name == "hf_t5":
        cfg, cls = tf.T5Config(**c), tf.T5ForConditionalGeneration
        # encoder and decoder both read the ids (a denoising-style LM over the same positions)
        logits = lambda m, x: m(input_ids=x, decoder_input_ids=x).logits  # noqa: E731
    elif name == "hf_whisper":
        c = dict(c, max_source_positions=-(-frames // 2))  # the conv front end halves the frames
        cfg, cls = tf.WhisperConfig(**c), tf.WhisperForAudioClassification
    else:  # pragma: no cover
        raise KeyError(name)
    _no_dropout(cfg)
    return Wrapped(cls(cfg), logits)


def build_model(
    name: str, size: str = "cpu", *, seed: int = 0, device=None, dtype: Optional[torch.dtype] = None, **overrides
) -> Tuple[nn.Module, Callable]:
    """Build real-zoo model ``name`` at ``size``: ``(model, make_batch)``, eval mode, seeded weights."""
    cfg = config(name, size, **overrides)
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or torch.get_default_dtype()
    kind = KIND[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "transformer_encoder":
            model = EncoderClassifier(**cfg)
        elif name == "lstm":
            model = LSTMClassifier(**cfg)
        else:
            model = _hf(name, cfg)
    model = model.to(dtype=dtype)

    def make_batch(B: int, generator: Optional[torch.Generator] = None, device=None):
        dev = device if device is not None else build_device
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        if kind == "image":
            x = torch.randn(B, 3, cfg["image_size"], cfg["image_size"], generator=g, dtype=dtype)
            y = torch.randint(cfg["num_labels"], (B,), generator=g)
        elif kind == "audio":
            x = torch.randn(B, cfg["num_mel_bins"], cfg["frames"], generator=g, dtype=dtype)
            y = torch.randint(cfg["num_labels"], (B,), generator=g)
        else:
            vocab = cfg.get("vocab_size", cfg.get("vocab"))
            x = torch.randint(vocab, (B, cfg["T"]), generator=g)
            if kind == "lm":
                y = torch.randint(vocab, (B, cfg["T"]), generator=g)
            else:
                y = torch.randint(cfg.get("num_labels", cfg.get("classes")), (B,), generator=g)
        return x.to(dev), y.to(dev)

    build_device = torch.device("cpu")
    _zoo._calibrate_batchnorm(model, make_batch, torch.Generator().manual_seed(seed + 1))
    model = model.to(device).eval()
    build_device = device
    make_batch.config = cfg  # type: ignore[attr-defined]
    make_batch.model_name = name  # type: ignore[attr-defined]
    return model, make_batch


def per_sample_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``fn(outputs, targets) -> [B]``: cross entropy; for language models averaged over positions."""
    if name not in CONFIGS:
        raise KeyError(f"unknown real-zoo model {name!r}")
    return _zoo._lm_per_sample if KIND[name] == "lm" else _zoo._ce_per_sample
