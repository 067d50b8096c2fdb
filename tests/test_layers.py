"""The stage order of the packages, read from the modules' own import statements (top-level and inside functions).

Lowest first: the shared utilities, the data, the recipe schema, the model, the plan, the run folder, training,
evaluation, export, then the orchestration (pipeline, launcher) and the command line on top. A module may import
its own package and anything below it. An import that climbs is a failure unless it is named in EXCEPTIONS with
its reason; so is any import cycle, between modules or between packages. The rule is checked on the real import
graph, not on a list kept by hand.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import lowvram

PACKAGE = Path(lowvram.__file__).parent

# The stage order, lowest first. A top-level module is its own unit; a subpackage is one unit.
ORDER = [
    ["lowvram.errors", "lowvram._lazy", "lowvram.utils"],
    ["lowvram.data"],
    ["lowvram.recipe"],  # the schema: every stage reads it
    ["lowvram.model"],
    ["lowvram.plan"],
    ["lowvram.rundir", "lowvram.offline"],
    ["lowvram.train"],
    ["lowvram.evaluate"],
    ["lowvram.export"],
    ["lowvram.pairs"],  # samples the policy (llama.cpp or transformers), judges, trains DPO rounds
    ["lowvram.pipeline", "lowvram.doctor", "lowvram.wheelcache"],
    ["lowvram.launch"],
    ["lowvram.cli"],
    ["lowvram.__main__"],
]
# Imports that climb, each with why. Module to module: a new one is a decision, not an accident.
EXCEPTIONS = {
    # recipe.py lists every problem of a recipe at once, before anything loads: it checks names against the
    # vocabularies of the stages it configures (the style review's one deliberate exception).
    ("lowvram.recipe", "lowvram.plan.catalog"): "model families: `model.family` is checked before loading",
    ("lowvram.recipe", "lowvram.plan.tiers"): "tier names: `plan.tier` is checked before loading",
    ("lowvram.recipe", "lowvram.export.llamacpp"): "GGUF type names: `export.gguf` is checked before training",
    # training measures KL to the reference with the same maths as `lowvram eval`; kl.py imports no lowvram module
    ("lowvram.train.callbacks", "lowvram.evaluate.kl"): "the KL logged during training is eval's KL",
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
            # `from lowvram.export import merge`: the submodule, when it is one
            found |= {f"{node.module}.{a.name}" for a in node.names}
        todo.extend(ast.iter_child_nodes(node))
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != "lowvram"}


def import_graph() -> dict[str, set[str]]:
    return {_module_name(p): imports_of(p) - {_module_name(p)} for p in sorted(PACKAGE.rglob("*.py"))}


def unit(module: str) -> str:
    """The unit a module belongs to in ORDER: its subpackage, or itself at the top level."""
    return ".".join(module.split(".")[:2])


LEVEL = {u: i for i, units in enumerate(ORDER) for u in units}


def test_the_graph_is_read_from_the_code():
    graph = import_graph()
    assert "lowvram.train.stage" in graph["lowvram.pipeline"]
    assert "lowvram.data.sources" in graph["lowvram.data.formats"]  # a top-level one
    assert "lowvram.plan.hardware" in graph["lowvram.cli"]  # a function-level one
    assert len(graph) > 40


def test_every_unit_has_a_place_in_the_stage_order():
    units = {unit(m) for m in import_graph()} - {"lowvram"}
    assert sorted(units - set(LEVEL)) == []


def test_no_import_climbs_the_stage_order_unless_named():
    climbs = {
        (mod, dep)
        for mod, deps in import_graph().items()
        for dep in deps
        if unit(mod) != unit(dep) and LEVEL[unit(dep)] > LEVEL[unit(mod)]
    }
    assert sorted(climbs - set(EXCEPTIONS)) == []
    assert sorted(set(EXCEPTIONS) - climbs) == []  # an exception that no longer climbs is taken off the list


def test_the_stage_order_catches_a_climb():
    assert LEVEL[unit("lowvram.export.run")] > LEVEL[unit("lowvram.train.stage")]
    assert LEVEL[unit("lowvram.cli")] > LEVEL[unit("lowvram.pipeline")] > LEVEL[unit("lowvram.export.run")]


def test_utilities_and_data_import_nothing_above_them():
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("lowvram.utils."):
            assert {unit(d) for d in deps} <= {"lowvram.utils", "lowvram.errors"}, mod
        if mod.startswith("lowvram.data"):
            assert {unit(d) for d in deps} <= {"lowvram.data", "lowvram.utils", "lowvram.errors"}, mod


def test_evaluation_and_the_kl_maths_stay_out_of_training():
    graph = import_graph()
    assert graph["lowvram.evaluate.kl"] == set()  # generation, log-probabilities, KL: used by training and eval
    training = {"lowvram.train.stage", "lowvram.train.common", "lowvram.train.callbacks"}
    assert not graph["lowvram.evaluate.run"] & training


def test_the_html_report_only_renders():
    """report_html reads the run's files; the reward model and the evaluation are the pipeline's steps."""
    graph = import_graph()
    assert graph["lowvram.evaluate.report_html"].isdisjoint({"lowvram.train.reward", "lowvram.evaluate.run"})
    assert {"lowvram.train.reward", "lowvram.evaluate.run", "lowvram.evaluate.report_html"} <= graph["lowvram.pipeline"]


def test_the_process_group_helpers_are_a_leaf_and_the_launcher_sits_beside_the_cli():
    graph = import_graph()
    assert graph["lowvram.utils.dist"] <= {"lowvram.errors"}
    for mod in ("lowvram.train.common", "lowvram.train.checkpoints"):
        assert "lowvram.utils.dist" in graph[mod]
        assert graph[mod].isdisjoint({"lowvram.plan.parallel", "lowvram.launch", "lowvram.plan.lengths"}), mod
    assert {mod for mod, deps in graph.items() if "lowvram.launch" in deps} == {"lowvram.cli"}


def test_the_small_upward_edges_stay_gone():
    """Three edges the style review found climbing back up the layers: each was a name in the wrong module."""
    graph = import_graph()
    assert "lowvram.train.guards" not in graph["lowvram.export.run"]  # the saved-adapter check lives in adapters.py
    for backend in ("lowvram.model.hf_backend", "lowvram.model.unsloth_backend"):  # annotations only
        assert not graph[backend] & {"lowvram.plan.planner", "lowvram.recipe"}, backend
    for reader in ("lowvram.offline", "lowvram.train.stage"):  # BUILTIN_PREFIX lives with the built-in model
        assert "lowvram.plan.catalog" not in graph[reader], reader


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
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


def test_no_import_cycles_between_modules():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [{"a", "b"}]  # the finder finds one
    assert _cycles(import_graph()) == []


def test_no_import_cycles_between_packages_beyond_the_named_exceptions():
    """At package scale, the named exceptions are the only way back down; without them the packages form no
    cycle."""
    packages: dict[str, set[str]] = {}
    for mod, deps in import_graph().items():
        for dep in deps:
            if unit(mod) != unit(dep) and (mod, dep) not in EXCEPTIONS:
                packages.setdefault(unit(mod), set()).add(unit(dep))
    assert _cycles(packages) == []


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


# Where a lowvram import inside a function buys start-up time: the command line imports each command's modules
# only when that command runs (`lowvram --help` loads no stage; tests/test_cli.py checks torch stays out), and
# doctor and the notebook's wheel cache are read by light commands. Everywhere else, imports are at the top.
LAZY_BOUNDARY = {"lowvram.cli", "lowvram.doctor", "lowvram.wheelcache"}


def test_lowvram_imports_are_at_the_top_outside_the_command_line_boundary():
    nested = {
        f"{_module_name(p)}:{line}"
        for p in sorted(PACKAGE.rglob("*.py"))
        if _module_name(p) not in LAZY_BOUNDARY
        for line in _nested_lowvram_imports(p)
    }
    assert sorted(nested) == []


def test_only_rundir_names_the_run_directorys_own_files():
    """recipe.yaml, plan.json and base.json are written down once, in rundir.py (docstrings aside)."""
    names = {"recipe.yaml", "plan.json", "base.json"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names and path.name != "rundir.py":
                found.append(f"{path.name}:{node.lineno} {node.value}")
    assert found == []


def test_no_folder_holds_more_than_twelve_modules():
    for folder in [PACKAGE, *[p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()]]:
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= 12, f"{folder.name}: {len(modules)} modules"


def _lowvram_imports_outside_the_package() -> list[tuple[str, int, str, str | None]]:
    """(file, line, module, name) for every `lowvram` import in scripts/, recipes/, tests/ and the notebooks'
    code cells, at any depth (a benchmark's imports sit inside main())."""
    root = PACKAGE.parent
    sources = [
        (p, p.read_text(encoding="utf-8")) for d in ("scripts", "recipes", "tests") for p in (root / d).rglob("*.py")
    ]
    for nb in (root / "notebooks").glob("*.ipynb"):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        # shell (!pip) and magic (%time) lines are not Python: each becomes `pass` at its indent
        lines = [ln for cell in code for ln in cell.splitlines()]
        text = "\n".join(
            ln[: len(ln) - len(ln.lstrip())] + "pass" if ln.lstrip().startswith(("!", "%")) else ln for ln in lines
        )
        sources.append((nb, text))
    found = []
    for path, text in sources:
        for node in ast.walk(ast.parse(text)):
            where = (str(path.relative_to(root)), node.lineno) if hasattr(node, "lineno") else None
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "lowvram":
                found += [(*where, node.module, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                found += [(*where, a.name, None) for a in node.names if a.name.split(".")[0] == "lowvram"]
    return found


def test_every_lowvram_import_outside_the_package_resolves():
    """A module that moved leaves no stale path behind in a script, recipe, test or notebook (bench_sampler.py
    imported resolve_model_path from train.stage after it had moved to model.tiny, and nothing ran it)."""
    import importlib

    imports = _lowvram_imports_outside_the_package()
    assert any(f.startswith("scripts/") for f, *_ in imports) and any(f.startswith("notebooks/") for f, *_ in imports)
    broken = []
    for file, line, module, name in imports:
        try:
            mod = importlib.import_module(module)
            if name is not None and name != "*" and not hasattr(mod, name):
                importlib.import_module(f"{module}.{name}")  # a submodule: `from lowvram import cli`
        except ImportError as e:
            broken.append(f"{file}:{line}: from {module} import {name}: {e}")
    assert not broken, "\n".join(broken)
