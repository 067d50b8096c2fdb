"""Export verification's cost against the conversion's, on a >= 0.5B-parameter random Llama.

    python scripts/bench_verify.py                  # 12 layers: 0.55B parameters, 3 rounds
    python scripts/bench_verify.py --layers 24      # 1.08B
    python scripts/bench_verify.py --vocab 128256   # Llama 3's vocabulary width (logits dominate)

Builds the synthetic bf16 Llama and LoRA adapter of scripts/bench_export.py. Then, in each round:
exports f16 + q4_k_m without verification (`lowvram export --no-verify --merged`) and reads the
conversion's own times from its output (llama.cpp converter to f16 + quantizer to q4_k_m); then
times, on those files, side by side in alternating order:
- verification now (lowvram/export/verify.py with llama.cpp threads sized to the free cores), and
- verification before (lowvram/export/verify.py at BEFORE_COMMIT, with llama.cpp on every core as then).
Prints each round, the medians, and the ratios (target: verification <= conversion). The machine's
load average is printed beside each figure: on a shared machine it moves the results.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

BEFORE_COMMIT = "2e3ce88"  # verify.py before this benchmark's changes (llama.cpp on every core)
SYSTEM = "You are terse."


def verify_module_at(commit: str, path: str = "lowvram/verify.py"):
    """verify.py as it was at `commit` (before the stage-package move it was lowvram/verify.py), loaded from git as
    the module `verify_before`. Its imports name that commit's modules; where the current tree no longer has them
    (lowvram.llamacpp and lowvram.hardware moved, and llama.cpp itself changed wheels), this exits saying so,
    instead of failing half-way through a benchmark: the before leg then needs a checkout of `commit`."""
    import importlib.util

    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{commit}:{path}"], check=True, capture_output=True, text=True
    ).stdout
    missing = sorted(
        {m for m in re.findall(r"^\s*from (lowvram[\w.]*) import", src, re.M) if importlib.util.find_spec(m) is None}
    )
    if missing:
        raise SystemExit(
            f"{path} at {commit} imports {', '.join(missing)}, which this tree no longer has: run this benchmark's "
            f"before leg in a checkout of {commit} (git worktree add /tmp/before {commit})."
        )
    mod = types.ModuleType("verify_before")
    sys.modules["verify_before"] = mod  # dataclasses look their module up
    exec(compile(src, "verify_before.py", "exec"), mod.__dict__)
    return mod


@contextmanager
def every_core():
    """llama.cpp's thread count as it was before: every core, whatever else runs."""
    import lowvram.export.llamacpp as lc

    kept = lc._threads
    lc._threads = lambda: max(1, os.cpu_count() or 1)
    try:
        yield
    finally:
        lc._threads = kept


def convert(run: Path, out: Path, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lowvram",
            "export",
            str(run),
            "--gguf",
            "f16",
            "q4_k_m",
            "--merged",
            "--no-verify",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    steps = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^\s+(f16|q4_k_m|merge):.*\[([\d.]+) s\]", proc.stdout, re.M)
    }
    return {"f16": steps.get("f16", 0.0), "q4_k_m": steps.get("q4_k_m", 0.0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12, help="layers (12 = 0.55B parameters)")
    ap.add_argument("--vocab", type=int, help="pad the vocabulary to this many rows (default: the tiny tokenizer's)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of conversion + both verifications")
    ap.add_argument("--work", help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    import bench_export
    import psutil

    from lowvram.export.llamacpp import _threads
    from lowvram.export.verify import verify_ggufs, verify_table
    from lowvram.model.tiny import ensure_tiny_model

    bench_export.VOCAB = args.vocab
    root = Path(args.work or tempfile.mkdtemp(prefix="bench-verify-"))
    root.mkdir(parents=True, exist_ok=True)
    run, params = bench_export.build_run(root, args.layers, ensure_tiny_model())
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB "
        f"RAM, Python {platform.python_version()}"
    )
    print(
        f"model: synthetic Llama bf16, {args.layers} layers, {params / 1e9:.2f}B parameters, vocabulary "
        f"{args.vocab or 'of the tiny tokenizer'}, random init\n"
    )
    out = root / "out"
    ggufs = {t: out / f"{run.name}-{t}.gguf" for t in ("f16", "q4_k_m")}
    old = verify_module_at(BEFORE_COMMIT).verify_ggufs
    rounds = []
    for i in range(args.rounds):
        load = os.getloadavg()[0]
        conv = convert(run, out, env)
        r = {"load": load, "conversion": conv["f16"] + conv["q4_k_m"], **conv}
        order = ("now", "before") if i % 2 == 0 else ("before", "now")
        for which in order:
            r[f"load_{which}"] = os.getloadavg()[0]
            t0 = time.perf_counter()
            if which == "now":
                r["threads"] = _threads()
                rows = verify_ggufs(out / "merged", ggufs, SYSTEM)
            else:
                with every_core():
                    old_rows = old(out / "merged", ggufs, SYSTEM)
            r[which] = time.perf_counter() - t0
        r["same_status"] = [x["status"] for x in rows] == [x["status"] for x in old_rows]
        rounds.append(r)
        print(
            f"round {i + 1}: conversion {r['conversion']:.1f} s (f16 {r['f16']:.1f} + q4_k_m {r['q4_k_m']:.1f}; "
            f"load {r['load']:.1f}); verification now {r['now']:.1f} s ({r['threads']} llama.cpp threads, load "
            f"{r['load_now']:.1f}), before {r['before']:.1f} s (load {r['load_before']:.1f}); "
            f"now/conversion {r['now'] / r['conversion']:.2f}, before/conversion {r['before'] / r['conversion']:.2f}; "
            f"same statuses: {r['same_status']}",
            flush=True,
        )
    med = {k: statistics.median(r[k] for r in rounds) for k in ("conversion", "now", "before")}
    ratio = {k: statistics.median(r[k] / r["conversion"] for r in rounds) for k in ("now", "before")}
    print(
        f"\nmedians over {len(rounds)} rounds: conversion {med['conversion']:.1f} s, verification now "
        f"{med['now']:.1f} s, before {med['before']:.1f} s"
    )
    print(
        f"median ratio to the conversion (same round): now {ratio['now']:.2f}x, before {ratio['before']:.2f}x; "
        f"now/before {statistics.median(r['now'] / r['before'] for r in rounds):.2f}"
    )
    print("\nverification now, last round:")
    print(verify_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
