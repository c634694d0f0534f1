"""What a non-editable install gets: the README's demo command runs ``pip install ".[demo]"``,
which installs the wheel's files only, while the test command's editable install reads the
checkout and would not notice a package left out of pyproject.toml."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# installed name of a source folder outside orthograd_fast/ (pyproject.toml, package-dir)
REMAPPED = {"kernels": "orthograd_fast.kernels"}


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomllib (3.11+) or tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _source_packages() -> dict:
    """{installed package name: its folder} of every folder with an __init__.py under
    orthograd_fast/ and the remapped folders."""
    out = {}
    for top, name in [("orthograd_fast", "orthograd_fast")] + list(REMAPPED.items()):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files and "__pycache__" not in folder:
                rel = os.path.relpath(folder, os.path.join(ROOT, top))
                out[name if rel == "." else name + "." + rel.replace(os.sep, ".")] = folder
    return out


def test_every_package_folder_is_listed_in_pyproject():
    cfg = _pyproject()["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = set(_source_packages())
    assert found - listed == set(), f"package folders missing from [tool.setuptools] packages: {sorted(found - listed)}"
    assert listed - found == set(), f"listed packages without a folder: {sorted(listed - found)}"
    assert cfg["package-dir"] == {v: k for k, v in REMAPPED.items()}


def test_the_wheel_holds_every_module_and_its_cli_imports_outside_the_checkout(tmp_path):
    # the wheel as pip builds it for `pip install .`, then installed into a bare folder and
    # imported from outside the checkout (torch and the other dependencies from this environment)
    # (from a copy of the files the build reads: an in-tree build would leave build/ behind, whose
    # stale modules a later build packs again)
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("orthograd_fast", *REMAPPED):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=skip)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run(pip + ["wheel", "--no-deps", "-w", str(wheels), str(src)], env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (whl,) = glob.glob(str(wheels / "*.whl"))
    in_wheel = {n for n in zipfile.ZipFile(whl).namelist() if n.endswith(".py")}
    expected = set()
    for name, folder in _source_packages().items():
        for f in os.listdir(folder):
            if f.endswith(".py"):
                expected.add(name.replace(".", "/") + "/" + f)
    assert expected - in_wheel == set(), f"modules missing from the wheel: {sorted(expected - in_wheel)}"

    inst = subprocess.run(pip + ["install", "--no-deps", "--target", str(target), whl], env=env, capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr[-3000:]
    code = (
        "import orthograd_fast, orthograd_fast.engine.routes, orthograd_fast.engine.rules, orthograd_fast.kernels\n"
        "from orthograd_fast.unlearning.cli import build_parser\n"
        "print(orthograd_fast.__file__)\n"
        "build_parser().parse_args(['demo', '--out', 'x'])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env={**env, "PYTHONPATH": str(target)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert os.path.realpath(run.stdout.split()[0]).startswith(os.path.realpath(str(target)) + os.sep), run.stdout
