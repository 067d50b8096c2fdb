"""Print the settings each GPU tier gets, as the memory planner chooses them (the README's tier table).

    python scripts/tier_table.py            # markdown table
    python scripts/tier_table.py --json

One row per tier, model family and stage, planned for a typical card of the tier (RTX 4090, T4,
RTX 3060, RTX 4060) by `lowvram.planner.tier_table()`. The numbers are the planner's output: the
tiers only say what to aim for (model, sequence length, effective batch, LoRA rank).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout works without pip install

from lowvram.planner import tier_table


def markdown(rows: list[dict]) -> str:
    head = "| tier | card | model | stage | seq | batch x accum | LoRA r | estimate / budget GiB |"
    out = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        model = r["model"].split("/")[-1]
        out.append(f"| {r['tier']} | {r['card']} | {model} | {r['stage']} | {r['max_seq_len']} | "
                   f"{r['batch_size']} x {r['grad_accum']} | {r['lora_r']} | {r['estimate_gib']:.1f} / "
                   f"{r['budget_gib']:.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="machine-readable rows")
    args = ap.parse_args(argv)
    rows = tier_table()
    print(json.dumps(rows, indent=2) if args.json else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
