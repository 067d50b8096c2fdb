"""`lowvram run`: recipe -> plan -> data check -> SFT -> DPO -> reward model, eval, report -> GGUF export,
in one run directory.

    lowvram run demo                     # new run in runs/demo-YYYYmmdd-HHMMSS, then its GGUF export
    lowvram run --resume runs/demo-...   # continue after a crash, Ctrl-C or kill -9

    run_pipeline(RunRequest("demo", ("sft.max_steps=20",), run_dir=Path("runs/x")))   # the same, from Python

The steps, in order: `open_run` (which recipe, which folder; shared with the launcher of `--gpus N`),
`plan_run` (the plan and every check that can refuse before a model loads), the data, `create_run_dir`,
`train_stages`, then in the main process `finish` (summary, reward model, eval, report.html) and the export.
The run directory's layout is lowvram/rundir.py's: a stage with a DONE file is never redone; one without
resumes from its newest checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lowvram import rundir
from lowvram.data import load_preference_data, load_sft_data
from lowvram.data.load import plural
from lowvram.errors import UserError
from lowvram.evaluate import run as evaluate
from lowvram.evaluate.report import summary_lines, write_report
from lowvram.evaluate.report_html import write_html
from lowvram.export.llamacpp import export_tools
from lowvram.model import unsloth_backend
from lowvram.model.tiny import resolve_model_path
from lowvram.offline import network_policy
from lowvram.pairs.build import run_rounds
from lowvram.plan import parallel
from lowvram.plan.catalog import get_spec
from lowvram.plan.hardware import Device, detect_device
from lowvram.plan.lengths import plan_with_data
from lowvram.plan.planner import Plan, choose_backend
from lowvram.plan.preflight import preflight
from lowvram.recipe import Recipe, dump_recipe, load_recipe
from lowvram.train import stage as train
from lowvram.train.reward import run_rm
from lowvram.utils import dist, fileio
from lowvram.utils.runlock import folder_lock
from lowvram.utils.ui import echo

# The export at the end of a run: called with the finished run directory and None (the recipe's GGUF types)
# or the recipe's types this machine can write; the command line passes one that prints its report.
ExportStep = Callable[[Path, tuple[str, ...] | None], int]


@dataclass(frozen=True)
class RunRequest:
    """What `lowvram run` (or `lowvram sft`/`dpo`) was asked to do; built by the command line."""

    recipe: str | None = None  # a shipped recipe's name or a recipe .yaml; None with `resume`
    overrides: tuple[str, ...] = ()  # dotted key=value
    vram: str | float | None = None  # --vram GIB: a smaller budget on the real CUDA card
    gpu: str | None = None  # --gpu NAME: train as that known card would (budget and precision)
    resume: Path | None = None  # continue this run directory
    run_dir: Path | None = None  # a new run here instead of OUTPUT_DIR/NAME-TIMESTAMP
    stages: tuple[str, ...] | None = None  # `lowvram sft`/`dpo`: that stage alone; None: the recipe's enabled ones
    init_adapter: Path | None = None  # `lowvram dpo --from`: continue this adapter
    export: bool = True  # the recipe's GGUF export at the end (--no-export: False)
    gpus: int | None = None  # --gpus N: that many processes, one card each (lowvram/launch.py)
    strategy: str = "auto"  # --strategy, with --gpus


@dataclass(frozen=True)
class Run:
    """The run a request names: its folder, its recipe and the stages to train."""

    dir: Path
    recipe: Recipe
    recipe_dir: Path | None  # the recipe file's folder, for its relative data paths; None on resume
    stages: tuple[str, ...]
    resumed: bool


def training_device(vram: str | float | None, gpu: str | None) -> Device:
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
    fileio.check_writable(
        folder, what, hint="Choose a writable place (--run-dir DIR, or output_dir=DIR in the recipe)."
    )


def _make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"Cannot create the run directory {run_dir}: {e.strerror or e}.",
            hint="Choose a writable place (--run-dir DIR, or output_dir=DIR in the recipe).",
        ) from None


def _write_run_files(run_dir: Path, recipe: Recipe, plan: Plan, model_path: str) -> None:
    fileio.atomic_write_text(rundir.recipe_file(run_dir), dump_recipe(recipe))
    fileio.atomic_write_text(rundir.plan_file(run_dir), json.dumps(plan.to_dict(), indent=2))
    spec = get_spec(plan.model)
    local = Path(model_path).is_dir()
    base = {
        "model": plan.model,
        "model_path": str(Path(model_path).resolve()) if local else None,
        "base_16bit": spec.base_16bit if spec else None,
        "load_in_4bit": plan.load_in_4bit,
    }
    fileio.atomic_write_text(rundir.base_file(run_dir), json.dumps(base, indent=2))


def _unsloth_first(recipe: Recipe, device: Device) -> None:
    """Import Unsloth before anything imports transformers, TRL or PEFT when it will train.

    Its patches apply only to what is imported after it, and planning from the data's lengths
    loads the model's tokenizer (transformers) before the first stage starts.
    """
    if choose_backend(recipe.model.backend, device)[0] == "unsloth":
        unsloth_backend.activate()


def _lock_run_dir(stack: contextlib.ExitStack, rdir: Path) -> None:
    if not dist.is_main():  # the main process holds the lock for its group
        return
    note = stack.enter_context(folder_lock(rdir, "run"))
    if note:
        print(f"Note: {note}.", flush=True)


def open_run(req: RunRequest) -> Run:
    """The recipe and folder a request names, before anything is created: a resumed run's own recipe (with the
    request's overrides), or the named recipe and a new folder. The launcher of `--gpus N` plans with it too."""
    if req.resume:
        rdir = rundir.require_run_dir(req.resume)
        if req.recipe:
            raise UserError(
                "--resume continues the run's own recipe; do not name another one.",
                hint=f"lowvram run --resume {shlex.quote(str(rdir))} [key=value ...]",
            )
        recipe = rundir.read_recipe(rdir, req.overrides)
        return Run(rdir, recipe, None, req.stages or tuple(recipe.stages()), resumed=True)
    if not req.recipe:
        raise UserError("Name a recipe to run.", hint="lowvram run demo   (or 'lowvram recipes' to list them)")
    recipe, path = load_recipe(req.recipe, list(req.overrides))
    rdir = req.run_dir or Path(dist.same_on_all(str(new_run_dir(recipe))))  # one name for a whole group
    return Run(rdir, recipe, path.parent, req.stages or tuple(recipe.stages()), resumed=False)


def _claim(stack: contextlib.ExitStack, run: Run) -> None:
    """The folder must be writable; a resumed run is locked at once (a new one as soon as it exists)."""
    check_writable(run.dir, "run directory")
    if run.resumed:
        _lock_run_dir(stack, run.dir)
        print(f"Resuming {run.dir}", flush=True)


def plan_run(run: Run, req: RunRequest, exporting: bool) -> Plan:
    """The plan for this card (each card's share in a group), printed with its reasons, then every check that can
    refuse the run before a model loads: libraries, the network policy, the export tools, the chat template."""
    recipe = run.recipe
    network = network_policy(recipe, recipe.model.name, list(run.stages))  # before any Hugging Face library
    device = training_device(req.vram, req.gpu)
    world = dist.world_size()
    _unsloth_first(parallel.group_recipe(recipe, world)[0], device)
    if world > 1:  # per card: its share of the global batch, DDP or FSDP (lowvram/plan/parallel.py)
        plan = parallel.plan_per_card(recipe, device, run.recipe_dir, world, dist.launched_strategy(), launched=True)
    else:
        plan = plan_with_data(recipe, device, run.recipe_dir)  # sized for the data's own lengths when local
    print(f"Plan for {recipe.name} on {device.name}:")
    echo(plan.lines())
    _check_libraries(plan)
    print(network, flush=True)
    if exporting and recipe.export.gguf:
        tools = export_tools()
        if tools.split(recipe.export.gguf)[1]:  # said now, not only after training
            print(tools.plan_line(recipe.export.gguf), flush=True)
    preflight(recipe, plan.model, run.recipe_dir, list(run.stages))
    return plan


def create_run_dir(stack: contextlib.ExitStack, run: Run, plan: Plan, model_path: str) -> bool:
    """A new run's folder, locked, with its recipe, plan and base files; a resumed run's recipe.yaml rewritten
    with its overrides. True when this request created the folder."""
    fresh = not run.resumed and not run.dir.exists()
    dist.wait_for_everyone()  # every process has looked before the main one creates it
    if not run.resumed:
        _make_run_dir(run.dir)
        _lock_run_dir(stack, run.dir)
        if dist.is_main():
            _write_run_files(run.dir, run.recipe, plan, model_path)
    elif dist.is_main():
        fileio.atomic_write_text(rundir.recipe_file(run.dir), dump_recipe(run.recipe))
    dist.wait_for_everyone()
    print(f"Run directory: {run.dir}", flush=True)
    return fresh


@contextlib.contextmanager
def _removed_if_it_fails_empty(run: Run, fresh: bool) -> Iterator[None]:
    """A new run that fails before it saved anything leaves no empty folder behind."""
    try:
        yield
    except BaseException:
        if fresh and dist.is_main() and not rundir.has_progress(run.dir):
            shutil.rmtree(run.dir, ignore_errors=True)
            print(f"Removed {run.dir}: the run failed before it saved anything.", file=sys.stderr, flush=True)
        raise


def train_stages(run: Run, plan: Plan, model_path: str, datasets: dict, adapter: Path | None) -> None:
    """Each stage in order, each continuing the adapter before it; a stage with a DONE file is not redone."""
    for stage in run.stages:
        if rundir.is_done(run.dir, stage):
            print(f"[{stage}] already done, skipping", flush=True)
        else:
            t0 = time.monotonic()
            if stage == "dpo" and run.recipe.pairs.enabled:  # its pairs come from the policy: sample, judge, train
                run_rounds(run.dir, run.recipe, plan, model_path, run.recipe_dir, adapter)
            else:
                ctx = train.StageContext(run.dir, run.recipe, plan, stage, model_path, run.recipe_dir, adapter)
                train.run_stage(ctx, datasets[stage])
            done_in = f"[{stage}] done in {time.monotonic() - t0:.0f} s"
            print(f"{done_in}; adapter in {rundir.adapter_dir(run.dir, stage)}", flush=True)
        adapter = rundir.adapter_dir(run.dir, stage)


def finish(run: Run, plan: Plan, model_path: str) -> None:
    """The summary and plots, then the reward model (rm.enabled), the evaluation (eval.enabled) and report.html."""
    rdir, recipe = run.dir, run.recipe
    print("\n".join(["", f"Finished {recipe.name}: {rdir}", *summary_lines(write_report(rdir))]))
    print(f"Plots: {rundir.plots_dir(rdir)}   Metrics: {rundir.metrics_file(rdir)}")
    tuned = rundir.adapter_dir(rdir, "dpo").is_dir()  # the reward model and the eval look at the preference stage
    if tuned and recipe.rm.enabled and not rundir.is_done(rdir, "rm"):
        run_rm(rdir, recipe, plan, model_path)  # RUN/rm/
    if tuned and recipe.eval.enabled:
        print("", flush=True)
        echo(evaluate.summary_lines(evaluate.evaluate_run(rdir)))  # RUN/eval/, as `lowvram eval`
    page = write_html(rdir)
    print(f"Report: {page.resolve().as_uri()}   (rebuild: lowvram report {rdir})", flush=True)


def export_gguf(run: Run, export: ExportStep) -> int:
    """The recipe's GGUF types this machine can write (the others skipped, with the reason); the export's status."""
    tools = export_tools()
    types, cannot = tools.split(run.recipe.export.gguf)
    for t in cannot:
        print(f"\nGGUF {t} skipped: {tools.reason(t)}.")
    if not types:
        print(f"Afterwards: lowvram export {shlex.quote(str(run.dir))}")
        return 0
    print(f"\nExporting {', '.join(types)} (lowvram export {shlex.quote(str(run.dir))})", flush=True)
    code = export(run.dir, tuple(types) if cannot else None)  # None: the recipe's types
    write_html(run.dir)  # now with the export verification table
    return code


def run_pipeline(req: RunRequest, export: ExportStep | None = None) -> int:
    """Train (then report, and export with `export` when the recipe asks for GGUF files) with the run directory
    locked: a second process on it stops at once. Without `export` (or with req.export False) it stops after
    the report.

    Under a launcher (`--gpus N`, `accelerate launch`) every process runs this; only the main one
    locks, prints and writes (lowvram/utils/dist.py).
    """
    with contextlib.ExitStack() as stack:
        dist.join(stack)
        return _run(stack, req, export if req.export and not req.stages else None)


def _run(stack: contextlib.ExitStack, req: RunRequest, export: ExportStep | None) -> int:
    run = open_run(req)
    _claim(stack, run)
    plan = plan_run(run, req, exporting=export is not None)
    made = {"dpo"} if run.recipe.pairs.enabled else set()  # the pairs stage makes the dpo stage's data
    todo = [s for s in run.stages if not rundir.is_done(run.dir, s) and s not in made]
    datasets = load_stage_data(run.recipe, run.recipe_dir, todo)
    model_path = resolve_model_path(plan.model)
    fresh = create_run_dir(stack, run, plan, model_path)
    with _removed_if_it_fails_empty(run, fresh):
        train_stages(run, plan, model_path, datasets, req.init_adapter)
    if not dist.leave():  # the other processes are done; the main one reports and exports alone
        return 0
    finish(run, plan, model_path)
    if export is None or not run.recipe.export.gguf:
        return 0
    return export_gguf(run, export)
