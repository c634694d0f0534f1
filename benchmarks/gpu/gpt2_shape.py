"""A GPT-2-small-shaped language model from plain torch.nn pieces (fallback for the GPU script when
benchmarks.zoo is not available): tied token embedding / LM head, learned positions, pre-LN
blocks with causal SDPA attention and a 4x GELU MLP. 124.4M parameters at the default size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (t.view(B, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, d))
        return x + self.fc2(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT2Shape(nn.Module):
    def __init__(self, vocab=50257, n_positions=1024, d=768, n_layer=12, heads=12):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(n_positions, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, idx):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


def per_sample_loss(logits, y):
    """Mean next-token cross-entropy per sequence: [B]."""
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(B * T, V).float(), y.reshape(B * T),
                           reduction="none").view(B, T).mean(1)


def build_model(device, *, vocab=50257, d=768, n_layer=12, heads=12, T=256, seed=0):
    """(model in eval mode, make_batch(B, generator) -> (idx [B, T], targets [B, T]))."""
    torch.manual_seed(seed)
    model = GPT2Shape(vocab=vocab, d=d, n_layer=n_layer, heads=heads,
                      n_positions=max(T, 16)).to(device).eval()

    def make_batch(B, generator):
        x = torch.randint(0, vocab, (B, T + 1), generator=generator).to(device)
        return x[:, :-1], x[:, 1:]

    return model, make_batch
