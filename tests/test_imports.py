"""The package's modules import each other in the order ``__init__``'s docstring declares, without a cycle,
counting imports inside functions.

A function-level import hides a cycle (or a module reaching up to a later chapter) from Python until the
function runs; these tests read every import statement of every module, top level or not.
"""
import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qlora_tutorial"


def module_name(path: Path) -> str:
    """A module's dotted name: "lora" for lora.py, "bench" for bench/__init__.py, "bench.suite" for bench/suite.py."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_files() -> list[Path]:
    """Every module of the package, subpackages included, but the package's own ``__init__``."""
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in its code ("lora", "bench.suite", ...).

    Importing a module of a subpackage from outside it runs the subpackage's ``__init__`` first:
    that counts as importing the subpackage too.
    """
    me = module_name(path)
    here = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]  # the importer's package
    targets = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # from .lora import x, from . import lora, from ..memory import y
                base = here[:len(here) - (node.level - 1)]
            elif module.split(".")[0] == "qlora_tutorial":  # from qlora_tutorial.lora import x
                base, module = [], module.partition(".")[2]
            else:
                continue
            parent = base + (module.split(".") if module else [])
            for alias in node.names:  # `from X import a`: a may be a module of X, or a name in X
                sub = ".".join(parent + [alias.name])
                targets.append(sub if sub in modules else ".".join(parent))
        elif isinstance(node, ast.Import):
            targets += [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("qlora_tutorial.")]
    found = set()
    for target in targets:
        parts = target.split(".")
        for k in range(1, len(parts) + 1):  # the module and every subpackage above it
            name = ".".join(parts[:k])
            if name in modules and (k == len(parts) or not me.startswith(name + ".")):
                found.add(name)
    return found - {me}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    modules = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, modules) for p in files}


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
    # a subpackage: its modules, relative imports two levels up, and importing it from outside
    assert {"bench.suite", "bench.cli"} <= graph["bench"] and "memory" in graph["bench.suite"]
    assert "bench.step" in graph["bench.suite"] and "adapters" in graph["fsdp"]


def test_no_import_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# ---------------------------------------------------------------- the declared order
# The teaching core, as the design names it: it imports nothing from the chapters after it.
CORE = {"lora", "formats", "nf4", "matmul4bit", "layer", "quantize", "adapters", "train", "memory"}
ABOVE_THE_CORE = {"fast", "nf4_triton", "variants", "fsdp", "bench"}


def declared_order() -> tuple[list[str], set[str]]:
    """The modules ``__init__``'s docstring lists, in order, and the ones listed before its "above the
    core" line."""
    doc = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text()))
    order, below = [], None
    for line in doc.splitlines():
        if line.startswith("    ----"):
            below = set(order)
        elif m := re.match(r"^    (\w+)\s{2,}\S", line):
            if m.group(1) != "module":  # the table's heading
                order.append(m.group(1))
    return order, below


def unit(module: str) -> str:
    """A subpackage counts as one module: "adapters.ours" -> "adapters"."""
    return module.split(".")[0]


def test_every_module_is_declared_once():
    order, below = declared_order()
    assert len(order) == len(set(order))
    assert set(order) == {unit(m) for m in import_graph()}
    assert CORE <= below and ABOVE_THE_CORE.isdisjoint(below)


def reaching_down(graph: dict[str, set[str]], order: list[str]) -> list[str]:
    """"a imports b" for every import of a module declared below the importer."""
    rank = {name: i for i, name in enumerate(order)}
    return [f"{module} imports {other}" for module, imported in sorted(graph.items()) for other in sorted(imported)
            if unit(other) != unit(module) and rank[unit(other)] > rank[unit(module)]]


def test_the_order_check_sees_a_module_reaching_down():
    order = ["lora", "layer", "adapters", "fast"]
    assert reaching_down({"layer": {"lora"}, "adapters.ours": {"adapters.folder", "layer"}}, order) == []
    assert reaching_down({"layer": {"fast", "lora"}, "lora": {"adapters.merge"}}, order) == [
        "layer imports fast", "lora imports adapters.merge"]


def test_each_module_imports_only_the_modules_above_it():
    order, _ = declared_order()
    wrong = reaching_down(import_graph(), order)
    assert wrong == [], "modules reaching down the declared order: " + "; ".join(wrong)


def test_the_core_imports_nothing_from_the_chapters_after_it():
    graph = import_graph()
    reach = {m: {unit(o) for o in imported} & ABOVE_THE_CORE for m, imported in graph.items() if unit(m) in CORE}
    assert {m: r for m, r in reach.items() if r} == {}
