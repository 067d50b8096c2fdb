"""What every training stage shares: its context, the trainer's arguments, and train_and_save.

    ctx = StageContext(run_dir, recipe, plan, stage="sft"|"dpo"|"rm", model_path)
    args = SFTConfig(**trainer_args(ctx), **eval_args(recipe.sft, eval_ds), ...)
    adapter_dir = train_and_save(ctx, trainer, model, tok)   # RUN/<stage>/{adapter,DONE,eval_*.json}

train_and_save resumes from the newest complete checkpoint, evaluates before and after, stops on
NaN/inf or a Ctrl-C with the command that resumes, and writes the adapter last of all. The SFT and
preference stages (train.py) and the reward model (reward.py) all go through it.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

from lowvram import rundir
from lowvram.errors import Interrupted, OutOfMemory
from lowvram.model.adapters import restore_policy, save_policy
from lowvram.model.turn_tokens import restore_rows, save_rows, trains_rows
from lowvram.plan.planner import Plan, StagePlan
from lowvram.recipe import Recipe
from lowvram.train.callbacks import graceful_interrupt, interrupt_requested
from lowvram.train.checkpoints import checkpoint_step, completion_callback, newest_complete, set_aside
from lowvram.train.guards import divergence_error, finite_callback, nonfinite_parameters
from lowvram.utils import ui
from lowvram.utils.dist import is_main, wait_for_everyone, world_size
from lowvram.utils.fileio import atomic_write_text


@dataclass
class StageContext:
    run_dir: Path
    recipe: Recipe
    plan: Plan
    stage: str  # "sft" or "dpo"
    model_path: str  # resolved base model (local path or hub id)
    recipe_dir: Path | None = None
    init_adapter: Path | None = None  # adapter to continue (DPO after SFT, or --from)

    @property
    def stage_dir(self) -> Path:  # every path of a stage derives from this (a pairs round overrides it)
        return rundir.stage_dir(self.run_dir, self.stage)

    @property
    def sp(self) -> StagePlan:
        return self.plan.stages[self.stage]


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (every file written and readable; see lowvram.train.checkpoints)."""
    return newest_complete(ckpt_dir)[0]


def _resume_point(ctx: StageContext, required: tuple[str, ...] = ()) -> Path | None:
    """The checkpoint to resume from; newer incomplete ones are named, with why, and set aside."""
    wait_for_everyone()
    if not is_main():  # the main process sets aside and trims; the others then read what it left
        wait_for_everyone()
        return newest_complete(ctx.stage_dir / "checkpoints", required)[0]
    try:
        return _main_resume_point(ctx, required)
    finally:
        wait_for_everyone()


def _main_resume_point(ctx: StageContext, required: tuple[str, ...]) -> Path | None:
    resume_from, skipped = newest_complete(ctx.stage_dir / "checkpoints", required)
    for path, why in skipped:
        moved = set_aside(path)
        print(
            f"[{ctx.stage}] skipped {path.name}: {why}; it is incomplete (moved to {moved.name}, "
            "delete it to free the space)",
            flush=True,
        )
    # the steps after the checkpoint are trained again: their old metrics lines would be logged twice
    rundir.supersede_metrics(ctx.run_dir, ctx.stage, checkpoint_step(resume_from) if resume_from else None)
    return resume_from


def resume_cmd(ctx: StageContext, *overrides: str) -> str:
    group = ["--gpus", str(world_size())] if world_size() > 1 else []  # the same number of processes
    return shlex.join(["lowvram", "run", "--resume", str(ctx.run_dir), *group, *overrides])


def trainer_args(ctx: StageContext) -> dict:
    cfg = getattr(ctx.recipe, ctx.stage)
    sp = ctx.sp
    cuda = ctx.plan.device.kind == "cuda"
    return dict(
        output_dir=str(ctx.stage_dir / "checkpoints"),
        per_device_train_batch_size=sp.batch_size,
        per_device_eval_batch_size=sp.batch_size,
        gradient_accumulation_steps=sp.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=2,
        optim=sp.optim,
        bf16=ctx.plan.dtype == "bf16",
        fp16=ctx.plan.dtype == "fp16",
        gradient_checkpointing=sp.grad_ckpt == "standard" and ctx.plan.backend == "hf" and not ctx.plan.load_in_4bit,
        report_to="none",
        disable_tqdm=True,
        seed=ctx.recipe.seed,
        data_seed=ctx.recipe.seed,
        use_cpu=not cuda and ctx.plan.device.kind != "mps",
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # LoRA: every trainable weight is used in each forward
        save_only_model=False,
    )


def eval_args(cfg, eval_ds) -> dict:
    """Evaluate every eval_steps when asked; otherwise only before and after training (see train_and_save)."""
    periodic = eval_ds is not None and cfg.eval_steps is not None
    return {"eval_strategy": "steps" if periodic else "no", "eval_steps": cfg.eval_steps}


def to_datasets(rows_train, rows_eval):
    from datasets import Dataset

    train = Dataset.from_list(rows_train)
    evald = Dataset.from_list(rows_eval) if rows_eval else None
    return train, evald


def quiet_trainer(trainer) -> None:
    """Our callback prints progress; drop the Trainer's raw dict printer."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def _evaluate(trainer, ctx: StageContext, when: str) -> dict:
    if trainer.eval_dataset is None:
        return {}
    metrics = trainer.evaluate(metric_key_prefix=f"eval_{when}")
    out = {}
    for key, value in metrics.items():  # TRL logs its own metrics as eval_*, the Trainer as eval_<when>_*
        for prefix in (f"eval_{when}_", "eval_"):
            if key.startswith(prefix):
                out[key[len(prefix) :]] = value
                break
    if trainer.is_world_process_zero():
        with rundir.metrics_file(ctx.run_dir).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"stage": ctx.stage, "eval": when, "step": trainer.state.global_step, **out}) + "\n")
    return out


def oom_message(ctx: StageContext) -> OutOfMemory:
    sp = ctx.sp
    st = ctx.stage
    floor = 2 if st == "dpo" and ctx.recipe.dpo.method == "kto" else 1  # KTO needs 2 per device
    if sp.batch_size > floor:
        new_bs = max(floor, sp.batch_size // 2)
        new_ga = sp.grad_accum * sp.batch_size // new_bs
        fix = (
            f"Lower {st}.batch_size to {new_bs} with {st}.grad_accum={new_ga} (same effective batch "
            f"{sp.effective_batch})"
        )
        overrides = f"{st}.batch_size={new_bs} {st}.grad_accum={new_ga}"
    else:
        new_seq = max(128, sp.max_seq_len // 2)
        fix = f"Lower {st}.max_seq_len from {sp.max_seq_len} to {new_seq} (longer examples are truncated)"
        overrides = f"{st}.max_seq_len={new_seq}"
    return OutOfMemory(
        f"CUDA ran out of memory in {st} at batch {sp.batch_size}, sequence length {sp.max_seq_len}.",
        [fix + "."],
        hint=f"Resume from the last checkpoint with: {resume_cmd(ctx, *overrides.split())}",
    )


def train_and_save(ctx: StageContext, trainer, model, tok) -> Path:
    import torch

    guard = finite_callback(fp16=ctx.plan.dtype == "fp16")
    rows = trains_rows(model)  # untrained turn tokens: their rows train with the adapter (model/turn_tokens.py)
    trainer.add_callback(completion_callback(save_extra=save_rows if rows else None))
    trainer.add_callback(guard)  # last: it sees the save decision of every other callback
    resume_from = _resume_point(ctx)
    if resume_from is not None:
        # the Trainer restores the optimizer and step; under transformers 5.17 not the policy adapter of a
        # checkpoint that also holds DPO's ref/ adapter (lowvram.model.adapters), so load it here under every version
        restore_policy(model, resume_from)
        if rows:  # written into the checkpoint's adapter by completion_callback, outside PEFT's state dict
            print(
                f"[{ctx.stage}] turn-token rows {restore_rows(model, resume_from)} restored from {resume_from.name}",
                flush=True,
            )
        print(f"[{ctx.stage}] resuming from {resume_from.name}", flush=True)
    elif trainer.eval_dataset is not None:
        before = _evaluate(trainer, ctx, "before")
        if before and trainer.is_world_process_zero():
            atomic_write_text(ctx.stage_dir / "eval_before.json", json.dumps(before, indent=2))
    try:
        with graceful_interrupt():
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.cuda.OutOfMemoryError:
        raise oom_message(ctx) from None
    except KeyboardInterrupt:  # the second Ctrl-C: no checkpoint of this step; say where the last one is
        ckpt = latest_checkpoint(ctx.stage_dir / "checkpoints")
        where = (
            f"The newest complete checkpoint is {ckpt} (step {ckpt.name.split('-')[-1]}); later steps are lost."
            if ckpt
            else f"No checkpoint was saved yet: resuming starts {ctx.stage} again."
        )
        raise Interrupted(
            f"Stopped {ctx.stage} at once at step {trainer.state.global_step}. {where}",
            hint=f"Resume with: {resume_cmd(ctx)}",
        ) from None
    finally:
        ui.close_progress()  # a bar left live by an exception would keep the cursor hidden and stdout redirected
    if guard.problem:
        raise divergence_error(ctx.stage, guard.problem, ctx.run_dir, ctx.recipe, guard.step)
    if interrupt_requested():
        raise Interrupted(
            f"Stopped {ctx.stage} at step {trainer.state.global_step}; a checkpoint was saved.",
            hint=f"Resume with: {resume_cmd(ctx)}",
        )
    stats = {
        "global_step": trainer.state.global_step,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_loss": result.metrics.get("train_loss"),
    }
    bad = nonfinite_parameters(model)
    if bad or not math.isfinite(stats["train_loss"] or 0.0):
        what = f"non-finite weights in {', '.join(bad[:3])}" if bad else f"the training loss is {stats['train_loss']}"
        raise divergence_error(ctx.stage, what, ctx.run_dir, ctx.recipe, trainer.state.global_step)
    after = _evaluate(trainer, ctx, "after")
    adapter_dir = ctx.stage_dir / "adapter"
    # FSDP: each process holds a shard; gathering the full weights takes every process (not run on a GPU yet)
    full = trainer.accelerator.get_state_dict(trainer.model) if getattr(trainer, "is_fsdp_enabled", False) else None
    if is_main():  # one writer; the group's processes hold the same weights
        if after:
            atomic_write_text(ctx.stage_dir / "eval_after.json", json.dumps(after, indent=2))
        save_policy(model, adapter_dir, full)
        save_rows(model, adapter_dir)  # trained turn-token rows, if any: into the adapter, as PEFT trainable tokens
        tok.save_pretrained(str(rundir.tokenizer_dir(ctx.run_dir)))
        atomic_write_text(ctx.stage_dir / "train_stats.json", json.dumps(stats, indent=2))
        atomic_write_text(ctx.stage_dir / "DONE", json.dumps(stats))  # last: the stage counts as done only now
    wait_for_everyone()  # the next stage, in every process, loads this adapter
    return adapter_dir
