"""Make `orthograd_fast` (and its `orthograd_fast.kernels`, which lives in the top-level kernels/
folder through a setuptools package-dir mapping) importable from a bare checkout, without pip.

An editable/regular install already provides both; otherwise the repository root goes on sys.path
and orthograd_fast.kernels is registered as a package whose __path__ is <root>/kernels.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ensure_importable() -> str:
    """Returns how the package was found: 'installed' or 'shim'."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    tests = os.path.join(ROOT, "tests")
    if tests not in sys.path:
        sys.path.append(tests)  # tests/tolerance.py: the suite's one tolerance rule
    import orthograd_fast

    try:
        importlib.import_module("orthograd_fast.kernels")
        return "installed"
    except ImportError:
        pass
    init = os.path.join(ROOT, "kernels", "__init__.py")
    spec = importlib.util.spec_from_file_location(
        "orthograd_fast.kernels", init, submodule_search_locations=[os.path.join(ROOT, "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["orthograd_fast.kernels"] = mod
    spec.loader.exec_module(mod)
    orthograd_fast.kernels = mod
    return "shim"
