"""Unlearning metrics on hand-computed cases."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="scikit-learn is not installed (extra [demo])")

from orthograd_fast.unlearning import metrics


class FixedLogits(torch.nn.Module):
    """model(x) = x: the 'input' is the logits, so every prediction is chosen by hand."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # metrics read the device off a parameter

    def forward(self, x):
        return x + 0 * self.dummy


def onehot_logits(preds, k=3, big=10.0):
    return torch.nn.functional.one_hot(torch.tensor(preds), k).float() * big


def test_accuracy_and_evaluate_hand_computed():
    m = FixedLogits()
    forget = (onehot_logits([0, 1, 2, 0]), torch.tensor([0, 1, 0, 1]))  # 2 of 4 right -> UA 50
    retain = (onehot_logits([0, 1, 2, 2, 1]), torch.tensor([0, 1, 2, 2, 0]))  # 4 of 5 -> RA 80
    test = (onehot_logits([2, 2, 1]), torch.tensor([2, 0, 1]))  # 2 of 3
    assert metrics.accuracy(m, forget) == pytest.approx(50.0)
    out = metrics.evaluate(m, forget, retain, test, mia=False)
    assert out == pytest.approx({"UA": 50.0, "RA": 80.0, "TA": 200.0 / 3})
    assert math.isnan(metrics.accuracy(m, (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))))


def test_true_label_confidence_is_softmax_of_label():
    m = FixedLogits()
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0]])
    conf = metrics.true_label_confidence(m, (logits, torch.tensor([1, 1])))
    # softmax([0, log 3])[1] = 3/4; softmax([log 4, 0])[1] = 1/5
    np.testing.assert_allclose(conf, [0.75, 0.2], rtol=1e-6)


def test_mia_efficacy_separable_confidences():
    # members sit at confidence ~1, non-members at ~0.5: a clean threshold between them
    rng = np.random.default_rng(0)
    member = 1.0 - rng.uniform(0, 0.02, 50)
    non_member = 0.5 + rng.uniform(-0.05, 0.05, 50)
    # forget: 3 member-like, 1 non-member-like -> 1 of 4 called non-member = 25%
    target = np.array([0.99, 0.995, 1.0, 0.5])
    assert metrics.mia_efficacy_from_confidences(member, non_member, target) == pytest.approx(25.0)
    assert metrics.mia_efficacy_from_confidences(member, non_member, np.array([0.45, 0.52])) == 100.0
    assert metrics.mia_efficacy_from_confidences(member, non_member, np.array([0.999])) == 0.0


def test_mia_efficacy_balances_shadow_sets():
    """With balance the 1000 members are subsampled to the 10 non-members' size; the SVC is the
    sklearn one with C=3, RBF, gamma='auto' (checked by refitting it on the same balanced data)."""
    from sklearn.svm import SVC

    rng = np.random.default_rng(1)
    member = rng.uniform(0.8, 1.0, 1000)
    non_member = rng.uniform(0.6, 0.85, 10)
    target = np.linspace(0.6, 1.0, 41)
    got = metrics.mia_efficacy_from_confidences(member, non_member, target, seed=3)
    sub = member[np.sort(np.random.default_rng(3).choice(1000, 10, replace=False))]
    clf = SVC(C=3, kernel="rbf", gamma="auto").fit(
        np.concatenate([sub, non_member])[:, None], np.r_[np.ones(10), np.zeros(10)]
    )
    assert got == pytest.approx(100.0 * np.mean(clf.predict(target[:, None]) == 0))
    with pytest.raises(ValueError, match="non-empty"):
        metrics.mia_efficacy_from_confidences(np.zeros(0), non_member, target)


def test_mia_efficacy_on_a_model():
    m = FixedLogits()
    k = 2
    # members: confident and right; non-members: unsure; forget: 2 confident, 2 unsure
    retain = (onehot_logits([0, 1] * 20, k, big=8.0), torch.tensor([0, 1] * 20))
    test = (torch.zeros(40, k) + torch.tensor([0.1, 0.0]), torch.tensor([0] * 40))
    forget = (torch.cat([onehot_logits([0, 1], k, 8.0), torch.zeros(2, k)]), torch.tensor([0, 1, 0, 1]))
    assert metrics.mia_efficacy(m, forget, retain, test) == pytest.approx(50.0)


def test_avg_gap():
    a = {"UA": 10.0, "RA": 90.0, "TA": 80.0, "MIA": 20.0}
    ref = {"UA": 12.0, "RA": 95.0, "TA": 79.0, "MIA": 30.0}
    assert metrics.avg_gap(a, ref) == pytest.approx((2 + 5 + 1 + 10) / 4)
    assert metrics.avg_gap(a, ref, keys=("UA", "TA")) == pytest.approx(1.5)
    with pytest.raises(KeyError):
        metrics.avg_gap({"UA": 1.0}, ref)


def test_uis_random_and_class():
    # random: (|90-88|/90 + |90-85|/90)/2 = (2 + 5) / 180
    assert metrics.uis(90.0, 88.0, 85.0, "random") == pytest.approx(7.0 / 180.0)
    # class: (|90-88|/90 + 3/90)/2
    assert metrics.uis(90.0, 88.0, 3.0, "class") == pytest.approx(5.0 / 180.0)
    # perfect unlearning scores 0
    assert metrics.uis(90.0, 90.0, 90.0, "random") == 0.0
    assert metrics.uis(90.0, 90.0, 0.0, "class") == 0.0
    with pytest.raises(ValueError, match="kind"):
        metrics.uis(90.0, 90.0, 0.0, "other")
    with pytest.raises(ValueError, match="original_test_acc"):
        metrics.uis(0.0, 90.0, 0.0)
