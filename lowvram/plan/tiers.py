"""VRAM tiers: which model a card gets, and what its training settings aim for.

A tier is chosen from the card's total memory. Each tier sets the targets its settings aim for
(the longest sequence worth training on, the effective batch, the LoRA rank), and its default
model in every family is computed, not typed: the largest model of the family whose estimated peak
(lowvram.plan.memory) fits the tier's card, minus the safety margin, at the tier's SFT and DPO sequence
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
from lowvram.plan.catalog import CATALOG, ModelSpec
from lowvram.plan.hardware import Device
from lowvram.plan.memory import ALL_LINEAR, MemoryEstimate, estimate

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


def largest_fitting(
    family: str,
    budget_gib: float,
    vram_gib: float,
    targets: dict[str, int],
    lora_r: int,
    *,
    dtype: str = "bf16",
    backend: str = "unsloth",
    grad_ckpt: str = "unsloth",
    optim: str = "adamw_8bit",
    lora_targets: tuple[str, ...] = ALL_LINEAR,
) -> tuple[ModelSpec | None, dict[str, MemoryEstimate]]:
    """The largest model of a family whose every stage fits `budget_gib` at batch 1.

    `targets` maps a stage ("sft", "dpo", "orpo") to the sequence length it aims for. Returns the
    model and its estimate per stage, or (None, {}) when no model of the family fits.
    """
    for spec in family_models(family):
        ests = {
            stage: estimate(
                spec,
                stage,
                max_seq_len=seq,
                batch_size=1,
                lora_r=lora_r,
                target_modules=lora_targets,
                grad_ckpt=grad_ckpt,
                optim=optim,
                dtype=dtype,
                backend=backend,
                vram_gib=vram_gib,
            )
            for stage, seq in targets.items()
        }
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


# One tier per line of reasoning: each value with why it is what it is. On GPU tiers the sequence, batch and
# accumulation values are targets the planner fits to the actual card; on cpu they are used as they are.
# Effective batch = batch_size x grad_accum (pairs for DPO, each holding a chosen and a rejected sequence).
_TIER_LIST = [
    Tier(
        name="24gb",
        min_total_gib=22.0,  # A10G and L4 report 22.49 GiB (hardware.KNOWN_CARDS); a 3090/4090 24.0
        vram_gib=24.0,
        cards="RTX 3090, RTX 4090, A10G, L4",
        sft_max_seq_len=4096,  # the room a 24 GB card has: twice the 2048 of Unsloth's notebooks
        dpo_max_seq_len=2048,  # DPO holds chosen + rejected and a reference forward: half the SFT length
        batch_size=2,
        grad_accum=4,  # effective 8, as Unsloth's Colab notebooks train (2 x 4)
        dpo_batch_size=1,
        dpo_grad_accum=8,  # effective 8 pairs; one pair is already two sequences
        lora_r=32,
        lora_alpha=32,  # r=32 where memory allows (Unsloth's benchmarks); alpha = r
        grad_ckpt="unsloth",  # Unsloth's offloaded checkpointing: activations wait in CPU RAM
        optim="adamw_8bit",
    ),  # bitsandbytes 8-bit AdamW: a quarter of AdamW's fp32 state memory
    Tier(
        name="16gb",
        min_total_gib=14.0,  # a Colab T4 reports 15.0 GiB and belongs here
        vram_gib=16.0,
        cards="RTX 4060 Ti 16GB, RTX 4080, Colab T4 (15 GiB)",
        sft_max_seq_len=2048,  # Unsloth's notebooks train at 2048
        dpo_max_seq_len=1024,  # half the SFT length (see 24gb)
        batch_size=2,
        grad_accum=4,  # effective 8 (Unsloth's 2 x 4)
        dpo_batch_size=1,
        dpo_grad_accum=8,  # effective 8 pairs
        lora_r=16,
        lora_alpha=16,  # r=16 on 12/16 GB cards, as Unsloth's notebooks; alpha = r
        grad_ckpt="unsloth",
        optim="adamw_8bit",
    ),
    Tier(
        name="12gb",
        min_total_gib=10.5,  # an RTX 2080 Ti reports 11.0 GiB and belongs here; a 10 GB 3080 does not
        vram_gib=12.0,
        cards="RTX 3060 12GB, RTX 4070, RTX 2080 Ti",
        sft_max_seq_len=2048,  # Unsloth's notebooks train at 2048
        dpo_max_seq_len=1024,  # half the SFT length
        batch_size=1,
        grad_accum=8,  # the same effective 8, one sequence at a time
        dpo_batch_size=1,
        dpo_grad_accum=8,  # effective 8 pairs
        lora_r=16,
        lora_alpha=16,  # r=16 on 12/16 GB cards; alpha = r
        grad_ckpt="unsloth",
        optim="adamw_8bit",
    ),
    Tier(
        name="8gb",
        min_total_gib=5.5,  # the smallest GPU tier: 6 GB cards plan here too, the planner fitting them
        vram_gib=8.0,
        cards="RTX 3060 Ti, RTX 3070, RTX 4060, RTX 3080 10GB",
        sft_max_seq_len=1024,  # half the 12/16 GB target, for the little an 8 GB card leaves beside the weights
        dpo_max_seq_len=512,  # half the SFT length
        batch_size=1,
        grad_accum=8,  # effective 8, one sequence at a time
        dpo_batch_size=1,
        dpo_grad_accum=8,  # effective 8 pairs
        lora_r=8,
        lora_alpha=8,  # half the 12/16 GB rank: fewer adapter weights and optimizer states; alpha = r
        grad_ckpt="unsloth",
        optim="adamw_8bit",
    ),
    # No CUDA: full-precision LoRA on CPU or Apple, small models; 4-bit (CPU only) if the recipe asks.
    Tier(
        name="cpu",
        min_total_gib=0.0,  # not chosen by memory: every machine without a CUDA card
        vram_gib=0.0,  # no VRAM budget to compute default models from: named_models below
        cards="CPU or Apple silicon",
        sft_max_seq_len=512,
        dpo_max_seq_len=512,  # short rows keep a CPU step in seconds
        batch_size=2,
        grad_accum=1,  # used as they are (no card to fit): small steps, no accumulation
        dpo_batch_size=2,
        dpo_grad_accum=1,
        lora_r=8,
        lora_alpha=16,  # a small adapter for small models; alpha 2r
        grad_ckpt="off",  # no VRAM to save; checkpointing would only recompute
        optim="adamw_torch",  # PyTorch's own AdamW: no bitsandbytes needed off CUDA
        named_models={"qwen": "unsloth/Qwen2.5-0.5B-Instruct", "tiny": "builtin:tiny-llama"},
    ),
]
TIERS: dict[str, Tier] = {t.name: t for t in _TIER_LIST}
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
