"""`lowvram run`: recipe -> plan -> data check -> SFT -> DPO -> GGUF export, in one run directory.

    lowvram run demo                     # new run in runs/demo-YYYYmmdd-HHMMSS, then its GGUF export
    lowvram run --resume runs/demo-...   # continue after a crash, Ctrl-C or kill -9

Layout of a run directory (export reads it):
    recipe.yaml  plan.json  base.json  tokenizer/  metrics.jsonl  summary.json  plots/
    sft/{checkpoints/,adapter/,DONE}     dpo/{checkpoints/,adapter/,DONE}
A stage with a DONE file is never redone; one without resumes from its newest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lowvram.errors import UserError
from lowvram.hardware import Device, detect_device
from lowvram.lengths import plan_with_data
from lowvram.planner import Plan
from lowvram.recipe import Recipe, apply_overrides, dump_recipe, load_recipe, parse_recipe


def _training_device(vram, gpu) -> Device:
    """The device that will train. --vram/--gpu may only shrink the budget of a real CUDA card."""
    real = detect_device(use_torch=True)
    if vram is None and gpu is None:
        return real
    planned = detect_device(vram_gib=vram, gpu=gpu)
    if real.kind != "cuda":
        raise UserError(
            f"--vram/--gpu plan for {planned.name}, but this machine has no CUDA GPU to train on.",
            hint="Use 'lowvram plan RECIPE --vram GIB' to plan for a card you do not have.",
        )
    if planned.total_vram_gib > real.total_vram_gib:
        raise UserError(f"--vram {planned.total_vram_gib:g} is more than this card's {real.total_vram_gib:.1f} GiB.")
    # --gpu emulates that card, precision included (--gpu t4 on a bigger card trains in fp16)
    cc = planned.compute_capability if gpu else real.compute_capability
    return Device(
        "cuda",
        f"{real.name} (capped at {planned.total_vram_gib:g} GiB)",
        planned.total_vram_gib,
        min(planned.total_vram_gib, real.usable_vram_gib),
        cc,
        "torch",
    )


def _check_libraries(plan: Plan) -> None:
    """Missing GPU libraries are a setup mistake: say so before anything loads."""
    import importlib.util

    needs_bnb = plan.load_in_4bit or any(sp.optim.endswith("8bit") for sp in plan.stages.values())
    if needs_bnb and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            "This plan uses bitsandbytes (4-bit weights / 8-bit AdamW), which is not installed.",
            hint="pip install 'lowvram[gpu]'  (or set model.load_in_4bit=false on a big enough card)",
        )


def new_run_dir(recipe: Recipe) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(recipe.output_dir) / f"{recipe.name}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = Path(f"{base}-{n}")
    return path


def load_stage_data(recipe: Recipe, recipe_dir: Path | None, stages: list[str]) -> dict:
    """Read and validate every stage's data before any model loads."""
    from lowvram.data import load_preference_data, load_sft_data
    from lowvram.data.load import plural

    out = {}
    for stage in stages:
        cfg = getattr(recipe, stage).data
        loader = load_sft_data if stage == "sft" else load_preference_data
        data = loader(cfg, recipe.sample_file(cfg), base_dir=recipe_dir, seed=recipe.seed)
        held = f", {len(data.eval)} held out" if data.eval else ""
        dropped = f", {plural(data.dropped, 'invalid row')} dropped" if data.dropped else ""
        print(
            f"[{stage}] data: {len(data.train)} rows{held}{dropped} from {data.source}"
            f" -- format {data.format}: {data.reason}",
            flush=True,
        )
        out[stage] = data
    return out


def check_writable(folder: Path, what: str) -> None:
    from lowvram.fileio import check_writable as check

    check(folder, what, hint="Choose a writable place (--run-dir DIR, or output_dir=DIR in the recipe).")


def _make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"Cannot create the run directory {run_dir}: {e.strerror or e}.",
            hint="Choose a writable place (--run-dir DIR, or output_dir=DIR in the recipe).",
        ) from None


def _write_run_files(run_dir: Path, recipe: Recipe, plan: Plan, model_path: str) -> None:
    from lowvram.fileio import atomic_write_text
    from lowvram.models import get_spec

    atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
    atomic_write_text(run_dir / "plan.json", json.dumps(plan.to_dict(), indent=2))
    spec = get_spec(plan.model)
    local = Path(model_path).is_dir()
    base = {
        "model": plan.model,
        "model_path": str(Path(model_path).resolve()) if local else None,
        "base_16bit": spec.base_16bit if spec else None,
        "load_in_4bit": plan.load_in_4bit,
    }
    atomic_write_text(run_dir / "base.json", json.dumps(base, indent=2))


def _has_progress(rdir: Path) -> bool:
    """Anything worth keeping: a finished stage, a checkpoint, or logged metrics (say, of a stage that diverged)."""
    metrics = rdir / "metrics.jsonl"
    return (
        any(rdir.glob("*/DONE"))
        or any(rdir.glob("*/checkpoints/checkpoint-*"))
        or (metrics.is_file() and metrics.stat().st_size > 0)
    )


def _run_stages(
    rdir: Path,
    recipe: Recipe,
    plan: Plan,
    todo: list[str],
    model_path: str,
    recipe_dir: Path | None,
    adapter: Path | None,
    datasets: dict,
) -> None:
    from lowvram.train import StageContext, run_stage

    for stage in todo:
        done = rdir / stage / "DONE"
        if done.is_file():
            print(f"[{stage}] already done, skipping", flush=True)
        else:
            t0 = time.monotonic()
            if stage == "dpo" and recipe.pairs.enabled:  # its pairs come from the policy: sample, judge, train
                from lowvram.pairs import run_rounds

                run_rounds(rdir, recipe, plan, model_path, recipe_dir, adapter)
            else:
                ctx = StageContext(rdir, recipe, plan, stage, model_path, recipe_dir, adapter)
                run_stage(ctx, datasets[stage])
            print(f"[{stage}] done in {time.monotonic() - t0:.0f} s; adapter in {rdir / stage / 'adapter'}", flush=True)
        adapter = rdir / stage / "adapter"


def run_pipeline(
    recipe_name: str | None,
    overrides: list[str],
    vram=None,
    gpu=None,
    resume: str | None = None,
    run_dir: str | None = None,
    stages: list[str] | None = None,
    init_adapter: str | None = None,
    export: Callable[[Path, tuple[str, ...] | None], int] | None = None,
) -> int:
    """Train (and export) with the run directory locked: a second process on it stops at once.

    `export`: the export step, called with the finished run directory when the recipe asks for GGUF files,
    and None (the recipe's types) or the recipe's types this machine can write (llamacpp.export_tools); the
    CLI passes one that prints its report; None stops after training.

    Under a launcher (`--gpus N`, `accelerate launch`) every process runs this; only the main one
    locks, prints and writes (lowvram/distributed.py).
    """
    from lowvram import distributed

    with contextlib.ExitStack() as stack:
        distributed.join(stack)
        return _run_pipeline(stack, recipe_name, overrides, vram, gpu, resume, run_dir, stages, init_adapter, export)


def _unsloth_first(recipe: Recipe, device: Device) -> None:
    """Import Unsloth before anything imports transformers, TRL or PEFT when it will train.

    Its patches apply only to what is imported after it, and planning from the data's lengths
    loads the model's tokenizer (transformers) before the first stage starts.
    """
    from lowvram.planner import choose_backend

    if choose_backend(recipe.model.backend, device)[0] == "unsloth":
        from lowvram import unsloth_backend

        unsloth_backend.activate()


def _lock_run_dir(stack: contextlib.ExitStack, rdir: Path) -> None:
    from lowvram.distributed import is_main
    from lowvram.runlock import folder_lock

    if not is_main():  # the main process holds the lock for its group
        return

    note = stack.enter_context(folder_lock(rdir, "run"))
    if note:
        print(f"Note: {note}.", flush=True)


def _run_pipeline(
    stack: contextlib.ExitStack, recipe_name, overrides, vram, gpu, resume, run_dir, stages, init_adapter, export
) -> int:
    from lowvram import distributed
    from lowvram.recipe import read_recipe_file
    from lowvram.report import summary_lines, write_report

    recipe_dir: Path | None
    if resume:
        rdir = Path(resume)
        if not (rdir / "recipe.yaml").is_file():
            raise UserError(
                f"{rdir} is not a lowvram run directory (no recipe.yaml).",
                hint="Pass the folder 'lowvram run' created, e.g. runs/demo-20261122-101500.",
            )
        if recipe_name:
            raise UserError(
                "--resume continues the run's own recipe; do not name another one.",
                hint=f"lowvram run --resume {shlex.quote(str(rdir))} [key=value ...]",
            )
        check_writable(rdir, "run directory")
        _lock_run_dir(stack, rdir)
        data = apply_overrides(read_recipe_file(rdir / "recipe.yaml"), overrides)
        recipe = parse_recipe(data, source=str(rdir / "recipe.yaml"))
        recipe_dir = None
        print(f"Resuming {rdir}", flush=True)
    else:
        if not recipe_name:
            raise UserError("Name a recipe to run.", hint="lowvram run demo   (or 'lowvram recipes' to list them)")
        recipe, path = load_recipe(recipe_name, overrides)
        recipe_dir = path.parent
        rdir = Path(run_dir) if run_dir else Path(distributed.same_on_all(str(new_run_dir(recipe))))
        check_writable(rdir, "run directory")
    todo = stages or recipe.stages()  # `lowvram sft`/`dpo` name their stage; `run` takes the enabled ones
    from lowvram.offline import network_policy

    network = network_policy(recipe, recipe.model.name, todo)  # before any Hugging Face library is imported
    device = _training_device(vram, gpu)
    world = distributed.world_size()
    _unsloth_first(distributed.group_recipe(recipe, world)[0], device)
    if world > 1:  # per card: its share of the global batch, DDP or FSDP (lowvram/distributed.py)
        plan = distributed.plan_per_card(
            recipe, device, recipe_dir, world, distributed.launched_strategy(), launched=True
        )
    else:
        plan = plan_with_data(recipe, device, recipe_dir)  # sized for the data's own lengths when local
    print(f"Plan for {recipe.name} on {device.name}:")
    from lowvram.ui import echo

    echo(plan.lines())
    _check_libraries(plan)
    print(network, flush=True)
    if export and recipe.export.gguf and not stages:
        from lowvram.llamacpp import export_tools

        tools = export_tools()
        if tools.split(recipe.export.gguf)[1]:  # said now, not only after training
            print(tools.plan_line(recipe.export.gguf), flush=True)
    from lowvram.templates import preflight

    preflight(recipe, plan.model, recipe_dir, todo)
    made = ["dpo"] if recipe.pairs.enabled else []  # the pairs stage makes the dpo stage's data
    datasets = load_stage_data(
        recipe, recipe_dir, [s for s in todo if not (rdir / s / "DONE").is_file() and s not in made]
    )

    from lowvram.train import resolve_model_path

    model_path = resolve_model_path(plan.model)
    fresh = not resume and not rdir.exists()
    distributed.wait_for_everyone()  # every process has looked before the main one creates it
    if not resume:
        _make_run_dir(rdir)
        _lock_run_dir(stack, rdir)
        if distributed.is_main():
            _write_run_files(rdir, recipe, plan, model_path)
    elif distributed.is_main():
        from lowvram.fileio import atomic_write_text

        atomic_write_text(rdir / "recipe.yaml", dump_recipe(recipe))
    distributed.wait_for_everyone()
    print(f"Run directory: {rdir}", flush=True)
    adapter = Path(init_adapter) if init_adapter else None
    try:
        _run_stages(rdir, recipe, plan, todo, model_path, recipe_dir, adapter, datasets)
    except BaseException:
        if (
            fresh and distributed.is_main() and not _has_progress(rdir)
        ):  # failed before any checkpoint: leave no empty run behind
            shutil.rmtree(rdir, ignore_errors=True)
            print(f"Removed {rdir}: the run failed before it saved anything.", file=sys.stderr, flush=True)
        raise
    if not distributed.leave():  # the other processes are done; the main one reports and exports alone
        return 0
    summary = write_report(rdir)
    print("\n".join(["", f"Finished {recipe.name}: {rdir}", *summary_lines(summary)]))
    print(f"Plots: {rdir / 'plots'}   Metrics: {rdir / 'metrics.jsonl'}")
    from lowvram.report_html import after_training

    after_training(
        rdir, recipe, plan, model_path
    )  # RUN/rm/ (rm.enabled), RUN/eval/ (lowvram eval) and RUN/report.html (lowvram report)
    if not export or not recipe.export.gguf or stages:
        return 0
    from lowvram.llamacpp import export_tools

    tools = export_tools()
    types, cannot = tools.split(recipe.export.gguf)
    for t in cannot:
        print(f"\nGGUF {t} skipped: {tools.reason(t)}.")
    if not types:
        print(f"Afterwards: lowvram export {shlex.quote(str(rdir))}")
        return 0
    print(f"\nExporting {', '.join(types)} (lowvram export {shlex.quote(str(rdir))})", flush=True)
    code = export(rdir, tuple(types) if cannot else None)  # None: the recipe's types
    from lowvram.report_html import write_html

    write_html(rdir)  # now with the export verification table
    return code
