"""Dependency drift between this environment and the last green CI run.

CI installs the README's commands unpinned (what a user gets today). `.ci/last-green.txt` records
the versions of the last run that passed (`pip freeze` of CI's venv, committed by the session that
saw it pass). When an upstream release breaks CI:

    python .ci/drift.py                        # which installed versions differ from last green
    bash .ci/run --last-green                  # same suite, every dependency at last green's version

If the second passes, the culprit is among the packages the first lists; install the old version
of one of them (`pip install NAME==OLD`) and rerun the failing test to confirm it in one step.

    python .ci/drift.py --write                # after a green run: record this venv as last green
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
LAST_GREEN = os.path.join(HERE, "last-green.txt")


def freeze() -> dict:
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                         text=True, check=True).stdout
    return _parse(out.splitlines())


def _parse(lines) -> dict:
    pins = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "==" not in line:
            continue
        name, _, version = line.partition("==")
        pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def diff(old: dict, new: dict) -> list:
    rows = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a != b:
            rows.append((name, a or "-", b or "-"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="record this environment as the last green run")
    args = ap.parse_args(argv)
    now = freeze()
    if args.write:
        with open(LAST_GREEN, "w") as f:
            f.write("# pip freeze of the last green CI venv (python .ci/drift.py --write); used by\n"
                    "# `bash .ci/run --last-green` as pip constraints\n")
            f.writelines(f"{k}=={v}\n" for k, v in sorted(now.items()))
        print(f"wrote {len(now)} pins to {os.path.relpath(LAST_GREEN)}")
        return 0
    if not os.path.exists(LAST_GREEN):
        print("drift: no .ci/last-green.txt yet")
        return 0
    with open(LAST_GREEN) as f:
        rows = diff(_parse(f), now)
    if not rows:
        print("drift: every installed version equals the last green run's")
        return 0
    print(f"drift: {len(rows)} package(s) differ from the last green run (.ci/last-green.txt):")
    width = max(len(r[0]) for r in rows)
    for name, a, b in rows:
        print(f"  {name:<{width}}  {a} -> {b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
