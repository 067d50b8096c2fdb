"""From a recipe and a card to concrete settings, each with the reason it was chosen.

    plan = make_plan(recipe, device)
    print("\\n".join(plan.lines()))

On a CUDA card the sequence length and batch come from the memory estimate (lowvram.plan.memory): the
card's usable memory minus a 10% safety margin is the budget; each stage gets the longest sequence
from SEQ_LADDER up to the tier's (or recipe's) target that fits at batch 1, then the largest batch
that fits, and gradient accumulation keeps the target effective batch. Values the recipe sets are
kept but checked; when nothing fits, planning stops before anything loads and says what would fit.
Without a CUDA card (CPU, Apple) there is no VRAM budget: the tier's defaults are used unchecked.

Nothing here imports torch: planning happens before anything loads.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import asdict, dataclass, field

from lowvram.errors import UserError
from lowvram.model.tiny import BUILTIN_PREFIX
from lowvram.plan.catalog import CATALOG, ModelSpec, get_spec
from lowvram.plan.hardware import Device, known_card, simulated_device
from lowvram.plan.memory import ALL_LINEAR, MemoryEstimate, estimate
from lowvram.plan.tiers import GPU_TIERS, SAFETY_MARGIN_FRACTION, Tier, family_models, largest_fitting, select_tier
from lowvram.recipe import ModelConfig, Recipe, StageConfig
from lowvram.utils.ui import table

__all__ = ["SAFETY_MARGIN_FRACTION", "SEQ_LADDER", "Plan", "StagePlan", "make_plan", "tier_table"]
# Sequence lengths the planner chooses from, longest first.
SEQ_LADDER = (8192, 4096, 2048, 1024, 512, 256)


@dataclass(frozen=True)
class StagePlan:
    stage: str  # "sft" or "dpo"
    max_seq_len: int
    batch_size: int
    grad_accum: int
    grad_ckpt: str  # "unsloth", "standard" or "off"
    optim: str
    reasons: dict[str, str] = field(default_factory=dict)
    estimate: MemoryEstimate | None = None  # peak VRAM at these settings; None without a CUDA card
    budget_gib: float | None = None  # usable VRAM minus the safety margin; None without a CUDA card
    data_lengths: dict | None = None  # token lengths of the stage's data when it was planned from them

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def fits(self) -> bool | None:
        """Whether the estimate is within the budget; None when there is no budget to check."""
        if self.estimate is None or self.budget_gib is None:
            return None
        return self.estimate.total_gib <= self.budget_gib


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
    processes: int = 1  # training processes, one card each (lowvram.plan.parallel.plan_per_card)
    parallel: str = "single"  # "single", "ddp", "fsdp" or "deepspeed"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["device"] = {**asdict(self.device), "bf16": self.device.bf16}
        for name, sp in self.stages.items():
            d["stages"][name]["estimate"] = sp.estimate.to_dict() if sp.estimate else None
            d["stages"][name]["fits"] = sp.fits
        return d

    def lines(self) -> list[str]:
        """The decisions, each with its reason, then each stage's settings and the memory estimate: tables
        (lowvram.utils.ui) whose plain text reads one decision per line."""

        decisions = [
            (k, str(getattr(self, k)) if k != "lora" else f"r={self.lora_r} alpha={self.lora_alpha}", self.reasons[k])
            for k in ("tier", "model", "backend", "dtype", "load_in_4bit", "lora")
        ]
        if self.processes > 1:  # several cards (lowvram.plan.parallel)
            decisions.append(("parallel", f"{self.parallel} x {self.processes} processes", self.reasons["parallel"]))
        out = [table(decisions, plain="\n".join(f"{k:<9} {v}  -- {why}" for k, v, why in decisions))]
        for sp in self.stages.values():
            settings = (
                f"seq {sp.max_seq_len}, batch {sp.batch_size} x accum {sp.grad_accum}"
                f" (effective {self._effective(sp)}), grad_ckpt {sp.grad_ckpt}, optim {sp.optim}"
            )
            out.append(
                table(
                    sp.reasons.items(),
                    title=f"{sp.stage}: {settings}",
                    plain="\n".join(
                        [f"{sp.stage:<9} {settings}", *(f"{'':<9}   {k}: {v}" for k, v in sp.reasons.items())]
                    ),
                )
            )
        return out + self.memory_lines()

    def _effective(self, sp: StagePlan) -> str:
        """The effective batch as a reader checks it: per card, and over all cards when there are several."""
        if self.processes <= 1:
            return str(sp.effective_batch)
        return f"{sp.effective_batch} per card, {sp.effective_batch * self.processes} over {self.processes} cards"

    def memory_lines(self) -> list[str]:
        """The estimated peak VRAM of each stage, line by line, against the budget."""
        planned = [sp for sp in self.stages.values() if sp.estimate is not None]
        if not planned:
            return [f"{'memory':<9} not estimated: {self.reasons.get('memory', 'no CUDA card, so no VRAM budget')}"]

        def seq(sp: StagePlan) -> str:  # the length the estimate used: the data's longest row when known
            if sp.data_lengths and sp.data_lengths["max"] < sp.max_seq_len:
                return f"{sp.data_lengths['max']} (data)"
            return str(sp.max_seq_len)

        headers = ("memory (GiB)", *(f"{sp.stage} (seq {seq(sp)} x batch {sp.batch_size})" for sp in planned))
        rows = [
            (name, *(f"{dict(sp.estimate.rows())[name]:.2f}" for sp in planned))
            for name, _ in planned[0].estimate.rows()
        ]
        rows.append(("budget", *(f"{sp.budget_gib:.2f}" for sp in planned)))
        budget = planned[0].budget_gib
        note = (
            f"budget = {self.device.usable_vram_gib:.1f} GiB usable on {self.device.name} minus a "
            f"{SAFETY_MARGIN_FRACTION:.0%} safety margin = {budget:.1f} GiB"
        )
        return ["", table(rows, headers), note]


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def choose_backend(requested: str, device: Device) -> tuple[str, str]:
    """(backend, reason): Unsloth when a CUDA GPU and Unsloth are there, transformers+PEFT otherwise."""
    has_unsloth = unsloth_installed()
    cc_ok = device.compute_capability is not None and device.compute_capability >= (7, 0)
    if requested == "unsloth":
        if device.kind != "cuda":
            raise UserError(
                "model.backend is 'unsloth', but Unsloth needs a CUDA GPU and none was found.",
                hint="Set model.backend=auto (or hf) to train with transformers+PEFT here.",
            )
        if not has_unsloth and not device.simulated:
            raise UserError(
                "model.backend is 'unsloth', but Unsloth is not installed.",
                hint="pip install 'lowvram[gpu]'  (or set model.backend=hf)",
            )
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
    return (
        "hf",
        "CUDA GPU but Unsloth is not installed: transformers+PEFT+bitsandbytes (pip install 'lowvram[gpu]' for Unsloth)",
    )


def choose_model(
    recipe: Recipe, tier: Tier, device: Device | None = None, *, backend: str = "unsloth", dtype: str = "bf16"
) -> tuple[str, str]:
    """(model, reason): the recipe's model, else the largest of its family that fits this card.

    On a CUDA card the choice is the estimator's: the largest model of the family whose SFT and DPO
    estimates fit the budget at the tier's sequence targets and batch 1. Without one, the tier's.
    """
    if recipe.model.name:
        return recipe.model.name, "set by the recipe (model.name)"
    fam = recipe.model.family
    if device is None or device.kind != "cuda" or fam == "tiny":
        if fam not in tier.models:
            offered = ", ".join(sorted(tier.models))
            raise UserError(
                f"The {tier.name} tier has no {fam} model.",
                hint=f"Pick model.family from {offered}, name a model with model.name, or plan for a bigger card.",
            )
        return tier.models[fam], f"default {fam} model for the {tier.name} tier"
    budget = device.usable_vram_gib * (1 - SAFETY_MARGIN_FRACTION)
    targets = {_est_stage(recipe, s): _stage_targets(tier, s, getattr(recipe, s))[0] for s in recipe.stages()}
    r = recipe.lora.r or tier.lora_r
    ckpt = "unsloth" if backend == "unsloth" else "standard"
    # The tier's targets first; when no member fits them (a forced tier, a small card), halve them:
    # the planner then fits the sequence to the card anyway.
    wanted = dict(targets)
    while True:
        spec, ests = largest_fitting(
            fam,
            budget,
            device.usable_vram_gib,
            targets,
            r,
            dtype=dtype,
            backend=backend,
            grad_ckpt=ckpt,
            lora_targets=_targets(recipe)[0],
        )
        if spec is not None or min(targets.values()) <= SEQ_LADDER[-1]:
            break
        targets = {st: max(seq // 2, SEQ_LADDER[-1]) for st, seq in targets.items()}
    if spec is None:  # nothing fits: plan the smallest, and let the planner refuse with what would fit
        smallest = family_models(fam)[-1]
        return smallest.name, f"smallest {fam} model (no member of the family fits this card)"
    fitted = ", ".join(f"{st.upper()} seq {targets[st]} at batch 1 = {e.total_gib:.1f} GiB" for st, e in ests.items())
    where = (
        f"the {tier.name} tier's targets"
        if targets == wanted
        else f"{', '.join(map(str, targets.values()))} tokens (none fits the {tier.name} tier's targets)"
    )
    return spec.name, f"largest {fam} model whose estimate fits at {where} ({fitted}; budget {budget:.1f} GiB)"


def _est_stage(recipe: Recipe, stage: str) -> str:
    return "orpo" if stage == "dpo" and recipe.dpo.method == "orpo" else stage


@dataclass(frozen=True)
class _Fitter:
    """Everything a stage's estimate depends on except sequence length and batch, and the budget."""

    spec: ModelSpec
    stage: str  # memory.estimate's stage: sft, dpo or orpo
    lora_r: int
    targets: tuple[str, ...]
    grad_ckpt: str
    optim: str
    dtype: str
    backend: str
    load_in_4bit: bool
    budget_gib: float
    vram_gib: float | None = None  # the card's usable memory: Unsloth sizes its loss chunks to what is free
    data_max: int | None = None  # the data's longest row: with dynamic padding no batch is longer

    def at(self, max_seq_len: int, batch_size: int, spec: ModelSpec | None = None) -> MemoryEstimate:
        if self.data_max is not None:
            max_seq_len = min(max_seq_len, self.data_max)  # the worst batch the data forms after truncation
        return estimate(
            spec or self.spec,
            self.stage,
            max_seq_len=max_seq_len,
            batch_size=batch_size,
            lora_r=self.lora_r,
            target_modules=self.targets,
            grad_ckpt=self.grad_ckpt,
            optim=self.optim,
            dtype=self.dtype,
            backend=self.backend,
            load_in_4bit=self.load_in_4bit,
            vram_gib=self.vram_gib,
        )

    def fits(self, max_seq_len: int, batch_size: int, spec: ModelSpec | None = None) -> bool:
        return self.at(max_seq_len, batch_size, spec).total_gib <= self.budget_gib

    def longest_seq(self, upto: int, batch_size: int = 1, spec: ModelSpec | None = None) -> int | None:
        """The longest ladder length <= upto (or upto itself when below the ladder) that fits."""
        ladder = [s for s in SEQ_LADDER if s <= upto] or [upto]
        return next((s for s in ladder if self.fits(s, batch_size, spec)), None)

    def max_seq(self, upto: int, batch_size: int = 1, spec: ModelSpec | None = None) -> int | None:
        """The longest sequence <= upto that fits, computed (a multiple of 64 unless upto is shorter)."""
        step = 64 if upto >= 64 else 1
        lo, hi = 0, upto // step
        while lo < hi:  # the estimate grows with the sequence: bisect over multiples of `step`
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.fits(mid * step, batch_size, spec) else (lo, mid - 1)
        if lo == 0:
            return upto if step == 1 and self.fits(upto, batch_size, spec) else None
        return lo * step

    def largest_batch(self, max_seq_len: int, upto: int) -> int | None:
        """The largest power-of-two batch <= upto that fits at this sequence length."""
        sizes = [2**i for i in range(int(math.log2(max(upto, 1))), -1, -1)]
        return next((b for b in sizes if self.fits(max_seq_len, b)), None)


class _NothingFits(Exception):
    """A stage does not fit even at the shortest sequence and batch 1 (turned into a UserError)."""

    def __init__(self, stage: str, target_seq: int):
        super().__init__(stage)
        self.stage, self.target_seq = stage, target_seq


def _targets(recipe: Recipe) -> tuple[tuple[str, ...], str | None]:
    """The LoRA targets the estimate can count, and a note about any it cannot."""
    wanted = tuple(recipe.lora.target_modules)
    if "all-linear" in wanted:
        return ALL_LINEAR, None
    known = tuple(t for t in wanted if t in ALL_LINEAR)
    other = [t for t in wanted if t not in ALL_LINEAR]
    return known or ALL_LINEAR, (f"the estimate does not count adapters on {', '.join(other)}" if other else None)


def _stage_targets(tier: Tier, stage: str, cfg: StageConfig) -> tuple[int, int]:
    """(max_seq_len, effective batch) a stage aims for: the recipe's values, else the tier's.

    The effective batch is the tier's unless the recipe sets both batch_size and grad_accum: setting
    one of them changes how the effective batch is split, not its size.
    """
    dpo = stage == "dpo"
    seq = cfg.max_seq_len or (tier.dpo_max_seq_len if dpo else tier.sft_max_seq_len)
    if cfg.batch_size and cfg.grad_accum:
        return seq, cfg.batch_size * cfg.grad_accum
    tier_eff = (tier.dpo_batch_size * tier.dpo_grad_accum) if dpo else (tier.batch_size * tier.grad_accum)
    return seq, tier_eff


def _gib_pair(need: float, budget: float) -> tuple[str, str]:
    """Two sizes printed with enough digits that a need over the budget never reads as equal to it."""
    digits = 1
    while digits < 3 and f"{need:.{digits}f}" == f"{budget:.{digits}f}":
        digits += 1
    return f"{need:.{digits}f}", f"{budget:.{digits}f}"


def _refuse(recipe: Recipe, fits: dict[str, _Fitter], failed: _NothingFits, tier: Tier, device: Device) -> UserError:
    """Some stage does not fit at all: say how far over it is and name what fits every stage."""
    fit = fits[failed.stage]
    shortest = min(failed.target_seq, SEQ_LADDER[-1])
    need, budget = _gib_pair(fit.at(shortest, 1).total_gib, fit.budget_gib)
    own_targets = {s: _stage_targets(tier, s, getattr(recipe, s))[0] for s in fits}

    def seqs_for(spec: ModelSpec) -> str | None:
        got = {s: f.max_seq(own_targets[s], spec=spec) for s, f in fits.items()}
        # not below the shortest length the planner itself tries: such a model would be refused in turn
        if any(n is None or n < min(own_targets[s], SEQ_LADDER[-1]) for s, n in got.items()):
            return None
        return ", ".join(f"{s}.max_seq_len={n}" for s, n in got.items())

    ideas = []
    smaller = sorted(
        (
            s
            for s in CATALOG.values()
            if s.family == fit.spec.family
            and s.params_b < fit.spec.params_b
            and s.prequantized_4bit == fit.spec.prequantized_4bit
        ),
        key=lambda s: -s.params_b,
    )
    for spec in smaller:  # the largest smaller model that fits, with the longest sequences it allows
        seqs = seqs_for(spec)
        if seqs:
            ideas.append(f"a smaller {spec.family} model: model.name={spec.name} fits ({seqs})")
            break
    return UserError(
        f"{fit.spec.name} does not fit on {device.name} for {failed.stage}: even max_seq_len={shortest} at batch 1 "
        f"needs about {need} GiB, and the budget is {budget} GiB "
        f"({device.usable_vram_gib:.1f} GiB usable minus a {SAFETY_MARGIN_FRACTION:.0%} safety margin).",
        ideas or ["nothing lowvram offers in this family fits: plan for a bigger card with --vram GIB"],
        hint="Planning stopped before loading anything. Use one of the above as an override, "
        "e.g. lowvram plan RECIPE model.name=NAME",
    )


def _check_recipe_values(
    fit: _Fitter, stage: str, seq: int, bs: int, set_seq: bool, set_bs: bool, device: Device
) -> None:
    """The recipe's own max_seq_len / batch_size win, unless they cannot fit: then say what would.

    Suggestions are computed for this card: the largest batch at the recipe's length, and the
    longest sequence at the recipe's batch (or at batch 1), not picked from a fixed list.
    """
    need = fit.at(seq, bs).total_gib
    if need <= fit.budget_gib:
        return
    if fit.max_seq(seq) is None:
        raise _NothingFits(stage, seq)
    ideas = []
    if bs > 1:
        b = fit.largest_batch(seq, bs - 1)
        if b is not None:
            ideas.append(
                f"{stage}.batch_size={b} fits at max_seq_len={seq} (lowvram raises {stage}.grad_accum to "
                f"keep the effective batch)"
            )
    shorter = fit.max_seq(seq - 1, bs)
    if shorter is not None:
        ideas.append(f"{stage}.max_seq_len={shorter} fits at batch_size={bs}")
    elif bs > 1:
        ideas.append(f"{stage}.max_seq_len={fit.max_seq(seq)} fits at batch_size=1")
    named = " with ".join(
        x for x, on in ((f"{stage}.max_seq_len={seq}", set_seq), (f"{stage}.batch_size={bs}", set_bs)) if on
    )
    need_s, budget_s = _gib_pair(need, fit.budget_gib)
    raise UserError(
        f"{named} needs about {need_s} GiB on {device.name}; the budget is {budget_s} GiB "
        f"({device.usable_vram_gib:.1f} GiB usable minus a {SAFETY_MARGIN_FRACTION:.0%} safety margin).",
        ideas,
        hint="Set one of the above, or leave the setting empty so lowvram chooses a value that fits.",
    )


def _memory_modes(
    cfg: StageConfig, tier: Tier, backend: str, device: Device, load_in_4bit: bool = False
) -> tuple[str, str, dict[str, str]]:
    """(grad_ckpt, optim, reasons) for a stage."""
    reasons = {}
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
        ckpt, reasons["grad_ckpt"] = (
            "standard",
            "transformers' standard checkpointing (Unsloth's offload needs Unsloth)",
        )
    if device.kind == "cuda":
        optim, reasons["optim"] = tier.optim, "8-bit AdamW states (bitsandbytes) save 75% of optimizer memory"
    elif load_in_4bit:
        optim, reasons["optim"] = "adamw_8bit", "4-bit on CPU runs the GPU path's QLoRA: bitsandbytes' 8-bit AdamW too"
    else:
        optim, reasons["optim"] = (
            "adamw_torch",
            "full-precision CPU training: plain AdamW (8-bit states matter on GPUs)",
        )
    return ckpt, optim, reasons


def _dpo_length_note(dpo_seq: int, sft_seq: int) -> str:
    """Why the DPO length is what it is, true to the numbers (it is not always shorter than SFT's)."""
    if dpo_seq * 2 == sft_seq:
        return " (DPO holds chosen+rejected: half the SFT length)"
    if dpo_seq < sft_seq:
        return f" (DPO holds chosen+rejected: shorter than the SFT length {sft_seq})"
    return " (the same length as SFT)" if dpo_seq == sft_seq else f" (longer than the SFT length {sft_seq})"


def _stage_plan(
    stage: str,
    cfg: StageConfig,
    tier: Tier,
    device: Device,
    ckpt: str,
    optim: str,
    reasons: dict[str, str],
    fit: _Fitter | None,
    lengths=None,
    note: str | None = None,
) -> StagePlan:
    dpo = stage == "dpo"
    if fit is None:  # no VRAM budget (CPU, Apple, or a model whose dimensions are unknown)

        def pick(name, value, default, why):
            if value is not None:
                reasons[name] = "set by the recipe"
                return value
            reasons[name] = why
            return default

        seq = pick(
            "max_seq_len",
            cfg.max_seq_len,
            tier.dpo_max_seq_len if dpo else tier.sft_max_seq_len,
            f"{tier.name} tier default" + (_dpo_length_note(tier.dpo_max_seq_len, tier.sft_max_seq_len) if dpo else ""),
        )
        bs = pick(
            "batch_size", cfg.batch_size, tier.dpo_batch_size if dpo else tier.batch_size, f"{tier.name} tier default"
        )
        ga = pick(
            "grad_accum", cfg.grad_accum, tier.dpo_grad_accum if dpo else tier.grad_accum, f"{tier.name} tier default"
        )
        return StagePlan(stage, seq, bs, ga, ckpt, optim, reasons)

    target_seq, target_eff = _stage_targets(tier, stage, cfg)
    what = {"sft": "SFT", "dpo": "DPO (chosen+rejected and a reference forward)", "orpo": "ORPO (chosen+rejected)"}[
        fit.stage
    ]
    if cfg.max_seq_len is not None:
        seq, reasons["max_seq_len"] = cfg.max_seq_len, "set by the recipe"
    else:
        seq = fit.longest_seq(target_seq)
        if seq is None:
            raise _NothingFits(stage, target_seq)
        why = f"{tier.name} tier target {target_seq}" + (
            _dpo_length_note(target_seq, tier.sft_max_seq_len) if dpo else ""
        )
        if seq == target_seq:
            reasons["max_seq_len"] = f"{why}; fits at batch 1 ({fit.at(seq, 1).total_gib:.1f} GiB)"
        else:
            reasons["max_seq_len"] = (
                f"{why} would need {fit.at(target_seq, 1).total_gib:.1f} GiB at batch 1; "
                f"{seq} is the longest of {', '.join(map(str, SEQ_LADDER))} that fits"
            )
    if cfg.batch_size is not None:
        bs, reasons["batch_size"] = cfg.batch_size, "set by the recipe"
    else:
        bs = fit.largest_batch(seq, target_eff) or 1
        reasons["batch_size"] = (
            f"largest power of two up to the effective batch {target_eff} that fits {what} at seq {seq}"
        )
    _check_recipe_values(fit, stage, seq, bs, cfg.max_seq_len is not None, cfg.batch_size is not None, device)
    if cfg.grad_accum is not None:
        ga, reasons["grad_accum"] = cfg.grad_accum, "set by the recipe"
    else:
        ga = max(1, math.ceil(target_eff / bs))
        reasons["grad_accum"] = f"keeps the effective batch at {target_eff} (batch {bs} x {ga})"
    est = fit.at(seq, bs)
    reasons["memory"] = f"estimated peak {est.total_gib:.1f} GiB of a {fit.budget_gib:.1f} GiB budget"
    if lengths is not None:
        worst = min(seq, lengths.longest)
        reasons["lengths"] = (
            f"{lengths.summary()} ({lengths.counted_with}); the worst batch this data forms is "
            f"{bs} x {worst:,} tokens" + (" after truncation" if lengths.longest > seq else "")
        )
    elif note:
        reasons["lengths"] = note
    return StagePlan(
        stage,
        seq,
        bs,
        ga,
        ckpt,
        optim,
        reasons,
        est,
        round(fit.budget_gib, 3),
        lengths.to_dict() if lengths is not None else None,
    )


# TRL's KTOTrainer refuses a per-device batch below 2: its KL reference point is estimated from the
# mismatched completions within a batch. recipe.py rejects dpo.batch_size=1 with method kto.
KTO_MIN_BATCH = 2


def _kto_min_batch(sp: StagePlan, cfg: StageConfig, fit: _Fitter | None) -> StagePlan:
    """KTO: raise a planned per-device batch of 1 to KTO_MIN_BATCH (shortening the sequence if it must)."""
    if sp.batch_size >= KTO_MIN_BATCH:
        return sp
    reasons, seq = dict(sp.reasons), sp.max_seq_len
    if fit is not None and not fit.fits(seq, KTO_MIN_BATCH):
        shorter = None if cfg.max_seq_len is not None else fit.longest_seq(seq, KTO_MIN_BATCH)
        if shorter is None:
            raise _NothingFits(sp.stage, seq)
        reasons["max_seq_len"] = f"{seq} fits only at batch 1; {shorter} is the longest that fits KTO's batch of 2"
        seq = shorter
    reasons["batch_size"] = (
        f"{KTO_MIN_BATCH}: KTO needs at least {KTO_MIN_BATCH} per device (TRL estimates its "
        f"KL reference point within a batch), not the 1 planned otherwise"
    )
    ga = sp.grad_accum
    if cfg.grad_accum is None:
        ga = max(1, math.ceil(sp.effective_batch / KTO_MIN_BATCH))
        reasons["grad_accum"] = f"keeps the effective batch at {sp.effective_batch} (batch {KTO_MIN_BATCH} x {ga})"
    est = fit.at(seq, KTO_MIN_BATCH) if fit is not None else None
    if est is not None:
        reasons["memory"] = f"estimated peak {est.total_gib:.1f} GiB of a {fit.budget_gib:.1f} GiB budget"
    return dataclasses.replace(
        sp, max_seq_len=seq, batch_size=KTO_MIN_BATCH, grad_accum=ga, reasons=reasons, estimate=est
    )


def make_plan(
    recipe: Recipe, device: Device, data_lengths: dict | None = None, data_notes: dict[str, str] | None = None
) -> Plan:
    """Resolve every automatic setting of a recipe for a device; refuse what cannot work.

    `data_lengths` maps a stage to the token lengths of its data (lowvram.plan.lengths.DataLengths):
    the stage is then planned for the worst batch that data forms, not for max_seq_len.
    `data_notes` says, per stage, why it was planned without them. lowvram.plan.lengths.plan_with_data
    fills both.
    """
    data_lengths, data_notes = data_lengths or {}, data_notes or {}
    tier, tier_reason = select_tier(device, recipe.model.tier)
    backend, backend_reason = choose_backend(recipe.model.backend, device)
    dtype, dtype_reason = device.dtype_choice()
    model, model_reason = choose_model(recipe, tier, device, backend=backend, dtype=dtype)
    spec: ModelSpec | None = get_spec(model)
    if recipe.model.load_in_4bit is not None:
        q4, q4_reason = recipe.model.load_in_4bit, "set by the recipe (model.load_in_4bit)"
    elif device.kind == "cuda" and not model.startswith(BUILTIN_PREFIX):
        q4, q4_reason = True, "QLoRA: 4-bit base weights on CUDA"
    else:
        q4, q4_reason = (
            False,
            (
                "no CUDA GPU: full precision (model.load_in_4bit=true runs NF4 on CPU, slowly)"
                if device.kind != "cuda"
                else "tiny built-in model"
            ),
        )
    prequantized = spec is not None and spec.prequantized_4bit
    if device.kind == "mps" and (q4 or prequantized):
        raise UserError(
            f"bitsandbytes 4-bit ({model}) runs on CUDA GPUs and CPUs, not on Apple GPUs.",
            hint="Use a 16-bit model with model.name=..., or model.load_in_4bit=false.",
        )
    if prequantized and not q4:  # its saved 4-bit weights would load anyway, against a 16-bit plan
        alt = spec.base_16bit if spec.base_16bit else None
        why = "on a CPU lowvram trains in full precision by default" if device.kind == "cpu" else q4_reason
        raise UserError(
            f"{model} is stored in bitsandbytes 4-bit; this plan loads the base in 16-bit: {why}.",
            hint=(f"Use the 16-bit original: model.name={alt}, or " if alt else "")
            + "set model.load_in_4bit=true to train the 4-bit checkpoint"
            + (" on the CPU (real, but slow)." if device.kind == "cpu" else "."),
        )
    if device.kind == "cpu" and q4:
        q4_reason += (
            "; bitsandbytes dequantizes every 4-bit weight for each matmul on the CPU: slower than "
            "full precision, for checking the GPU path or saving RAM"
        )
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
    budgeted = device.kind == "cuda" and spec is not None
    if device.kind != "cuda":
        reasons["memory"] = "no CUDA card, so no VRAM budget to check the settings against"
    elif spec is None:
        reasons["memory"] = (
            f"dimensions of {model} unknown (not in lowvram's catalog, no local config.json): "
            "the tier's defaults, unchecked"
        )
    targets, note = _targets(recipe)
    if note and budgeted:
        reasons["lora"] += f"; {note}"
    modes, fits = {}, {}
    for s in recipe.stages():
        modes[s] = _memory_modes(getattr(recipe, s), tier, backend, device, q4)
        if budgeted:
            est_stage = _est_stage(recipe, s)
            longest = data_lengths[s].longest if s in data_lengths else None
            fits[s] = _Fitter(
                spec,
                est_stage,
                r,
                targets,
                modes[s][0],
                modes[s][1],
                dtype,
                backend,
                q4,
                device.usable_vram_gib * (1 - SAFETY_MARGIN_FRACTION),
                device.usable_vram_gib,
                longest,
            )
    try:
        stages = {
            s: _stage_plan(
                s,
                getattr(recipe, s),
                tier,
                device,
                *modes[s],
                fits.get(s),
                data_lengths.get(s) if s in fits else None,
                data_notes.get(s),
            )
            for s in recipe.stages()
        }
        if "dpo" in stages and recipe.dpo.method == "kto":
            stages["dpo"] = _kto_min_batch(stages["dpo"], recipe.dpo, fits.get("dpo"))
    except _NothingFits as failed:
        raise _refuse(recipe, fits, failed, tier, device) from None
    return Plan(device, tier.name, model, backend, dtype, q4, r, alpha, stages, reasons)


def tier_table(cards: dict[str, str] | None = None) -> list[dict]:
    """The settings each GPU tier gets, per model family, as planned for the tier's card.

    By default the tier's card is a card of exactly the tier's size (24, 16, 12, 8 GiB), the one its
    default models are computed for; `cards` maps a tier to a known card instead (e.g. {"16gb": "t4"}).
    The tier table is the planner's output: `scripts/tier_table.py` prints it for the README.
    """

    rows = []
    for tier in GPU_TIERS:
        if cards and tier.name in cards:
            device = known_card(cards[tier.name])
        else:
            device = simulated_device(tier.vram_gib, name=f"{tier.vram_gib:g} GiB card")
        for family in sorted(f for f in tier.models if f != "tiny"):
            plan = make_plan(Recipe(model=ModelConfig(family=family, tier=tier.name)), device)
            for sp in plan.stages.values():
                rows.append(
                    {
                        "tier": tier.name,
                        "card": device.name,
                        "family": family,
                        "model": plan.model,
                        "params_b": get_spec(plan.model).params_b,
                        "stage": sp.stage,
                        "max_seq_len": sp.max_seq_len,
                        "batch_size": sp.batch_size,
                        "grad_accum": sp.grad_accum,
                        "lora_r": plan.lora_r,
                        "estimate_gib": round(sp.estimate.total_gib, 2),
                        "budget_gib": round(sp.budget_gib, 2),
                    }
                )
    return rows
