"""From a recipe and a card to concrete settings, each with the reason it was chosen.

    plan = make_plan(recipe, device)
    print("\\n".join(plan.lines()))

Nothing here imports torch: planning happens before anything loads.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field

from lowvram.errors import UserError
from lowvram.hardware import Device
from lowvram.models import BUILTIN_PREFIX, ModelSpec, get_spec
from lowvram.recipe import Recipe, StageConfig
from lowvram.tiers import Tier, select_tier


@dataclass(frozen=True)
class StagePlan:
    stage: str  # "sft" or "dpo"
    max_seq_len: int
    batch_size: int
    grad_accum: int
    grad_ckpt: str  # "unsloth", "standard" or "off"
    optim: str
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum


@dataclass(frozen=True)
class Plan:
    device: Device
    tier: str
    model: str
    backend: str  # "unsloth" or "hf"
    dtype: str  # "bf16", "fp16" or "fp32"
    load_in_4bit: bool
    lora_r: int
    lora_alpha: int
    stages: dict[str, StagePlan]
    reasons: dict[str, str]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["device"] = {**asdict(self.device), "bf16": self.device.bf16}
        return d

    def lines(self) -> list[str]:
        """The decisions, one per line, each with its reason."""
        out = [f"{k:<9} {getattr(self, k) if k != 'lora' else f'r={self.lora_r} alpha={self.lora_alpha}'}"
               f"  -- {self.reasons[k]}" for k in ("tier", "model", "backend", "dtype", "load_in_4bit", "lora")]
        for sp in self.stages.values():
            out.append(
                f"{sp.stage:<9} seq {sp.max_seq_len}, batch {sp.batch_size} x accum {sp.grad_accum}"
                f" (effective {sp.effective_batch}), grad_ckpt {sp.grad_ckpt}, optim {sp.optim}"
            )
            out += [f"{'':<9}   {k}: {v}" for k, v in sp.reasons.items()]
        return out


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def choose_backend(requested: str, device: Device) -> tuple[str, str]:
    """(backend, reason): Unsloth when a CUDA GPU and Unsloth are there, transformers+PEFT otherwise."""
    has_unsloth = unsloth_installed()
    cc_ok = device.compute_capability is not None and device.compute_capability >= (7, 0)
    if requested == "unsloth":
        if device.kind != "cuda":
            raise UserError("model.backend is 'unsloth', but Unsloth needs a CUDA GPU and none was found.",
                            hint="Set model.backend=auto (or hf) to train with transformers+PEFT here.")
        if not has_unsloth and not device.simulated:
            raise UserError("model.backend is 'unsloth', but Unsloth is not installed.",
                            hint="pip install 'lowvram[gpu]'  (or set model.backend=hf)")
        return "unsloth", "set by the recipe (model.backend)"
    if requested == "hf":
        return "hf", "set by the recipe (model.backend)"
    if device.kind != "cuda":
        return "hf", "no CUDA GPU: transformers+PEFT (Unsloth needs CUDA)"
    if not cc_ok:
        return "hf", "compute capability below 7.0: Unsloth's kernels need 7.0+"
    if device.simulated:
        return "unsloth", "planning for a CUDA card: Unsloth is what it would train with (pip install 'lowvram[gpu]')"
    if has_unsloth:
        return "unsloth", "CUDA GPU and Unsloth installed"
    return "hf", "CUDA GPU but Unsloth is not installed: transformers+PEFT+bitsandbytes (pip install 'lowvram[gpu]' for Unsloth)"


def choose_model(recipe: Recipe, tier: Tier) -> tuple[str, str]:
    if recipe.model.name:
        return recipe.model.name, "set by the recipe (model.name)"
    fam = recipe.model.family
    if fam not in tier.models:
        offered = ", ".join(sorted(tier.models))
        raise UserError(f"The {tier.name} tier has no {fam} model that fits.",
                        hint=f"Pick model.family from {offered}, name a model with model.name, or plan for a bigger card.")
    return tier.models[fam], f"default {fam} model for the {tier.name} tier"


def _stage_plan(stage: str, cfg: StageConfig, tier: Tier, backend: str, device: Device) -> StagePlan:
    reasons = {}
    dpo = stage == "dpo"
    seq_default = tier.dpo_max_seq_len if dpo else tier.sft_max_seq_len
    bs_default = tier.dpo_batch_size if dpo else tier.batch_size
    ga_default = tier.dpo_grad_accum if dpo else tier.grad_accum

    def pick(name, value, default, why):
        if value is not None:
            reasons[name] = "set by the recipe"
            return value
        reasons[name] = why
        return default

    seq = pick("max_seq_len", cfg.max_seq_len, seq_default,
               f"{tier.name} tier default" + (" (DPO holds chosen+rejected: half the SFT length)" if dpo else ""))
    bs = pick("batch_size", cfg.batch_size, bs_default, f"{tier.name} tier default")
    ga = pick("grad_accum", cfg.grad_accum, ga_default, f"{tier.name} tier default")
    if cfg.grad_ckpt != "auto":
        ckpt = cfg.grad_ckpt
        reasons["grad_ckpt"] = "set by the recipe"
        if ckpt == "unsloth" and backend != "unsloth":
            ckpt = "standard"
            reasons["grad_ckpt"] = "recipe asked for unsloth; the hf backend has standard checkpointing only"
    elif device.kind != "cuda":
        ckpt, reasons["grad_ckpt"] = "off", "no GPU memory to save: recomputation would only slow CPU training"
    elif backend == "unsloth":
        ckpt, reasons["grad_ckpt"] = tier.grad_ckpt, "Unsloth's offloaded checkpointing: activations go to CPU RAM"
    else:
        ckpt, reasons["grad_ckpt"] = "standard", "transformers' standard checkpointing (Unsloth's offload needs Unsloth)"
    if device.kind == "cuda":
        optim, reasons["optim"] = tier.optim, "8-bit AdamW states (bitsandbytes) save 75% of optimizer memory"
    else:
        optim, reasons["optim"] = "adamw_torch", "bitsandbytes' 8-bit optimizer needs CUDA"
    return StagePlan(stage, seq, bs, ga, ckpt, optim, reasons)


def make_plan(recipe: Recipe, device: Device) -> Plan:
    """Resolve every automatic setting of a recipe for a device; refuse what cannot work."""
    tier, tier_reason = select_tier(device, recipe.model.tier)
    model, model_reason = choose_model(recipe, tier)
    backend, backend_reason = choose_backend(recipe.model.backend, device)
    dtype, dtype_reason = device.dtype_choice()
    spec: ModelSpec | None = get_spec(model)
    if recipe.model.load_in_4bit is not None:
        q4, q4_reason = recipe.model.load_in_4bit, "set by the recipe (model.load_in_4bit)"
    elif device.kind == "cuda" and not model.startswith(BUILTIN_PREFIX):
        q4, q4_reason = True, "QLoRA: 4-bit base weights on CUDA"
    else:
        q4, q4_reason = False, "bitsandbytes 4-bit needs CUDA" if device.kind != "cuda" else "tiny built-in model"
    if device.kind != "cuda" and (q4 or (spec is not None and spec.prequantized_4bit)):
        alt = spec.base_16bit if spec is not None and spec.base_16bit else None
        raise UserError(f"{model} is stored in bitsandbytes 4-bit, which needs a CUDA GPU; this machine has none.",
                        hint=f"Use the 16-bit original instead: model.name={alt}" if alt else
                        "Pick a 16-bit model with model.name=..., or run on a CUDA GPU.")
    r = recipe.lora.r or tier.lora_r
    alpha = recipe.lora.alpha or (r if recipe.lora.r else tier.lora_alpha)
    reasons = {
        "tier": tier_reason,
        "model": model_reason,
        "backend": backend_reason,
        "dtype": dtype_reason,
        "load_in_4bit": q4_reason,
        "lora": "set by the recipe" if recipe.lora.r else f"{tier.name} tier default",
    }
    stages = {s: _stage_plan(s, getattr(recipe, s), tier, backend, device) for s in recipe.stages()}
    return Plan(device, tier.name, model, backend, dtype, q4, r, alpha, stages, reasons)
