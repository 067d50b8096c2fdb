"""The LoRA adapters of a training stage: the trained policy ("default") and DPO/KTO's frozen reference ("ref").

    restore_policy(model, checkpoint_dir)   # on resume, before trainer.train(resume_from_checkpoint=...)

TRL's DPO and KTO trainers copy the SFT adapter into a second, frozen adapter named "ref", so a
checkpoint holds the policy at its root and the reference in ref/. transformers 5.17 (the newest
that Unsloth allows) reloads only the subfolder adapters on resume, never the root one, so the
policy would silently restart from the SFT adapter; 5.23 reloads both. lowvram loads the policy
itself, which is right under every version.
"""

from __future__ import annotations

from pathlib import Path

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
    saved = load_file(str(path))
    result = set_peft_model_state_dict(model, saved, adapter_name=POLICY)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise RuntimeError(f"{path}: {len(unexpected)} tensors match no LoRA weight of the model, e.g. {unexpected[0]}")
    loaded = adapter_tensors(model)
    differ = [k for k, v in saved.items() if k not in loaded or not torch.equal(loaded[k].cpu().to(v.dtype), v)]
    if differ:
        raise RuntimeError(f"{path}: {len(differ)} policy tensors did not load, e.g. {differ[0]}")
    return len(saved)
