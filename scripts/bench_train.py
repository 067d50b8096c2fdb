"""lowvram's SFT and DPO against a plain TRL script: same model, data and settings, side by side.

Run: python scripts/bench_train.py [--repeat 3] [--steps 30]
Each measurement runs in a fresh process (peak RSS is per process), lowvram and plain TRL in ABBA
order so machine noise and run order hit both alike; the table shows medians and the lowvram/TRL ratio. Target on CPU:
tokens/s ratio at least 0.95. On a CUDA machine with Unsloth, `--backends` compares lowvram's
Unsloth backend with its transformers+PEFT backend at equal settings (peak VRAM too).
The model is a 6-layer Llama (hidden 256) built here with the tiny model's tokenizer: large enough
that the trainer's own work, not Python overhead, dominates; random weights are fine for speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEQ, BATCH, LR, RANK, ALPHA = 128, 8, 1e-3, 16, 32


def build_bench_model(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lowvram.model.tiny import ensure_tiny_model

    tiny = ensure_tiny_model()
    tok = AutoTokenizer.from_pretrained(str(tiny))
    cfg = LlamaConfig.from_pretrained(str(tiny))
    cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads = 256, 6, 8
    cfg.num_key_value_heads, cfg.intermediate_size = 4, 688
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _rows(name: str) -> list[dict]:
    from lowvram.recipe import SAMPLES_DIR

    return [json.loads(x) for x in (SAMPLES_DIR / name).read_text().splitlines() if x.strip()]


def child_lowvram(stage: str, model: str, steps: int, workdir: Path, backend: str) -> dict:
    from lowvram.pipeline import RunRequest, run_pipeline

    run = workdir / f"lowvram-{stage}"
    overrides = [
        f"model.name={model}",
        f"model.backend={backend}",
        f"{stage}.max_steps={steps}",
        f"{stage}.save_steps=100000",
        f"{stage}.batch_size={BATCH}",
        f"{stage}.grad_accum=1",
        f"{stage}.max_seq_len={SEQ}",
        f"{stage}.learning_rate={LR}",
        f"lora.r={RANK}",
        f"lora.alpha={ALPHA}",
        "dpo.data.eval_fraction=0",
        "sft.warmup_ratio=0",
        "dpo.warmup_ratio=0",
    ]
    if stage == "dpo":
        overrides.append("sft.enabled=false")
    else:
        overrides.append("dpo.enabled=false")
    run_pipeline(RunRequest("demo", tuple(overrides), run_dir=run))
    stats = json.loads((run / stage / "DONE").read_text())
    logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    tokens = max(r.get("num_tokens", 0) for r in logs if r.get("stage") == stage)
    return {"tokens": tokens, "train_runtime_s": stats["train_runtime_s"]}


def child_trl(stage: str, model_dir: str, steps: int, workdir: Path) -> dict:
    """What a user writes with TRL and PEFT directly."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32"),
        LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    common = dict(
        output_dir=str(workdir / f"trl-{stage}"),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        max_steps=steps,
        logging_steps=1,
        save_steps=100000,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=42,
        data_seed=42,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        dataloader_num_workers=0,
        # what lowvram's CPU plan sets; TRL's own defaults are bf16 autocast and gradient checkpointing
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
    )
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        rows = []
        for r in _rows("chat_sft.jsonl"):  # loss on the last answer, as lowvram does for a template without markers
            msgs = r["messages"]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            rows.append({"prompt": msgs[:last], "completion": [msgs[last]]})
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**common, max_length=SEQ),
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
        )
    else:
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(**common, max_length=SEQ, beta=0.1, loss_type=["sigmoid"]),
            train_dataset=Dataset.from_list(_rows("concise_prefs.jsonl")),
            processing_class=tok,
        )
    result = trainer.train()
    tokens = max(h.get("num_tokens", 0) for h in trainer.state.log_history)
    return {"tokens": tokens, "train_runtime_s": result.metrics["train_runtime"]}


def run_child(variant: str, stage: str, model: str, steps: int, backend: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            variant,
            "--stage",
            stage,
            "--model",
            model,
            "--steps",
            str(steps),
            "--workdir",
            tmp,
            "--backend",
            backend,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{variant} {stage} failed:\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--backends", action="store_true", help="CUDA: lowvram unsloth vs lowvram hf instead of vs TRL")
    ap.add_argument("--child")
    ap.add_argument("--stage")
    ap.add_argument("--model")
    ap.add_argument("--workdir")
    ap.add_argument("--backend", default="hf")
    args = ap.parse_args()
    if args.child:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        work = Path(args.workdir)
        if args.child == "trl":
            out = child_trl(args.stage, args.model, args.steps, work)
        else:
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):
                out = child_lowvram(args.stage, args.model, args.steps, work, args.backend)
        out["tokens_per_s"] = out["tokens"] / out["train_runtime_s"]
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        try:
            import torch

            if torch.cuda.is_available():
                out["peak_vram_gib"] = torch.cuda.max_memory_reserved() / 1024**3
        except ImportError:
            pass
        print(json.dumps(out))
        return

    variants = (
        [("lowvram-unsloth", "unsloth"), ("lowvram-hf", "hf")] if args.backends else [("lowvram", "hf"), ("trl", "hf")]
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_bench_model(Path(tmp) / "bench-model"))
        print(
            f"machine: {platform.machine()} {platform.system()}, python {platform.python_version()}; "
            f"model: 6-layer Llama, hidden 256; seq {SEQ}, batch {BATCH}, LoRA r={RANK}; {args.steps} steps; "
            f"{args.repeat} alternating runs each, medians"
        )
        results: dict = {}
        for stage in ("sft", "dpo"):
            for i in range(args.repeat):
                # ABBA order: whichever runs first in a pair gets no systematic advantage
                for name, backend in variants if i % 2 == 0 else variants[::-1]:
                    variant = "trl" if name == "trl" else "lowvram"
                    results.setdefault((stage, name), []).append(run_child(variant, stage, model, args.steps, backend))
        print(f"{'stage':<5} {'variant':<16} {'tokens/s':>10} {'peak RSS MiB':>13} {'tokens':>8}")
        for stage in ("sft", "dpo"):
            meds = {}
            for name, _ in variants:
                rs = results[(stage, name)]
                tps = statistics.median(r["tokens_per_s"] for r in rs)
                rss = statistics.median(r["peak_rss_mib"] for r in rs)
                meds[name] = (tps, rss)
                each = ", ".join(f"{r['tokens_per_s']:.0f}" for r in rs)
                vram = ""
                if "peak_vram_gib" in rs[0]:
                    vram = f"  peak VRAM {statistics.median(r['peak_vram_gib'] for r in rs):.2f} GiB"
                print(f"{stage:<5} {name:<16} {tps:>10.0f} {rss:>13.0f} {rs[0]['tokens']:>8.0f}{vram}  (runs: {each})")
            a, b = (variants[0][0], variants[1][0])
            print(
                f"{stage:<5} ratio {a}/{b}: tokens/s {meds[a][0] / meds[b][0]:.3f}, peak RSS {meds[a][1] / meds[b][1]:.3f}"
            )


if __name__ == "__main__":
    main()
