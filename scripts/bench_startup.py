"""Start-up time of the light commands, against what importing the training stack would cost.

Run: python scripts/bench_startup.py [--repeat 7] [--tty]
Each command runs in a fresh interpreter, interleaved with the others; the table shows medians.
`lowvram --help`, `recipes` and `doctor` must cost about the interpreter plus lowvram's own
modules, far below the `import torch, transformers, trl` line. Output goes to /dev/null, as in CI or a
pipe; `--tty` gives each command a pseudo-terminal instead, where lowvram draws its tables with rich.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass (interpreter)": [sys.executable, "-c", "pass"],
    "lowvram --help": [sys.executable, "-m", "lowvram", "--help"],
    "lowvram recipes": [sys.executable, "-m", "lowvram", "recipes"],
    "lowvram doctor": [sys.executable, "-m", "lowvram", "doctor"],
    "lowvram plan chat-assistant --gpu t4": [sys.executable, "-m", "lowvram", "plan", "chat-assistant", "--gpu", "t4"],
    "import torch, transformers, trl (baseline)": [sys.executable, "-c", "import torch, transformers, trl"],
}


def run(cmd: list[str], tty: bool) -> None:
    if not tty:
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        return
    leader, follower = os.openpty()
    proc = subprocess.Popen(cmd, stdout=follower, stderr=follower)
    os.close(follower)
    try:
        while os.read(leader, 65536):  # drain, as a terminal would; EIO once the command has exited
            pass
    except OSError:
        pass
    finally:
        os.close(leader)
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--tty", action="store_true", help="run each command on a pseudo-terminal, not /dev/null")
    args = ap.parse_args()
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for _ in range(args.repeat):
        for name, cmd in COMMANDS.items():  # interleaved, so drift hits every command alike
            t0 = time.perf_counter()
            run(cmd, args.tty)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["import torch, transformers, trl (baseline)"])
    print(f"machine: {platform.machine()}, {platform.system()}, python {platform.python_version()}, "
          f"{args.repeat} runs each, medians, output to {'a pseudo-terminal' if args.tty else '/dev/null'}")
    print(f"{'command':<46} {'median s':>9} {'vs training imports':>20}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<46} {med:>9.3f} {med / base:>19.2f}x")


if __name__ == "__main__":
    main()
