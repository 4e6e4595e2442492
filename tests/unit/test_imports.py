"""No import cycles between megatron_lite modules, and no import against the documented layer order
(docs/architecture.md), found by parsing the source with `ast` (nothing imported).

Lazy imports (inside a function) count. A lazy import that closes a loop still means two modules depend on
each other; it only works because of call order, and the first refactor that hoists it to module level turns
it into an ImportError. Imports under `if TYPE_CHECKING:` are ignored: they never run. The implicit
"submodule -> parent package __init__" step is not an edge, but an explicit import of the parent is.
"""
from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(node: ast.AST):
    """Yield every Import/ImportFrom under `node`, lazy ones included, skipping `if TYPE_CHECKING:` bodies."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    elif isinstance(node, ast.If) and "TYPE_CHECKING" in (getattr(node.test, k, "") for k in ("id", "attr")):
        for stmt in node.orelse:
            yield from _imports(stmt)
    else:
        for child in ast.iter_child_nodes(node):
            yield from _imports(child)


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Map each module of `package` (found under `root`) to the modules of the package it imports."""
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {mod: set() for mod in files}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: `.` is this module's package, each extra dot goes one level up
                    anchor = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            graph[mod].update(t for t in targets if t in files)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Tarjan's SCC; each cyclic component is reported as the shortest loop through each of its members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    sccs: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = {stack.pop()}
            while v not in scc:
                scc.add(stack.pop())
            if len(scc) > 1 or v in graph[v]:
                sccs.append(scc)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    loops = set()
    for scc in sccs:
        for start in scc:  # BFS inside the component for the shortest start -> ... -> start
            prev: dict[str, str] = {}
            queue = deque([start])
            while start not in prev:
                v = queue.popleft()
                for w in sorted(graph[v] & scc - prev.keys()):
                    prev[w] = v
                    queue.append(w)
            loop = [prev[start]]
            while loop[-1] != start:
                loop.append(prev[loop[-1]])
            loop.reverse()  # loop is now start ... prev[start]; rotate so the smallest name leads
            i = loop.index(min(loop))
            loops.add(tuple(loop[i:] + loop[:i]))
    return [" -> ".join(loop + loop[:1]) for loop in sorted(loops)]


# The documented order, lowest first: a module may import its own layer and the ones below it. A key
# is a module or package under megatron_lite (the longest matching prefix decides).
LAYERS = [
    ("errors", "logs", "lazy"),
    ("config", "slicing", "distributed.env"),  # slicing imports only torch; RunEnv only reads os.environ
    ("model", "data"),
    ("parallel", "distributed"),
    ("pipeline",),
    ("layout",),
    ("optim", "checkpoint"),
    ("train",),
    ("plan", "verify", "launcher", "generate"),  # command modules, each with its own sub-parser
    ("cli",),
    ("testing",),  # for tests and benchmarks only: on top, so no module of the package imports it
]


def layer_of(module: str, layers=LAYERS) -> int | None:
    """The layer index of a dotted module name (without the package name), None if unplaced."""
    table = {key: i for i, keys in enumerate(layers) for key in keys}
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in table:
            return table[".".join(parts[:n])]
    return None


def upward_imports(graph: dict[str, set[str]], package: str, layers=LAYERS) -> list[str]:
    """Every import of a higher layer by a lower one, and every module the table does not place."""
    rel = lambda mod: mod.removeprefix(package).lstrip(".")
    out = [f"{m}: not in the layer table" for m in sorted(graph)
           if m != package and layer_of(rel(m), layers) is None]
    for mod in sorted(graph):
        low = layer_of(rel(mod), layers)
        for target in sorted(graph[mod]):
            high = layer_of(rel(target), layers)
            if low is not None and high is not None and high > low:
                out.append(f"{mod} (layer {low}) imports {target} (layer {high})")
    return out


def test_imports_follow_the_documented_layers():
    wrong = upward_imports(import_graph(ROOT, "megatron_lite"), "megatron_lite")
    assert not wrong, "imports against the order in docs/architecture.md:\n  " + "\n  ".join(wrong)


def test_layer_checker_finds_an_upward_import_and_an_unplaced_module(tmp_path):
    _make_package(tmp_path, "lay", {"__init__.py": "", "low.py": "def f():\n    from .high import x\n",
                                    "high.py": "from .low import f\n", "extra.py": ""})
    layers = [("low",), ("high",)]
    assert upward_imports(import_graph(tmp_path, "lay"), "lay", layers) == [
        "lay.extra: not in the layer table", "lay.low (layer 0) imports lay.high (layer 1)"]
    assert upward_imports(import_graph(tmp_path, "lay"), "lay", [("low", "extra"), ("high",)]) == [
        "lay.low (layer 0) imports lay.high (layer 1)"]


def test_package_has_no_import_cycles():
    cycles = find_cycles(import_graph(ROOT, "megatron_lite"))
    assert not cycles, "import cycles (lazy imports count):\n  " + "\n  ".join(cycles)


def _make_package(root: Path, name: str, files: dict[str, str]) -> None:
    (root / name).mkdir()
    for fname, src in files.items():
        (root / name / fname).write_text(src)


def test_checker_finds_lazy_cycle_and_passes_acyclic(tmp_path):
    _make_package(tmp_path, "cyc", {"__init__.py": "", "a.py": "from . import b\n",
                                    "b.py": "import os\n\ndef f():\n    from .a import x\n"})
    assert find_cycles(import_graph(tmp_path, "cyc")) == ["cyc.a -> cyc.b -> cyc.a"]
    # __init__ -> a -> b (no implicit b -> __init__ edge), and b's TYPE_CHECKING import of a is ignored.
    _make_package(tmp_path, "ok", {"__init__.py": "from .a import x\n", "a.py": "from .b import y\n",
                                   "b.py": "if TYPE_CHECKING:\n    from .a import x\n"})
    assert import_graph(tmp_path, "ok") == {"ok": {"ok.a"}, "ok.a": {"ok.b"}, "ok.b": set()}
    assert find_cycles(import_graph(tmp_path, "ok")) == []
