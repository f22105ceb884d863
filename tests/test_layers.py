"""The package's layering, checked from its source: no import cycles (function-level imports
count too), `sched/` makes host decisions only (importing it loads no jax), and no module
assigns another object's private attributes."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("drex_jax", "convert")


def _modules() -> dict[str, str]:
    """Dotted module name -> source path, for every module of the packages."""
    out = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _imports(name: str, path: str) -> set[str]:
    """Modules of the packages that `name` imports anywhere in its source (module level or in a
    function; `from P import x` counts as P.x when that is a module)."""
    tree = ast.parse(open(path).read(), path)
    is_pkg = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = name.split(".")
                anchor = parts if is_pkg else parts[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # `import drex_jax.model.decoder as d` -> that module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    # the lazy `__getattr__` exports of a package's __init__ name modules in strings
    if is_pkg:
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for cand in (node.value, f"{name}.{node.value}"):
                    if cand in MODULES and cand != name and cand.startswith(name + "."):
                        found.add(cand)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_import_graph_has_no_cycles():
    assert len(MODULES) > 40 and GRAPH["drex_jax.engine"], "the walk found the package's modules and imports"
    assert _cycles(GRAPH) == []


def test_cycle_detector_finds_a_planted_cycle():
    planted = {k: set(v) for k, v in GRAPH.items()}
    planted["drex_jax.kv.pages"].add("drex_jax.engine")  # engine -> sched.batch -> kv.pages -> engine
    assert any({"drex_jax.engine", "drex_jax.kv.pages"} <= set(c) for c in _cycles(planted))


SCHED = sorted(m for m in MODULES if m.startswith("drex_jax.sched."))


def test_sched_imports_no_jax():
    """Every sched module, imported in a fresh interpreter, leaves jax unloaded."""
    assert "drex_jax.sched.ee_decoder" in SCHED
    code = ("import sys\n" + "".join(f"import {m}\n" for m in SCHED)
            + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax'))\n"
              "print(bad[:5]); sys.exit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"importing sched/ loaded {r.stdout.strip()} {r.stderr[-400:]}"


def _private_writes(path: str) -> list[str]:
    """Assignments `obj._name = ...` (also augmented, and `del`) to an object other than self/cls."""
    bad = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        flat = []
        for t in targets:
            flat += t.elts if isinstance(t, ast.Tuple) else [t]
        for t in flat:
            if (isinstance(t, ast.Attribute) and t.attr.startswith("_") and not t.attr.startswith("__")
                    and not (isinstance(t.value, ast.Name) and t.value.id in ("self", "cls"))):
                bad.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {ast.unparse(t)}")
    return bad


def test_no_module_writes_another_objects_private_attributes():
    bad = [w for path in MODULES.values() for w in _private_writes(path)]
    assert bad == []


def test_private_write_detector(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("class A:\n    def f(self, eng):\n        self._x = 1\n        eng._running = {}\n"
                   "        eng.pool, eng._y = 1, 2\n")
    assert _private_writes(str(src)) == [f"{os.path.relpath(str(src), ROOT)}:4 eng._running",
                                         f"{os.path.relpath(str(src), ROOT)}:5 eng._y"]


@pytest.mark.parametrize("layer", ["drex_jax.model", "drex_jax.kv", "drex_jax.rebatch"])
def test_device_layers_do_not_import_the_engine_or_scheduler(layer):
    """model/, kv/ and rebatch/ are the device layers: they never reach up into the engine, the
    scheduler or the server."""
    up = ("drex_jax.engine", "drex_jax.runner", "drex_jax.sched", "drex_jax.serve", "drex_jax.cli")
    bad = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() if m.startswith(layer) for t in ts if t.startswith(up))
    assert bad == []
