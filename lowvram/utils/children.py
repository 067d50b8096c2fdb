"""Child processes that never outlive lowvram, and whose last words are kept.

    rc, tail = run_child(cmd, log_path, env)   # output to the log (and its tail kept in memory)

The child runs in its own process group (a Ctrl-C in the terminal reaches lowvram, which then
ends the child) and, on Linux, asks the kernel to kill it when lowvram dies: a `kill -9` of
`lowvram export` leaves no converter behind writing into the output folder. The child's output
is copied to the log by lowvram, and its last lines are kept in memory, so a full disk that cuts
the log short does not lose the child's own error message.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

# Runs first in the child: PR_SET_PDEATHSIG(SIGKILL), then the real module as __main__.
# A parent that died before the prctl call is caught by the getppid check.
_LAUNCHER = (
    "import os, sys, runpy, signal\n"
    "parent = int(sys.argv[1])\n"
    "if sys.platform.startswith('linux'):\n"
    "    import ctypes\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)\n"
    "if os.getppid() != parent:\n"
    "    os._exit(137)\n"
    "module = sys.argv[2]\n"
    "sys.argv = [module] + sys.argv[3:]\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)

TAIL_LINES = 40


def python_module_cmd(module: str, args: list[str]) -> list[str]:
    """The command that runs `python -m module args...` as a child bound to this process's life."""
    return [sys.executable, "-c", _LAUNCHER, str(os.getpid()), module, *args]


def run_child(cmd: list[str], log_path: Path, env: dict | None = None) -> tuple[int, str]:
    """Run `cmd`, copying its output to `log_path`; (exit status, its last lines of output).

    Writing the log may fail (a full disk): the output is still read, and its tail still returned.
    Ctrl-C (or any exception here) kills the child's whole process group before re-raising.
    """
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    try:
        log = open(log_path, "ab")  # noqa: SIM115 - closed below; may fail on a full disk
    except OSError as e:
        log = None
        tail.append(f"(cannot write the log {log_path}: {e.strerror or e})")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        for raw in proc.stdout:
            tail.append(raw.decode("utf-8", errors="replace").rstrip("\n"))
            if log is not None:
                try:
                    log.write(raw)
                except OSError as e:
                    tail.append(f"(the log {log_path} is cut short here: {e.strerror or e})")
                    log = None
        rc = proc.wait()
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        if log is not None:
            try:
                log.close()
            except OSError:
                pass
    return rc, "\n".join(tail)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.kill()
    proc.wait()
