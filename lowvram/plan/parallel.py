"""The plan per card when several processes train (`--gpus N`, `accelerate launch`): each process gets its
share of the global effective batch (accumulation divided across processes), DDP or FSDP chosen by whether
one card holds the model, and a refusal with the reason where neither fits.

    plan = plan_per_card(recipe, device, recipe_dir, world=2)        # `lowvram plan demo --gpus 2`

The launch itself is lowvram/launch.py's; the process group's helpers are lowvram/utils/dist.py's.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from lowvram.errors import UserError
from lowvram.plan.lengths import plan_with_data

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed")

UNSLOTH_NOTE = (
    "several processes train with transformers+PEFT: Unsloth documents multi-GPU only as a manual "
    "DDP setup under `accelerate launch` (official support announced as coming) and has no FSDP "
    "sharding, so lowvram does not run it in a process group"
)


def group_recipe(recipe, world: int):
    """(recipe, note): multi-process training uses the transformers+PEFT backend (see UNSLOTH_NOTE)."""
    if world <= 1:
        return recipe, None
    if recipe.model.backend == "unsloth":
        raise UserError(
            f"model.backend is 'unsloth', but {world} processes train with transformers+PEFT.",
            [UNSLOTH_NOTE],
            hint="Set model.backend=auto (or hf), or train on one card without --gpus.",
        )
    if recipe.model.backend == "hf":
        return recipe, None
    model = dataclasses.replace(recipe.model, backend="hf")
    return dataclasses.replace(recipe, model=model), UNSLOTH_NOTE


def split_batch(sp, world: int, min_batch: int = 1):
    """A stage's plan for one of `world` processes: the global effective batch kept, accumulation divided.

    The one-card plan's batch per step (batch_size x grad_accum) is the global target; each process
    keeps at most its one-card micro-batch (memory only goes down) and accumulates less.
    """
    target = sp.batch_size * sp.grad_accum
    batch = max(min_batch, min(sp.batch_size, target // world or 1))
    accum = max(1, round(target / (batch * world)))
    total = batch * accum * world
    why = (
        f"global effective batch {total} = {batch} per card x accumulation {accum} x {world} processes"
        f" (one card: {sp.batch_size} x {sp.grad_accum})"
    )
    if total != target:
        why = (
            f"global effective batch {total}, not the recipe's {target}: {target} does not split evenly over "
            f"{world} processes; {batch} per card x accumulation {accum} x {world}"
        )
    reasons = {**sp.reasons, "processes": why}
    return dataclasses.replace(sp, batch_size=batch, grad_accum=accum, reasons=reasons)


def _weights_gib(plan) -> float | None:
    """The base weights' share of a stage's estimate (what FSDP shards); None without an estimate."""
    sizes = [sp.estimate.weights_gib for sp in plan.stages.values() if sp.estimate is not None]
    return max(sizes) if sizes else None


_MODE_TEXT = {
    "ddp": "data parallel: each process trains a full copy of the model on its share of every batch",
    "deepspeed": (
        "DeepSpeed ZeRO-2: optimizer states and gradients sharded (LoRA keeps them small), "
        "so each card is planned like DDP"
    ),
}


def plan_per_card(recipe, device, recipe_dir: Path | None, world: int, strategy: str = "auto", launched: bool = False):
    """The plan for each of `world` processes, one card each; refuses, with the reason, what cannot fit.

    DDP holds the whole model on every card, so a card must fit the one-card plan (at its share of
    the batch). FSDP shards the base weights over the cards: each holds 1/world of them, so a model
    one card cannot hold may fit; `auto` chooses FSDP only then. DeepSpeed ZeRO is planned like DDP
    (ZeRO-2 shards optimizer states and gradients, which LoRA keeps small) and needs `deepspeed`.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"Unknown parallel strategy {strategy!r}.", hint=f"Use one of: {', '.join(STRATEGIES)}.")
    recipe, backend_note = group_recipe(recipe, world)
    if world <= 1:
        return plan_with_data(recipe, device, recipe_dir)
    if strategy == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(
                "--strategy deepspeed needs the deepspeed package, which is not installed.",
                hint="pip install deepspeed  (or use --strategy ddp / fsdp, which need nothing more)",
            )
    mode = "ddp" if strategy == "auto" else strategy
    origin = (
        "as launched by accelerate"
        if launched
        else "one card holds the model"
        if strategy == "auto"
        else "set with --strategy"
    )
    why = f"{_MODE_TEXT.get(mode, '')} ({origin})"
    one_card_refusal = None
    if strategy != "fsdp":
        try:
            plan = plan_with_data(recipe, device, recipe_dir)
        except UserError as e:
            if strategy != "auto" or device.kind != "cuda":
                raise UserError(
                    f"{strategy.upper()} keeps the whole model on each card, and one card cannot hold it: {e.message}",
                    e.problems,
                    hint="Use FSDP, which shards the weights over the cards: --strategy fsdp "
                    "(under your own accelerate launch: --use_fsdp).",
                ) from None
            one_card_refusal = e
    card = device
    if strategy == "fsdp" or one_card_refusal is not None:
        plan, why, card = _fsdp_plan(recipe, device, recipe_dir, world, one_card_refusal)
        mode = "fsdp"
    floor = 2 if "dpo" in plan.stages and recipe.dpo.method == "kto" else 1
    split = {name: split_batch(sp, world, floor if name == "dpo" else 1) for name, sp in plan.stages.items()}
    plan = _at_card_batch(recipe, card, recipe_dir, plan, split)
    reasons = {**plan.reasons, "parallel": why}
    if backend_note:  # the recipe left the backend to lowvram: transformers+PEFT, and why
        reasons["backend"] = f"transformers+PEFT: {backend_note}"
    return dataclasses.replace(plan, reasons=reasons, processes=world, parallel=mode)


def _fsdp_plan(recipe, device, recipe_dir, world: int, refusal: UserError | None):
    """Plan with the other cards' share of the weights off this card's budget (FSDP full sharding)."""
    if device.kind != "cuda":
        raise UserError(
            "FSDP shards the model over GPUs, and this machine has no CUDA GPU.",
            [
                "accelerate does not apply FSDP to CPU processes: it would train with DDP instead "
                "(tests/test_distributed.py checks this)."
            ],
            hint="Use --strategy ddp (or auto) here; FSDP runs on a machine with CUDA GPUs.",
        )
    big = dataclasses.replace(
        device, total_vram_gib=device.total_vram_gib * 64, usable_vram_gib=device.usable_vram_gib * 64
    )
    try:
        weights = _weights_gib(plan_with_data(recipe, big, recipe_dir))
    except UserError:
        weights = None
    if weights is None:
        raise refusal or UserError("FSDP could not be planned: the model's size is unknown.")
    saved = weights * (world - 1) / world
    shard = dataclasses.replace(device, usable_vram_gib=device.usable_vram_gib + saved)
    try:
        plan = plan_with_data(recipe, shard, recipe_dir)
    except UserError as e:
        raise UserError(
            f"Even sharded over {world} cards (FSDP: {weights / world:.1f} of the {weights:.1f} GiB of "
            f"weights on each), one card cannot hold this training: {e.message}",
            e.problems,
            hint="Use more cards (--gpus), a smaller model, or a shorter max_seq_len.",
        ) from None
    why = (
        f"FSDP: one card cannot hold the model with DDP, so the {weights:.1f} GiB of base weights are sharded: "
        f"{weights / world:.2f} GiB on each of {world} cards; the memory table shows the whole weights and a "
        f"budget raised by the {saved:.2f} GiB held by the other cards"
    )
    return plan, why, shard


def _at_card_batch(recipe, card, recipe_dir, one_card, split: dict):
    """The plan again at each card's share of the batch: its memory estimate is then the card's own, checked
    against the card's budget; the one-card reasons for the sequence length and the batch are kept."""
    stage_cfgs = {
        name: dataclasses.replace(
            getattr(recipe, name), max_seq_len=sp.max_seq_len, batch_size=sp.batch_size, grad_accum=sp.grad_accum
        )
        for name, sp in split.items()
    }
    plan = plan_with_data(dataclasses.replace(recipe, **stage_cfgs), card, recipe_dir)
    stages = {}
    for name, sp in plan.stages.items():
        kept = {
            k: v for k, v in one_card.stages[name].reasons.items() if k in ("max_seq_len", "batch_size", "grad_accum")
        }
        stages[name] = dataclasses.replace(
            sp, reasons={**sp.reasons, **kept, "processes": split[name].reasons["processes"]}
        )
    return dataclasses.replace(plan, stages=stages)
