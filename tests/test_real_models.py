"""Models from transformers (tiny random configs) against the float64 oracle: exact, with no
parameter on the torch.func fallback. T5's relative position bias (a table looked up with ids shared
by all samples) is exact, also when the sequence length equals the retain batch size; Swin's
window attention (the batch folded into dim 0, shifted and padded windows) is exact with both
attention implementations."""

import itertools
import warnings

import pytest
import torch

from engine_helpers import compare
from real_models import HF_MODELS, hf_model

pytest.importorskip("transformers")

REL = 1e-4
COMBOS = list(itertools.product(["tensor", "global"], [0.0, 0.3]))
EXACT = list(HF_MODELS)
# stock layers only (conv, BatchNorm, Linear), slow on the CPU: the slow selection runs them
STOCK_ONLY = ("resnet", "mobilenet_v2", "efficientnet")
DEFAULT = [m for m in EXACT if m not in STOCK_ONLY]


def _check(model, retain, unlearn, loss, scope, alpha, label):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback use warns: fail on it
        err, _, og = compare(model, loss, retain, unlearn, scope=scope, alpha=alpha, backend="torch")
    assert err <= REL, f"{label}/{scope}/{alpha}: relative error {err:.2e}"
    assert og.stats["fallback"] == [], og.stats["fallback"]
    return og


# one scope/alpha combination per model in the default run (all four over the models), the full
# matrix in the slow selection
@pytest.mark.parametrize("name", DEFAULT)
def test_real_model_matches_oracle(name):
    scope, alpha = COMBOS[DEFAULT.index(name) % len(COMBOS)]
    _check(*hf_model(name), scope, alpha, name)


@pytest.mark.slow
@pytest.mark.parametrize("scope,alpha", COMBOS)
@pytest.mark.parametrize("name", EXACT)
def test_real_model_matches_oracle_all_settings(name, scope, alpha):
    _check(*hf_model(name), scope, alpha, name)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_swin_exact_with_either_attention(impl):
    # the relative-position bias meets the folded scores as an added tensor (eager) or as the
    # attn_mask of scaled_dot_product_attention (sdpa)
    model, retain, unlearn, loss = hf_model("swin")
    model.hf.config._attn_implementation = impl
    _check(model, retain, unlearn, loss, "tensor", 0.3, f"swin-{impl}")


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_t5_exact_when_sequence_length_equals_batch(scope):
    # the bias table's ids are [T, S]: with T == B a shape test takes positions for samples
    model, retain, unlearn, loss = hf_model("t5")
    T = retain[0].shape[1]
    gen = torch.Generator().manual_seed(7)
    retain = (torch.randint(1, 37, (T, T), generator=gen), torch.randint(0, 37, (T, 4), generator=gen))
    _check(model, retain, unlearn, loss, scope, 0.3, "t5")
    assert any("relative_attention_bias" in n for n, p in model.named_parameters() if p.requires_grad)
