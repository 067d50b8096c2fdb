"""Export verification's cost against the conversion's, on a >= 0.5B-parameter random Llama.

    python scripts/bench_verify.py                  # 12 layers: 0.55B parameters
    python scripts/bench_verify.py --layers 24      # 1.08B

Builds the synthetic bf16 Llama and LoRA adapter of scripts/bench_export.py, exports f16 + q4_k_m
without verification (`lowvram export --no-verify --merged`) and reads the conversion's own times from
its output (llama.cpp converter to f16 + quantizer to q4_k_m). Then times, on the same files:
- verification now (lowvram/verify.py: one batched transformers forward for all types, greedy
  candidates decoded by llama.cpp, each GGUF teacher-forced once per probe), and
- verification as it was before (export.py at commit c3c7de6: a llama.cpp greedy loop per type,
  extra transformers forwards at each divergence),
and prints each, with the ratio to the conversion (target: verification <= conversion).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

OLD_COMMIT = "c3c7de6"


def old_verify():
    """verify_ggufs as it was at OLD_COMMIT, loaded from git."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:lowvram/export.py"], check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType("old_export")
    sys.modules["old_export"] = mod  # dataclasses look their module up
    exec(compile(src, "old_export.py", "exec"), mod.__dict__)
    return mod.verify_ggufs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12, help="layers (12 = 0.55B parameters)")
    ap.add_argument("--work", help="scratch folder (default: a temporary one)")
    ap.add_argument("--no-old", action="store_true", help="skip timing the old verification")
    args = ap.parse_args()
    import bench_export

    from lowvram.tiny import ensure_tiny_model
    from lowvram.verify import verify_ggufs, verify_table

    root = Path(args.work or tempfile.mkdtemp(prefix="bench-verify-"))
    root.mkdir(parents=True, exist_ok=True)
    run, params = bench_export.build_run(root, args.layers, ensure_tiny_model())
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{__import__('psutil').virtual_memory().total / 2**30:.0f} GiB RAM, Python {platform.python_version()}")
    print(f"model: synthetic Llama bf16, {args.layers} layers, {params / 1e9:.2f}B parameters, random init\n")
    out = root / "out"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lowvram", "export", str(run), "--gguf", "f16", "q4_k_m", "--merged",
                           "--no-verify", "--out", str(out)], env=env, capture_output=True, text=True)
    export_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    steps = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\s+(f16|q4_k_m|merge):.*\[([\d.]+) s\]",
                                                                  proc.stdout, re.M)}
    conversion_s = steps.get("f16", 0) + steps.get("q4_k_m", 0)
    print(f"export without verification: {export_s:.1f} s (merge {steps.get('merge', 0):.1f} s, "
          f"f16 convert {steps.get('f16', 0):.1f} s, q4_k_m quantize {steps.get('q4_k_m', 0):.1f} s)")
    ggufs = {t: out / f"{run.name}-{t}.gguf" for t in ("f16", "q4_k_m")}
    merged = out / "merged"

    t0 = time.perf_counter()
    rows = verify_ggufs(merged, ggufs, "You are terse.")
    new_s = time.perf_counter() - t0
    print(f"\nverification now: {new_s:.1f} s = {new_s / conversion_s:.2f}x the conversion ({conversion_s:.1f} s)")
    print(verify_table(rows))
    if not args.no_old:
        t0 = time.perf_counter()
        old_verify()(merged, ggufs, "You are terse.")
        old_s = time.perf_counter() - t0
        print(f"\nverification before ({OLD_COMMIT}): {old_s:.1f} s = {old_s / conversion_s:.2f}x the conversion; "
              f"now/before = {new_s / old_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
