"""Install a package in the background, through a wheel cache (the notebook: llama.cpp's runtime, xllamacpp).

The notebook once used it for llama-cpp-python, which PyPI has only as source (a 12-15 minute compile); lowvram
now uses xllamacpp's prebuilt wheel, so nothing compiles and the cache only saves a download. A requirement that
does compile still goes through the same path (pip's "Building wheel for" sets `compiled`).

    job = start("xllamacpp==2026.10.11549", Path("/content/drive/MyDrive/lowvram/wheels"), Path("logs/xllamacpp.log"))
    ...                                   # train meanwhile: nothing in training needs it
    status = wait(job)                    # blocks only while it still runs; status["waited"] says how long

The cache holds wheels in a folder per Python version and platform (cache_key(): "cp311-linux_x86_64"),
so a wheel compiled once on a runtime installs on the next one in seconds, and a runtime with another
Python never picks up a wheel that does not fit it. A cache hit installs with `pip --no-index` from that
folder: it cannot compile. A miss runs `pip wheel` (pip's own wheel cache first, else a compile), copies
the new wheels into the cache, then installs from it.

The log is plain text, one timestamped line per step (pip's own output between them), so its progress
can be read at any time (`tail LOG`); the status is JSON beside it (LOG.json): state running/ok/failed,
started/finished (Unix time), compiled (pip built a wheel from source), from_cache, seconds.

This module uses the standard library only: it runs before anything else is installed.

    python -m lowvram.wheelcache install REQUIREMENT --cache DIR --log FILE     # the background job itself
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# Tests only: wait until this file exists (at most HOLD_MAX_S) before installing, so a test can prove the
# notebook starts training without waiting for the build, even when the build is a cache hit of seconds.
HOLD_ENV = "LOWVRAM_WHEELCACHE_HOLD"
HOLD_MAX_S = 300
COMPILING = "Building wheel for"  # pip prints it only when it compiles a source distribution


def cache_key() -> str:
    """The cache folder for this interpreter: Python version and platform, e.g. cp311-linux_x86_64."""
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    return f"cp{sys.version_info[0]}{sys.version_info[1]}-{plat}"


def status_path(log: Path) -> Path:
    return log.with_name(log.name + ".json")


def read_status(log: Path) -> dict:
    try:
        return json.loads(status_path(log).read_text())
    except (OSError, ValueError):
        return {"state": "unknown"}


def _write_status(log: Path, **fields) -> dict:
    status = {**read_status(log), **fields}
    tmp = status_path(log).with_suffix(".tmp")
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, status_path(log))
    return status


def mark(log: Path, event: str) -> None:
    """Append `[UTC time] event` to `log`: the lines the notebook's test reads the order of events from."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"[{stamp}] {event}\n")


def _pip(log: Path, *args: str) -> tuple[int, str]:
    """Run pip with its output appended to `log`; (exit status, its output)."""
    cmd = [sys.executable, "-m", "pip", *args]
    mark(log, "$ " + " ".join(cmd))
    start = log.stat().st_size
    with open(log, "a", encoding="utf-8") as f:  # streamed: a 15-minute compile shows its progress as it goes
        rc = subprocess.run(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_PROGRESS_BAR="off"),
        ).returncode
    with open(log, encoding="utf-8", errors="replace") as f:
        f.seek(start)
        return rc, f.read()


def install(requirement: str, cache_root: Path, log: Path) -> dict:
    """Install `requirement` from the wheel cache, or build its wheels into the cache first. Returns the status."""
    folder = cache_root / cache_key()
    t0 = time.time()
    _write_status(log, state="running", requirement=requirement, cache=str(folder), pid=os.getpid(), started=t0)
    mark(log, f"start: {requirement}; wheel cache {folder}")
    hold = os.environ.get(HOLD_ENV)
    if hold:
        while not Path(hold).exists() and time.time() - t0 < HOLD_MAX_S:
            time.sleep(0.2)
        mark(log, f"hold released ({HOLD_ENV})")
    folder.mkdir(parents=True, exist_ok=True)
    from_cache = any(folder.glob("*.whl"))
    compiled = False
    rc = 1
    if from_cache:  # --no-index: only what the folder holds; it cannot compile
        rc, _ = _pip(log, "install", "--no-index", "--only-binary", ":all:", "--find-links", str(folder), requirement)
        from_cache = rc == 0
        mark(log, "installed from the wheel cache" if from_cache else "the wheel cache cannot satisfy it: building")
    if not from_cache:
        with tempfile.TemporaryDirectory(prefix="wheels-") as tmp:
            rc, out = _pip(log, "wheel", "--wheel-dir", tmp, requirement)
            compiled = COMPILING in out
            if rc == 0:
                for whl in Path(tmp).glob("*.whl"):  # copied under a temporary name: a disconnect leaves no half wheel
                    if not (folder / whl.name).exists():
                        part = folder / (whl.name + ".partial")
                        shutil.copyfile(whl, part)
                        os.replace(part, folder / whl.name)
                mark(log, f"wheels saved to the cache ({'compiled from source' if compiled else 'no compile'})")
                rc, _ = _pip(log, "install", "--no-index", "--find-links", str(folder), requirement)
    state = "ok" if rc == 0 else "failed"
    mark(log, f"finished: {state} in {time.time() - t0:.1f} s")
    return _write_status(
        log,
        state=state,
        finished=time.time(),
        seconds=round(time.time() - t0, 1),
        compiled=compiled,
        from_cache=from_cache,
    )


def start(requirement: str, cache_root: Path, log: Path) -> Path:
    """Run install() in a background process, its output in `log`; returns `log` (wait() takes it)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    _write_status(log, state="running", requirement=requirement, started=time.time(), pid=None)
    with open(log, "a") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lowvram.wheelcache",
                "install",
                requirement,
                "--cache",
                str(cache_root),
                "--log",
                str(log),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    _write_status(log, pid=proc.pid)
    return log


def _alive(pid) -> bool:
    if not pid:
        return True  # not started yet
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reaps our own child once it ends
        return done == 0
    except ChildProcessError:  # not our child (another kernel started it): ask the OS
        from lowvram.utils.runlock import pid_alive  # standard library only, like this module

        return pid_alive(pid)


def last_line(log: Path) -> str:
    """The log's last non-empty line (a compile's progress), or ''."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [x.strip() for x in f.read().decode("utf-8", errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def wait(log: Path, poll_s: float = 1.0, report=None, every_s: float = 60.0) -> dict:
    """Block until the job writing `log` has finished; its status, with "waited" (seconds spent here).

    `report` (e.g. print) gets a line every `every_s` seconds while it waits: a compile is long and silent.
    """
    t0 = last = time.time()
    status = read_status(log)
    while status.get("state") == "running":
        if not _alive(status.get("pid")) and read_status(log).get("state") == "running":
            mark(log, "the install process ended without finishing")
            status = _write_status(log, state="failed", finished=time.time())
            break
        time.sleep(poll_s)
        status = read_status(log)
        if report and status.get("state") == "running" and time.time() - last >= every_s:
            last = time.time()
            report(
                f"waiting for {status.get('requirement', 'the install')}: {last - t0:.0f} s so far "
                f"(started {last - status.get('started', t0):.0f} s ago); its log: {last_line(log)}"
            )
    return {**status, "waited": round(time.time() - t0, 1)}


def describe(status: dict, log: Path) -> str:
    """One line for the notebook: how long it waited, and what the job did."""
    what = status.get("requirement", "the package")
    waited = f"waited {status['waited']:.0f} s for it" if status.get("waited", 0) >= 1 else "no wait"
    if status.get("state") != "ok":
        return f"{what}: the install failed ({waited}); its log: {log}"
    how = (
        "installed from the wheel cache, no compile"
        if status.get("from_cache")
        else "compiled, and its wheel saved to the cache"
        if status.get("compiled")
        else "installed from pip's own wheel cache and saved to the wheel cache"
    )
    return f"{what}: {how} in {status.get('seconds', 0):.0f} s ({waited})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowvram.wheelcache", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("install", help="install from the wheel cache, or build into it first")
    i.add_argument("requirement")
    i.add_argument("--cache", required=True, type=Path, help="the cache root (a folder per Python and platform)")
    i.add_argument("--log", required=True, type=Path)
    sub.add_parser("key", help="print this interpreter's cache folder name")
    args = p.parse_args(argv)
    if args.cmd == "key":
        print(cache_key())
        return 0
    return 0 if install(args.requirement, args.cache, args.log)["state"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
