"""The package's import graph has no cycle, counting imports inside functions too (a lazy import that
holds a cycle together still is one)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"tedcache": ROOT / "tedcache", "tedcache.cli": ROOT / "cli"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its file (`from . import x` resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # `from pkg import module` depends on the module, not on pkg's __init__
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    resolved = set()
    for target in targets:
        while target and target not in known:  # an attribute of a module: the module itself
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def test_no_import_cycles():
    graph = package_graph()
    assert len(graph) > 25 and graph["tedcache.extraction"]  # the walk saw the package
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_cache_package_depends_on_nothing_downstream():
    """The format knows nothing of models, data, training: only errors and schema from outside."""
    graph = package_graph()
    outside = {t for name, deps in graph.items() if name.startswith("tedcache.cache") for t in deps
               if not t.startswith("tedcache.cache")}
    assert outside <= {"tedcache.errors", "tedcache.schema"}, outside


ON_TOP = ("tedcache.experiments", "tedcache.demos")  # stand on the pipeline; the pipeline never imports them
FRONT_DOORS = {"tedcache", "tedcache.cli", "tedcache.cli.main", "tedcache.cli.options"}  # may import anything


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports against the layering: the pipeline importing experiments or demos, experiments importing demos."""
    def level(name: str) -> int:
        return 2 if name.startswith(ON_TOP[1]) else 1 if name.startswith(ON_TOP[0]) else 0
    return [f"{name} -> {target}" for name, targets in sorted(graph.items()) if name not in FRONT_DOORS
            for target in sorted(targets) if level(target) > level(name)]


def test_the_pipeline_never_imports_what_stands_on_it():
    """experiments/ and demos/ import the pipeline, never the reverse (the package's __init__, the Python
    API's front door, and the CLI may import anything)."""
    graph = package_graph()
    assert any(name.startswith(ON_TOP[0]) for name in graph) and any(name.startswith(ON_TOP[1]) for name in graph)
    assert not upward_imports(graph), "imports against the layering: " + ", ".join(upward_imports(graph))


def test_the_layering_check_finds_upward_imports():
    graph = {"tedcache.loop": {"tedcache.experiments.stats"}, "tedcache.experiments.tune": {"tedcache.demos.demo"},
             "tedcache.demos.demo": {"tedcache.experiments.tune", "tedcache.loop"}, "tedcache": {"tedcache.demos.demo"}}
    assert upward_imports(graph) == ["tedcache.experiments.tune -> tedcache.demos.demo",
                                     "tedcache.loop -> tedcache.experiments.stats"]


GENERIC = ("tedcache.loop", "tedcache.reader", "tedcache.transfer", "tedcache.distributed")  # loop, batching, processes
METHOD_SPECIFIC = ("tedcache.losses", "tedcache.evaluate", "tedcache.stage1", "tedcache.stage2", "tedcache.teacher",
                   "tedcache.filters", "tedcache.distill", "tedcache.extract", "tedcache.teacher_", "tedcache.finetuning")


def generic_imports_of_the_specific(graph: dict[str, set[str]]) -> list[str]:
    """Imports, even indirect ones, from a generic part (the loop, batching, processes) to a method-specific
    one (the losses, evaluation's metrics and choice of the best state, Stage I, the pipelines)."""
    found = []
    for name in GENERIC:
        seen, todo = set(), list(graph[name])
        while todo:
            target = todo.pop()
            if target in seen or not target.startswith("tedcache"):
                continue
            seen.add(target)
            todo += graph.get(target, ())
        found += [f"{name} -> {t}" for t in sorted(seen) if t.startswith(METHOD_SPECIFIC)]
    return found


def test_the_generic_parts_never_import_a_method_specific_one():
    graph = package_graph()
    assert set(GENERIC) <= set(graph) and all(any(m.startswith(p) for m in graph) for p in METHOD_SPECIFIC)
    assert not generic_imports_of_the_specific(graph), generic_imports_of_the_specific(graph)


def test_the_generic_check_finds_an_indirect_import():
    graph = {"tedcache.loop": {"tedcache.helper"}, "tedcache.helper": {"tedcache.losses"}, "tedcache.losses": set(),
             "tedcache.reader": set(), "tedcache.transfer": set(), "tedcache.distributed": set()}
    assert generic_imports_of_the_specific(graph) == ["tedcache.loop -> tedcache.losses"]
