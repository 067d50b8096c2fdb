"""Data-aware planning: the batch is sized for the worst batch the data forms, counted with the model's tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest

from lowvram.cli import main
from lowvram.plan.hardware import simulated_device
from lowvram.plan.lengths import plan_with_data, stage_lengths
from lowvram.recipe import load_recipe

# meta-llama/Llama-3.1-8B's dimensions, so the estimate is an 8B's; the tokenizer is the tiny model's.
LLAMA_8B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "quantization_config": {"load_in_4bit": True},
}


@pytest.fixture
def model_8b(tiny_tokenizer_dir, tmp_path):
    """A local model folder: an 8B's config.json and a real tokenizer with a chat template."""
    folder = tmp_path / "llama-8b-dims"
    folder.mkdir()
    for f in tiny_tokenizer_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy(f, folder / f.name)
    (folder / "config.json").write_text(json.dumps(LLAMA_8B))
    return folder


def _chat_rows(path, n, words):
    with path.open("w") as fh:
        for i in range(n):
            answer = " ".join(["word"] * words) + f" {i}"
            fh.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"Question {i}?"},
                            {"role": "assistant", "content": answer},
                        ]
                    }
                )
                + "\n"
            )
    return path


def _recipe(model, data, *extra):
    return load_recipe(
        "chat-assistant",
        [
            f"model.name={model}",
            "use_samples=false",
            f"sft.data.path={data}",
            "dpo.enabled=false",
            "sft.max_seq_len=4096",
            *extra,
        ],
    )[0]


def test_short_rows_get_a_larger_batch_and_the_plan_says_why(model_8b, tmp_path):
    data = _chat_rows(tmp_path / "short.jsonl", 40, 20)
    device = simulated_device(11)
    recipe = _recipe(model_8b, data)
    lengths, _ = stage_lengths(recipe, "sft", str(model_8b), tmp_path)
    assert lengths is not None and lengths.rows == 40 and lengths.longest < 100
    blind = plan_with_data(_recipe(model_8b, "HuggingFaceH4/ultrachat_200k"), device, tmp_path).stages["sft"]
    aware = plan_with_data(recipe, device, tmp_path).stages["sft"]
    assert aware.max_seq_len == blind.max_seq_len == 4096  # nothing is truncated
    assert aware.batch_size > blind.batch_size and aware.effective_batch == blind.effective_batch
    assert aware.estimate.tokens == aware.batch_size * lengths.longest  # the worst batch this data forms
    assert aware.data_lengths["max"] == lengths.longest
    assert aware.reasons["lengths"].startswith(
        f"p50 {lengths.percentile(50)}, p99 {lengths.percentile(99)}, max {lengths.longest} tokens from 40 rows"
    )
    assert "not on this machine" in blind.reasons["lengths"]


def test_rows_that_fill_max_seq_len_plan_like_the_worst_case(model_8b, tmp_path):
    data = _chat_rows(tmp_path / "long.jsonl", 12, 3000)  # longer than max_seq_len: truncated to it
    device = simulated_device(11)
    aware = plan_with_data(_recipe(model_8b, data, "sft.max_seq_len=1024"), device, tmp_path).stages["sft"]
    blind = plan_with_data(
        _recipe(model_8b, "HuggingFaceH4/ultrachat_200k", "sft.max_seq_len=1024"), device, tmp_path
    ).stages["sft"]
    assert (aware.batch_size, aware.max_seq_len) == (blind.batch_size, blind.max_seq_len)
    assert aware.estimate.total_gib == pytest.approx(blind.estimate.total_gib)
    assert "after truncation" in aware.reasons["lengths"]


def test_plan_command_prints_the_lengths_line(model_8b, tmp_path, capsys):
    data = _chat_rows(tmp_path / "short.jsonl", 40, 20)
    args = [
        "plan",
        "chat-assistant",
        "--vram",
        "11",
        f"model.name={model_8b}",
        "use_samples=false",
        f"sft.data.path={data}",
        "dpo.enabled=false",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "lengths:" in x).strip()
    assert line.startswith("lengths: p50 ") and ", p99 " in line and "tokens from 40 rows" in line
    assert "(data) x batch" in out  # the memory table says which length it used
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"]["sft"]["data_lengths"]["rows"] == 40


def test_packed_sft_is_planned_at_full_length(model_8b, tmp_path):
    data = _chat_rows(tmp_path / "short.jsonl", 40, 20)
    sp = plan_with_data(_recipe(model_8b, data, "sft.packing=true"), simulated_device(11), tmp_path).stages["sft"]
    assert sp.data_lengths is None and "packing" in sp.reasons["lengths"]
    assert sp.estimate.tokens == sp.batch_size * sp.max_seq_len
