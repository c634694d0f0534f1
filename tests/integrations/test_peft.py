"""OrthoGrad on a PEFT LoRA model: only the adapter weights are projected and stepped."""

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (extra [hf])")
peft = pytest.importorskip("peft", reason="peft is not installed (extra [hf])")

from test_hf import gpt2_data, gpt2_model, oracle_direction, run_trainer  # noqa: E402


def lora_gpt2():
    from peft import LoraConfig, get_peft_model

    model = gpt2_model()
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_proj"],
                     fan_in_fan_out=True)  # GPT-2's Conv1D stores weights as [in, out]
    model = get_peft_model(model, cfg)
    torch.manual_seed(1)
    # LoRA initializes B = 0, which makes every A gradient zero; randomize B so both factors get
    # non-trivial gradients to check.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def test_lora_adapter_only_and_orthogonal(tmp_path):
    forget, retain = gpt2_data(4, seed=11), gpt2_data(4, seed=12)
    model = lora_gpt2()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and adapters and all("lora_" in n for n in adapters)

    trainer, cap = run_trainer(model, forget, retain, tmp_path, steps=2)

    managed = [n for n, _ in trainer.og.parameters]
    assert sorted(managed) == sorted(adapters)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), f"frozen base weight {n} changed"
            assert p.grad is None
        else:
            assert not torch.equal(p.detach(), adapters[n]), f"adapter {n} did not move"

    # the first step's adapter gradient: orthogonal to every retain sample's adapter gradient
    # (explicit float64 per-sample loop) and equal to the oracle projection
    expected, G = oracle_direction(cap.model, forget, retain)
    assert set(expected) == set(cap.grads) == set(adapters)
    for n, e in expected.items():
        a = cap.grads[n].double()
        assert (a - e).norm() <= 2e-4 * e.norm() + 1e-12, n
        d = a.reshape(-1)
        cos = (G[n] @ d).abs() / (G[n].norm(dim=1).clamp_min(1e-300) * d.norm().clamp_min(1e-300))
        assert float(cos.max()) < 1e-4, f"{n}: max |cos(g_i, d)| = {float(cos.max()):.2e}"
