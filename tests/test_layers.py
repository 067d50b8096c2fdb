"""The import direction, read from the modules' own import statements (top-level and inside functions).

The command line (cli.py) sits on top; pipeline.py composes the stages; train.py and export.py are
the stages; everything else is a lower layer that must not reach back up. A lower module importing a
higher one is how the back-edges the style review found came about (export importing doctor, data
importing the planner), so the rule is checked on the real import graph, not on a list kept by hand.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lowvram

PACKAGE = Path(lowvram.__file__).parent
HIGH = ("lowvram.cli", "lowvram.pipeline", "lowvram.train", "lowvram.export")
# Who may import each high module: the command line everything, the pipeline its stages, and the two stages
# that load a trained model with train's helpers (eval and the reward model).
MAY_IMPORT = {
    "lowvram.__main__": {"lowvram.cli"},
    "lowvram.cli": set(HIGH),
    "lowvram.pipeline": {"lowvram.train"},
    "lowvram.evaluate": {"lowvram.train"},
    "lowvram.reward": {"lowvram.train"},
    "lowvram.pairs": {"lowvram.train"},  # the pairs loop trains a DPO stage per round
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_of(path: Path) -> set[str]:
    """Every lowvram module `path` imports at run time, wherever the import statement is."""
    found: set[str] = set()
    todo = [ast.parse(path.read_text(encoding="utf-8"))]
    while todo:
        node = todo.pop()
        if _type_checking_only(node):  # annotations only: never executed
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            if node.module == "lowvram":  # `from lowvram import merge`
                found |= {f"lowvram.{a.name}" for a in node.names}
        todo.extend(ast.iter_child_nodes(node))
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    return {_module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_graph_is_read_from_the_code():
    graph = import_graph()
    assert "lowvram.train" in graph["lowvram.pipeline"]  # a function-level import
    assert "lowvram.data.sources" in graph["lowvram.data.formats"]  # a top-level one
    assert len(graph) > 30


def test_lower_layers_never_import_the_command_line_pipeline_or_stages():
    bad = [
        f"{mod} imports {dep}"
        for mod, deps in import_graph().items()
        for dep in sorted(deps)
        if dep in HIGH and dep != mod and dep not in MAY_IMPORT.get(mod, set())
    ]
    assert bad == []


def test_the_data_package_depends_only_on_itself_and_leaf_modules():
    graph = import_graph()
    leaves = {"lowvram.errors", "lowvram.ui"}  # ui: its report is a table (plain text, or rich in a terminal)
    assert all(not graph[leaf] for leaf in leaves)  # leaves import no lowvram module
    bad = [
        f"{mod} imports {dep}"
        for mod, deps in graph.items()
        if mod.startswith("lowvram.data")
        for dep in sorted(deps)
        if not dep.startswith("lowvram.data") and dep not in leaves
    ]
    assert bad == []


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_new_import_cycles():
    """The recipe <-> data cycle is gone; two remain, named here so that no third one grows unnoticed."""
    known = [
        {"lowvram.templates", "lowvram.special_tokens"},  # named templates' turn tokens <-> their memory note
        {"lowvram.train", "lowvram.evaluate", "lowvram.reward"},  # eval/reward load models with train's helpers
    ]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [{"a", "b"}]  # the finder finds one
    assert [c for c in _cycles(import_graph()) if c not in known] == []
