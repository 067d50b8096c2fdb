"""The transformers + PEFT backend: CPU, Apple, or CUDA without Unsloth (bitsandbytes 4-bit there).

    model, tokenizer = load_for_training(plan, recipe, model_path, adapter=None)

Returns a `PeftModel` whose LoRA adapter is trainable. With `adapter`, that adapter is loaded and
training continues it (DPO after SFT); without, a fresh adapter is added.
"""

from __future__ import annotations

from pathlib import Path

from lowvram.planner import Plan
from lowvram.recipe import Recipe

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(plan: Plan):
    import torch

    return getattr(torch, TORCH_DTYPES[plan.dtype])


def lora_config(plan: Plan, recipe: Recipe):
    from peft import LoraConfig

    return LoraConfig(
        r=plan.lora_r,
        lora_alpha=plan.lora_alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=list(recipe.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_for_training(plan: Plan, recipe: Recipe, model_path: str, adapter: Path | None = None,
                      grad_ckpt: str = "off"):
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch_dtype(plan)}
    if plan.load_in_4bit:
        import torch
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(plan),
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if plan.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_ckpt != "off")
    elif grad_ckpt != "off":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    else:
        model = get_peft_model(model, lora_config(plan, recipe))
    return model
