"""Top-level names of a checkout (kernels/, benchmarks/, tests/) never shadow installed packages.

Each check runs a fresh interpreter from the checkout's root with ``python -c``, which puts the
current directory first on sys.path: the way a user who stands in the checkout runs a script.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, cwd: str = ROOT, flags=()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _inside(path: str, folder: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


IMPORT_KERNELS = (
    "import sys\n"
    "try:\n"
    "    import kernels\n"
    "except ModuleNotFoundError as e:\n"
    "    print('MISSING', e.name)\n"
    "else:\n"
    "    print('FILE', kernels.__file__)\n"
)


@pytest.mark.parametrize("where", ["root", "tests"])
def test_import_kernels_from_checkout_is_the_installed_package(where):
    cwd = ROOT if where == "root" else os.path.join(ROOT, "tests")
    out = _run(IMPORT_KERNELS, cwd=cwd)
    assert out.returncode == 0, out.stderr
    kind, _, value = out.stdout.strip().partition(" ")
    if _installed("kernels"):
        assert kind == "FILE", out.stdout
        installed = importlib.metadata.distribution("kernels").locate_file("kernels")
        assert os.path.realpath(os.path.dirname(value)) == os.path.realpath(str(installed)), (
            f"`import kernels` from {cwd} found {value}, not the installed package at {installed}")
    else:
        assert (kind, value) == ("MISSING", "kernels"), out.stdout


def test_import_kernels_without_the_installed_package_is_module_not_found():
    # -S: no site-packages, so no installed `kernels` either way; the checkout's folder steps aside
    out = _run(IMPORT_KERNELS, flags=("-S",))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "MISSING kernels", out.stdout


def test_transformers_trainer_imports_from_checkout():
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install -e '.[test]' installs it)")
    out = _run("from transformers import Trainer; import transformers; print(transformers.__version__)")
    assert out.returncode == 0, out.stderr[-3000:]


def test_package_kernels_still_import_as_orthograd_fast_kernels():
    out = _run("import orthograd_fast.kernels as k, orthograd_fast.kernels._common as c; print(k.__name__, c.__name__)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["orthograd_fast.kernels", "orthograd_fast.kernels._common"]


def test_benchmarks_from_checkout_is_the_project_suite():
    # opacus ships a top-level `benchmarks` package; from the checkout the project's suite wins, and
    # pytest's `pythonpath = ["."]` keeps it first wherever pytest is started.
    out = _run("import benchmarks, benchmarks.zoo; print(benchmarks.__file__)")
    assert out.returncode == 0, out.stderr
    assert os.path.realpath(out.stdout.strip()) == os.path.realpath(os.path.join(ROOT, "benchmarks", "__init__.py"))
    import benchmarks  # this process: pytest put the rootdir first on sys.path

    assert _inside(benchmarks.__file__, ROOT), benchmarks.__file__


def test_checkout_tests_folder_does_not_shadow_an_installed_tests_package(tmp_path):
    # tests/ is a plain folder (no __init__.py) and nothing imports it as `tests`: a distribution
    # that ships a top-level `tests` package keeps it, also for code run from the checkout's root.
    assert not os.path.exists(os.path.join(ROOT, "tests", "__init__.py"))
    fake = tmp_path / "site" / "tests"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("MARK = 'installed'\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    out = subprocess.run([sys.executable, "-c", "import tests; print(tests.MARK)"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "installed"


def test_import_and_a_step_load_neither_dynamo_nor_triton():
    # torch.compiler.disable imports torch._dynamo (and with it triton): ~2 s on `import
    # orthograd_fast`; the op capture makes its eager twins only once torch.compile has loaded it
    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "import orthograd_fast as ogf\n"
        "print('import', 'torch._dynamo' in sys.modules, 'triton' in sys.modules)\n"
        "torch.manual_seed(0)\n"
        "m = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3))\n"
        "og = ogf.OrthoGrad(m, alpha=0.0)\n"
        "x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))\n"
        "with og.retain():\n"
        "    nn.functional.cross_entropy(m(x), y).backward()\n"
        "nn.functional.cross_entropy(m(x[:3]), y[:3]).backward()\n"
        "og.project_()\n"
        "print('step', 'torch._dynamo' in sys.modules, 'triton' in sys.modules)\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["import False False", "step False False"], out.stdout
