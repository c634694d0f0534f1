"""The drift report CI prints at exit (.ci/drift.py): parsing pins and listing what moved."""

from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _drift():
    spec = importlib.util.spec_from_file_location("ci_drift", os.path.join(ROOT, ".ci", "drift.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_diff_lists_moved_added_and_removed_packages():
    d = _drift()
    old = d._parse(["# header", "Torch==2.13.0+cpu", "typing_extensions==4.12.0", "gone==1.0", "-e git+x#egg=y"])
    new = d._parse(["torch==2.13.0+cpu", "typing-extensions==4.13.1", "kernels==0.19.1"])
    assert old == {"torch": "2.13.0+cpu", "typing-extensions": "4.12.0", "gone": "1.0"}
    assert d.diff(old, new) == [
        ("gone", "1.0", "-"),
        ("kernels", "-", "0.19.1"),
        ("typing-extensions", "4.12.0", "4.13.1"),
    ]
    assert d.diff(new, new) == []


def test_last_green_pins_parse_and_name_the_core_dependencies():
    d = _drift()
    with open(d.LAST_GREEN) as f:
        pins = d._parse(f)
    for name in ("torch", "opt-einsum", "numpy", "transformers", "pytest"):
        assert name in pins, f".ci/last-green.txt has no pin for {name}"
