"""The run directory's layout on disk: where each file `lowvram run` writes lives, and the readers of the small ones.

    RUN/recipe.yaml  plan.json  base.json  tokenizer/  metrics.jsonl  summary.json  plots/  report.html
    RUN/{sft,dpo,rm}/{checkpoints/,adapter/,DONE}   RUN/eval/   RUN/export/

    recipe = read_recipe(run_dir)          # UserError when run_dir is not a lowvram run directory
    base = trained_base(run_dir)           # the base model the adapters were trained on, and how it loads
    if done_file(run_dir, "sft").is_file(): ...

Every module that reads or writes a run directory names its files through here, so the layout is
written down once. A stage with a DONE file is never redone; one without resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lowvram.errors import UserError
from lowvram.recipe import Recipe, apply_overrides, parse_recipe, read_recipe_file
from lowvram.utils.fileio import atomic_write_text

RECIPE = "recipe.yaml"  # the recipe as run, overrides applied (a resume reads it back)
PLAN = "plan.json"  # Plan.to_dict(): the settings and their reasons
BASE = "base.json"  # the base model: name, local path, its 16-bit original, 4-bit or not
TOKENIZER = "tokenizer"  # the tokenizer the adapters were trained with
METRICS = "metrics.jsonl"  # one record per log line, of every stage
SUMMARY = "summary.json"
PLOTS = "plots"
REPORT = "report.html"
EVAL = "eval"  # `lowvram eval`: answers, scores, summary.json
EXPORT = "export"  # `lowvram export`'s default output folder
DONE = "DONE"  # in a stage's folder: written last, when its adapter is saved


def recipe_file(run_dir: Path) -> Path:
    return Path(run_dir) / RECIPE


def plan_file(run_dir: Path) -> Path:
    return Path(run_dir) / PLAN


def base_file(run_dir: Path) -> Path:
    return Path(run_dir) / BASE


def tokenizer_dir(run_dir: Path) -> Path:
    return Path(run_dir) / TOKENIZER


def metrics_file(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS


def supersede_metrics(run_dir: Path, stage: str, resumed_step: int | None) -> int:
    """Drop `stage`'s records after `resumed_step` (all of them when it is None): they are about to be
    trained and logged again. Lines cut short by a kill go too. Returns how many lines were dropped."""
    path = metrics_file(run_dir)
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("stage") == stage:
            step = row.get("step")
            if resumed_step is None or not isinstance(step, int) or step > resumed_step:
                continue
        keep.append(line)
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(x + "\n" for x in keep))
    return len(lines) - len(keep)


def summary_file(run_dir: Path) -> Path:
    return Path(run_dir) / SUMMARY


def plots_dir(run_dir: Path) -> Path:
    return Path(run_dir) / PLOTS


def report_file(run_dir: Path) -> Path:
    return Path(run_dir) / REPORT


def rounds_dir(run_dir: Path) -> Path:
    """RUN/rounds/: each round of sampled pairs (iterated DPO) and their summary.json."""
    return Path(run_dir) / "rounds"


def eval_dir(run_dir: Path) -> Path:
    return Path(run_dir) / EVAL


def export_dir(run_dir: Path) -> Path:
    return Path(run_dir) / EXPORT


def stage_dir(run_dir: Path, stage: str) -> Path:
    """RUN/sft, RUN/dpo or RUN/rm."""
    return Path(run_dir) / stage


def adapter_dir(run_dir: Path, stage: str) -> Path:
    return stage_dir(run_dir, stage) / "adapter"


def checkpoints_dir(run_dir: Path, stage: str) -> Path:
    return stage_dir(run_dir, stage) / "checkpoints"


def done_file(run_dir: Path, stage: str) -> Path:
    return stage_dir(run_dir, stage) / DONE


def is_done(run_dir: Path, stage: str) -> bool:
    return done_file(run_dir, stage).is_file()


def has_progress(run_dir: Path) -> bool:
    """Anything worth keeping: a finished stage, a checkpoint, or logged metrics (say, of a stage that diverged)."""
    run_dir, metrics = Path(run_dir), metrics_file(run_dir)
    return (
        any(run_dir.glob(f"*/{DONE}"))
        or any(run_dir.glob("*/checkpoints/checkpoint-*"))
        or (metrics.is_file() and metrics.stat().st_size > 0)
    )


def require_run_dir(run_dir: Path) -> Path:
    """`run_dir` itself, or the one UserError for a folder `lowvram run` did not write."""
    run_dir = Path(run_dir)
    if not recipe_file(run_dir).is_file():
        raise UserError(
            f"{run_dir} is not a lowvram run directory (no {RECIPE}).",
            hint="Pass the folder 'lowvram run' created, e.g. runs/demo-20261122-101500.",
        )
    return run_dir


def read_recipe(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The run's own recipe (with `overrides` applied, as a resume takes them); checked like any recipe."""
    path = recipe_file(require_run_dir(run_dir))
    return parse_recipe(apply_overrides(read_recipe_file(path), list(overrides)), source=str(path))


def read_plan(run_dir: Path) -> dict:
    """plan.json as written (Plan.to_dict())."""
    return json.loads(plan_file(run_dir).read_text(encoding="utf-8"))


def read_base(run_dir: Path) -> dict:
    """base.json, or {} in a run written before it existed."""
    path = base_file(run_dir)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@dataclass(frozen=True)
class TrainedBase:
    """The base model a run's adapters were trained on, and how it was loaded (from plan.json and base.json)."""

    model: str  # the plan's model: a Hub id, a local path or builtin:NAME
    model_path: str | None  # the local folder it was read from, when it was one
    dtype: str | None  # "bf16", "fp16" or "fp32"
    load_in_4bit: bool


def trained_base(run_dir: Path) -> TrainedBase:
    plan, base = read_plan(run_dir), read_base(run_dir)
    return TrainedBase(plan["model"], base.get("model_path"), plan.get("dtype"), bool(plan.get("load_in_4bit")))
