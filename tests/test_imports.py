"""The package's modules import each other without a cycle, counting imports inside functions.

A function-level import hides a cycle from Python until the function runs; this test reads every
import statement of every module (top level or not) and checks that the graph has no cycle.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qlora_tutorial"


def imported_modules(path: Path) -> set[str]:
    """The package modules ``path`` imports anywhere in its code ("lora", "nf4", ...)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .lora import x
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import lora, nf4
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and (node.module or "").startswith("qlora_tutorial."):
                found.add(node.module.split(".")[1])
            elif node.level == 0 and node.module == "qlora_tutorial":
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("qlora_tutorial."))
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return (found & modules) - {path.stem}


def import_graph() -> dict[str, set[str]]:
    return {p.stem: imported_modules(p) for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_holds_function_level_imports():
    graph = import_graph()
    assert "layer" in graph["quantize"] and "lora" in graph["layer"]  # top-level imports
    assert "models" in graph["memory"]  # an import inside a function


def test_no_import_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
