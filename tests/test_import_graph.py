"""The package's own import graph has no cycle, and the engine never reaches the CGS2 front end.

Every module of ``orthograd_fast`` (and of ``orthograd_fast.kernels``, whose source is the
checkout's top-level ``kernels/``, see pyproject.toml) is read with ``ast``, never imported, and
each ``import`` / ``from ... import`` of a module of the package becomes an edge.

What counts as an edge:

* Module-level and function-local imports alike. A local import only defers the import to the
  first call; the two modules still need each other, so they cannot be read, tested or moved apart.
  (The cycle this test was written against, gram_schmidt <-> triton_ops, was local on both sides.)
* Not imports under ``if TYPE_CHECKING:``: they never run and exist for annotations only.
* ``from pkg import name`` points at ``pkg.name`` where that is a module, else at ``pkg`` itself.
* No implicit edge to a parent package: importing ``orthograd_fast.x`` runs
  ``orthograd_fast/__init__.py`` first, but that is already under way whenever ``x`` is imported
  from inside the package, so it orders nothing.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# package name -> source folder (pyproject.toml, [tool.setuptools.package-dir])
ROOTS = {"orthograd_fast": "orthograd_fast", "orthograd_fast.kernels": "kernels"}
TOP = "orthograd_fast"


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    local: bool  # inside a function (deferred to the first call)

    def __str__(self) -> str:
        where = "function-local" if self.local else "module-level"
        return f"{self.src} -> {self.dst}  ({_path(self.src)}:{self.line}, {where})"


def _modules() -> dict[str, tuple[str, bool]]:
    """{dotted module name: (file path, is a package __init__)}."""
    mods: dict[str, tuple[str, bool]] = {}
    for pkg, folder in ROOTS.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            rel = os.path.relpath(dirpath, base)
            parts = [] if rel == "." else rel.split(os.sep)
            if "__init__.py" not in filenames:
                dirnames[:] = []  # not a package: nothing below it is importable as one
                continue
            for f in sorted(filenames):
                if not f.endswith(".py"):
                    continue
                stem = f[:-3]
                name = ".".join([pkg, *parts] + ([] if stem == "__init__" else [stem]))
                if name in mods and mods[name][0] != os.path.join(dirpath, f):
                    continue  # orthograd_fast/kernels (if any) never shadows the mapped kernels/
                mods[name] = (os.path.join(dirpath, f), stem == "__init__")
    return mods


def _path(mod: str) -> str:
    return os.path.relpath(_modules()[mod][0], ROOT)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """(node, inside a function) for every import statement, skipping TYPE_CHECKING blocks."""
    def visit(node, local):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    yield from visit(ast.Module(body=[sub], type_ignores=[]), local)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, local
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from visit(child, inner)

    yield from visit(tree, False)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if node.level > 1:
        parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _known(name: str, mods) -> str | None:
    """The longest prefix of ``name`` that is a module of the package."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        cand = ".".join(parts[:k])
        if cand in mods:
            return cand
    return None


def import_graph() -> list[Edge]:
    mods = _modules()
    edges: list[Edge] = []
    for mod, (path, is_pkg) in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        for node, local in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = _resolve(mod, is_pkg, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            for t in targets:
                if not (t == TOP or t.startswith(TOP + ".")):
                    continue
                dst = _known(t, mods)
                if dst is not None and dst != mod:
                    edges.append(Edge(mod, dst, node.lineno, local))
    return edges


def find_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges) per strongly connected component of more than one module."""
    adj: dict[str, list[Edge]] = {}
    for e in edges:
        adj.setdefault(e.src, []).append(e)
        adj.setdefault(e.dst, [])
    # Tarjan's strongly connected components, iterative
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]
    for root in sorted(adj):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter[0]
                counter[0] += 1
                stack.append(v)
                on.add(v)
            if i < len(adj[v]):
                work.append((v, i + 1))
                w = adj[v][i].dst
                if w not in index:
                    work.append((w, 0))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            for e in adj[v]:
                if e.dst in on:
                    low[v] = min(low[v], low[e.dst])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(set(comp))
    cycles = []
    for comp in comps:
        start = min(comp)
        # breadth-first search inside the component for a shortest path back to start
        prev: dict[str, Edge] = {}
        frontier, seen, closing = [start], {start}, None
        while frontier and closing is None:
            nxt = []
            for v in frontier:
                for e in adj[v]:
                    if e.dst == start:
                        closing = e
                        break
                    if e.dst in comp and e.dst not in seen:
                        seen.add(e.dst)
                        prev[e.dst] = e
                        nxt.append(e.dst)
                if closing is not None:
                    break
            frontier = nxt
        path, v = [closing], closing.src
        while v != start:
            path.append(prev[v])
            v = prev[v].src
        cycles.append(path[::-1])
    return cycles


def _reached_from(edges: list[Edge], source: str) -> dict[str, Edge]:
    """{module reachable from ``source``: the edge it was first reached by} (source excluded)."""
    fwd: dict[str, list[Edge]] = {}
    for e in edges:
        fwd.setdefault(e.src, []).append(e)
    out: dict[str, Edge] = {}
    todo = [source]
    while todo:
        for e in fwd.get(todo.pop(), ()):
            if e.dst not in out and e.dst != source:
                out[e.dst] = e
                todo.append(e.dst)
    return out


def _reaches(edges: list[Edge], target: str) -> set[str]:
    """Modules from which ``target`` is reachable (target itself excluded)."""
    back: dict[str, set[str]] = {}
    for e in edges:
        back.setdefault(e.dst, set()).add(e.src)
    out, todo = set(), [target]
    while todo:
        for s in back.get(todo.pop(), ()):
            if s not in out and s != target:
                out.add(s)
                todo.append(s)
    return out


# ----------------------------------------------------------------------------- tests
def test_roots_match_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    assert '"orthograd_fast.kernels" = "kernels"' in text


def test_graph_sees_known_edges():
    """Guards against a vacuous graph: module-level, function-local and relative-in-package
    imports are all found, and a name imported from a package resolves to its module."""
    edges = {(e.src, e.dst): e for e in import_graph()}
    assert not edges[("orthograd_fast.api", "orthograd_fast.engine.gram")].local  # from .engine.gram import
    assert not edges[("orthograd_fast.api", "orthograd_fast.engine.projection")].local  # from .engine import
    assert ("orthograd_fast.engine.capture", "orthograd_fast.errors") in edges  # from ..errors
    assert edges[("orthograd_fast.engine.routes.triton", "orthograd_fast.engine.triton_ops")].local
    assert ("orthograd_fast.kernels.cgs_step", "orthograd_fast.kernels._common") in edges
    assert ("orthograd_fast.integrations.hf", "orthograd_fast.api") in edges  # from ..api
    assert ("orthograd_fast.unlearning.loop", "orthograd_fast.api") in edges  # from ..api
    assert ("orthograd_fast", "orthograd_fast.unlearning") in edges  # from .unlearning import unlearn
    assert ("orthograd_fast.engine.triton_ops", "orthograd_fast.kernels.tile_gram") in edges


def test_find_cycles_reports_a_cycle():
    edges = [Edge("a", "b", 1, False), Edge("b", "c", 2, True), Edge("c", "a", 3, False),
             Edge("c", "d", 4, False)]
    (cyc,) = find_cycles(edges)
    assert [e.src for e in cyc] == ["a", "b", "c"] and cyc[-1].dst == "a"
    assert find_cycles(edges[:2]) == []


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    if cycles:
        msg = "\n\n".join("\n".join(f"  {e}" for e in cyc) for cyc in cycles)
        pytest.fail(f"import cycle(s) in the package (each edge: importer -> imported):\n{msg}")


def test_engine_never_imports_gram_schmidt():
    """Blocked CGS2 is a documented alternative outside the engine: no module of the package
    reaches orthograd_fast.gram_schmidt, and its kernel is reached only through it."""
    edges = import_graph()
    assert _reaches(edges, "orthograd_fast.gram_schmidt") == set()
    assert _reaches(edges, "orthograd_fast.kernels.cgs_step") == {"orthograd_fast.gram_schmidt"}


ENGINE = "orthograd_fast.engine"
# what the engine must never reach: the facade, the application on top of it, and blocked CGS2
ABOVE_ENGINE = ("orthograd_fast.api", "orthograd_fast.unlearning", "orthograd_fast.gram_schmidt")


def test_engine_data_flows_one_way():
    """No module of orthograd_fast.engine imports (directly or through other modules) the facade,
    orthograd_fast.unlearning or orthograd_fast.gram_schmidt: they sit on top of the engine."""
    edges = import_graph()
    engine = sorted(m for m in _modules() if m == ENGINE or m.startswith(ENGINE + "."))
    assert len(engine) > 20 and f"{ENGINE}.gram" in engine  # the subpackage is really read
    bad = []
    for mod in engine:
        for dst, e in sorted(_reached_from(edges, mod).items()):
            if any(dst == a or dst.startswith(a + ".") for a in ABOVE_ENGINE):
                bad.append(f"{mod} reaches {dst} (last edge: {e})")
    assert not bad, "the engine imports what sits on top of it:\n" + "\n".join(bad)


def test_engine_check_sees_an_upward_import():
    """The check above is not vacuous: an engine module importing the facade is caught."""
    edges = import_graph() + [Edge(f"{ENGINE}.gram", "orthograd_fast.api", 1, True)]
    assert "orthograd_fast.api" in _reached_from(edges, f"{ENGINE}.projection")
