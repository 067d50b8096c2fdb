"""Builders for export tests: a small Llama base, LoRA adapters with real (non-zero) deltas, a run directory.

The base reuses the built-in tiny model's SentencePiece tokenizer (which llama.cpp's converter
reads) but is 256 wide, so llama.cpp's K-quants really quantize it (they need rows of 256) instead
of falling back to simpler types. It is saved in several shards to exercise the shard-by-shard merge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DIMS = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def build_base(tiny_dir: Path, out: Path, seed: int = 0, train_steps: int = 15) -> Path:
    """A base that has seen the shipped chat samples for a few steps.

    A random model's next-token logits are nearly flat: two tokens often tie within 0.01, and
    llama.cpp's f16 arithmetic (activations rounded to f16) legitimately flips such ties. A few
    steps of training give the peaked distributions of a real model, so greedy decoding is stable.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lowvram.recipe import SAMPLES_DIR

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    cfg = json.loads((tiny_dir / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=cfg["bos_token_id"],
        eos_token_id=cfg["eos_token_id"],
        pad_token_id=cfg["pad_token_id"],
        initializer_range=0.08,
        **DIMS,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    rows = [json.loads(x) for x in (SAMPLES_DIR / "chat_sft.jsonl").read_text().splitlines() if x.strip()]
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(train_steps):
        batch = tok(
            texts[(step * 8) % len(texts) :][:8],
            add_special_tokens=False,
            padding=True,
            truncation=True,
            max_length=64,
            return_tensors="pt",
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.generation_config.eos_token_id = cfg["eos_token_id"]
    model.save_pretrained(str(out), max_shard_size="1MB")  # several shards
    tok.save_pretrained(str(out))
    shutil.copy2(tiny_dir / "tokenizer.model", out / "tokenizer.model")  # as a Hub checkpoint ships it
    return out


def build_adapter(base_dir: Path, out: Path, seed: int, init_from: Path | None = None, r: int = 8) -> Path:
    """A PEFT LoRA adapter with random non-zero B, so merging really changes the weights."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    if init_from is not None:  # DPO continues the SFT adapter
        peft_model = PeftModel.from_pretrained(model, str(init_from), is_trainable=True)
    else:
        peft_model = get_peft_model(
            model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="CAUSAL_LM")
        )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.04)
    peft_model.save_pretrained(str(out))
    return out


def build_run_dir(tiny_dir: Path, run: Path, base_dir: Path, system_prompt: str = "You are terse.") -> Path:
    """A run directory as the trainer writes it: SFT then DPO done, tokenizer, base.json, plan.json, recipe.yaml."""
    import yaml
    from transformers import AutoTokenizer

    run.mkdir(parents=True)
    build_adapter(base_dir, run / "sft" / "adapter", seed=1)
    (run / "sft" / "DONE").write_text("ok\n")
    build_adapter(base_dir, run / "dpo" / "adapter", seed=2, init_from=run / "sft" / "adapter")
    (run / "dpo" / "DONE").write_text("ok\n")
    AutoTokenizer.from_pretrained(str(tiny_dir)).save_pretrained(str(run / "tokenizer"))
    (run / "base.json").write_text(
        json.dumps({"model": str(base_dir), "model_path": str(base_dir), "base_16bit": None, "load_in_4bit": False})
    )
    (run / "plan.json").write_text(json.dumps({"model": str(base_dir), "load_in_4bit": False, "dtype": "float32"}))
    recipe = {
        "name": "fixture",
        "use_samples": True,
        "model": {"name": str(base_dir)},
        "sft": {"data": {"sample": "chat_sft.jsonl"}},
        "dpo": {"data": {"sample": "concise_prefs.jsonl"}},
        "export": {"gguf": ["q4_k_m"], "system_prompt": system_prompt, "verify": True},
    }
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("export"))
    return dst
