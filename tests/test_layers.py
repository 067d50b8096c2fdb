"""The import direction, read from the modules' own import statements (top-level and inside functions).

The command line (cli.py) and the launcher of `--gpus N` (launch.py) sit on top; pipeline.py composes the
stages; train.py and export.py are the stages; everything else is a lower layer that must not reach back up. A lower module importing a
higher one is how the back-edges the style review found came about (export importing doctor, data
importing the planner), so the rule is checked on the real import graph, not on a list kept by hand.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lowvram

PACKAGE = Path(lowvram.__file__).parent
HIGH = ("lowvram.cli", "lowvram.launch", "lowvram.pipeline", "lowvram.train", "lowvram.export")
# Who may import each high module: the command line everything, the pipeline its stages, and the two stages
# that load a trained model with train's helpers (eval and the reward model).
MAY_IMPORT = {
    "lowvram.__main__": {"lowvram.cli"},
    "lowvram.cli": set(HIGH),
    "lowvram.launch": {"lowvram.pipeline"},  # the launcher opens the run as the pipeline does (open_run)
    "lowvram.pipeline": {"lowvram.train"},
    "lowvram.reward": {"lowvram.train"},
}
# The training modules: evaluation measures trained models, it never reaches into how they are trained.
TRAINING = ("lowvram.train", "lowvram.train_common", "lowvram.callbacks")


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


def test_the_small_upward_edges_stay_gone():
    """Three edges the style review found climbing back up the layers: each was a name in the wrong module."""
    graph = import_graph()
    assert "lowvram.guards" not in graph["lowvram.export"]  # the saved-adapter check lives in adapters.py
    for backend in ("lowvram.hf_backend", "lowvram.unsloth_backend"):  # Plan and Recipe: annotations only
        assert not graph[backend] & {"lowvram.planner", "lowvram.recipe"}, backend
    for reader in ("lowvram.offline", "lowvram.train"):  # BUILTIN_PREFIX lives with the built-in model
        assert "lowvram.models" not in graph[reader], reader


def test_evaluation_and_the_kl_maths_stay_out_of_training():
    graph = import_graph()
    assert graph["lowvram.kl"] == set()  # generation, log-probabilities, KL: used by training and eval alike
    assert not graph["lowvram.evaluate"] & set(TRAINING)


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


def test_no_import_cycles():
    """Gone: recipe <-> data; templates <-> special_tokens (the preflight checks left the template catalogue);
    train -> evaluate -> reward -> train (shared helpers in train_common, the KL maths in kl.py)."""
    known: list[set[str]] = []
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [{"a", "b"}]  # the finder finds one
    assert _cycles(import_graph()) == known  # none new, and the removed ones stay removed


def test_the_html_report_only_renders():
    """report_html reads the run's files; the reward model and the evaluation are the pipeline's steps."""
    graph = import_graph()
    assert graph["lowvram.report_html"].isdisjoint({"lowvram.train", "lowvram.reward", "lowvram.evaluate"})
    assert {"lowvram.reward", "lowvram.evaluate", "lowvram.report_html"} <= graph["lowvram.pipeline"]


def test_the_process_group_helpers_are_a_leaf_below_the_stages_and_the_launcher_sits_beside_the_cli():
    """distributed.py held three jobs: dist.py (who writes, barriers) is a leaf the training modules import
    alone; parallel.py (the plan per card) is a planner; launch.py is imported by the command line only."""
    graph = import_graph()
    assert "lowvram.distributed" not in graph
    assert graph["lowvram.dist"] <= {"lowvram.errors"}
    for mod in ("lowvram.train_common", "lowvram.checkpoints"):
        assert "lowvram.dist" in graph[mod]
        assert graph[mod].isdisjoint({"lowvram.parallel", "lowvram.launch", "lowvram.lengths"}), mod
    assert graph["lowvram.parallel"].isdisjoint(HIGH)
    assert {mod for mod, deps in graph.items() if "lowvram.launch" in deps} == {"lowvram.cli"}


def _nested_lowvram_imports(path: Path) -> list[int]:
    """Lines of `path` that import a lowvram module inside a function."""
    lines = []
    for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lowvram"):
                    lines.append(node.lineno)
                elif isinstance(node, ast.Import) and any(a.name.startswith("lowvram") for a in node.names):
                    lines.append(node.lineno)
    return lines


def test_the_run_entry_and_its_new_modules_import_lowvram_at_the_top():
    """No hidden edges: pipeline, launch, rundir, dist and parallel import lowvram modules at their top only."""
    for name in ("pipeline", "launch", "rundir", "dist", "parallel"):
        assert _nested_lowvram_imports(PACKAGE / f"{name}.py") == [], name


def test_only_rundir_names_the_run_directorys_own_files():
    """recipe.yaml, plan.json and base.json are written down once, in rundir.py (docstrings aside)."""
    names = {"recipe.yaml", "plan.json", "base.json"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names and path.name != "rundir.py":
                found.append(f"{path.name}:{node.lineno} {node.value}")
    assert found == []
