"""Print the settings each GPU tier gets, as the memory planner chooses them (the README's tier table).

    python scripts/tier_table.py            # markdown table
    python scripts/tier_table.py --json

One row per tier, model family and stage, planned for a card of exactly the tier's size (24, 16,
12, 8 GiB) by `lowvram.plan.planner.tier_table()`. Every number is computed: the model is the largest of
its family whose SFT and DPO estimates fit that card at the tier's targets (batch 1, 10% safety
margin), and the sequence, batch and accumulation are the planner's fit; the tiers only say what
to aim for (sequence length, effective batch, LoRA rank). `--card 16gb=t4` plans on a known card.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout works without pip install

from lowvram.plan.planner import tier_table


def markdown(rows: list[dict]) -> str:
    head = "| tier | card | model | params | stage | seq | batch x accum | LoRA r | estimate / budget GiB |"
    out = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        model = r["model"].split("/")[-1]
        out.append(
            f"| {r['tier']} | {r['card']} | {model} | {r['params_b']:.1f}B | {r['stage']} | {r['max_seq_len']} | "
            f"{r['batch_size']} x {r['grad_accum']} | {r['lora_r']} | {r['estimate_gib']:.1f} / "
            f"{r['budget_gib']:.1f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="machine-readable rows")
    ap.add_argument(
        "--card",
        action="append",
        default=[],
        metavar="TIER=CARD",
        help="plan a tier on a known card instead, e.g. 16gb=t4 (repeatable)",
    )
    args = ap.parse_args(argv)
    rows = tier_table(dict(c.split("=", 1) for c in args.card) or None)
    print(json.dumps(rows, indent=2) if args.json else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
