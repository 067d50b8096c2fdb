"""The CLI: exit codes, messages without tracebacks, and start-up that imports no training library."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lowvram.cli import main


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lowvram", *args], capture_output=True, text=True, env=env)


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert main([]) == 0
    assert "doctor" in capsys.readouterr().out


def test_doctor_is_healthy_on_cpu(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for key in (
        "GPU",
        "precision",
        "tier",
        "backend",
        "torch",
        "transformers",
        "trl",
        "peft",
        "bitsandbytes",
        "unsloth",
        "xformers",
        "GGUF f16",
        "GGUF q4_k_m",
        "free RAM",
        "free disk",
    ):
        assert key in out


def test_doctor_for_a_t4(capsys):
    assert main(["doctor", "--gpu", "t4"]) == 0
    out = capsys.readouterr().out
    assert "Tesla T4" in out and "fp16" in out and "16gb" in out


def test_recipes_list_show_copy(tmp_path, capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "chat-assistant" in out and "orpo-tight" in out
    assert main(["recipes", "show", "tiny"]) == 0
    assert "builtin:tiny-llama" in capsys.readouterr().out
    dest = tmp_path / "mine.yaml"
    assert main(["recipes", "copy", "tiny", str(dest)]) == 0
    assert dest.read_text().startswith("# tiny")
    assert main(["recipes", "copy", "tiny", str(dest)]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err
    assert main(["plan", str(dest), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "builtin:tiny-llama"


def test_plan_with_overrides_after_options(capsys):
    assert main(["plan", "chat-assistant", "--vram", "12", "lora.r=8"]) == 0
    out = capsys.readouterr().out
    assert "12gb tier" in out and "r=8" in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["plan", "qwen-7b"], "Unknown recipe 'qwen-7b'"),
        (["plan", "tiny", "sft.max_seq_len=0", "sft.learning_rate=-1"], "2 problems"),
        (["plan", "tiny", "model.tier=20gb"], "'20gb' is not a tier"),
        (["plan", "chat-assistant", "--vram", "3"], "smallest GPU tier"),
        (["plan", "chat-assistant", "--gpu", "voodoo2"], "Unknown card"),
        (["recipes", "show"], "needs a recipe name"),
        (["plan", "tiny", "notanoverride"], "expected key=value"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_user_mistakes_exit_2_without_traceback(args, needle):
    res = run_cli(*args)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("args", [["--help"], ["recipes"], ["doctor"], ["plan", "chat-assistant", "--gpu", "t4"]])
def test_light_commands_do_not_import_training_libraries(args):
    code = (
        "import sys\n"
        "from lowvram.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets', 'unsloth') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
        "print('RICH', 'rich' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in res.stdout, res.stdout + res.stderr
    assert "RICH False" in res.stdout  # output to a pipe is plain text: rich is loaded only for a terminal


def test_export_modules_import_no_training_libraries():
    """Importing the export side (merge, llama.cpp, Ollama) loads no torch: each imports it where it runs."""
    code = (
        "import json, sys, lowvram.cli, lowvram.export.run, lowvram.export.ollama, lowvram.export.merge, lowvram.export.llamacpp; "
        "print(json.dumps([m for m in ('torch', 'transformers', 'xllamacpp', 'peft') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize("name", ["chat-assistant", "concise", "demo", "tiny", "orpo-tight"])
def test_recipe_script_runs_the_yaml_beside_it(name, tiny_tokenizer_dir):
    """tiny_tokenizer_dir: demo plans with the tiny model's tokenizer, from the tests' cache, not the user's."""
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "recipes" / f"{name}.py"
    res = subprocess.run(
        [sys.executable, str(script), "--plan", "--gpu", "rtx3060", "dpo.beta=0.3"], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert f"Plan for {name} " in res.stdout and "12gb tier" in res.stdout
