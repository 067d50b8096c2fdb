"""A checkpoint counts only when all its files were written; --resume falls back past broken ones and says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers.tmpfs import fill, small_tmpfs

from lowvram.cli import main
from lowvram.train.checkpoints import MARKER, newest_complete, validate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    """A finished SFT-only run with real Trainer checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    assert (
        main(
            [
                "run",
                "tiny",
                "--run-dir",
                str(run),
                "--no-export",
                "dpo.enabled=false",
                "sft.max_steps=4",
                "sft.save_steps=2",
            ]
        )
        == 0
    )
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


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda c: _truncate(c / "trainer_state.json", 0), "trainer_state.json is empty"),  # disk full
        (lambda c: _truncate(c / "optimizer.pt", 0.5), "optimizer.pt"),
        (lambda c: _truncate(c / "adapter_model.safetensors", 0.5), "adapter_model.safetensors"),
        (lambda c: _truncate(c / "rng_state.pth", 0.3), "rng_state.pth"),
        (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),  # listed in the marker
        (
            lambda c: ((c / MARKER).unlink(), (c / "optimizer.pt").unlink()),
            "optimizer.pt is missing",
        ),  # no marker either
    ],
)
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


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 MiB filesystem (tmpfs), for filling up; needs root and mount, else the test is skipped."""
    with small_tmpfs(tmp_path / "disk", 64) as mnt:
        yield mnt


def test_disk_full_during_training_says_so_and_resume_continues(tiny_model_dir, small_disk):
    import os
    import signal
    import subprocess
    import sys
    import time

    run = small_disk / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lowvram",
            "run",
            "tiny",
            "--run-dir",
            str(run),
            "--no-export",
            "dpo.enabled=false",
            "sft.epochs=100",
            "sft.save_steps=2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "sft" / "checkpoints" / "checkpoint-2" / MARKER).is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.05)
        filler = fill(small_disk)  # the disk fills up under the running training
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 2, err[-3000:]
    assert "The disk is full" in err and "Traceback" not in err, err[-3000:]
    assert f"lowvram run --resume {run}" in err
    good, _ = newest_complete(run / "sft" / "checkpoints")
    assert good is not None and f"newest complete checkpoint is {good.name}" in err
    os.unlink(filler)  # space freed: resume from the newest complete checkpoint
    step = int(good.name.split("-")[1])
    res = subprocess.run(
        [sys.executable, "-m", "lowvram", "run", "--resume", str(run), "--no-export", f"sft.max_steps={step + 2}"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {good.name}" in res.stdout
    assert json.loads((run / "sft" / "DONE").read_text())["global_step"] == step + 2
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r["step"] for r in rows if r.get("stage") == "sft" and "loss" in r and "eval" not in r]
    assert steps == list(range(1, step + 3))


def test_a_checkpoint_without_a_file_the_stage_requires_is_skipped(sft_run, tmp_path):
    """A file a stage requires beyond the Trainer's own (named by the caller): a kill before it was written leaves
    it out, and the checkpoint is skipped."""
    ckpt_dir = _copy(sft_run, tmp_path / "run") / "sft" / "checkpoints"
    for p in ckpt_dir.glob("checkpoint-*"):
        (p / MARKER).unlink()  # a kill before the marker too: the files read back whole
    good, skipped = newest_complete(ckpt_dir, ("lowvram_turn_rows.safetensors",))
    assert good is None and len(skipped) == 2
    assert "lowvram_turn_rows.safetensors is missing" in skipped[0][1]
    assert newest_complete(ckpt_dir)[0] == ckpt_dir / "checkpoint-4"
