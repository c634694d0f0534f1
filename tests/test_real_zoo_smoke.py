"""Smoke test of the real-model zoo (benchmarks/real_zoo.py): every model at a tiny size through
the benchmark's own code path once -- FLOP floor, float64-oracle check, one timed round of plain
and of the OrthoGrad step in the API contract's order -- and the table (benchmarks/real_report.py).
No timings are asserted. A crash, a wrong direction or a time-out fails; a model the engine
refuses must come back as a "refused" row.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

pytest.importorskip("transformers", reason="the real-model zoo builds transformers models")

from benchmarks import real_zoo  # noqa: E402
from benchmarks.runner import SETS, BenchSession, CaseFailed, CaseSkipped, Settings  # noqa: E402

TINY = {
    "hf_vit": dict(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
    "hf_convnext": dict(image_size=16, patch_size=2, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1]),
    "hf_resnet": dict(image_size=16, embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1]),
    "hf_swin": dict(image_size=16, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4),
    "hf_mobilenet_v2": dict(image_size=32, depth_multiplier=0.25),
    "hf_gpt2": dict(T=8, vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16),
    "hf_llama": dict(T=8, vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, max_position_embeddings=16),
    "hf_bert": dict(T=8, vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    max_position_embeddings=16),
    "hf_t5": dict(T=8, vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8),
    "hf_whisper": dict(num_mel_bins=8, frames=16, d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32),
    "transformer_encoder": dict(T=8, vocab=32, d=16, nhead=2, layers=1, dim_ff=32),
    "lstm": dict(T=8, vocab=32, d=16, hidden=16, layers=1),
}
B, B_UNLEARN = 4, 3
PROVIDERS = ("plain", "torch-contract")


# no speed is measured here: one intra-op thread keeps it quick on a loaded 2-core box
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def session():
    s = Settings(
        set_name="real-smoke", device="cpu", size="cpu", zoo="real_zoo", floor=True, unlearn_batch=B_UNLEARN,
        providers=list(PROVIDERS), case_budget=0.0, max_rounds=1, min_rounds=1, paired_rounds=0, paired_ref_rounds=0,
        step_timeout=60.0, overrides=TINY,
    )
    return BenchSession(s)


def _one_round(fn, rounds, warmup_rounds):
    assert rounds == 1
    import time

    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def test_tiny_configs_cover_the_real_zoo_and_the_sets_select_it():
    assert set(TINY) == set(real_zoo.MODEL_NAMES)
    for name in ("real-cpu", "real-gpu"):
        st = Settings.from_set(name)
        assert st.zoo == "real_zoo" and st.floor and st.unlearn_batch == 16
        assert {c[0] for c in st.cases} == set(real_zoo.MODEL_NAMES) and {c[1] for c in st.cases} == {32}
        assert all(tuple(c[2]) == PROVIDERS for c in st.cases)
    assert SETS["cpu-quick"].get("zoo", "zoo") == "zoo"


@pytest.mark.parametrize("name", real_zoo.MODEL_NAMES)
def test_real_model_through_the_benchmark_path(session, name):
    model, mb = real_zoo.build_model(name, "cpu", **TINY[name])
    assert not model.training
    assert not any(m.training for m in model.modules())
    x, y = mb(B, torch.Generator().manual_seed(3))
    losses = real_zoo.per_sample_loss(name)(model(x), y)
    assert losses.shape == (B,) and torch.isfinite(losses).all()

    for provider in PROVIDERS:
        try:
            row = session.run_case(name, B, provider, _one_round)
        except CaseFailed as e:
            pytest.fail(f"{name} {provider}: {e}", pytrace=False)
        except CaseSkipped as e:
            row = session.rows[-1]
            # the engine's refusal is a row; a time-out or anything else is a failure here
            assert row["status"] == "refused" and provider != "plain", f"{name} {provider}: {e}"
            assert row["reason"].startswith("refused: ") and len(row["reason"]) > 20
            continue
        assert row["status"] == "ok" and row["median_s"] > 0, row
        assert row["check"]["ok"], row["check"]
        fl = row["floor"]
        assert "error" not in fl, fl
        assert fl["B"] == B and fl["Bu"] == B_UNLEARN and fl["plain_flops"] > 0
        assert math.isfinite(fl["floor_ratio"]) and fl["floor_ratio"] >= 1.0
        if provider != "plain":
            assert row["fallback_params"] is not None and 0.0 <= row["fallback_share"] <= 1.0
            assert row["fallback_params"] == 0 and row["fallback_modules"] == [], row


def test_real_report_table(session, tmp_path):
    # the table from this module's rows (run after the models above; a fresh session otherwise)
    pytest.importorskip("matplotlib", reason="the report's plots need matplotlib")
    from benchmarks import real_report
    from benchmarks.real_zoo_run import median_timer

    if not session.rows:
        for p in PROVIDERS:
            session.run_case("hf_gpt2", B, p, _one_round)
    assert median_timer(lambda: None, 3, 1) >= 0.0
    data = {"orthograd": {"settings": {"set_name": "real-smoke"}, "machine": {"cpu_model": "Test CPU"}, "rows": session.rows}}
    (tmp_path / "r.json").write_text(json.dumps(data, default=str))
    md_path = real_report.main([str(tmp_path / "r.json"), "--out", str(tmp_path)])
    md = open(md_path).read()
    assert "| model | params | plain | step | step / plain | floor | measured / floor |" in md
    models = {r["model"] for r in session.rows}
    for m in models:
        assert f"| {m} |" in md
    for r in session.rows:
        if r["status"] == "refused":
            assert "refused: " in md
    for suffix in ("ratios", "times"):
        png = tmp_path / f"r-{suffix}.png"
        assert png.exists() and png.stat().st_size > 1000


def test_paired_ratio_records_the_spread_of_single_pairs():
    from benchmarks import real_report

    s = Settings(
        set_name="real-smoke", device="cpu", size="cpu", zoo="real_zoo", unlearn_batch=B_UNLEARN,
        providers=list(PROVIDERS), case_budget=0.0, max_rounds=1, min_rounds=1, paired_rounds=5, paired_budget=60.0,
        paired_ref_rounds=0, step_timeout=60.0, overrides=TINY,
    )
    sess = BenchSession(s)
    rows = [sess.run_case("lstm", B, p, _one_round) for p in PROVIDERS]
    step = rows[1]
    assert step["paired_rounds"] == 5
    q1, q3 = step["paired_iqr"]
    assert 0 < q1 <= step["paired_ratio"] <= q3
    notes = real_report.model_rows(rows)[0]["notes"]
    assert f"5 pairs, IQR {q1:.2f}x-{q3:.2f}x" in notes


class _BatchSecondAttention(torch.nn.Module):
    """A model every engine version refuses: attention with the batch on dim 1."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=False)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):  # x [B, T, 8]
        y = x.transpose(0, 1)
        return self.head(self.attn(y, y, y, need_weights=False)[0].mean(0))


def test_a_refused_model_is_a_row_not_a_crash(monkeypatch):
    import types

    from benchmarks import runner

    def build_model(name, size="cpu", *, seed=0, device=None, **kw):
        torch.manual_seed(seed)
        model = _BatchSecondAttention().eval()

        def make_batch(n, generator=None, device=None):
            g = generator or torch.Generator().manual_seed(0)
            return torch.randn(n, 5, 8, generator=g), torch.randint(3, (n,), generator=g)

        return model, make_batch

    fake = types.SimpleNamespace(
        build_model=build_model, count_params=real_zoo.count_params,
        per_sample_loss=lambda name: (lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")),
    )
    monkeypatch.setitem(runner.ZOOS, "fake", fake)
    s = Settings(set_name="refusal", zoo="fake", floor=True, unlearn_batch=2, providers=list(PROVIDERS), case_budget=0.0,
                 max_rounds=1, min_rounds=1, paired_rounds=0, paired_ref_rounds=0, step_timeout=60.0)
    sess = BenchSession(s)
    assert sess.run_case("bsa", 3, "plain", _one_round)["status"] == "ok"
    with pytest.raises(CaseSkipped, match="refused: "):
        sess.run_case("bsa", 3, "torch-contract", _one_round)
    row = sess.rows[-1]
    assert row["status"] == "refused" and "attn" in row["reason"]  # the message names the module
    assert row["floor"]["floor_ratio"] >= 1.0  # the floor still stands for a refused model


def test_oracle_check_ignores_rounding_on_gradient_free_tensors_only():
    # compare(): a tensor whose exact gradient is zero (a key bias under softmax) holds rounding
    # noise; it is judged against the whole model's gradient size, a real error still fails
    from benchmarks.oracle import SCALE_FLOOR, OracleResult, compare

    g = torch.Generator().manual_seed(11)
    u = {"w": torch.randn(40, generator=g, dtype=torch.float64), "kb": 1e-19 * torch.randn(4, generator=g, dtype=torch.float64)}
    o = OracleResult(
        direction={n: -v for n, v in u.items()}, u=u, gbar={n: torch.zeros_like(v) for n, v in u.items()},
        rank={"w": 2, "kb": 0}, checked=["w", "kb"], all_names=["w", "kb"], alpha=0.0, scope="tensor", B=2,
        numel={"w": 40, "kb": 4},
    )
    noise = {"w": -u["w"], "kb": torch.full((4,), 1e-12, dtype=torch.float64)}
    assert compare(noise, o).ok
    wrong_small = dict(noise, kb=torch.full((4,), 10 * SCALE_FLOOR * float(u["w"].norm()), dtype=torch.float64))
    assert not compare(wrong_small, o).ok
    wrong_big = dict(noise, w=-0.99 * u["w"])
    assert not compare(wrong_big, o).ok
