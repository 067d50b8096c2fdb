"""How much reading + validating + linting training data costs, next to plain reading.

    python scripts/bench_data.py [--rows 20000] [--repeats 3]

Writes a synthetic preference JSONL (string pairs, ~300-600 character answers) and an
HH-RLHF-style JSONL in a temp folder, then times, median of --repeats runs each:
  floor      json.loads on every line (the least any reader can do)
  datasets   datasets.load_dataset("json", ...) into a fresh cache (what a TRL script usually does)
  load       lowvram's load_preference_data (read, detect, validate, convert; drop_invalid)
  check      lowvram's data check without a token budget (load + every lint)
and prints the medians and the ratios to the floor and to datasets. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

WORDS = [
    "the",
    "model",
    "answers",
    "every",
    "question",
    "with",
    "care",
    "and",
    "a",
    "short",
    "list",
    "of",
    "steps",
    "that",
    "user",
    "can",
    "follow",
    "to",
    "reach",
    "result",
    "quickly",
    "while",
    "keeping",
    "memory",
    "low",
]


def sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def write_pairs(path: Path, rows: int, rng: random.Random) -> None:
    with path.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            f.write(
                json.dumps(
                    {
                        "prompt": sentence(rng, 15),
                        "chosen": sentence(rng, rng.randint(50, 100)),
                        "rejected": sentence(rng, rng.randint(50, 100)),
                    }
                )
                + "\n"
            )


def write_hh(path: Path, rows: int, rng: random.Random) -> None:
    with path.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            prefix = "".join(f"\n\nHuman: {sentence(rng, 12)}\n\nAssistant: {sentence(rng, 30)}" for _ in range(2))
            prefix += f"\n\nHuman: {sentence(rng, 12)}\n\nAssistant:"
            f.write(
                json.dumps({"chosen": f"{prefix} {sentence(rng, 60)}", "rejected": f"{prefix} {sentence(rng, 60)}"})
                + "\n"
            )


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def floor(path: Path) -> None:
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            pass


def with_datasets(path: Path) -> None:
    import datasets

    with tempfile.TemporaryDirectory() as cache:
        datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import datasets  # noqa: F401 - imported once up front so its import time is not in the first run

    from lowvram.data import load_preference_data
    from lowvram.data.check import check_data
    from lowvram.recipe import DataConfig

    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    pairs, hh = tmp / "pairs.jsonl", tmp / "hh.jsonl"
    write_pairs(pairs, args.rows, rng)
    write_hh(hh, args.rows, rng)
    print(
        f"machine: {platform.processor() or platform.machine()}, {platform.python_implementation()} "
        f"{platform.python_version()}; {args.rows} rows per file; median of {args.repeats} runs"
    )
    print(
        f"{'file':<12}{'MiB':>6}{'floor s':>9}{'datasets s':>12}{'load s':>8}{'check s':>9}"
        f"{'load/floor':>12}{'check/floor':>13}{'check/datasets':>16}{'rows/s check':>14}"
    )
    for name, path in (("pairs", pairs), ("hh-rlhf", hh)):
        cfg = DataConfig(path=str(path))
        t_floor = timed(partial(floor, path), args.repeats)
        t_ds = timed(partial(with_datasets, path), args.repeats)
        t_load = timed(partial(load_preference_data, cfg), args.repeats)
        t_check = timed(partial(check_data, cfg, "preference"), args.repeats)
        mib = path.stat().st_size / 2**20
        print(
            f"{name:<12}{mib:>6.1f}{t_floor:>9.2f}{t_ds:>12.2f}{t_load:>8.2f}{t_check:>9.2f}"
            f"{t_load / t_floor:>12.1f}{t_check / t_floor:>13.1f}{t_check / t_ds:>16.2f}{args.rows / t_check:>14.0f}"
        )


if __name__ == "__main__":
    main()
