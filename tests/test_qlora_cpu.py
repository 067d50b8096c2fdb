"""The QLoRA path for real on CPU: bitsandbytes NF4 base, 8-bit AdamW, SFT -> DPO -> merge -> GGUF.

bitsandbytes (0.50) runs 4-bit layers and its 8-bit optimizer on CPU, so the transformers + PEFT +
bitsandbytes path that CUDA users without Unsloth take runs here with the real libraries. What it
cannot show (Unsloth's kernels, speed, peak VRAM) is in tests/test_gpu.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowvram.cli import main
from lowvram.errors import UserError
from lowvram.plan.hardware import Device, known_card
from lowvram.plan.planner import make_plan
from lowvram.recipe import load_recipe

CPU = Device("cpu", "CPU", 0, 0, None, "none")
# 4-bit on CPU is slower than fp32: a few steps of each stage, checkpoints every 4
Q4 = [
    "model.load_in_4bit=true",
    "sft.max_steps=8",
    "sft.save_steps=4",
    "dpo.max_steps=6",
    "dpo.save_steps=3",
    # every stage runs on the 4-bit base: the reward model and the evaluation load it too (reward.py, evaluate.py)
    "rm.max_steps=2",
    "eval.prompts=2",
    "eval.max_new_tokens=8",
    "eval.kl_samples=1",
    "eval.best_of=2",
]


# ------------------------------------------------------------------ planning (fast)


def test_cpu_plans_full_precision_unless_the_recipe_asks_for_4bit():
    recipe, _ = load_recipe("tiny")
    plan = make_plan(recipe, CPU)
    assert not plan.load_in_4bit and {sp.optim for sp in plan.stages.values()} == {"adamw_torch"}
    assert "model.load_in_4bit=true" in plan.reasons["load_in_4bit"]

    recipe, _ = load_recipe("tiny", ["model.load_in_4bit=true"])
    plan = make_plan(recipe, CPU)
    assert plan.load_in_4bit and plan.backend == "hf" and plan.dtype == "fp32"
    assert {sp.optim for sp in plan.stages.values()} == {"adamw_8bit"}
    assert "slower" in plan.reasons["load_in_4bit"]


def test_prequantized_checkpoint_on_cpu_needs_the_4bit_flag():
    recipe, _ = load_recipe("chat-assistant", ["model.name=unsloth/Llama-3.2-1B-Instruct-bnb-4bit"])
    with pytest.raises(UserError) as err:
        make_plan(recipe, CPU)
    hint = err.value.render()
    assert "model.name=unsloth/Llama-3.2-1B-Instruct" in hint and "model.load_in_4bit=true" in hint
    recipe, _ = load_recipe(
        "chat-assistant", ["model.name=unsloth/Llama-3.2-1B-Instruct-bnb-4bit", "model.load_in_4bit=true"]
    )
    assert make_plan(recipe, CPU).load_in_4bit

    # on a GPU too: model.load_in_4bit=false with a 4-bit checkpoint would train its 4-bit weights on a 16-bit plan
    recipe, _ = load_recipe(
        "chat-assistant", ["model.name=unsloth/Llama-3.2-1B-Instruct-bnb-4bit", "model.load_in_4bit=false"]
    )
    with pytest.raises(UserError, match="stored in bitsandbytes 4-bit") as err:
        make_plan(recipe, known_card("t4"))
    assert "model.name=unsloth/Llama-3.2-1B-Instruct," in err.value.render()

    recipe, _ = load_recipe(
        "chat-assistant", ["model.name=unsloth/Llama-3.2-1B-Instruct-bnb-4bit", "model.load_in_4bit=true"]
    )
    apple = Device("mps", "Apple GPU (MPS)", 0, 0, None, "platform")
    with pytest.raises(UserError, match="not on Apple GPUs"):
        make_plan(recipe, apple)


def test_gpu_plans_are_unchanged():
    recipe, _ = load_recipe("chat-assistant")
    plan = make_plan(recipe, known_card("t4"))
    assert plan.load_in_4bit and {sp.optim for sp in plan.stages.values()} == {"adamw_8bit"}


# ------------------------------------------------------------------ the model as loaded


def _plan(dtype: str):
    recipe, _ = load_recipe("tiny", ["model.load_in_4bit=true"])
    return dataclasses.replace(make_plan(recipe, CPU), dtype=dtype), recipe


def load_for_training(plan, recipe, model_path: str):
    """The policy as a training stage loads it: the base through the hf backend, then a fresh LoRA adapter."""
    from lowvram.model import hf_backend
    from lowvram.train.common import StageContext

    ctx = StageContext(Path("unused-run-dir"), recipe, plan, "sft", model_path)
    model, _ = hf_backend.load_base(ctx)
    return hf_backend.add_adapter(model, ctx)


def test_nf4_load_keeps_embeddings_in_the_compute_dtype(tiny_init_model_dir):
    """PEFT's prepare_model_for_kbit_training would leave fp32 embeddings and lm_head; lowvram keeps them bf16."""
    import bitsandbytes as bnb
    import torch

    plan, recipe = _plan("bf16")
    model = load_for_training(plan, recipe, str(tiny_init_model_dir))
    base = model.get_base_model()
    linears = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == base.config.num_hidden_layers * 7  # every decoder linear, not lm_head
    for m in linears:
        assert m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested  # double quantization
        assert m.compute_dtype == torch.bfloat16
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    norms = [p for n, p in base.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable)


@pytest.mark.slow
def test_bf16_qlora_sft_then_dpo_runs_under_autocast(tiny_model_dir, tmp_path):
    """bf16 embeddings, fp32 norms and fp32 LoRA through TRL's trainers (and its fused LM head) under
    bf16 autocast, as on an Ampere card: CPU autocast runs the same mixed dtypes."""
    from lowvram.model.tiny import resolve_model_path
    from lowvram.pipeline import load_stage_data
    from lowvram.train.stage import StageContext, run_stage

    recipe, path = load_recipe("tiny", ["model.load_in_4bit=true", "sft.max_steps=2", "dpo.max_steps=2"])
    plan = dataclasses.replace(make_plan(recipe, CPU), dtype="bf16")
    data = load_stage_data(recipe, path.parent, ["sft", "dpo"])
    model_path = resolve_model_path(plan.model)
    sft = run_stage(StageContext(tmp_path, recipe, plan, "sft", model_path, path.parent), data["sft"])
    run_stage(StageContext(tmp_path, recipe, plan, "dpo", model_path, path.parent, sft), data["dpo"])
    before = json.loads((tmp_path / "dpo" / "eval_before.json").read_text())
    assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 4 and all(0 < x < 100 for x in losses)  # finite: no fp16/bf16 overflow


def test_a_checkpoint_saved_in_4bit_computes_in_the_plans_dtype(tiny_init_model_dir, tmp_path):
    """Unsloth's -bnb-4bit repos carry their own quantization_config (compute dtype bfloat16), which transformers
    uses instead of one passed: lowvram passes none (no warning) and sets the plan's dtype on the layers (a T4
    cannot compute in bf16). Every loader of a 4-bit base does so: the policy, the reward model, evaluation."""
    import warnings

    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    from lowvram.model.hf_backend import four_bit_kwargs, quantization_config, saved_quantization

    saved = tmp_path / "tiny-bnb-4bit"
    AutoModelForCausalLM.from_pretrained(
        str(tiny_init_model_dir), dtype=torch.float32, quantization_config=quantization_config(torch.bfloat16)
    ).save_pretrained(str(saved))
    for f in tiny_init_model_dir.iterdir():
        if f.is_file() and not (saved / f.name).exists():
            shutil.copy2(f, saved / f.name)
    assert saved_quantization(str(saved))["bnb_4bit_compute_dtype"] == "bfloat16"
    assert saved_quantization(str(tiny_init_model_dir)) is None
    assert four_bit_kwargs(str(saved), torch.float16) == {}
    assert "quantization_config" in four_bit_kwargs(str(tiny_init_model_dir), torch.float16)

    other = tmp_path / "tiny-gptq"  # quantized another way: a clear error, not transformers' own
    other.mkdir()
    config = json.loads((tiny_init_model_dir / "config.json").read_text())
    for q, named in (
        ({"quant_method": "gptq", "bits": 4}, "gptq"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes 8-bit"),
    ):
        (other / "config.json").write_text(json.dumps({**config, "quantization_config": q}))
        with pytest.raises(UserError, match=f"saved quantized with {named}") as err:
            four_bit_kwargs(str(other), torch.float16)
        assert "16-bit original" in err.value.render()

    plan, recipe = _plan("fp16")  # a T4's plan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_for_training(plan, recipe, str(saved))
    assert not [w for w in caught if "quantization_config" in str(w.message)]
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and {m.compute_dtype for m in linears} == {torch.float16}
    assert all(m.weight.quant_state.quant_type == "nf4" for m in linears)  # loaded as saved, not re-quantized


# ------------------------------------------------------------------ a real run on an NF4 checkpoint


@pytest.fixture(scope="module")
def nf4_base(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama saved the way Unsloth's -bnb-4bit repos are: transformers' bitsandbytes NF4 serialization."""
    import torch
    from transformers import AutoModelForCausalLM

    from lowvram.model.hf_backend import quantization_config

    out = tmp_path_factory.mktemp("nf4") / "tiny-llama-bnb-4bit"
    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir),
        dtype=torch.float32,
        device_map={"": "cpu"},
        quantization_config=quantization_config(torch.float32),
    )
    model.save_pretrained(str(out))
    for f in tiny_model_dir.iterdir():  # tokenizer files, generation config
        if f.is_file() and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def q4_run(nf4_base, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("q4") / "run"
    assert main(["run", "tiny", "--run-dir", str(run), "--no-export", f"model.name={nf4_base}", *Q4]) == 0
    return run


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.slow
def test_sft_then_dpo_on_nf4_with_8bit_adamw_trains_only_fp32_lora(q4_run):
    import torch

    plan = json.loads((q4_run / "plan.json").read_text())
    assert plan["load_in_4bit"] and {s["optim"] for s in plan["stages"].values()} == {"adamw_8bit"}
    # the checkpoint holds bitsandbytes' optimizer state (torch's AdamW would save exp_avg / exp_avg_sq);
    # bitsandbytes keeps 8-bit moments for tensors of 4096+ values and saves them dequantized
    opt = torch.load(q4_run / "sft" / "checkpoints" / "checkpoint-8" / "optimizer.pt", weights_only=False)
    states = list(opt["state"].values())
    assert states and not any("exp_avg" in s for s in states)
    assert any("__bnb_optimizer_quant_state__" in s for s in states)

    sft, dpo = _adapter(q4_run / "sft" / "adapter"), _adapter(q4_run / "dpo" / "adapter")
    assert set(sft) == set(dpo) and all("lora_" in k for k in sft)  # only LoRA was trained and saved
    # TRL casts a 4-bit model's LoRA weights to bf16; lowvram keeps fp32 masters (DPO steps would round away)
    assert {t.dtype for t in sft.values()} == {t.dtype for t in dpo.values()} == {torch.float32}
    lora_b = [k for k in sft if "lora_B" in k]
    assert all(sft[k].abs().max() > 0 for k in lora_b)  # SFT moved B from zero
    assert any((sft[k] - dpo[k]).abs().max() > 0 for k in sft)  # DPO moved the same adapter further
    rows = [json.loads(x) for x in (q4_run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)  # no NaN


@pytest.mark.slow
def test_every_stage_of_the_demo_runs_on_nf4_on_this_cpu(q4_run):
    """The reward model and the evaluation load the 4-bit base too. On a CPU with AVX512-BF16 (this machine, Zen 4
    desktops) bitsandbytes 0.50 repacked their 4-bit weights at the first no-grad forward and asserted
    `N must be divisible by block_n`: `lowvram run demo model.load_in_4bit=true` died in the reward-model stage."""
    assert (q4_run / "rm" / "DONE").is_file() and (q4_run / "rm" / "adapter" / "adapter_config.json").is_file()
    assert list((q4_run / "eval").glob("*.json")), "no evaluation results"


@pytest.mark.slow
def test_dpo_reference_on_nf4_is_the_sft_policy(q4_run):
    before = json.loads((q4_run / "dpo" / "eval_before.json").read_text())
    assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert before["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)


def _logits(model, ids):
    import torch

    model.eval()
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.slow
def test_export_dequantizes_the_nf4_base_and_matches_the_trained_policy(q4_run, nf4_base):
    """The merge of an adapter trained on a 4-bit base: NF4 dequantized, delta added, GGUF verified."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lowvram.export.run import ExportOptions, export_run
    from lowvram.model.hf_backend import load_4bit, prepare_4bit_model

    result = export_run(q4_run, ExportOptions(gguf=("f16",), merged=True))
    assert result.verified_ok and result.verify_rows and result.files["f16"].is_file()
    merged_dir = result.files["merged"]
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())

    # the policy exactly as DPO trained it: the NF4 base in bitsandbytes, loaded as training loads it
    # (load_4bit: no AVX512-BF16 repack, which asserts on the tiny model's widths), + the adapter
    base = load_4bit(AutoModelForCausalLM, str(nf4_base), torch.float32, device_map={"": "cpu"})
    prepare_4bit_model(base, torch.float32)
    policy = PeftModel.from_pretrained(base, str(q4_run / "dpo" / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    ids = torch.randint(0, merged.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    want, got = _logits(policy, ids), _logits(merged, ids)
    # bf16 storage of the merged weights is the only difference
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() > 0.95
    assert (want - got).abs().max() < 0.05 * want.abs().max()


@pytest.mark.slow
def test_merge_prefers_the_local_16bit_original(q4_run, nf4_base, tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lowvram.export.merge import choose_base, merge_lora, read_adapter

    base_json = tmp_path / "base.json"
    base_json.write_text(
        json.dumps(
            {
                "model": "tiny-llama-bnb-4bit",
                "model_path": str(nf4_base),
                "base_16bit": str(tiny_model_dir),
                "load_in_4bit": True,
            }
        )
    )
    choice = choose_base(base_json)
    assert choice.path == tiny_model_dir and not choice.quantized_4bit
    merge_lora(choice, read_adapter(q4_run / "dpo" / "adapter"), tmp_path / "merged")
    original = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32), str(q4_run / "dpo" / "adapter")
    )
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    ids = torch.randint(0, merged.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    want, got = _logits(original, ids), _logits(merged, ids)
    assert (want - got).abs().max() < 0.05 * want.abs().max()


@pytest.mark.slow
def test_killed_nf4_run_resumes_with_its_8bit_optimizer(tiny_model_dir, tmp_path):
    from lowvram.train.stage import latest_checkpoint

    run = tmp_path / "killed"
    env = {**os.environ, "LOWVRAM_CACHE": os.environ["LOWVRAM_CACHE"]}
    args = ["--no-export", "dpo.enabled=false", "model.load_in_4bit=true", "sft.epochs=100", "sft.save_steps=3"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowvram", "run", "tiny", "--run-dir", str(run), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    t0 = time.monotonic()
    while latest_checkpoint(run / "sft" / "checkpoints") is None:
        assert proc.poll() is None, "training ended before a checkpoint: " + proc.stderr.read()
        assert time.monotonic() - t0 < 300, "no checkpoint appeared"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = latest_checkpoint(run / "sft" / "checkpoints")
    step = int(ckpt.name.split("-")[1])

    res = subprocess.run(
        [sys.executable, "-m", "lowvram", "run", "--resume", str(run), "--no-export", f"sft.max_steps={step + 2}"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    assert f"resuming from checkpoint-{step}" in res.stdout and "optim adamw_8bit" in res.stdout
    # Steps the killed run logged past its checkpoint are trimmed on resume (they are trained again), so the
    # log holds every step once: 1..step from before the kill, step+1 and step+2 from the resumed run.
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r.get("stage") == "sft" and "loss" in r]
    assert steps == list(range(1, step + 3)), steps
    assert json.loads((run / "sft" / "DONE").read_text())["global_step"] == step + 2


@pytest.mark.slow
def test_reward_model_and_evaluation_load_the_saved_4bit_base_as_training_does(q4_run, nf4_base):
    """The other two loaders of a 4-bit base: the reward model's classifier and `lowvram eval`'s models."""
    import warnings

    import bitsandbytes as bnb
    import torch

    from lowvram.evaluate.run import load_run_models
    from lowvram.train.reward import _load_classifier

    plan, _ = _plan("bf16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rm = _load_classifier(str(nf4_base), plan)  # nf4_base was saved computing in fp32
        model, _tok, names = load_run_models(q4_run)
    assert not [w for w in caught if "quantization_config" in str(w.message)]
    assert {m.compute_dtype for m in rm.modules() if isinstance(m, bnb.nn.Linear4bit)} == {torch.bfloat16}
    run_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[json.loads((q4_run / "plan.json").read_text())["dtype"]]
    assert {m.compute_dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)} == {run_dtype}
    assert set(names) == {"base", "sft", "final"}
