"""OrthoGradTrainer on tiny random-initialized Hugging Face models (built here, nothing downloaded).

The gradient the Trainer's optimizer receives is compared with an independent float64 oracle: an
explicit per-sample autograd loop over the retain batch and an SVD projector (tests/oracle.py).
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (extra [hf])")

from oracle import project_out  # noqa: E402  (tests/ is on sys.path, see conftest.py)

from orthograd_fast.integrations.hf import OrthoGradTrainer  # noqa: E402


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def gpt2_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: a deterministic oracle
    return GPT2LMHeadModel(cfg)


def gpt2_data(n, seed, T=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, T), generator=g)
    # (no position_ids: GPT-2 builds them with batch dimension 1, as for any user)
    return DictDataset([{"input_ids": ids[i], "labels": ids[i]} for i in range(n)])


def whisper_model():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=64, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=8, max_target_positions=16, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None,
    )
    # (the decoder's WhisperPositionalEmbedding, an nn.Embedding subclass that returns a slice of
    # its weight instead of looking up ids, stays trainable; the encoder's Whisper freezes itself)
    return WhisperForConditionalGeneration(cfg)


def whisper_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, 8, 16, generator=g)  # [B, mel bins, 2 * max_source_positions]
    labels = torch.randint(3, 64, (n, 6), generator=g)
    return DictDataset([{"input_features": feats[i], "labels": labels[i]} for i in range(n)])


class CaptureGrads(transformers.TrainerCallback):
    """Keeps the gradient the optimizer is about to apply, and the weights it applies it to."""

    def __init__(self):
        self.grads, self.model = None, None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            self.model = copy.deepcopy(model)


def run_trainer(model, forget, retain, tmp_path, steps=1, **kw):
    from transformers import TrainingArguments, default_data_collator

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=len(forget), max_steps=steps,
        learning_rate=1e-2, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        report_to=[], logging_strategy="no", save_strategy="no", use_cpu=True, seed=0,
        disable_tqdm=True,
    )
    cap = CaptureGrads()
    trainer = OrthoGradTrainer(
        model=model, args=args, forget_dataset=forget, retain_dataset=retain,
        data_collator=default_data_collator, callbacks=[cap], **kw,
    )
    trainer.train()
    return trainer, cap


def collate(ds, idx=None):
    from transformers import default_data_collator

    items = [ds[i] for i in (range(len(ds)) if idx is None else idx)]
    return default_data_collator(items)


def oracle_direction(model, forget, retain, alpha=0.0):
    """float64 {name: expected .grad} from a per-sample loop over the retain set (tensor scope)."""
    m = copy.deepcopy(model).double()
    for mod in m.modules():  # plain forwards (reentrant checkpointing does not support autograd.grad)
        if getattr(mod, "gradient_checkpointing", None) is True:
            mod.gradient_checkpointing = False
    params = [(n, p) for n, p in m.named_parameters() if p.requires_grad]

    def grads(batch):
        batch = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}
        gs = torch.autograd.grad(m(**batch).loss, [p for _, p in params], allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, (_, p) in zip(gs, params)]

    rows = [grads(collate(retain, [i])) for i in range(len(retain))]
    u = grads(collate(forget))
    gbar = grads(collate(retain))
    out, G = {}, {}
    for k, (n, p) in enumerate(params):
        Gk = torch.stack([r[k].reshape(-1) for r in rows])
        G[n] = Gk
        perp = project_out(Gk, u[k].reshape(-1))
        out[n] = (alpha * gbar[k].reshape(-1) - (1 - alpha) * perp).view_as(p)
    return out, G


def check_against_oracle(cap, forget, retain, alpha=0.0):
    expected, G = oracle_direction(cap.model, forget, retain, alpha)
    assert set(cap.grads) == set(expected)
    for n, e in expected.items():
        a = cap.grads[n].double()
        scale = e.norm() + 1e-30
        err = (a - e).norm() / scale
        assert err < 2e-4, f"{n}: relative error {err:.2e} against the float64 oracle"
        if alpha == 0.0 and e.norm() > 0:
            # the applied direction is orthogonal to every retain sample's gradient
            cos = (G[n] @ a.reshape(-1)).abs() / (G[n].norm(dim=1).clamp_min(1e-300) * a.norm())
            assert float(cos.max()) < 1e-4, f"{n}: max |cos(g_i, d)| = {float(cos.max()):.2e}"


def test_gpt2_step_matches_oracle(tmp_path):
    forget, retain = gpt2_data(4, seed=1), gpt2_data(4, seed=2)
    trainer, cap = run_trainer(gpt2_model(), forget, retain, tmp_path)
    assert trainer.og.stats["B"] == 4
    check_against_oracle(cap, forget, retain)


def test_gpt2_alpha_and_step_applied(tmp_path):
    forget, retain = gpt2_data(4, seed=3), gpt2_data(4, seed=4)
    model = gpt2_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer, cap = run_trainer(model, forget, retain, tmp_path, alpha=0.25)
    check_against_oracle(cap, forget, retain, alpha=0.25)
    # SGD with a constant lr: the weights moved by exactly -lr * the captured direction
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 1e-2 * cap.grads[n], rtol=1e-5, atol=1e-7)


def test_whisper_step_matches_oracle(tmp_path):
    forget, retain = whisper_data(3, seed=5), whisper_data(3, seed=6)
    trainer, cap = run_trainer(whisper_model(), forget, retain, tmp_path)
    check_against_oracle(cap, forget, retain)


def test_gradient_checkpointing_step_matches_oracle(tmp_path):
    # TrainingArguments(gradient_checkpointing=True): off inside og.retain(), on for the forget pass
    from transformers import TrainingArguments, default_data_collator

    forget, retain = gpt2_data(4, seed=11), gpt2_data(4, seed=12)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], logging_strategy="no", save_strategy="no",
        use_cpu=True, seed=0, disable_tqdm=True, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},  # (the one whose recompute the capture cannot see)
    )
    cap = CaptureGrads()
    model = gpt2_model()
    trainer = OrthoGradTrainer(model=model, args=args, forget_dataset=forget, retain_dataset=retain,
                               data_collator=default_data_collator, callbacks=[cap])
    trainer.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # still on after the step
    check_against_oracle(cap, forget, retain)


def test_gradient_accumulation_projects_each_micro_batch(tmp_path):
    """With 2 accumulation steps the applied gradient is the mean of each micro-batch's own
    projection (against its own retain batch)."""
    from transformers import TrainingArguments, default_data_collator

    forget, retain = gpt2_data(4, seed=7), gpt2_data(4, seed=8)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=1, learning_rate=1e-2, optim="sgd", max_grad_norm=0.0, report_to=[],
        logging_strategy="no", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
    )
    cap = CaptureGrads()
    # retain batch size 4 = the whole retain set: both micro-batches use the same retain samples
    trainer = OrthoGradTrainer(model=gpt2_model(), args=args, forget_dataset=forget, retain_dataset=retain,
                               retain_batch_size=4, data_collator=default_data_collator, callbacks=[cap])
    trainer.train()
    _, G = oracle_direction(cap.model, forget, retain)
    for n, G_n in G.items():
        a = cap.grads[n].double().reshape(-1)
        if a.norm() == 0:
            continue
        cos = (G_n @ a).abs() / (G_n.norm(dim=1).clamp_min(1e-300) * a.norm())
        assert float(cos.max()) < 1e-4, n


def test_uniform_objective_runs_and_is_bounded(tmp_path):
    forget, retain = gpt2_data(4, seed=9), gpt2_data(4, seed=10)
    model = gpt2_model()
    trainer, cap = run_trainer(model, forget, retain, tmp_path, steps=2, forget_objective="uniform")
    assert all(torch.isfinite(g).all() for g in cap.grads.values())
    # the uniform objective is -CE(uniform, p) <= -log(V)
    from orthograd_fast.integrations.hf import uniform_forget_objective

    with torch.no_grad():
        v = uniform_forget_objective(model, collate(forget))
    assert float(v) <= -torch.log(torch.tensor(64.0)).item() + 1e-5


def test_bad_arguments():
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="retain_dataset"):
        OrthoGradTrainer(model=gpt2_model(), args=args, forget_dataset=gpt2_data(2, 0))
    with pytest.raises(ValueError, match="forget_objective"):
        OrthoGradTrainer(model=gpt2_model(), args=args, forget_dataset=gpt2_data(2, 0),
                         retain_dataset=gpt2_data(2, 1), forget_objective="nope")
    with pytest.raises(ValueError, match="not both"):
        OrthoGradTrainer(model=gpt2_model(), args=args, forget_dataset=gpt2_data(2, 0),
                         train_dataset=gpt2_data(2, 0), retain_dataset=gpt2_data(2, 1))
