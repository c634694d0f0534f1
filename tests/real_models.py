"""Tiny models from libraries the project does not control (transformers configs, torch.nn
layers) for the capture tests: each builder returns (model, retain, unlearn, loss)."""

from __future__ import annotations

import torch
from torch import nn

from models import ce


class Logits(nn.Module):
    """A transformers model called on one tensor, returning its logits (decoder ids, where the model
    needs them, are a fixed buffer shared by every sample)."""

    def __init__(self, hf, dec_ids=None):
        super().__init__()
        self.hf = hf
        self.register_buffer("dec_ids", dec_ids, persistent=False)

    def forward(self, x):
        if self.dec_ids is None:
            return self.hf(x).logits
        return self.hf(x, decoder_input_ids=self.dec_ids.expand(x.shape[0], -1)).logits


def _vision(cfg_name, model_name, gen, size=16, channels=3, labels=5, **cfg):
    import transformers as tf

    config = getattr(tf, cfg_name)(num_labels=labels, num_channels=channels, **cfg)
    model = Logits(getattr(tf, model_name)(config)).eval()
    r = lambda b: torch.randn(b, channels, size, size, generator=gen)
    ri = lambda b: torch.randint(0, labels, (b,), generator=gen)
    return model, (r(5), ri(5)), (r(3), ri(3)), ce


def _lm(cfg_name, model_name, gen, vocab=37, T=6, dec=False, **cfg):
    import transformers as tf

    config = getattr(tf, cfg_name)(vocab_size=vocab, **cfg)
    hf = getattr(tf, model_name)(config).eval()
    dec_ids = torch.randint(1, vocab, (1, 4), generator=gen) if dec else None
    model = Logits(hf, dec_ids)
    ids = lambda b: torch.randint(1, vocab, (b, T), generator=gen)
    labels = lambda b: torch.randint(0, vocab, (b, 4 if dec else T), generator=gen)
    return model, (ids(5), labels(5)), (ids(3), labels(3)), ce


def _cls_lm(cfg_name, model_name, gen, vocab=37, T=6, labels=4, **cfg):
    import transformers as tf

    config = getattr(tf, cfg_name)(vocab_size=vocab, num_labels=labels, **cfg)
    model = Logits(getattr(tf, model_name)(config)).eval()
    ids = lambda b: torch.randint(1, vocab, (b, T), generator=gen)
    y = lambda b: torch.randint(0, labels, (b,), generator=gen)
    return model, (ids(5), y(5)), (ids(3), y(3)), ce


TINY_TX = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24)


def _freeze_key_biases(model):
    """An attention key bias shifts every score of a query by the same amount, which softmax
    ignores: its true gradient is exactly zero and both sides of a comparison hold rounding noise."""
    for n, p in model.named_parameters():
        if n.endswith(("key.bias", "k_proj.bias")):
            p.requires_grad_(False)
    return model


def hf_model(name: str, seed: int = 0):
    out = _hf_model(name, seed)
    _freeze_key_biases(out[0])
    return out


def _hf_model(name: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the models' own initialization
    if name == "vit":
        return _vision("ViTConfig", "ViTForImageClassification", gen, image_size=16, patch_size=4, **TINY_TX)
    if name == "swin":
        return _vision(
            # window 3 on 8 x 8 patches: padded windows; two blocks per stage: the second one shifted
            "SwinConfig", "SwinForImageClassification", gen, image_size=16, patch_size=2, embed_dim=8,
            depths=[2, 2], num_heads=[2, 2], window_size=3,
        )
    if name == "convnext":
        return _vision("ConvNextConfig", "ConvNextForImageClassification", gen, hidden_sizes=[8, 12], depths=[1, 1], num_stages=2)
    if name == "resnet":
        return _vision(
            "ResNetConfig", "ResNetForImageClassification", gen, embedding_size=8, hidden_sizes=[8, 12], depths=[1, 1],
            layer_type="basic",
        )
    if name == "mobilenet_v2":
        return _vision(
            "MobileNetV2Config", "MobileNetV2ForImageClassification", gen, depth_multiplier=0.1, min_depth=4, initializer_range=0.5,
            image_size=16,
        )
    if name == "efficientnet":
        return _vision(
            "EfficientNetConfig", "EfficientNetForImageClassification", gen, size=32, image_size=32, width_coefficient=0.1, initializer_range=0.5,
            depth_coefficient=0.1, hidden_dim=128, depthwise_padding=[], dropout_rate=0.0, drop_connect_rate=0.0,
        )
    if name == "gpt2":
        return _lm("GPT2Config", "GPT2LMHeadModel", gen, n_embd=16, n_layer=1, n_head=2, n_positions=8, attn_pdrop=0.0,
                   resid_pdrop=0.0, embd_pdrop=0.0)
    if name == "llama":
        return _lm("LlamaConfig", "LlamaForCausalLM", gen, num_key_value_heads=1, max_position_embeddings=8, **TINY_TX)
    if name == "bert":
        return _cls_lm("BertConfig", "BertForSequenceClassification", gen, max_position_embeddings=8, **TINY_TX)
    if name == "t5":
        return _lm("T5Config", "T5ForConditionalGeneration", gen, dec=True, d_model=16, d_kv=8, d_ff=24, num_layers=1,
                   num_heads=2, relative_attention_num_buckets=4, relative_attention_max_distance=8, dropout_rate=0.0)
    if name == "whisper":
        import transformers as tf

        cfg = tf.WhisperConfig(
            vocab_size=37, num_mel_bins=4, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_source_positions=6,
            max_target_positions=8, dropout=0.0, pad_token_id=0, decoder_start_token_id=1,
        )
        hf = tf.WhisperForConditionalGeneration(cfg).eval()
        model = Logits(hf, torch.randint(1, 37, (1, 4), generator=gen))
        feats = lambda b: torch.randn(b, 4, 12, generator=gen)
        y = lambda b: torch.randint(0, 37, (b, 4), generator=gen)
        return model, (feats(5), y(5)), (feats(3), y(3)), ce
    raise KeyError(name)


HF_MODELS = ["vit", "swin", "convnext", "resnet", "mobilenet_v2", "efficientnet", "gpt2", "llama", "bert", "t5", "whisper"]
