"""One process per run directory / export folder: a live holder is named, a dead one's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowvram.cli import main
from lowvram.recipe import dump_recipe, load_recipe
from lowvram.utils.runlock import LOCK_NAME, FolderBusy, folder_lock

HOLD = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from lowvram.utils.runlock import folder_lock\n"
    "with folder_lock(Path(sys.argv[1]), 'run'):\n"
    "    print('locked', flush=True)\n"
    "    time.sleep(600)\n"
)


def _holder(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s lock (it prints 'locked' once it has it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_a_live_holder_is_named_and_a_killed_ones_lock_is_taken_over(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(FolderBusy) as e:
            with folder_lock(tmp_path, "run"):
                pass
        assert f"PID {proc.pid}" in e.value.message and "in use by another lowvram run" in e.value.message
        proc.send_signal(signal.SIGKILL)  # no chance to release anything: the lock file stays behind
        proc.wait()
        assert (tmp_path / LOCK_NAME).is_file()
        with folder_lock(tmp_path, "run") as note:
            assert note and f"PID {proc.pid}" in note and "no longer running" in note
        assert not (tmp_path / LOCK_NAME).exists()  # released: removed
    finally:
        _stop(proc)


def test_a_second_run_on_the_same_directory_stops_before_training(tmp_path, capsys):
    recipe, _ = load_recipe("tiny")
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(dump_recipe(recipe))
    proc = _holder(run)
    try:
        t0 = time.monotonic()
        rc = main(["run", "--resume", str(run), "--no-export"])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert f"PID {proc.pid}" in err and "Traceback" not in err
        assert time.monotonic() - t0 < 60  # refused at once, not after loading data and a model
        assert not (run / "sft").exists() and not (run / "metrics.jsonl").exists()
    finally:
        _stop(proc)


def test_lock_is_reentrant_within_one_process(tmp_path):
    with folder_lock(tmp_path, "run"):
        with folder_lock(tmp_path, "export") as note:  # `lowvram export RUN --out RUN` inside `lowvram run`
            assert note is None
        assert (tmp_path / LOCK_NAME).is_file()
    assert not (tmp_path / LOCK_NAME).exists()


def test_two_processes_racing_for_one_folder_never_both_hold_it(tmp_path):
    """Many short-lived holders at once: the lock file records exactly one owner at any moment."""
    code = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from lowvram.utils.runlock import folder_lock, FolderBusy\n"
        "got = 0\n"
        "for _ in range(40):\n"
        "    try:\n"
        "        with folder_lock(Path(sys.argv[1]), 'run'):\n"
        "            marker = Path(sys.argv[1]) / 'owner'\n"
        "            assert not marker.exists(), 'two holders at once'\n"
        "            marker.write_text(str(os.getpid()))\n"
        "            time.sleep(0.002)\n"
        "            marker.unlink()\n"
        "            got += 1\n"
        "    except FolderBusy:\n"
        "        pass\n"
        "print(got)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, results):
        assert p.returncode == 0, err
    assert sum(int(out) for out, _ in results) > 0
    assert not any(tmp_path.glob(LOCK_NAME))


def test_lock_file_needs_a_writable_folder(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(Exception) as e:
            with folder_lock(tmp_path, "run"):
                pass
        assert "Cannot write in" in str(e.value)
    finally:
        tmp_path.chmod(0o755)
