"""A checkpoint counts only when all its files were written; --resume falls back past broken ones and says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lowvram.checkpoints import MARKER, newest_complete, validate
from lowvram.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    """A finished SFT-only run with real Trainer checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    assert main(["run", "demo", "--run-dir", str(run), "--no-export", "dpo.enabled=false", "sft.max_steps=4",
                 "sft.save_steps=2"]) == 0
    return run


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def test_every_saved_checkpoint_has_a_marker_and_validates(sft_run):
    ckpts = sorted((sft_run / "sft" / "checkpoints").glob("checkpoint-*"))
    assert [p.name for p in ckpts] == ["checkpoint-2", "checkpoint-4"]
    for p in ckpts:
        files = json.loads((p / MARKER).read_text())["files"]
        assert {"trainer_state.json", "optimizer.pt", "adapter_model.safetensors"} <= set(files)
        assert validate(p) is None


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage, why", [
    (lambda c: _truncate(c / "trainer_state.json", 0), "trainer_state.json is empty"),  # disk full
    (lambda c: _truncate(c / "optimizer.pt", 0.5), "optimizer.pt"),
    (lambda c: _truncate(c / "adapter_model.safetensors", 0.5), "adapter_model.safetensors"),
    (lambda c: _truncate(c / "rng_state.pth", 0.3), "rng_state.pth"),
    (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),  # listed in the marker
    (lambda c: ((c / MARKER).unlink(), (c / "optimizer.pt").unlink()), "optimizer.pt is missing"),  # no marker either
])
def test_a_damaged_newest_checkpoint_is_skipped_with_its_reason(sft_run, tmp_path, damage, why):
    ckpt_dir = _copy(sft_run, tmp_path / "run") / "sft" / "checkpoints"
    damage(ckpt_dir / "checkpoint-4")
    good, skipped = newest_complete(ckpt_dir)
    assert good == ckpt_dir / "checkpoint-2"
    assert [p.name for p, _ in skipped] == ["checkpoint-4"] and why in skipped[0][1], skipped


def test_a_checkpoint_without_marker_that_reads_back_whole_is_accepted(sft_run, tmp_path):
    """Written before the marker existed, or killed between the last file and the marker."""
    ckpt_dir = _copy(sft_run, tmp_path / "run") / "sft" / "checkpoints"
    (ckpt_dir / "checkpoint-4" / MARKER).unlink()
    assert newest_complete(ckpt_dir) == (ckpt_dir / "checkpoint-4", [])


def test_resume_skips_a_checkpoint_cut_short_by_a_full_disk_and_logs_each_step_once(sft_run, tmp_path, capsys):
    run = _copy(sft_run, tmp_path / "run")
    # the state after a crash at checkpoint 4: its trainer_state.json was left at 0 bytes, the stage is unfinished
    (run / "sft" / "DONE").unlink()
    shutil.rmtree(run / "sft" / "adapter")
    (run / "sft" / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_bytes(b"")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"stage": "sft", "step": 5, "lo')  # a line cut short by the crash
    rc = main(["run", "--resume", str(run), "--no-export", "sft.max_steps=6"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "skipped checkpoint-4: trainer_state.json is empty (0 bytes)" in out
    assert "resuming from checkpoint-2" in out
    assert (run / "sft" / "checkpoints" / "incomplete-checkpoint-4").is_dir()  # set aside, not deleted
    assert json.loads((run / "sft" / "DONE").read_text())["global_step"] == 6
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r.get("stage") == "sft" and "loss" in r and "eval" not in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # 3 and 4 were trained twice, logged once
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sft"]["steps"] == 6
