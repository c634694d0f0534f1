"""Unlearning metrics (SalUn / "Unlearn-Sparse" conventions, plus the OrthoGrad paper's UIS).

All accuracies are percentages in [0, 100]. For a model ``m`` and the sets of a scenario:

- ``UA`` (unlearning accuracy) = ``100 - acc(m, forget)``: higher means more forgotten.
- ``RA`` (retain accuracy)     = ``acc(m, retain)``.
- ``TA`` (test accuracy)       = ``acc(m, test)``; for class forgetting ``test`` holds only the
  samples of the *other* classes.
- ``MIA`` (MIA-Efficacy): see :func:`mia_efficacy`.
- ``Avg. Gap`` = mean over UA, RA, TA, MIA of ``|metric - metric of the retrained model|``
  (:func:`avg_gap`; lower is better).
- ``RTE`` (run-time efficiency) = wall-clock seconds of the unlearning run itself (evaluation
  excluded); :func:`orthograd_fast.unlearning.unlearn` records it as ``result.seconds``.
- ``UIS`` (the paper's unlearning impact score, lower is better): :func:`uis`.
"""

from __future__ import annotations

from typing import Dict, Mapping, Sequence

import numpy as np
import torch

from .data import as_dataset

__all__ = [
    "predict",
    "accuracy",
    "true_label_confidence",
    "mia_efficacy",
    "mia_efficacy_from_confidences",
    "evaluate",
    "avg_gap",
    "uis",
    "METRIC_KEYS",
]

METRIC_KEYS = ("UA", "RA", "TA", "MIA")


@torch.no_grad()
def predict(model: torch.nn.Module, data, batch_size: int = 1024):
    """Return ``(probs, labels)`` over ``data`` (a Dataset or ``(X, y)``), model in eval mode.

    The model's train/eval mode is restored afterwards. ``probs`` is softmax over the last dim.
    """
    ds = as_dataset(data)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        probs, labels = [], []
        for xb, yb in torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False):
            probs.append(torch.softmax(model(xb.to(device)).float(), dim=-1).cpu())
            labels.append(yb)
    finally:
        model.train(was_training)
    if not probs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(probs), torch.cat(labels)


def accuracy(model: torch.nn.Module, data, batch_size: int = 1024) -> float:
    """Top-1 accuracy in percent (``nan`` for an empty set)."""
    probs, labels = predict(model, data, batch_size)
    if len(labels) == 0:
        return float("nan")
    return 100.0 * (probs.argmax(-1) == labels).double().mean().item()


def true_label_confidence(model: torch.nn.Module, data, batch_size: int = 1024) -> np.ndarray:
    """Softmax probability the model gives each sample's own label (the MIA feature)."""
    probs, labels = predict(model, data, batch_size)
    if len(labels) == 0:
        return np.zeros(0)
    return probs.gather(1, labels[:, None]).squeeze(1).double().numpy()


def mia_efficacy_from_confidences(
    member: np.ndarray,
    non_member: np.ndarray,
    target: np.ndarray,
    *,
    balance: bool = True,
    seed: int = 0,
) -> float:
    """MIA-Efficacy from precomputed 1-D confidences.

    Fits ``sklearn.svm.SVC(C=3, kernel="rbf", gamma="auto")`` on ``member`` (label 1) vs
    ``non_member`` (label 0) and returns ``100 * share of target samples predicted 0``
    (called non-member). With ``balance`` the larger shadow set is subsampled (seeded, without
    replacement) to the size of the smaller one, as SalUn does with retain vs test.
    """
    from sklearn.svm import SVC

    member = np.asarray(member, dtype=np.float64).reshape(-1, 1)
    non_member = np.asarray(non_member, dtype=np.float64).reshape(-1, 1)
    target = np.asarray(target, dtype=np.float64).reshape(-1, 1)
    if len(member) == 0 or len(non_member) == 0:
        raise ValueError("mia_efficacy needs non-empty member (retain) and non-member (test) sets")
    if len(target) == 0:
        return float("nan")
    if balance:
        rng = np.random.default_rng(seed)
        n = min(len(member), len(non_member))
        if len(member) > n:
            member = member[np.sort(rng.choice(len(member), n, replace=False))]
        if len(non_member) > n:
            non_member = non_member[np.sort(rng.choice(len(non_member), n, replace=False))]
    X = np.concatenate([member, non_member])
    y = np.concatenate([np.ones(len(member)), np.zeros(len(non_member))])
    clf = SVC(C=3, kernel="rbf", gamma="auto")
    clf.fit(X, y)
    return 100.0 * float(np.mean(clf.predict(target) == 0))


def mia_efficacy(model: torch.nn.Module, forget, retain, test, *, balance: bool = True, seed: int = 0) -> float:
    """MIA-Efficacy of ``model``: an RBF SVC (C=3) trained on the true-label softmax confidence of
    ``retain`` (members) vs ``test`` (non-members), applied to ``forget``; returns the share of
    forget samples it calls non-member, x100. Higher means the forget set looks unseen.
    See :func:`mia_efficacy_from_confidences` for ``balance``/``seed``.
    """
    return mia_efficacy_from_confidences(
        true_label_confidence(model, retain),
        true_label_confidence(model, test),
        true_label_confidence(model, forget),
        balance=balance,
        seed=seed,
    )


def evaluate(model: torch.nn.Module, forget, retain, test, *, mia: bool = True, seed: int = 0) -> Dict[str, float]:
    """``{"UA", "RA", "TA", "MIA"}`` of ``model`` (MIA omitted when ``mia=False``)."""
    out = {
        "UA": 100.0 - accuracy(model, forget),
        "RA": accuracy(model, retain),
        "TA": accuracy(model, test),
    }
    if mia:
        out["MIA"] = mia_efficacy(model, forget, retain, test, seed=seed)
    return out


def avg_gap(
    metrics: Mapping[str, float], reference: Mapping[str, float], keys: Sequence[str] = METRIC_KEYS
) -> float:
    """Mean of ``|metrics[k] - reference[k]|`` over ``keys`` (default UA, RA, TA, MIA).

    ``reference`` is the retrain-from-scratch oracle's metrics. Missing keys raise ``KeyError``.
    """
    keys = list(keys)
    if not keys:
        raise ValueError("avg_gap needs at least one key")
    return float(np.mean([abs(float(metrics[k]) - float(reference[k])) for k in keys]))


def uis(
    original_test_acc: float,
    unlearned_test_acc: float,
    unlearned_forget_acc: float,
    kind: str = "random",
) -> float:
    """The OrthoGrad paper's unlearning impact score (lower is better); accuracies in one unit.

    With ``O_t`` the original model's test accuracy, ``U_t`` the unlearned model's test accuracy
    and ``U_u`` its forget-set accuracy:

    - ``kind="random"``: ``(|O_t - U_t| / O_t + |O_t - U_u| / O_t) / 2`` -- ideal is keeping test
      accuracy and bringing forget accuracy to test level;
    - ``kind="class"``: ``(|O_t - U_t| / O_t + |U_u| / O_t) / 2`` -- ideal is keeping test accuracy
      (other classes) and forget accuracy 0.
    """
    O_t, U_t, U_u = float(original_test_acc), float(unlearned_test_acc), float(unlearned_forget_acc)
    if O_t <= 0:
        raise ValueError(f"original_test_acc must be > 0, got {original_test_acc!r}")
    if kind == "random":
        return (abs(O_t - U_t) / O_t + abs(O_t - U_u) / O_t) / 2
    if kind == "class":
        return (abs(O_t - U_t) / O_t + abs(U_u) / O_t) / 2
    raise ValueError(f"kind must be 'random' or 'class', got {kind!r}")
