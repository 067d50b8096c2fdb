"""VRAM tiers: which model a card gets, and what its training settings aim for.

A tier is chosen from the card's total memory. Each tier names the default model of every
family, the LoRA rank, and the targets its settings aim for: the longest sequence worth training
on and the effective batch (batch_size x grad_accum). The actual sequence length, batch and
accumulation are the memory planner's output (lowvram.planner, `lowvram plan`): the longest
sequence up to the target and the largest batch whose estimated peak fits the card
(scripts/tier_table.py prints what each tier gets). Only the cpu tier, which has no VRAM budget,
uses these numbers as they are. Where the targets come from:
- Unsloth's Colab notebooks: Llama-3.1-8B 4-bit, r=16, seq 2048, batch 2 peaks at 7.9 GiB on a
  T4 (shared/calibration/vram_points.csv), so 8B models belong on 16 GB cards and up.
- DPO holds chosen and rejected together plus a no-grad reference forward: roughly SFT at twice
  the batch, so DPO aims for half the SFT sequence length.
- Below 12 GB the logits over a 128k-152k vocabulary dominate at short sequences, so the
  8 GB tier uses 1-1.5B models.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowvram.errors import UserError
from lowvram.hardware import Device


@dataclass(frozen=True)
class Tier:
    name: str
    min_total_gib: float  # a card with at least this much total memory gets the tier
    cards: str  # examples, for messages
    models: dict[str, str]  # family -> default model name
    # Targets on GPU tiers (the planner fits the actual values to the card); used as-is on cpu.
    sft_max_seq_len: int
    dpo_max_seq_len: int
    batch_size: int
    grad_accum: int
    dpo_batch_size: int
    dpo_grad_accum: int
    lora_r: int
    lora_alpha: int
    grad_ckpt: str  # "unsloth" (offloaded), "standard" or "off"
    optim: str


_LLAMA = {
    "24gb": "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit",
    "16gb": "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit",
    "12gb": "unsloth/Llama-3.2-3B-Instruct-bnb-4bit",
    "8gb": "unsloth/Llama-3.2-1B-Instruct-bnb-4bit",
}
_QWEN = {
    "24gb": "unsloth/Qwen2.5-14B-Instruct-bnb-4bit",
    "16gb": "unsloth/Qwen2.5-7B-Instruct-bnb-4bit",
    "12gb": "unsloth/Qwen2.5-3B-Instruct-bnb-4bit",
    "8gb": "unsloth/Qwen2.5-1.5B-Instruct-bnb-4bit",
    "cpu": "unsloth/Qwen2.5-0.5B-Instruct",
}
_MISTRAL = {
    "24gb": "unsloth/Mistral-Nemo-Instruct-2407-bnb-4bit",
    "16gb": "unsloth/mistral-7b-instruct-v0.3-bnb-4bit",
    "12gb": "unsloth/mistral-7b-instruct-v0.3-bnb-4bit",
}


def _models(tier: str) -> dict[str, str]:
    out = {fam: table[tier] for fam, table in (("llama", _LLAMA), ("qwen", _QWEN), ("mistral", _MISTRAL)) if tier in table}
    out["tiny"] = "builtin:tiny-llama"
    return out


TIERS: dict[str, Tier] = {
    t.name: t
    for t in [
        Tier("24gb", 22.0, "RTX 3090, RTX 4090, A10G, L4", _models("24gb"),
             4096, 2048, 2, 4, 1, 8, 32, 32, "unsloth", "adamw_8bit"),
        Tier("16gb", 14.0, "RTX 4060 Ti 16GB, RTX 4080, Colab T4 (15 GiB)", _models("16gb"),
             2048, 1024, 2, 4, 1, 8, 16, 16, "unsloth", "adamw_8bit"),
        Tier("12gb", 10.5, "RTX 3060 12GB, RTX 4070, RTX 2080 Ti", _models("12gb"),
             2048, 1024, 1, 8, 1, 8, 16, 16, "unsloth", "adamw_8bit"),
        Tier("8gb", 5.5, "RTX 3060 Ti, RTX 3070, RTX 4060, RTX 3080 10GB", _models("8gb"),
             1024, 512, 1, 8, 1, 8, 8, 8, "unsloth", "adamw_8bit"),
        # No CUDA: full-precision LoRA on CPU or Apple; small models only, no 4-bit.
        Tier("cpu", 0.0, "CPU or Apple silicon", _models("cpu"),
             512, 512, 2, 1, 2, 1, 8, 16, "off", "adamw_torch"),
    ]
}
GPU_TIERS = [t for t in TIERS.values() if t.name != "cpu"]  # largest first


def tier_names() -> list[str]:
    return list(TIERS)


def select_tier(device: Device, requested: str = "auto") -> tuple[Tier, str]:
    """(tier, reason) for a device, or the tier the recipe asks for."""
    if requested != "auto":
        if requested not in TIERS:
            raise UserError(f"Unknown tier {requested!r}.", hint=f"Tiers: auto, {', '.join(TIERS)}.")
        return TIERS[requested], f"{requested} tier: set by the recipe (model.tier)"
    if device.kind != "cuda":
        what = "Apple GPU" if device.kind == "mps" else "no CUDA GPU"
        return TIERS["cpu"], f"cpu tier: {what}, so no 4-bit loading; small models in full precision"
    total = device.total_vram_gib
    for tier in GPU_TIERS:
        if total >= tier.min_total_gib:
            extra = ""
            if tier.name == "24gb" and total > 26:
                extra = "; larger cards use the 24 GB settings (the largest tier)"
            return tier, f"{tier.name} tier: {device.name}, {total:.1f} GiB total ({tier.cards}){extra}"
    raise UserError(
        f"{device.name} has {total:.1f} GiB; lowvram's smallest GPU tier needs {GPU_TIERS[-1].min_total_gib} GiB.",
        hint="Train a small model on the CPU instead (CUDA_VISIBLE_DEVICES= lowvram run ...), or plan for a bigger card with --vram.",
    )
