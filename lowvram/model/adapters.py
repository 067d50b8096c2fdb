"""The LoRA adapters of a training stage: the trained policy ("default") and DPO/KTO's frozen reference ("ref").

    restore_policy(model, checkpoint_dir)   # on resume, before trainer.train(resume_from_checkpoint=...)
    check_reference(model, sft_adapter)      # after building a DPO/KTO trainer: "ref" is a frozen SFT copy
    check_start_rewards(start_rewards(trainer, batch))   # and the rewards start at 0
    save_policy(model, adapter_dir)          # the final adapter, without ref/
    check_saved_adapter_finite(adapter_dir, hint)   # before an export: no NaN/inf on disk

TRL's DPO and KTO trainers copy the SFT adapter into a second, frozen adapter named "ref", so a
checkpoint holds the policy at its root and the reference in ref/. transformers 5.17 (the newest
that Unsloth allows) reloads only the subfolder adapters on resume, never the root one, so the
policy would silently restart from the SFT adapter; 5.23 reloads both. lowvram loads the policy
itself, which is right under every version.
"""

from __future__ import annotations

from pathlib import Path

from lowvram.errors import UserError
from lowvram.model.turn_tokens import TOKEN_KEY
from lowvram.utils.safetensors_io import FLOAT_DTYPES, read_safetensors_header, read_tensor

POLICY = "default"  # PEFT's name for the adapter being trained
REFERENCE = "ref"  # TRL's name for the frozen copy used as the DPO/KTO reference
ADAPTER_FILE = "adapter_model.safetensors"


def adapter_tensors(model, name: str = POLICY) -> dict:
    """The adapter's weights as saved on disk (keys without the adapter name)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=name)


def restore_policy(model, checkpoint_dir: Path) -> int:
    """Load the checkpoint's policy adapter into the model in place; return how many tensors were loaded.

    In place, so the optimizer state that the Trainer restores afterwards still points at these tensors.
    """
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(checkpoint_dir) / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the checkpoint has no policy adapter to resume from")

    # its trained turn-token rows (PEFT trainable tokens) are lowvram's row wrappers': special_tokens.restore_rows
    saved = {k: v for k, v in load_file(str(path)).items() if not TOKEN_KEY.fullmatch(k)}
    result = set_peft_model_state_dict(model, saved, adapter_name=POLICY)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise RuntimeError(f"{path}: {len(unexpected)} tensors match no LoRA weight of the model, e.g. {unexpected[0]}")
    loaded = adapter_tensors(model)
    differ = [k for k, v in saved.items() if k not in loaded or not torch.equal(loaded[k].cpu().to(v.dtype), v)]
    if differ:
        raise RuntimeError(f"{path}: {len(differ)} policy tensors did not load, e.g. {differ[0]}")
    return len(saved)


# ------------------------------------------------------------------ the DPO/KTO reference

# At step 0 the policy equals its reference, so every implied reward is 0 up to rounding: TRL sums the
# per-token log-probability differences over the completion and scales them by beta, so 16-bit
# rounding stays far below this, while a reference that is not the policy lands far above it.
START_REWARD_TOLERANCE = 1e-2
_VERSIONS_HINT = (
    "lowvram was tested with TRL 1.15-1.16, transformers 5.17-5.23, PEFT 0.21 and Unsloth 2026.10; "
    "a newer release may have changed how the reference is built. Install the versions in "
    "constraints.txt (or constraints-gpu-versions.txt with the gpu extra), or use dpo.method=orpo, "
    "which has no reference."
)


class BadReference(UserError):
    """The preference trainer's reference is not a frozen copy of the SFT policy: training would be wrong."""


def check_reference(model, init_adapter: Path | None) -> str:
    """Stop unless the model holds a frozen "ref" adapter equal to the policy it starts from; return a reason line.

    TRL's DPO and KTO trainers build it from the adapter they are given (the SFT adapter); without it
    they would silently use the base model as the reference.
    """
    import torch

    configs = getattr(model, "peft_config", {})
    if REFERENCE not in configs:
        raise BadReference(
            f"The preference trainer built no frozen reference adapter ('{REFERENCE}'); adapters: "
            f"{', '.join(configs) or 'none'}. The reference would be the base model, not the SFT policy.",
            hint=_VERSIONS_HINT,
        )
    trainable = [n for n, p in model.named_parameters() if f".{REFERENCE}." in n and p.requires_grad]
    if trainable:
        raise BadReference(
            f"The reference adapter is being trained ({len(trainable)} tensors, e.g. {trainable[0]}); "
            "it must stay frozen.",
            hint=_VERSIONS_HINT,
        )
    ref, policy = adapter_tensors(model, REFERENCE), adapter_tensors(model)
    sources = [("the policy it starts from", policy)]
    if init_adapter is not None and (Path(init_adapter) / ADAPTER_FILE).is_file():
        from safetensors.torch import load_file

        sources.append((f"the adapter in {init_adapter}", load_file(str(Path(init_adapter) / ADAPTER_FILE))))
    for what, want in sources:
        differ = sorted(set(ref) ^ set(want)) or [
            k for k in want if not torch.equal(ref[k].detach().cpu(), want[k].detach().cpu().to(ref[k].dtype))
        ]
        if differ:
            raise BadReference(
                f"The reference adapter differs from {what} in {len(differ)} tensors, e.g. {differ[0]}.",
                hint=_VERSIONS_HINT,
            )
    start = f"the SFT adapter ({init_adapter})" if init_adapter is not None else "a fresh adapter (the base model)"
    return f"a frozen copy of {start}: {len(ref)} tensors, equal to the policy's"


def start_rewards(trainer, rows: int) -> dict[str, float]:
    """The trainer's implied rewards on its first training rows, before any update (eval mode, no dropout)."""
    size = len(trainer.train_dataset)
    half = max(1, rows // 2)
    # rows from both ends: KTO's unpaired dataset lists the desirable completions before the undesirable ones
    picked = sorted(set(range(min(half, size))) | set(range(max(0, size - half), size)))
    metrics = trainer.evaluate(eval_dataset=trainer.train_dataset.select(picked), metric_key_prefix="refcheck")
    return {
        k: v
        for k in ("rewards/chosen", "rewards/rejected", "rewards/margins")
        if (v := metrics.get(f"eval_{k}")) is not None
    }


def check_start_rewards(rewards: dict[str, float]) -> str:
    """Stop unless every implied reward at step 0 is 0 (the policy equals its reference); return a reason line."""
    if not rewards:
        return "rewards at step 0 not reported by the trainer"
    off = {k: v for k, v in rewards.items() if not abs(v) <= START_REWARD_TOLERANCE}
    shown = ", ".join(f"{k.split('/')[1]} {v:+.4f}" for k, v in rewards.items())
    if off:
        raise BadReference(
            f"At step 0 the policy should equal its reference (every reward 0), but: {shown}.", hint=_VERSIONS_HINT
        )
    return f"at step 0 the policy equals its reference: {shown}"


def save_policy(model, adapter_dir: Path, state_dict: dict | None = None) -> None:
    """Save only the trained adapter: the stage's output is the policy, not DPO's reference copy.

    `state_dict`: the full weights gathered from the shards when FSDP trained the model.
    """
    extra = {"state_dict": state_dict} if state_dict is not None else {}
    model.save_pretrained(str(adapter_dir), selected_adapters=[POLICY], **extra)


# ------------------------------------------------------------------ a saved adapter, before it is exported


def nonfinite_tensors(path: Path, limit: int = 5) -> list[str]:
    """Names of floating-point tensors in a safetensors file that hold NaN or inf (read one at a time)."""
    import torch

    entries, _ = read_safetensors_header(path)
    bad = []
    for name, entry in entries.items():
        if entry.dtype in FLOAT_DTYPES and not bool(torch.isfinite(read_tensor(entry)).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


def check_saved_adapter_finite(adapter_dir: Path, stage_hint: str) -> None:
    """UserError when an adapter on disk holds NaN/inf (an export would produce a broken model)."""
    weights = adapter_dir / ADAPTER_FILE
    if not weights.is_file():
        return
    try:
        bad = nonfinite_tensors(weights)
    except ValueError:
        return  # a corrupt file is reported by the adapter reader, with its own message
    if bad:
        raise UserError(
            f"The adapter in {adapter_dir} holds NaN or infinite weights ({', '.join(bad[:3])}): "
            "training diverged, and a model exported from it would only produce garbage.",
            hint=stage_hint,
        )
