"""The Unsloth backend: the only module that imports `unsloth`. CUDA only.

    activate()                                   # before trl/transformers are imported
    model, tokenizer = load_for_training(...)

Unsloth patches transformers, PEFT and TRL when it is imported, so `lowvram.train` calls
`activate()` before it imports TRL. Written against unsloth 2026.10 (`FastLanguageModel.from_pretrained`,
`FastLanguageModel.get_peft_model`); exercised by scripts/gpu_check.py on a CUDA machine, never on CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lowvram.errors import UserError
from lowvram.planner import Plan
from lowvram.recipe import Recipe

_LATE = ("trl", "transformers", "peft")


def activate() -> None:
    """Import unsloth first so its patches apply; say so if something imported TRL before it."""
    late = [m for m in _LATE if m in sys.modules and "unsloth" not in sys.modules]
    try:
        import unsloth  # noqa: F401
    except ImportError as e:
        raise UserError(f"The Unsloth backend was chosen but unsloth does not import: {e}.",
                        hint="pip install 'lowvram[gpu]' on a CUDA machine, or set model.backend=hf.") from None
    except NotImplementedError as e:  # "Unsloth cannot find any torch accelerator"
        raise UserError(f"Unsloth cannot run here: {e}.", hint="Set model.backend=hf to train with transformers+PEFT.") from None
    if late:
        print(f"warning: {', '.join(late)} was imported before unsloth; some of Unsloth's patches may not apply",
              file=sys.stderr)


def load_for_training(plan: Plan, recipe: Recipe, model_path: str, adapter: Path | None = None,
                      grad_ckpt: str = "unsloth", max_seq_len: int = 2048):
    """(PeftModel, tokenizer) through Unsloth's loader, with the tier's checkpointing mode."""
    activate()
    import torch
    from unsloth import FastLanguageModel

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.dtype)
    use_ckpt = {"unsloth": "unsloth", "standard": True, "off": False}[grad_ckpt]
    if adapter is not None:
        # Unsloth reads the base from adapter_config.json and loads the adapter trainable.
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(adapter),
            max_seq_length=max_seq_len,
            dtype=dtype,
            load_in_4bit=plan.load_in_4bit,
            use_gradient_checkpointing=use_ckpt,
            random_state=recipe.seed,
        )
        FastLanguageModel.for_training(model, use_gradient_checkpointing=use_ckpt)
        return model, tokenizer
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_path,
        max_seq_length=max_seq_len,
        dtype=dtype,
        load_in_4bit=plan.load_in_4bit,
        use_gradient_checkpointing=use_ckpt,
        random_state=recipe.seed,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=plan.lora_r,
        lora_alpha=plan.lora_alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=list(recipe.lora.target_modules),
        bias="none",
        use_gradient_checkpointing=use_ckpt,
        random_state=recipe.seed,
    )
    return model, tokenizer
