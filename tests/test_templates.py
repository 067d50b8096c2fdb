"""Named chat templates, and the checks that need no model: a base without a chat template is refused
before anything loads (plan, data check, run), naming the options; a missing model folder likewise."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from lowvram.cli import main
from lowvram.data.templates import NAMED_TEMPLATES, chat_template_text, resolve_chat_template
from lowvram.errors import UserError


def make_base_folder(tiny_dir: Path, out: Path) -> Path:
    """A copy of the tiny model that looks like a base model: its tokenizer carries no chat template."""
    shutil.copytree(tiny_dir, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def base_dir(tiny_init_model_dir, tmp_path_factory):
    return make_base_folder(tiny_init_model_dir, tmp_path_factory.mktemp("base") / "base-model")


def test_names_resolve_to_their_jinja_and_jinja_passes_through():
    assert {"chatml", "llama-3", "gemma", "mistral", "qwen-2.5", "phi-4", "alpaca"} <= set(NAMED_TEMPLATES)
    assert resolve_chat_template("Gemma").end_of_turn == "<end_of_turn>"
    assert chat_template_text("llama-3") == NAMED_TEMPLATES["llama-3"].jinja
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert chat_template_text(jinja) == jinja and resolve_chat_template(jinja) is None
    with pytest.raises(UserError, match="gemma"):
        resolve_chat_template("gemmma")


def test_recipes_templates_lists_every_name_with_its_turn_tokens(capsys):
    assert main(["recipes", "templates"]) == 0
    out = capsys.readouterr().out
    for name, t in NAMED_TEMPLATES.items():
        assert name in out
        if t.end_of_turn:
            assert t.end_of_turn in out
    assert "folded into the first user turn" in out  # gemma's system prompt


def test_a_misspelt_template_name_is_a_recipe_problem(capsys):
    assert main(["plan", "tiny", "model.chat_template=lama-3"]) == 2
    err = capsys.readouterr().err
    assert "model.chat_template" in err and "'llama-3'" in err


@pytest.mark.parametrize("command", ["plan", "data"])
def test_chat_data_on_a_base_without_template_is_refused_naming_the_options(base_dir, command, capsys):
    args = (["plan", "tiny"] if command == "plan" else ["data", "check", "--recipe", "tiny"]) + [
        f"model.name={base_dir}"
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no chat template" in err and "model.chat_template" in err
    for name in ("chatml", "gemma", "llama-3", "mistral"):
        assert name in err
    assert main(args + ["model.chat_template=chatml"]) == 0  # the same recipe with a named template
    capsys.readouterr()


def test_run_refuses_before_loading_and_leaves_no_run_dir(base_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    assert main(["run", "tiny", f"model.name={base_dir}", "--run-dir", str(run_dir)]) == 2
    assert "no chat template" in capsys.readouterr().err
    assert not run_dir.exists()
    assert time.monotonic() - t0 < 60  # sanity bound only: no model or data was loaded


@pytest.mark.parametrize("name", ["./no-such-model", "/nonexistent/models/base"])
def test_missing_model_folder_is_refused_by_plan_and_run_without_a_run_dir(name, tmp_path, capsys):
    assert main(["plan", "tiny", f"model.name={name}"]) == 2
    assert "no model folder" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    assert main(["run", "tiny", f"model.name={name}", "--run-dir", str(run_dir)]) == 2
    assert not run_dir.exists()


def test_data_check_recipe_takes_dotted_overrides(capsys):
    # Before: argparse refused them ("unrecognized arguments: sft.max_seq_len=64").
    code = main(["data", "check", "--recipe", "tiny", "sft.max_seq_len=64", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code in (0, 1)
    sft = next(r for r in out["reports"] if r["stage"] == "sft")
    assert sft["token_budget"]["max_seq_len"] == 64


def test_copied_recipes_document_model_name_and_chat_template():
    from lowvram.recipe import shipped_recipes

    for name, path in shipped_recipes().items():
        text = path.read_text()
        assert "chat_template:" in text, name
        assert "name:" in text.split("lora:")[0], name


def test_readme_documents_the_template_field():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "model.chat_template" in readme and "lowvram recipes templates" in readme


def test_dpo_length_reason_matches_the_numbers(capsys):
    # The cpu tier gives DPO the SFT length; the reason used to say "half the SFT length" regardless.
    assert main(["plan", "chat-assistant", "model.family=qwen", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    sft, dpo = plan["stages"]["sft"], plan["stages"]["dpo"]
    why = dpo["reasons"]["max_seq_len"]
    assert dpo["max_seq_len"] == sft["max_seq_len"]
    assert "half" not in why and "same length as SFT" in why
    assert main(["plan", "chat-assistant", "--vram", "12", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    if plan["stages"]["dpo"]["max_seq_len"] * 2 == plan["stages"]["sft"]["max_seq_len"]:
        assert "half the SFT length" in plan["stages"]["dpo"]["reasons"]["max_seq_len"]


def test_summary_labels_the_sft_loss_as_a_mean_of_logged_steps(tmp_path):
    from lowvram.evaluate.report import summarize, summary_lines

    rows = [{"stage": "sft", "step": i, "loss": 5.0 - i * 0.4} for i in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    line = summary_lines(summarize(tmp_path))[0]
    assert "training loss" in line and "mean of the first 3 logged steps" in line
    assert "4.200 -> 1.400" in line and "over 10 steps" in line


def test_plan_states_the_cost_of_training_turn_tokens(capsys):
    assert main(["plan", "chat-assistant", "model.chat_template=gemma", "--vram", "12"]) == 0
    out = capsys.readouterr().out
    assert "turn tokens: the gemma template's 2 control tokens" in out and "KiB with AdamW state" in out
