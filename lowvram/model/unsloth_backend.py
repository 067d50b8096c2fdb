"""The Unsloth backend: the only module that imports `unsloth`. CUDA only.

    activate()                                   # before trl/transformers are imported
    model, tokenizer = load_for_training(...)

Unsloth patches transformers, PEFT and TRL when it is imported, so `lowvram.train.stage` calls
`activate()` before it imports TRL. Written against unsloth 2026.10 (`FastLanguageModel.from_pretrained`,
`FastLanguageModel.get_peft_model`); exercised by scripts/gpu_check.py on a CUDA machine, never on CPU.

Untrained turn tokens: `prepare_tokens(model, tokenizer)` (lowvram.model.turn_tokens.prepare, the hf
backend's code) runs between loading the base and adding the adapter. Unsloth's own fix
(unsloth_zoo.tokenizer_utils.fix_untrained_tokens, which its patched SFT/DPO trainers call) stays on,
as a second net, but does not replace it:
- it finds only rows that are exactly zero (|x| <= 1e-16 in both matrices); a Gemma-style base, whose
  turn tokens sit among its unused tokens without being zero, passes it untouched;
- it sets the rows to a frequency-scaled mean but leaves them frozen under LoRA (or raises, asking for
  `embed_tokens`/`lm_head` in target_modules: whole matrices, vocab x hidden x 16 bytes with AdamW,
  16 GiB on an 8B Llama), so the model never learns to end its turn;
- PEFT's `trainable_token_indices` (get_peft_model passes it through to LoraConfig) is no way out:
  Unsloth's fused cross-entropy reads `lm_head.weight` directly, which bypasses PEFT's token wrapper.
lowvram's row wrappers expose the patched matrix as `.weight`, so the fused loss trains the rows; after
them Unsloth's check finds nothing to fix in the turn tokens and still guards the rest of the vocabulary.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lowvram.errors import UserError

if TYPE_CHECKING:  # annotations only: the backends take a plan and a recipe, they do not build them
    from lowvram.plan.planner import Plan
    from lowvram.recipe import Recipe

_LATE = ("trl", "transformers", "peft")


def activate() -> None:
    """Import unsloth first so its patches apply; say so if something imported TRL before it."""
    late = [m for m in _LATE if m in sys.modules and "unsloth" not in sys.modules]
    try:
        import unsloth  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"The Unsloth backend was chosen but unsloth does not import: {e}.",
            hint="pip install 'lowvram[gpu]' on a CUDA machine, or set model.backend=hf.",
        ) from None
    except NotImplementedError as e:  # "Unsloth cannot find any torch accelerator"
        raise UserError(
            f"Unsloth cannot run here: {e}.", hint="Set model.backend=hf to train with transformers+PEFT."
        ) from None
    if late:
        print(
            f"warning: {', '.join(late)} was imported before unsloth; some of Unsloth's patches may not apply",
            file=sys.stderr,
        )


def load_for_training(
    plan: Plan,
    recipe: Recipe,
    model_path: str,
    adapter: Path | None = None,
    grad_ckpt: str = "unsloth",
    max_seq_len: int = 2048,
    prepare_tokens=None,
):
    """(PeftModel, tokenizer) through Unsloth's loader, with the tier's checkpointing mode.

    `prepare_tokens(model, tokenizer)` checks and fixes the turn tokens before the adapter is added
    (with `adapter`, once it is loaded: it restores the rows SFT trained).
    """
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
        if prepare_tokens is not None:
            prepare_tokens(model, tokenizer)
        return model, tokenizer
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_path,
        max_seq_length=max_seq_len,
        dtype=dtype,
        load_in_4bit=plan.load_in_4bit,
        use_gradient_checkpointing=use_ckpt,
        random_state=recipe.seed,
    )
    if prepare_tokens is not None:
        prepare_tokens(model, tokenizer)
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
