"""No import cycle inside smollm_ref, read from the source with `ast` (nothing is imported).

Every import statement counts: at module level, inside functions and under `if TYPE_CHECKING`, since a lazy
import that closes a cycle only hides it until the day someone hoists it. Relative imports are resolved
against the importing module's package. An edge goes from the importing module to:

- the module or package named (`import a.b.c` and `from a.b.c import x` -> `a.b.c`; a package is its
  `__init__`);
- each name of `from P import n` that is a submodule or subpackage of `P` (`from . import storage` ->
  `smollm_ref.storage`);
- `P` itself for `from P import n` when `n` is not a submodule: that name must already be bound in `P`'s
  `__init__`, so `P/__init__` depends on nothing that reaches back here;
- every package above the one named that Python initialises on the way (`import smollm_ref.weights.gguf`
  runs `smollm_ref/weights/__init__` first), except the packages that hold the importing module itself:
  those are already being initialised when it runs (the parent's `__init__` starts before the child's code),
  so reaching for a submodule through them closes no cycle. Without this exception every module that
  `smollm_ref/__init__` re-exports would be "in a cycle" with it.

A cycle through a package's `__init__` is therefore reported only when it is real: a module asks its own
package's `__init__` for a name it defines, or a module imports another package whose `__init__` leads back.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "smollm_ref"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under the package directory `root` (a package is its __init__)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _packages_of(name: str, is_package: bool) -> list[str]:
    """The packages that hold module `name` (itself too, when it is a package's __init__), outermost first."""
    parts = name.split(".")
    own = parts if is_package else parts[:-1]
    return [".".join(own[: i + 1]) for i in range(len(own))]


def import_graph(root: Path) -> dict[str, dict[str, list[int]]]:
    """importer -> {imported module -> line numbers of the imports} for every module under `root`; only
    modules under `root` are kept (third-party and standard-library imports are not edges)."""
    names = module_names(root)
    graph = {}
    for name, path in names.items():
        is_package = path.name == "__init__.py"
        own = set(_packages_of(name, is_package))
        edges: dict[str, list[int]] = {}

        def add(target: str, line: int, via_parents: bool = True, own=own, edges=edges, name=name) -> None:
            parts = target.split(".")
            while parts and ".".join(parts) not in names:  # `import a.b.attr` style: the longest module that exists
                parts.pop()
            if not parts:
                return
            found = ".".join(parts)
            targets = [found] if found not in own else []
            if via_parents:
                targets += [p for p in _packages_of(found, True)[:-1] if p not in own]
            for t in targets:
                if t != name:
                    edges.setdefault(t, []).append(line)

        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = _packages_of(name, is_package)[-1].split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != root.name:
                    continue
                add(source, node.lineno)
                for alias in node.names:
                    if f"{source}.{alias.name}" in names:
                        add(f"{source}.{alias.name}", node.lineno)
                    elif source in own and source != name:  # a name its own package's __init__ must already bind
                        edges.setdefault(source, []).append(node.lineno)
        graph[name] = edges
    return graph


def tangles(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """Each set of modules that import one another in a cycle (a strongly connected set of more than one
    module), sorted; a tangle holding several cycles is named once."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph is a few dozen modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def shortest_cycle(tangle: list[str], graph: dict[str, dict[str, list[int]]]) -> list[str]:
    """The shortest cycle through the tangle's first module, that module repeated at the end."""
    start = tangle[0]
    came_from: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:  # breadth first inside the tangle
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while (before := came_from[path[-1]]) is not None:
                    path.append(before)
                return [*reversed(path), start]
            if w in tangle and w not in came_from:
                came_from[w] = v
                queue.append(w)
    raise AssertionError(f"{tangle} is not a tangle")


def describe(tangle: list[str], graph: dict[str, dict[str, list[int]]], root: Path) -> str:
    """A tangle in words: one cycle, then every import among its modules with its file and lines."""
    names = module_names(root)
    cycle = " -> ".join(shortest_cycle(tangle, graph))
    edges = [
        f"{a} -> {b} ({names[a].relative_to(root.parent)} line {', '.join(map(str, graph[a][b]))})"
        for a in tangle
        for b in sorted(graph[a])
        if b in tangle
    ]
    return f"{cycle}; the imports among these modules:\n    " + "\n    ".join(edges)


def test_no_import_cycle_in_the_package():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40 and "smollm_ref.model" in graph  # the walk found the package
    found = tangles(graph)
    assert not found, f"{len(found)} import cycle(s) in smollm_ref:\n  " + "\n  ".join(describe(t, graph, PACKAGE) for t in found)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_cycles_are_found_through_lazy_relative_and_package_imports(tmp_path):
    """The check itself, on a made-up package: a cycle closed by an import inside a function, one through a
    subpackage's `__init__` re-export, and one where a module asks its own package's `__init__` for a name;
    re-exporting submodules from `__init__` (which import each other's siblings) is not one."""
    pkg = _write(
        tmp_path,
        {
            "pkg/__init__.py": "from .a import f\nfrom . import sub\n",
            "pkg/a.py": "from .b import g\n",
            "pkg/b.py": "def g():\n    from pkg import a\n",
            "pkg/sub/__init__.py": "from .x import h\n",
            "pkg/sub/x.py": "from .. import c\n",
            "pkg/c.py": "def k():\n    from .sub import h\n",
            "pkg/d.py": "from . import f\n",
            "pkg/e.py": "from .d import *\n",
            "pkg/z.py": "import pkg.sub.x\n",
        },
    )
    graph = import_graph(pkg)
    assert graph["pkg.sub.x"] == {"pkg.c": [1]}  # `from .. import c`: the submodule, not pkg/__init__
    assert graph["pkg.c"] == {"pkg.sub": [2]}  # `h` is a name pkg/sub/__init__ binds
    assert graph["pkg.z"] == {"pkg.sub.x": [1], "pkg.sub": [1]}  # pkg/sub/__init__ runs before pkg/sub/x
    assert graph["pkg.d"] == {"pkg": [1]}  # `f` is a name pkg/__init__ binds, but pkg/__init__ never imports d
    assert tangles(graph) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub", "pkg.sub.x"]]
    assert shortest_cycle(["pkg.c", "pkg.sub", "pkg.sub.x"], graph) == ["pkg.c", "pkg.sub", "pkg.sub.x", "pkg.c"]
    assert "pkg.b -> pkg.a (pkg/b.py line 2)" in describe(["pkg.a", "pkg.b"], graph, pkg)
    (pkg / "__init__.py").write_text("from .a import f\nfrom . import sub\nfrom .e import *\n")
    assert ["pkg", "pkg.d", "pkg.e"] in tangles(import_graph(pkg))
