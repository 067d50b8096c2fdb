"""lowvram.wheelcache: a package installed from a wheel cache folder keyed by Python and platform, in the background.

The wheel here is a real (small, pure-Python) wheel file, installed by pip into a fresh environment
(tests/venvs.py); llama-cpp-python itself goes through this path in tests/test_notebook.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
from helpers.venvs import venv_without

from lowvram import wheelcache

ROOT = Path(__file__).resolve().parents[1]


def _wheel(folder: Path, name: str = "lowvram_probe", version: str = "1.0") -> Path:
    """A minimal valid wheel holding one module, `name`, whose VERSION is `version`."""
    files = {
        f"{name}.py": f"VERSION = {version!r}\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = f"{name}-{version}.dist-info/RECORD"
    lines = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        lines.append(f"{path},sha256={digest},{len(text.encode())}")
    lines.append(f"{record},,")
    folder.mkdir(parents=True, exist_ok=True)
    whl = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for path, text in {**files, record: "\n".join(lines) + "\n"}.items():
            z.writestr(path, text)
    return whl


def test_cache_key_names_this_python_and_platform():
    key = wheelcache.cache_key()
    assert key.startswith(f"cp{sys.version_info.major}{sys.version_info.minor}-")
    assert key.endswith(sysconfig.get_platform().replace("-", "_").replace(".", "_"))


def test_a_cache_hit_installs_in_the_background_without_pip_wheel(tmp_path):
    """The cache folder for this Python holds the wheel: installed with --no-index, nothing built."""
    python = venv_without(tmp_path / "env", hide=())
    cache = tmp_path / "drive" / "wheels"
    _wheel(cache / wheelcache.cache_key(), version="1.0")
    _wheel(cache / "cp27-other_platform", version="9.9")  # another runtime's folder is never read
    log = tmp_path / "logs" / "probe.log"
    # start() runs the job with this module's Python: run it in the fresh environment instead
    code = (
        "import sys; from pathlib import Path; from lowvram import wheelcache as w; "
        "log = w.start('lowvram_probe', Path(sys.argv[1]), Path(sys.argv[2])); "
        "import json; print(json.dumps(w.wait(log, poll_s=0.2)))"
    )
    out = subprocess.run(
        [str(python), "-c", code, str(cache), str(log)], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    status = json.loads(out.strip().splitlines()[-1])
    assert status["state"] == "ok" and status["from_cache"] and not status["compiled"], log.read_text()
    text = log.read_text()
    assert (
        "installed from the wheel cache" in text
        and "--no-index" in text
        and " wheel " not in text.replace("wheel cache", "")
    )
    got = subprocess.run(
        [str(python), "-c", "import lowvram_probe; print(lowvram_probe.VERSION)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert got == "1.0"
    assert "installed from the wheel cache" in wheelcache.describe(status, log)


def test_wait_reports_a_job_that_died_without_finishing(tmp_path):
    log = tmp_path / "job.log"
    log.write_text("")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    wheelcache._write_status(log, state="running", requirement="x==1", started=time.time(), pid=dead.pid)
    status = wheelcache.wait(log, poll_s=0.05)
    assert status["state"] == "failed"
    assert "the install failed" in wheelcache.describe(status, log)
    assert "ended without finishing" in log.read_text()


@pytest.mark.parametrize("held", [False, True])
def test_the_hold_keeps_the_install_from_finishing_until_released(tmp_path, monkeypatch, held):
    """The test-only hold (HOLD_ENV): nothing is installed before the file exists."""
    cache = tmp_path / "wheels"
    _wheel(cache / wheelcache.cache_key())
    hold = tmp_path / "hold"
    if not held:
        hold.touch()
    monkeypatch.setenv(wheelcache.HOLD_ENV, str(hold))
    monkeypatch.setattr(wheelcache, "HOLD_MAX_S", 0.5)
    monkeypatch.setattr(wheelcache, "_pip", lambda log, *args: (0, ""))  # the install itself is tested above
    t0 = time.time()
    status = wheelcache.install("lowvram_probe", cache, tmp_path / "job.log")
    assert status["state"] == "ok"
    assert (time.time() - t0 >= 0.5) is held


def test_wait_reports_progress_while_the_job_runs(tmp_path):
    """A long compile is silent: wait() passes a line with the log's last line to `report` as it goes."""
    log = tmp_path / "job.log"
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        wheelcache._write_status(log, state="running", requirement="x==1", started=time.time(), pid=job.pid)
        wheelcache.mark(log, "Building wheel for x (pyproject.toml): still running")
        lines = []

        def report(line):
            lines.append(line)
            if len(lines) == 2:
                wheelcache._write_status(
                    log, state="ok", finished=time.time(), seconds=1.0, from_cache=False, compiled=True
                )

        status = wheelcache.wait(log, poll_s=0.02, report=report, every_s=0.05)
    finally:
        job.kill()
        job.wait()
    assert status["state"] == "ok" and status["waited"] > 0
    assert len(lines) == 2 and all(x.startswith("waiting for x==1: ") for x in lines)
    assert lines[0].endswith("Building wheel for x (pyproject.toml): still running")
    assert "compiled, and its wheel saved to the cache" in wheelcache.describe(status, log)
