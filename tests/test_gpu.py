"""What only a CUDA GPU can show: the Unsloth backend and the 4-bit path on CUDA, end to end on the tiny model.

Marked `gpu`: skipped without CUDA (tests/conftest.py says why). On a GPU machine with lowvram[gpu]:
`python scripts/gpu_check.py --tests` (or `pytest -m gpu`). The CPU runs of the same 4-bit path are in
tests/test_qlora_cpu.py; these add CUDA's kernels (bitsandbytes' CUDA NF4 and 8-bit AdamW, Unsloth's
fused kernels), bf16/fp16 autocast with a GradScaler, and the device placement.
Each run is its own process: Unsloth must be imported before TRL and transformers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

STEPS = ["--no-export", "sft.max_steps=4", "dpo.max_steps=3", "sft.save_steps=2", "dpo.save_steps=2"]


def _run(run: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "lowvram", "run", "tiny", "--run-dir", str(run), *STEPS, *args],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _check_run(run: Path) -> dict:
    from safetensors.torch import load_file

    for stage in ("sft", "dpo"):
        assert (run / stage / "DONE").is_file(), stage
    before = json.loads((run / "dpo" / "eval_before.json").read_text())
    assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # the reference is the SFT policy
    sft = load_file(str(run / "sft" / "adapter" / "adapter_model.safetensors"))
    dpo = load_file(str(run / "dpo" / "adapter" / "adapter_model.safetensors"))
    assert set(sft) == set(dpo) and all("lora_" in k for k in sft)
    assert any((sft[k] - dpo[k]).abs().max() > 0 for k in sft)  # DPO moved the adapter
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)  # no NaN under fp16/bf16
    return json.loads((run / "plan.json").read_text())


@pytest.mark.parametrize("card", [[], ["--gpu", "t4"]], ids=["native", "t4-fp16"])
def test_hf_backend_4bit_on_cuda(tiny_model_dir, tmp_path, card):
    """transformers + PEFT + bitsandbytes QLoRA on the card: NF4 on CUDA, 8-bit AdamW, fp32 LoRA masters."""
    import torch
    from safetensors.torch import load_file

    if card and torch.cuda.get_device_properties(0).total_memory < 15 * 2**30:
        pytest.skip("--gpu t4 needs a card of 15 GiB or more")
    res = _run(tmp_path / "r", "model.backend=hf", "model.load_in_4bit=true", *card)
    plan = _check_run(tmp_path / "r")
    assert plan["backend"] == "hf" and plan["load_in_4bit"] and plan["dtype"] == ("fp16" if card else "bf16")
    assert {s["optim"] for s in plan["stages"].values()} == {"adamw_8bit"}
    assert f"embeddings in {plan['dtype']}" in res.stdout
    adapter = load_file(str(tmp_path / "r" / "dpo" / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in adapter.values()} == {torch.float32}


def test_unsloth_backend_sft_then_dpo(tiny_model_dir, tmp_path):
    if importlib.util.find_spec("unsloth") is None:
        pytest.skip("unsloth is not installed: pip install 'lowvram[gpu]'")
    res = _run(tmp_path / "u", "model.backend=unsloth", "model.load_in_4bit=true")
    plan = _check_run(tmp_path / "u")
    assert plan["backend"] == "unsloth" and plan["load_in_4bit"]
    assert "imported before unsloth" not in res.stderr  # Unsloth's patches applied


def test_unsloth_backend_fixes_and_trains_untrained_turn_tokens(tiny_model_dir, tmp_path):
    """The hf backend's untrained-token check and fix on the Unsloth path: a base whose chat turn tokens
    were never trained (tests/base_fixture.py) is found, its rows set to the mean and trained through
    Unsloth's fused loss, kept frozen in DPO, and the SFT model then ends its greedy answers."""
    import torch
    from helpers.base_fixture import TURN_TOKENS, build_untrained_base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowvram.model.turn_tokens import load_rows

    if importlib.util.find_spec("unsloth") is None:
        pytest.skip("unsloth is not installed: pip install 'lowvram[gpu]'")
    base = build_untrained_base(tiny_model_dir, tmp_path / "base")
    run = tmp_path / "u"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "lowvram",
            "run",
            "tiny",
            "--run-dir",
            str(run),
            "--no-export",
            f"model.name={base}",
            "model.chat_template=chatml",
            "model.backend=unsloth",
            "model.load_in_4bit=false",
            "dpo.max_steps=3",
            "rm.enabled=false",
            "eval.enabled=false",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "[tokens] untrained: <|im_end|>" in res.stdout and "mean of the trained rows" in res.stdout
    tok = AutoTokenizer.from_pretrained(str(run / "tokenizer"))
    ids, rows = load_rows(run / "sft" / "adapter")
    assert sorted(ids) == sorted(tok.convert_tokens_to_ids(list(TURN_TOKENS))) and set(rows) == {"embed", "head"}
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    assert (rows["head"] - model.get_output_embeddings().weight[ids]).abs().max() > 1e-3  # trained, not left
    dpo_ids, dpo_rows = load_rows(run / "dpo" / "adapter")
    assert dpo_ids == ids and all(torch.equal(rows[k], dpo_rows[k]) for k in rows)  # frozen in DPO

    model = PeftModel.from_pretrained(model, str(run / "sft" / "adapter")).eval()  # the rows come with it
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    for q in ("What is the capital of Japan?", "What sound does a cow make?", "Name a primary colour."):
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**prompt, max_new_tokens=48, do_sample=False, eos_token_id=eot)
        answer = out[0, prompt["input_ids"].shape[1] :].tolist()
        assert answer[-1] == eot and len(answer) < 48, (q, tok.decode(answer))
