"""The run directory's layout (lowvram/rundir.py): one refusal for a folder lowvram did not write, the run's own
recipe read back with overrides, and the trained base read from plan.json and base.json."""

from __future__ import annotations

import json

import pytest

from lowvram import rundir
from lowvram.cli import main
from lowvram.errors import UserError
from lowvram.recipe import dump_recipe, load_recipe


def test_a_folder_without_recipe_yaml_is_refused_once_by_every_command(tmp_path, capsys):
    with pytest.raises(UserError) as e:
        rundir.read_recipe(tmp_path)
    assert e.value.message == f"{tmp_path} is not a lowvram run directory (no recipe.yaml)."
    for command in (["report", str(tmp_path)], ["run", "--resume", str(tmp_path)]):
        assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("is not a lowvram run directory (no recipe.yaml)") == 2 and "Traceback" not in err


def test_the_runs_recipe_is_read_back_with_overrides(tmp_path):
    recipe, _ = load_recipe("demo")
    rundir.recipe_file(tmp_path).write_text(dump_recipe(recipe))
    again = rundir.read_recipe(tmp_path, ["dpo.beta=0.25"])
    assert again.name == recipe.name and again.dpo.beta == 0.25 and recipe.dpo.beta != 0.25


def test_trained_base_reads_the_plan_and_base_files(tmp_path):
    rundir.plan_file(tmp_path).write_text(json.dumps({"model": "org/m", "dtype": "bf16", "load_in_4bit": True}))
    base = rundir.trained_base(tmp_path)  # a run written before base.json existed: no local path
    assert base == rundir.TrainedBase("org/m", None, "bf16", True)
    rundir.base_file(tmp_path).write_text(json.dumps({"model_path": "/models/m"}))
    assert rundir.trained_base(tmp_path).model_path == "/models/m"


def test_progress_is_a_done_stage_a_checkpoint_or_metrics(tmp_path):
    assert not rundir.has_progress(tmp_path)
    rundir.checkpoints_dir(tmp_path, "sft").joinpath("checkpoint-2").mkdir(parents=True)
    assert rundir.has_progress(tmp_path)
    assert not rundir.is_done(tmp_path, "sft")
    rundir.done_file(tmp_path, "sft").write_text("{}")
    assert rundir.is_done(tmp_path, "sft")
