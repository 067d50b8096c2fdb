"""When the card disagrees with the plan: step down on CUDA out-of-memory, resume, and measure the peak.

    adapter_dir = run_with_step_down(ctx, lambda c: run_sft(c, data))

The plan's settings come from an estimate; a card can still run out of memory (another process,
a driver that reserves more, a batch the estimate did not foresee). When a stage raises
torch.cuda.OutOfMemoryError (train.py turns it into errors.OutOfMemory), the stage is run again
from its last checkpoint with smaller settings, and what changed is printed with why:
1. the per-device batch is halved and gradient accumulation doubled: the same effective batch,
   so the optimizer sees the same updates;
2. at the smallest batch, the sequence length is halved (longer examples are truncated).
Each step is appended to RUN/<stage>/step_down.jsonl. `<stage>.oom_step_down=false` in the recipe
turns this off: the first out-of-memory then stops the run with the settings to lower.

At the end of each stage, the peak the card really reserved (torch.cuda.max_memory_reserved) is
written beside the plan's estimate to RUN/<stage>/memory.json and printed
(`peak 9.1 GiB measured, 9.6 estimated`), so estimates can be checked against real cards.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from collections.abc import Callable
from pathlib import Path

from lowvram.errors import OutOfMemory
from lowvram.plan.catalog import get_spec
from lowvram.plan.memory import GIB, MemoryEstimate, estimate
from lowvram.plan.planner import _est_stage, _targets
from lowvram.train.checkpoints import newest_complete

MIN_SEQ_LEN = 128  # below this, chat examples lose their answers: stop and say so instead
MAX_STEP_DOWNS = 8  # batch 128 -> 1 and a few halvings of the sequence, at most


def _min_batch(ctx) -> int:
    # KTO needs at least two examples per device batch to estimate its reference point.
    return 2 if ctx.stage == "dpo" and ctx.recipe.dpo.method == "kto" else 1


def next_settings(sp, min_batch: int = 1) -> tuple[dict, str] | None:
    """The next smaller settings for a stage plan, and why; None when nothing smaller is left."""
    if sp.batch_size > min_batch:
        bs = max(min_batch, sp.batch_size // 2)
        ga = sp.grad_accum * sp.batch_size // bs
        if bs * ga == sp.batch_size * sp.grad_accum:
            return (
                {"batch_size": bs, "grad_accum": ga},
                f"batch {sp.batch_size} -> {bs} with accumulation {sp.grad_accum} -> {ga} "
                f"(same effective batch {bs * ga})",
            )
    if sp.max_seq_len // 2 >= MIN_SEQ_LEN:
        seq = sp.max_seq_len // 2
        return (
            {"max_seq_len": seq},
            f"max_seq_len {sp.max_seq_len} -> {seq} at batch {sp.batch_size} (longer examples are truncated)",
        )
    return None


def _estimate_for(ctx, sp) -> MemoryEstimate | None:
    """The estimate at a stage plan's settings, computed like the planner's (None without a budget)."""
    if ctx.sp.estimate is None:
        return None

    plan = ctx.plan
    return estimate(
        get_spec(plan.model),
        _est_stage(ctx.recipe, ctx.stage),
        max_seq_len=sp.max_seq_len,
        batch_size=sp.batch_size,
        lora_r=plan.lora_r,
        target_modules=_targets(ctx.recipe)[0],
        grad_ckpt=sp.grad_ckpt,
        optim=sp.optim,
        dtype=plan.dtype,
        backend=plan.backend,
        load_in_4bit=plan.load_in_4bit,
        vram_gib=plan.device.usable_vram_gib,
    )


def _with_settings(ctx, changes: dict, why: str):
    """A copy of the stage context whose plan carries the smaller settings."""
    sp = dataclasses.replace(ctx.sp, **changes, reasons={**ctx.sp.reasons, "step_down": why})
    sp = dataclasses.replace(sp, estimate=_estimate_for(ctx, sp))
    plan = dataclasses.replace(ctx.plan, stages={**ctx.plan.stages, ctx.stage: sp})
    return dataclasses.replace(ctx, plan=plan)


def _cuda():
    try:
        import torch
    except ImportError:  # planning-only installs
        return None
    return torch.cuda if torch.cuda.is_available() else None


def _free_cuda() -> None:
    gc.collect()
    cuda = _cuda()
    if cuda is not None:
        cuda.empty_cache()


def record_peak(ctx, step_downs: int = 0) -> dict:
    """Write RUN/<stage>/memory.json (measured peak beside the estimate) and print the comparison."""
    sp = ctx.sp
    cuda = _cuda()
    measured = cuda.max_memory_reserved() / GIB if cuda is not None else None
    allocated = cuda.max_memory_allocated() / GIB if cuda is not None else None
    est = sp.estimate
    out = {
        "stage": ctx.stage,
        "max_seq_len": sp.max_seq_len,
        "batch_size": sp.batch_size,
        "grad_accum": sp.grad_accum,
        "step_downs": step_downs,
        "measured_peak_reserved_gib": measured,
        "measured_peak_allocated_gib": allocated,
        "estimated_reserved_gib": est.reserved_gib if est else None,
        "estimated_total_gib": est.total_gib if est else None,
        "note": (
            "reserved = torch.cuda.max_memory_reserved(); the estimate's reserved part leaves out the "
            "CUDA context, as that reading does"
            if cuda is not None
            else "no CUDA device: nothing measured"
        ),
    }
    path = Path(ctx.stage_dir) / "memory.json"
    path.write_text(json.dumps(out, indent=2))
    if measured is not None:
        estimated = f", {est.reserved_gib:.1f} estimated" if est else " (no estimate)"
        print(f"[{ctx.stage}] peak {measured:.1f} GiB measured{estimated}", flush=True)
    return out


def _keep_earlier_step_downs(ctx, log: Path):
    """(ctx, steps): a resumed stage keeps the smaller settings an earlier out-of-memory led to.

    Only ever smaller: a setting the new plan already has at or below the logged one stays.
    """
    if not log.is_file():
        return ctx, 0
    entries = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    changes: dict = {}
    for entry in entries:
        changes.update(entry["to"])
    sp = ctx.sp
    keep = {k: v for k, v in changes.items() if k in ("batch_size", "max_seq_len") and v < getattr(sp, k)}
    if "batch_size" in keep:  # the same effective batch, split as the earlier step-down split it
        keep["grad_accum"] = max(1, sp.effective_batch // keep["batch_size"])
    if not keep:
        return ctx, len(entries)
    why = f"an earlier out-of-memory in this run stepped {ctx.stage} down ({log.name}): " + ", ".join(
        f"{k} {getattr(sp, k)} -> {v}" for k, v in keep.items()
    )
    print(f"[{ctx.stage}] keeping smaller settings: {why}", flush=True)
    return _with_settings(ctx, keep, why), len(entries)


def run_with_step_down(ctx, train: Callable) -> Path:
    """Run `train(ctx)`; on CUDA out-of-memory, step the settings down and resume from the checkpoint."""

    log = Path(ctx.stage_dir) / "step_down.jsonl"
    enabled = getattr(getattr(ctx.recipe, ctx.stage), "oom_step_down", True)
    ctx, steps = _keep_earlier_step_downs(ctx, log) if enabled else (ctx, 0)
    while True:
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
        try:
            adapter = train(ctx)
        except OutOfMemory as oom:
            nxt = next_settings(ctx.sp, _min_batch(ctx)) if enabled and steps < MAX_STEP_DOWNS else None
            if nxt is None:
                if enabled:
                    oom.problems.insert(
                        0,
                        f"lowvram already stepped down as far as it goes ({steps} step(s); see {log})"
                        if steps
                        else "nothing smaller to step down to",
                    )
                raise
            changes, why = nxt
        else:
            record_peak(ctx, steps)
            return adapter
        _free_cuda()  # the failed trainer and model are gone with the exception
        steps += 1
        ckpt = newest_complete(Path(ctx.stage_dir) / "checkpoints")[0]
        where = f"resuming from {ckpt.name}" if ckpt else "starting the stage again (no checkpoint yet)"
        print(
            f"[{ctx.stage}] CUDA ran out of memory at batch {ctx.sp.batch_size} x accum {ctx.sp.grad_accum}, "
            f"seq {ctx.sp.max_seq_len}: stepping down, {why}; {where} "
            f"(turn off with {ctx.stage}.oom_step_down=false)",
            flush=True,
        )
        with log.open("a", encoding="utf-8") as fh:
            fh.write(
                json.dumps(
                    {
                        "step": steps,
                        "from": {
                            "batch_size": ctx.sp.batch_size,
                            "grad_accum": ctx.sp.grad_accum,
                            "max_seq_len": ctx.sp.max_seq_len,
                        },
                        "to": changes,
                        "why": why,
                        "resumed_from": ckpt.name if ckpt else None,
                    }
                )
                + "\n"
            )
        ctx = _with_settings(ctx, changes, why)
