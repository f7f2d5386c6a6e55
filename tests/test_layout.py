"""The shape of the library: which titans modules import which, and how long they are.

Read from the source with ``ast`` (nothing is imported), counting every import: at the top
of a module and inside functions alike, since a function-local import is still a
dependency, only a hidden one.
  * no import loops between titans modules;
  * imports go one way between the folders: pipeline -> transforms -> models, never back
    (models imports neither transforms nor pipeline; transforms does not import pipeline);
  * no library module grows past MAX_LINES.
"""
from __future__ import annotations

import ast
import os


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("models", "transforms", "pipeline")  # lower folders first
MAX_LINES = 500


def library_files() -> dict[str, str]:
    """titans module name -> path, for every .py file under the library folders."""
    files = {}
    for folder in FOLDERS:
        for dirpath, dirnames, names in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in names:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                files["titans." + ".".join(parts)] = path
    return files


def imported_modules(module: str, path: str, known: set[str]) -> set[str]:
    """The titans modules ``module`` imports anywhere in its file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()

    def add(name: str) -> None:
        # the module itself, or the nearest enclosing titans module/package that exists
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if not base.startswith("titans"):
                continue
            for alias in node.names:  # `from titans.pipeline import counts` names a module
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base)
    return found


def import_graph() -> dict[str, set[str]]:
    files = library_files()
    known = set(files)
    return {m: imported_modules(m, p, known) for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop as [a, b, ..., a], or None."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = grey
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt, black) == grey:
                return stack[stack.index(nxt):] + [nxt]
            if colour.get(nxt) == white:
                loop = visit(nxt)
                if loop:
                    return loop
        stack.pop()
        colour[node] = black
        return None

    for node in sorted(graph):
        if colour[node] == white:
            loop = visit(node)
            if loop:
                return loop
    return None


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every loop found, one at a time: report a loop, cut its last edge, look again."""
    graph = {k: set(v) for k, v in graph.items()}
    loops = []
    while (loop := find_cycle(graph)) is not None:
        loops.append(loop)
        graph[loop[-2]].discard(loop[-1])
    return loops


def folder(module: str) -> str:
    return module.split(".")[1]


def test_the_graph_sees_the_library():
    graph = import_graph()
    assert {"titans.models.deferral", "titans.transforms.features", "titans.pipeline.job"} <= set(graph)
    # a function-local import counts as an edge (job imports cascade inside a function)
    assert "titans.pipeline.graphs.cascade" in graph["titans.pipeline.job"]
    # `from titans.pipeline import counts` is an edge to the module counts
    assert "titans.pipeline.graphs.counts" in graph["titans.pipeline.graphs.stages"]


def test_find_cycle_finds_a_loop():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_loops():
    loops = all_cycles(import_graph())
    assert not loops, "import loops:\n" + "\n".join(" -> ".join(loop) for loop in loops)


def test_imports_go_one_way_between_folders():
    rank = {name: i for i, name in enumerate(FOLDERS)}
    upward = sorted(f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
                    if rank[folder(b)] > rank[folder(a)])
    assert not upward, "imports that climb back up (models < transforms < pipeline):\n" + "\n".join(upward)


def long_modules() -> dict[str, int]:
    lengths = {}
    for module, path in library_files().items():
        with open(path, encoding="utf-8") as f:
            lengths[module] = sum(1 for _ in f)
    return {m: n for m, n in sorted(lengths.items()) if n > MAX_LINES}


def test_no_library_module_is_too_long():
    too_long = long_modules()
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_the_state_store_imports_only_storage_and_the_lock():
    """pipeline/state (``--state DIR``) sits below the label job: it may use the storage layer
    and the output lock, never the label job, graphs or command line that use it."""
    allowed = {"titans.transforms.io.storage", "titans.pipeline.output_lock"}
    graph = import_graph()
    assert "titans.pipeline.state.store" in graph
    outside = sorted(f"{a} -> {b}" for a, targets in graph.items()
                     if a.startswith("titans.pipeline.state") for b in targets
                     if not b.startswith("titans.pipeline.state") and b not in allowed)
    assert not outside, "pipeline/state imports beyond storage and the lock:\n" + "\n".join(outside)
