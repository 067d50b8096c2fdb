"""VRAM tiers: which model a card gets, and what its training settings aim for.

A tier is chosen from the card's total memory. Each tier sets the targets its settings aim for
(the longest sequence worth training on, the effective batch, the LoRA rank), and its default
model in every family is computed, not typed: the largest model of the family whose estimated peak
(lowvram.memory) fits the tier's card, minus the safety margin, at the tier's SFT and DPO sequence
targets with batch 1 (`largest_fitting`). The planner repeats that choice for the actual card
(a 15 GiB T4 in the 16 GB tier, an 11 GiB 2080 Ti in the 12 GB one), then fits the sequence length,
batch and accumulation to it; `scripts/tier_table.py` prints both. Only the cpu tier, which has no
VRAM budget, names its models and uses its numbers as they are. Where the targets come from:
- Unsloth's Colab notebooks train at seq 2048 with an effective batch of 8 (batch 2 x accumulation
  4); r=16 on 12/16 GB cards, r=32 where memory allows (Unsloth's benchmarks use r=32).
- DPO holds chosen and rejected together plus a no-grad reference forward: roughly SFT at twice
  the batch, so DPO aims for half the SFT sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowvram.errors import UserError
from lowvram.hardware import Device
from lowvram.memory import ALL_LINEAR, MemoryEstimate, estimate
from lowvram.models import CATALOG, ModelSpec

# Held back from the card's usable memory for what the estimate cannot see: other processes, the
# display, allocator behaviour beyond the modelled one. scripts/calibrate_vram.py measures the
# estimate's error; 10% covers the worst full-length row it shows (+6.6%) with room to spare.
SAFETY_MARGIN_FRACTION = 0.10


@dataclass(frozen=True)
class Tier:
    name: str
    min_total_gib: float  # a card with at least this much total memory gets the tier
    vram_gib: float  # the tier's card, for its default models (0 on cpu)
    cards: str  # examples, for messages
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
    named_models: dict[str, str] = field(default_factory=dict)  # cpu only: no budget to compute them from

    @property
    def models(self) -> dict[str, str]:
        """family -> default model: computed from the estimator on GPU tiers (see largest_fitting)."""
        if self.vram_gib <= 0:
            return dict(self.named_models)
        return _gpu_tier_models(self.name)


def family_models(family: str, gpu: bool = True) -> list[ModelSpec]:
    """The catalog's models of a family, largest first (4-bit repos on a GPU, 16-bit ones elsewhere)."""
    specs = [s for s in CATALOG.values() if s.family == family and s.prequantized_4bit == gpu]
    return sorted(specs, key=lambda s: -s.params_b)


def largest_fitting(family: str, budget_gib: float, vram_gib: float, targets: dict[str, int], lora_r: int, *,
                    dtype: str = "bf16", backend: str = "unsloth", grad_ckpt: str = "unsloth",
                    optim: str = "adamw_8bit", lora_targets: tuple[str, ...] = ALL_LINEAR,
                    ) -> tuple[ModelSpec | None, dict[str, MemoryEstimate]]:
    """The largest model of a family whose every stage fits `budget_gib` at batch 1.

    `targets` maps a stage ("sft", "dpo", "orpo") to the sequence length it aims for. Returns the
    model and its estimate per stage, or (None, {}) when no model of the family fits.
    """
    for spec in family_models(family):
        ests = {stage: estimate(spec, stage, max_seq_len=seq, batch_size=1, lora_r=lora_r, target_modules=lora_targets,
                                grad_ckpt=grad_ckpt, optim=optim, dtype=dtype, backend=backend, vram_gib=vram_gib)
                for stage, seq in targets.items()}
        if all(e.total_gib <= budget_gib for e in ests.values()):
            return spec, ests
    return None, {}


_TIER_MODELS: dict[str, dict[str, str]] = {}


def _gpu_tier_models(name: str) -> dict[str, str]:
    if name not in _TIER_MODELS:
        tier = TIERS[name]
        budget = tier.vram_gib * (1 - SAFETY_MARGIN_FRACTION)
        targets = {"sft": tier.sft_max_seq_len, "dpo": tier.dpo_max_seq_len}
        out = {}
        for fam in sorted({s.family for s in CATALOG.values() if s.prequantized_4bit}):
            spec, _ = largest_fitting(fam, budget, tier.vram_gib, targets, tier.lora_r)
            if spec is not None:
                out[fam] = spec.name
        out["tiny"] = "builtin:tiny-llama"
        _TIER_MODELS[name] = out
    return _TIER_MODELS[name]


TIERS: dict[str, Tier] = {
    t.name: t
    for t in [
        Tier("24gb", 22.0, 24.0, "RTX 3090, RTX 4090, A10G, L4",
             4096, 2048, 2, 4, 1, 8, 32, 32, "unsloth", "adamw_8bit"),
        Tier("16gb", 14.0, 16.0, "RTX 4060 Ti 16GB, RTX 4080, Colab T4 (15 GiB)",
             2048, 1024, 2, 4, 1, 8, 16, 16, "unsloth", "adamw_8bit"),
        Tier("12gb", 10.5, 12.0, "RTX 3060 12GB, RTX 4070, RTX 2080 Ti",
             2048, 1024, 1, 8, 1, 8, 16, 16, "unsloth", "adamw_8bit"),
        Tier("8gb", 5.5, 8.0, "RTX 3060 Ti, RTX 3070, RTX 4060, RTX 3080 10GB",
             1024, 512, 1, 8, 1, 8, 8, 8, "unsloth", "adamw_8bit"),
        # No CUDA: full-precision LoRA on CPU or Apple, small models; 4-bit (CPU only) if the recipe asks.
        Tier("cpu", 0.0, 0.0, "CPU or Apple silicon",
             512, 512, 2, 1, 2, 1, 8, 16, "off", "adamw_torch",
             {"qwen": "unsloth/Qwen2.5-0.5B-Instruct", "tiny": "builtin:tiny-llama"}),
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
        return TIERS["cpu"], f"cpu tier: {what}, small models in full precision (4-bit only if the recipe asks)"
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
