"""Start-up time of the light commands, against what importing the training stack would cost.

Run: python scripts/bench_startup.py [--repeat 7] [--tty] [--against OLD_CHECKOUT]
Each command runs in a fresh interpreter, interleaved with the others; the table shows medians of wall time
and of the command's CPU time (user + system, steadier than wall time on a busy machine).
`lowvram --help`, `recipes` and `doctor` must cost about the interpreter plus lowvram's own
modules, far below the `import torch, transformers, trl` line. Output goes to /dev/null, as in CI or a
pipe; `--tty` gives each command a pseudo-terminal instead, where lowvram draws its tables with rich.
`--against DIR` compares the light commands with another source tree (e.g. `git archive REV | tar -x -C DIR`),
run interleaved with this one, and prints the differences: a change must not slow them by more than 20 ms.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
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


LIGHT = ["lowvram --help", "lowvram recipes", "lowvram doctor", "lowvram plan chat-assistant --gpu t4"]
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list[str], tty: bool, tree: str = HERE) -> tuple[float, float]:
    """(wall s, CPU s) of one run of `cmd` with lowvram imported from `tree`."""
    env = {**os.environ, "PYTHONPATH": tree}
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    _run(cmd, tty, env)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime


def _run(cmd: list[str], tty: bool, env: dict) -> None:
    if not tty:
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=env)
        return
    leader, follower = os.openpty()
    proc = subprocess.Popen(cmd, stdout=follower, stderr=follower, env=env)
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
    ap.add_argument("--against", metavar="DIR", help="also run the light commands from this source tree")
    args = ap.parse_args()
    trees = {"": HERE, **({"old": os.path.abspath(args.against)} if args.against else {})}
    jobs = [(name, tree) for name in COMMANDS for tree in trees if not tree or name in LIGHT]
    times: dict[tuple[str, str], list[tuple[float, float]]] = {job: [] for job in jobs}
    for _ in range(args.repeat):
        for name, tree in jobs:  # interleaved, so drift hits every command alike
            times[(name, tree)].append(run(COMMANDS[name], args.tty, trees[tree]))

    def med(job: tuple[str, str], i: int) -> float:
        return statistics.median(t[i] for t in times[job])

    base = med(("import torch, transformers, trl (baseline)", ""), 0)
    with open("/proc/loadavg") if os.path.exists("/proc/loadavg") else open(os.devnull) as fh:
        load = " ".join(fh.read().split()[:3]) or "n/a"
    print(
        f"machine: {platform.machine()}, {platform.system()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, {args.repeat} runs each, medians, output to "
        f"{'a pseudo-terminal' if args.tty else '/dev/null'}; load average at the end {load}"
    )
    print(f"{'command':<46} {'median s':>9} {'CPU s':>7} {'vs training imports':>20}")
    for name in COMMANDS:
        print(f"{name:<46} {med((name, ''), 0):>9.3f} {med((name, ''), 1):>7.3f} {med((name, ''), 0) / base:>19.2f}x")
    if args.against:
        print(f"\nagainst {trees['old']}: this tree minus that one, ms")
        print(f"{'command':<46} {'wall':>8} {'CPU':>8}")
        for name in LIGHT:
            dw, dc = ((med((name, ""), i) - med((name, "old"), i)) * 1000 for i in (0, 1))
            print(f"{name:<46} {dw:>+8.1f} {dc:>+8.1f}")


if __name__ == "__main__":
    main()
