"""Prove the tiers on a CUDA GPU: each recipe's default model at real dimensions, capped to the tier's card.

Run on a CUDA machine with lowvram[gpu] installed (see ../shared/GPU.md for an offline machine):
    python scripts/gpu_check.py                 # every tier x family, SFT and DPO, Unsloth backend
    python scripts/gpu_check.py --tiers 16gb --families llama --t4 --compare-hf

For each (tier, family): build the tier's default model with random bf16 weights at its real
dimensions (no download), cap this process to the tier's memory with
torch.cuda.set_per_process_memory_fraction, run a few steps of SFT and of DPO through lowvram's own
pipeline with the planner's settings, and print peak reserved memory against the budget and the
planner's estimate, and whether it ran out of memory. `--t4` adds a 15 GiB fp16 run; `--compare-hf`
adds tokens/s and peak memory of the transformers+PEFT+bitsandbytes backend at equal settings.
Each run is its own process, so one OOM or one allocator state does not leak into the next.
Nothing here has been run yet: no GPU was available where lowvram was written.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TIER_BUDGET_GIB = {"24gb": 24.0, "16gb": 16.0, "12gb": 12.0, "8gb": 8.0}


def build_random_model(name: str, out: Path) -> Path:
    """A bf16 random-init checkpoint with `name`'s real dimensions and a borrowed-shape tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lowvram.models import get_spec
    from lowvram.tiny import ensure_tiny_model

    spec = get_spec(name)
    cfg = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
                      num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                      intermediate_size=spec.intermediate_size, tie_word_embeddings=spec.tied_embeddings,
                      max_position_embeddings=8192, torch_dtype="bfloat16")
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out))
    del model
    torch.cuda.empty_cache()
    # The tiny tokenizer has fewer ids than the real vocabulary, which only leaves some rows unused.
    AutoTokenizer.from_pretrained(str(ensure_tiny_model())).save_pretrained(str(out))
    return out


def child(args) -> None:
    """One capped run in this process: prints a JSON line."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory / 1024**3
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget / total))
    from lowvram.pipeline import run_pipeline

    overrides = [f"model.name={args.model_dir}", f"model.backend={args.backend}", f"model.tier={args.tier}",
                 "use_samples=true", "sft.max_steps=5", "dpo.max_steps=5", "sft.save_steps=1000",
                 "dpo.save_steps=1000", "dpo.data.eval_fraction=0", "model.load_in_4bit=true"]
    out = {"tier": args.tier, "family": args.family, "backend": args.backend, "budget_gib": args.budget}
    try:
        t4 = args.budget == 15.0
        run_pipeline("chat-assistant", overrides, run_dir=args.run_dir, gpu="t4" if t4 else None,
                     vram=None if t4 else (args.budget if args.budget < total else None))
        out["oom"] = False
    except Exception as e:  # report, do not hide: OOM or anything else, verbatim
        out["oom"] = "out of memory" in str(e).lower()
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 1024**3
    plan_path = Path(args.run_dir) / "plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        out["plan"] = {s: {k: v for k, v in sp.items() if k != "reasons"} for s, sp in plan["stages"].items()}
    metrics = Path(args.run_dir) / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        for stage in ("sft", "dpo"):
            tps = [r["tokens_per_s"] for r in rows if r.get("stage") == stage and "tokens_per_s" in r]
            if tps:
                out[f"{stage}_tokens_per_s"] = sorted(tps)[len(tps) // 2]
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiers", default="24gb,16gb,12gb,8gb")
    ap.add_argument("--families", default="llama,qwen,mistral")
    ap.add_argument("--t4", action="store_true", help="also a 15 GiB fp16 run of the 16gb tier")
    ap.add_argument("--compare-hf", action="store_true", help="also run the transformers+PEFT backend")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--model-dir")
    ap.add_argument("--run-dir")
    ap.add_argument("--tier")
    ap.add_argument("--family")
    ap.add_argument("--backend", default="unsloth")
    ap.add_argument("--budget", type=float)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU; none is visible.")
    from lowvram.tiers import TIERS

    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.total_memory / 1024**3:.1f} GiB, cc {props.major}.{props.minor}; "
          f"torch {torch.__version__}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for tier in args.tiers.split(","):
            for family in args.families.split(","):
                name = TIERS[tier].models.get(family)
                if not name:
                    continue
                model_dir = build_random_model(name, Path(tmp) / name.replace("/", "_"))
                runs = [("unsloth", TIER_BUDGET_GIB[tier])]
                if args.compare_hf:
                    runs.append(("hf", TIER_BUDGET_GIB[tier]))
                if args.t4 and tier == "16gb":
                    runs.append(("unsloth", 15.0))
                for backend, budget in runs:
                    run_dir = Path(tmp) / f"run-{tier}-{family}-{backend}-{budget:g}"
                    cmd = [sys.executable, __file__, "--child", "--model-dir", str(model_dir), "--run-dir",
                           str(run_dir), "--tier", tier, "--family", family, "--backend", backend, "--budget",
                           str(budget)]
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    line = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "{}"
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        r = {"tier": tier, "family": family, "backend": backend, "error": res.stderr[-500:]}
                    results.append(r)
                    print(json.dumps(r), flush=True)
    print("\ntier  family   backend  budget  peak GiB  OOM  sft tok/s  dpo tok/s")
    for r in results:
        print(f"{r.get('tier', ''):<5} {r.get('family', ''):<8} {r.get('backend', ''):<8} {r.get('budget_gib', 0):>6.1f} "
              f"{r.get('peak_reserved_gib', float('nan')):>9.2f}  {str(r.get('oom', '?')):<4} "
              f"{r.get('sft_tokens_per_s', float('nan')):>9.0f}  {r.get('dpo_tokens_per_s', float('nan')):>9.0f}")


if __name__ == "__main__":
    main()
