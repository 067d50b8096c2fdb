"""Verification on a real model: its figures per GGUF type, and its time against the conversion's.

    python scripts/bench_verify_real.py /work/models/smollm2-hf          # f16, q8_0, q4_k_m
    python scripts/bench_verify_real.py DIR --types f16 q4_k_m --rounds 2

Converts the Hugging Face folder DIR (standing in for export's merged folder) with the functions
`lowvram export` uses (llamacpp.convert to f16, llamacpp.quantize from it), timing each; then times
verification now and verification before (lowvram/export/verify.py at BEFORE_COMMIT, loaded from git) on the same
files, in alternating order, and prints both tables. The machine's load is printed beside each figure:
on a shared machine it moves them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_verify import verify_module_at  # noqa: E402  (scripts/ is on sys.path when run as a script)

BEFORE_COMMIT = "80ac7db"  # verify.py before the conversion/cost split


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()

    from lowvram.export import llamacpp, verify

    old = verify_module_at(BEFORE_COMMIT)
    with tempfile.TemporaryDirectory(prefix="bench-verify-real-") as tmp:
        out = Path(tmp)
        log = out / "export.log"
        files, conv_s = {}, {}
        t0 = time.perf_counter()
        llamacpp.convert(args.model_dir, out / "m-f16.gguf", "f16", log, model_name="bench")
        conv_s["f16"] = time.perf_counter() - t0
        for t in args.types:
            if t == "f16":
                files[t] = out / "m-f16.gguf"
                continue
            t0 = time.perf_counter()
            llamacpp.quantize(out / "m-f16.gguf", out / f"m-{t}.gguf", t, log)
            conv_s[t] = time.perf_counter() - t0
            files[t] = out / f"m-{t}.gguf"
        conversion = sum(conv_s.values())
        print(
            f"conversion {conversion:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in conv_s.items())}); "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        for r in range(args.rounds):
            order = [("now", verify), ("before", old)] if r % 2 == 0 else [("before", old), ("now", verify)]
            for name, mod in order:
                t0 = time.perf_counter()
                rows = mod.verify_ggufs(args.model_dir, files, None)
                took = time.perf_counter() - t0
                print(
                    f"\nround {r + 1}: verification {name} {took:.1f} s = {took / conversion:.2f}x the conversion; "
                    f"load {os.getloadavg()[0]:.1f}"
                )
                print(mod.verify_table(rows))
                if name == "now":
                    for row in rows:
                        print(f"  {row['type']}: {row['weights']}; {row['seconds']:.1f} s")
                        line = verify.cost_line(row, rows)
                        if line:
                            print(f"  {line}")
                else:
                    for row in rows:
                        if row["status"] != "ok":
                            print("  " + mod.explain(row, row.get("n_params")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
