"""Prove the plan on a CUDA GPU: each tier's model at real dimensions, capped to the tier's card.

Run on a CUDA machine with lowvram[gpu] installed:
    python scripts/gpu_check.py --out /tmp/gpu-check                    # every tier (llama), SFT + DPO
    python scripts/gpu_check.py --tiers 24gb --families qwen,mistral    # other families (--tiers "": none)
    python scripts/gpu_check.py --t4 --methods kto,orpo --compare-hf --long-context --resume-check

What one job is: build the model with random bf16 weights at its real dimensions (the family's own
transformers architecture: Qwen2's biased attention projections, Mistral's head_dim), write chat data
whose every row fills the planned sequence length (the worst case the planner must bound; short rows
would hide an under-estimate), cap the process with torch.cuda.set_per_process_memory_fraction to the
card's memory, and run lowvram's own pipeline (`run_pipeline`, the planner's settings, the real
Unsloth or transformers+PEFT+bitsandbytes backend, TRL's trainers) for a few steps of SFT and of the
preference stage. Each job is its own process, so an OOM or the allocator state of one never leaks
into the next. Per stage it records peak reserved and allocated memory (reset between stages),
the planner's estimate, tokens/s over full-length rows, and the preference stage's reward margin
at its first logged step (0 when the reference is the SFT policy).

Extra checks:
  --tests           first the test suite's `gpu` tests (tests/test_gpu.py): the Unsloth backend and the
                    transformers+PEFT+bitsandbytes 4-bit path end to end on the tiny model, bf16 and fp16
  --compare-hf      --compare-model (the 3B) through both backends at the settings the plain backend's plan
                    fits on --compare-gib, each alone on the GPU: tokens/s and peak memory, Unsloth vs PEFT
  --also            more tier:family jobs, e.g. 12gb:qwen,24gb:mistral
  --parallel        run the memory jobs concurrently while their caps fit the card (their speed is not compared)
  --t4              the 16gb tier capped at 15 GiB in fp16 (Colab T4: no bf16)
  --methods         preference variants to run beside DPO (kto, orpo, ipo) on the smallest tier
  --long-context    the longest SFT sequence the planner allows for Llama-3.1-8B-sized weights at r=32,
                    batch 1, on a 24 GiB cap; runs it and reports the peak
  --resume-check    SFT, then DPO killed with SIGKILL after a checkpoint, then `--resume`: the policy
                    adapter right after resuming must equal the checkpoint's, and the margin continues

Results: one JSON line per job on stdout and in OUT/results.jsonl, a table in OUT/summary.txt, each
job's full log in OUT/logs/. Nothing is faked: a job that fails prints its error verbatim.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CARDS = {"24gb": 24.0, "16gb": 16.0, "12gb": 12.0, "8gb": 8.0}
T4_GIB = 15.0
LONG_CONTEXT_MODEL = "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"
# head_dim where a published config.json sets it apart from hidden/heads (copied from those files)
HEAD_DIM = {"unsloth/Mistral-Nemo-Instruct-2407-bnb-4bit": 128}


# ------------------------------------------------------------------ models and data


def config_for(name: str, max_positions: int = 131072):
    """A transformers config of `name`'s family at the catalog's real dimensions."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from lowvram.plan.catalog import get_spec

    spec = get_spec(name)
    if spec is None:
        raise SystemExit(f"{name}: dimensions unknown to lowvram's catalog")
    head_dim = HEAD_DIM.get(name) or getattr(spec, "head_dim", None) or spec.hidden_size // spec.num_heads
    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        tie_word_embeddings=spec.tied_embeddings,
        max_position_embeddings=max_positions,
        head_dim=head_dim,
    )
    if spec.family == "qwen":
        return Qwen2Config(**common)  # q/k/v projections carry biases, as in Qwen2.5
    if spec.family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    return LlamaConfig(**common)


def build_random_model(name: str, out: Path) -> Path:
    """A bf16 random-init checkpoint with `name`'s real dimensions, and the tiny model's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowvram.model.tiny import ensure_tiny_model

    cfg = config_for(name)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(out))
    del model
    torch.cuda.empty_cache()
    # Fewer token ids than the real vocabulary: some embedding rows go unused, memory is the same.
    AutoTokenizer.from_pretrained(str(ensure_tiny_model())).save_pretrained(str(out))
    return out


def _words() -> list[str]:
    from lowvram.recipe import SAMPLES_DIR

    text = (SAMPLES_DIR / "chat_sft.jsonl").read_text(encoding="utf-8")
    words = [w for w in text.replace('"', " ").replace("\\n", " ").split() if w.isalpha()]
    return sorted(set(words)) or ["token"]


def write_full_length_data(out: Path, tokenizer_dir: Path, tokens: int, rows: int, seed: int = 0) -> tuple[Path, Path]:
    """Chat SFT rows and preference pairs whose answers alone exceed `tokens` tokens (so every batch is full)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rng = random.Random(seed)
    words = _words()
    probe = " ".join(rng.choice(words) for _ in range(2000))
    per_word = len(tok(probe, add_special_tokens=False)["input_ids"]) / 2000
    n_words = int(tokens / per_word * 1.15) + 16

    def answer() -> str:
        return " ".join(rng.choice(words) for _ in range(n_words))

    out.mkdir(parents=True, exist_ok=True)
    sft, pref = out / "sft.jsonl", out / "prefs.jsonl"
    with sft.open("w") as fh:
        for i in range(rows):
            fh.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"Question {i}: tell me a long story."},
                            {"role": "assistant", "content": answer()},
                        ]
                    }
                )
                + "\n"
            )
    with pref.open("w") as fh:
        for i in range(rows):
            prompt = [{"role": "user", "content": f"Question {i}: tell me a long story."}]
            fh.write(
                json.dumps(
                    {
                        "prompt": prompt,
                        "chosen": [{"role": "assistant", "content": answer()}],
                        "rejected": [{"role": "assistant", "content": answer()}],
                    }
                )
                + "\n"
            )
    return sft, pref


# ------------------------------------------------------------------ one job, in its own process


def _stage_peaks(peaks: dict):
    """Wrap lowvram.train.stage.run_stage so each stage's peak memory is measured on its own."""
    import torch

    import lowvram.train.stage as train

    original = train.run_stage

    def measured(ctx, data):
        torch.cuda.synchronize()
        start = torch.cuda.memory_reserved() / 1024**3
        torch.cuda.reset_peak_memory_stats()
        try:
            return original(ctx, data)
        finally:
            torch.cuda.synchronize()
            peaks[ctx.stage] = {
                "reserved_at_start_gib": round(start, 3),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 1024**3, 3),
                "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 3),
            }

    train.run_stage = measured
    import lowvram.pipeline as pipeline  # the pipeline calls train.run_stage through the module: patched above

    return pipeline


def _resume_probe(report: dict):
    """On a resumed train(), compare the live policy adapter with the checkpoint's file at on_train_begin."""
    import torch
    from safetensors.torch import load_file
    from transformers import Trainer, TrainerCallback

    original = Trainer.train

    class Probe(TrainerCallback):
        def __init__(self, ckpt):
            self.ckpt = ckpt

        def on_train_begin(self, args, state, control, model=None, **kw):
            saved = load_file(str(Path(self.ckpt) / "adapter_model.safetensors"))
            live = {k: v for k, v in model.named_parameters() if "lora_" in k and ".default." in k}
            worst, n = 0.0, 0
            for key, tensor in saved.items():
                name = key.replace(".weight", ".default.weight")
                match = [
                    v for k, v in live.items() if k.endswith(name) or k.endswith(name.replace("base_model.model.", ""))
                ]
                if match:
                    n += 1
                    worst = max(worst, (match[0].detach().float().cpu() - tensor.float()).abs().max().item())
            report["resume_checkpoint"] = Path(self.ckpt).name
            report["resume_adapter_tensors_compared"] = n
            report["resume_adapter_max_abs_diff"] = worst

    def train(self, *a, resume_from_checkpoint=None, **kw):
        if resume_from_checkpoint:
            self.add_callback(Probe(resume_from_checkpoint))
        return original(self, *a, resume_from_checkpoint=resume_from_checkpoint, **kw)

    Trainer.train = train
    return torch


def child(args) -> None:
    if "model.backend=hf" not in args.overrides:
        try:  # before this harness imports transformers (the resume probe does): Unsloth patches what follows it
            import unsloth  # noqa: F401
        except Exception:
            pass
    import torch

    total = torch.cuda.get_device_properties(0).total_memory / 1024**3
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget / total))
    peaks: dict = {}
    pipeline = _stage_peaks(peaks)
    out: dict = {"job": args.job, "budget_gib": args.budget}
    if args.resume:
        _resume_probe(out)
    overrides = json.loads(args.overrides)
    try:
        req = pipeline.RunRequest(
            None if args.resume else "chat-assistant",
            () if args.resume else tuple(overrides),
            run_dir=None if args.resume else Path(args.run_dir),
            resume=Path(args.run_dir) if args.resume else None,
            gpu="t4" if args.t4 else None,
            vram=None if args.t4 or args.budget >= total else args.budget,
        )
        pipeline.run_pipeline(req)
        out["ok"] = True
    except BaseException as e:  # report, do not hide: OOM or anything else, verbatim
        out["ok"] = False
        out["oom"] = "out of memory" in f"{e}".lower() or isinstance(e, torch.cuda.OutOfMemoryError)
        out["error"] = f"{type(e).__name__}: {e}"[:800]
    out["peaks"] = peaks
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------ the parent: plan jobs, run them, report


def _plan(overrides: list[str], budget: float, t4: bool):
    from lowvram.plan.hardware import Device, detect_device
    from lowvram.plan.planner import make_plan
    from lowvram.recipe import load_recipe

    recipe, _ = load_recipe("chat-assistant", overrides)
    # as lowvram.pipeline caps a bigger card: usable = the cap; --gpu t4 also takes the T4's precision (fp16)
    cc = detect_device(gpu="t4").compute_capability if t4 else (9, 0)
    device = Device("cuda", f"{budget:g} GiB card", budget, budget, cc, "torch")
    return make_plan(recipe, device)


def longest_planned_seq(model_dir: str, budget: float, lora_r: int = 32) -> int:
    """Binary search of the SFT sequence length the planner accepts at batch 1 (the planner itself decides)."""
    from lowvram.errors import UserError

    lo, hi = 256, 1 << 18
    while hi - lo > 64:
        mid = (lo + hi) // 2
        try:
            _plan(
                [
                    f"model.name={model_dir}",
                    f"lora.r={lora_r}",
                    "sft.batch_size=1",
                    "sft.grad_accum=1",
                    f"sft.max_seq_len={mid}",
                    "dpo.enabled=false",
                    "use_samples=true",
                ],
                budget,
                False,
            )
            lo = mid
        except UserError:
            hi = mid
    return lo


class Runner:
    def __init__(self, out: Path, work: Path, total_gib: float):
        self.out, self.work, self.total = out, work, total_gib
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.results: list[dict] = []

    def start(
        self,
        job: str,
        model_dir: Path,
        budget: float,
        overrides: list[str],
        t4=False,
        resume=False,
        run_dir: Path | None = None,
    ) -> tuple[subprocess.Popen, dict]:
        run_dir = run_dir or self.work / f"run-{job}"
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--job",
            job,
            "--run-dir",
            str(run_dir),
            "--budget",
            str(budget),
            "--overrides",
            json.dumps([f"model.name={model_dir}", *overrides]),
        ]
        cmd += ["--t4"] if t4 else []
        cmd += ["--resume"] if resume else []
        log = (self.out / "logs" / f"{job}.log").open("a")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return proc, {"job": job, "run_dir": run_dir, "log": log, "t0": time.monotonic(), "budget": budget}

    def finish(self, proc: subprocess.Popen, info: dict, extra: dict | None = None) -> dict:
        proc.wait()
        info["log"].close()
        text = (self.out / "logs" / f"{info['job']}.log").read_text(errors="replace")
        lines = [x for x in text.splitlines() if x.startswith("RESULT ")]
        res = (
            json.loads(lines[-1][7:])
            if lines
            else {"job": info["job"], "ok": False, "error": f"exit {proc.returncode}: {text[-600:]}"}
        )
        res["wall_s"] = round(time.monotonic() - info["t0"], 1)
        res.update(_run_facts(info["run_dir"]))
        res.update(info.get("extra") or {})
        res.update(extra or {})
        self.results.append(res)
        with (self.out / "results.jsonl").open("a") as fh:
            fh.write(json.dumps(res) + "\n")
        print(json.dumps(res), flush=True)
        return res


def _run_facts(run_dir: Path) -> dict:
    """The plan's settings and estimates, tokens/s over full-length rows, and the first logged margin."""
    out: dict = {}
    plan_path = run_dir / "plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        out["model"] = plan.get("model")
        out["backend"] = plan.get("backend")
        out["dtype"] = plan.get("dtype")
        out["stages"] = {}
        for s, sp in plan["stages"].items():
            est = sp.get("estimate") or {}
            out["stages"][s] = {
                "seq": sp["max_seq_len"],
                "batch": sp["batch_size"],
                "accum": sp["grad_accum"],
                "estimate_gib": round(est.get("total_gib", float("nan")), 3),
                "budget_gib": sp.get("budget_gib"),
            }
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        first = [
            r
            for r in rows
            if r.get("stage") == "dpo"
            and "rewards/margins" in r
            and "eval" not in r
            and not any(k.startswith("eval_") for k in r)
        ]
        if first:
            out["dpo_first_margin"] = first[0]["rewards/margins"]
            out["dpo_margins"] = [round(r["rewards/margins"], 4) for r in first]
    for s in ("sft", "dpo"):
        stats = run_dir / s / "train_stats.json"
        if stats.is_file() and s in out.get("stages", {}):
            st = json.loads(stats.read_text())
            sp = out["stages"][s]
            seqs = 2 if s == "dpo" else 1  # chosen and rejected
            tokens = st["global_step"] * sp["batch"] * sp["accum"] * sp["seq"] * seqs
            if st.get("train_runtime_s"):
                sp["tokens_per_s"] = round(tokens / st["train_runtime_s"], 1)
                sp["train_runtime_s"] = round(st["train_runtime_s"], 2)
    return out


def _table(results: list[dict]) -> list[str]:
    head = (
        f"{'job':<28} {'model':<44} {'stage':<5} {'seq':>6} {'bs':>3} {'ga':>3} {'budget':>6} {'est':>6} "
        f"{'peak':>6} {'alloc':>6} {'tok/s':>8}  result"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        stages = r.get("stages") or {"-": {}}
        for s, sp in stages.items():
            pk = (r.get("peaks") or {}).get(s, {})
            status = "ok" if r.get("ok") else ("OOM" if r.get("oom") else "FAILED")
            lines.append(
                f"{r['job']:<28} {str(r.get('model', ''))[-44:]:<44} {s:<5} {sp.get('seq', ''):>6} "
                f"{sp.get('batch', ''):>3} {sp.get('accum', ''):>3} {r.get('budget_gib', 0):>6.1f} "
                f"{sp.get('estimate_gib', float('nan')):>6.2f} {pk.get('peak_reserved_gib', float('nan')):>6.2f} "
                f"{pk.get('peak_allocated_gib', float('nan')):>6.2f} {sp.get('tokens_per_s', float('nan')):>8.0f}  {status}"
            )
        if r.get("dpo_first_margin") is not None:
            lines.append(f"{'':<28} first logged reward margin {r['dpo_first_margin']:+.6f}")
        if r.get("resume_adapter_max_abs_diff") is not None:
            lines.append(
                f"{'':<28} resumed from {r['resume_checkpoint']}: policy adapter max |diff| vs checkpoint "
                f"{r['resume_adapter_max_abs_diff']:.3g} over {r['resume_adapter_tensors_compared']} tensors"
            )
        if r.get("error"):
            lines.append(f"{'':<28} {r['error'][:300]}")
    return lines


def _versions() -> str:
    import importlib.metadata as md

    import torch

    names = ["transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "unsloth", "unsloth_zoo"]
    vers = []
    for n in names:
        try:
            vers.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError:
            vers.append(f"{n} -")
    drv = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.strip()
    p = torch.cuda.get_device_properties(0)
    return (
        f"device: {p.name}, {p.total_memory / 1024**3:.1f} GiB, cc {p.major}.{p.minor}, driver {drv}; "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}); " + ", ".join(vers)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu-check", help="results folder")
    ap.add_argument("--tiers", default="24gb,16gb,12gb,8gb", help="tiers to run (empty: none)")
    ap.add_argument("--families", default="llama")
    ap.add_argument("--also", default="", help="more tier:family jobs, e.g. 12gb:qwen,24gb:mistral")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per stage")
    ap.add_argument("--t4", action="store_true")
    ap.add_argument("--compare-hf", action="store_true")
    ap.add_argument("--compare-model", default="unsloth/Llama-3.2-3B-Instruct-bnb-4bit")
    ap.add_argument("--compare-gib", type=float, default=12.0, help="card the compared settings are planned for")
    ap.add_argument("--methods", default="", help="e.g. kto,orpo,ipo: run on the smallest tier beside DPO")
    ap.add_argument("--long-context", action="store_true")
    ap.add_argument("--resume-check", action="store_true")
    ap.add_argument("--parallel", action="store_true", help="run memory-only jobs concurrently (speed not compared)")
    ap.add_argument("--tests", action="store_true", help="first run the test suite's `gpu` tests (tests/test_gpu.py)")
    ap.add_argument("--work", default=None, help="scratch folder for models and runs (default OUT/work)")
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    ap.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU; none is visible.")
    if args.tests:  # the Unsloth backend and the 4-bit path end to end on the tiny model, as pytest tests
        root = Path(__file__).resolve().parent.parent
        res = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rs", str(root / "tests")], cwd=root)
        if res.returncode != 0:
            print(f"gpu tests failed (exit {res.returncode})", flush=True)
    from lowvram.model.tiny import ensure_tiny_model

    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    header = _versions()
    print(header, flush=True)
    total = torch.cuda.get_device_properties(0).total_memory / 1024**3
    runner = Runner(out, work, total)
    tiny = ensure_tiny_model()
    steps = args.steps
    base = [
        "use_samples=false",
        f"sft.max_steps={steps}",
        f"dpo.max_steps={steps}",
        "sft.save_steps=1000",
        "dpo.save_steps=1000",
        "dpo.data.eval_fraction=0",
        "dpo.data.eval_split=",
        "sft.logging_steps=1",
        "dpo.logging_steps=1",
    ]

    def data_for(tag: str, tokens: int, rows: int) -> list[str]:
        sft, pref = write_full_length_data(work / f"data-{tag}", tiny, tokens, rows)
        return [f"sft.data.path={sft}", f"dpo.data.path={pref}"]

    def planned(plan) -> list[str]:
        """The settings a user of the catalog model gets, pinned: the local random copy has no
        quantization_config, so left alone the planner could pick other values for it."""
        return [
            f"{s}.{k}={getattr(sp, k)}"
            for s, sp in plan.stages.items()
            for k in ("max_seq_len", "batch_size", "grad_accum")
        ]

    def user_plan(plan) -> dict:
        return {s: round(sp.estimate.total_gib, 3) for s, sp in plan.stages.items() if sp.estimate is not None}

    def job(name, model, budget, overrides, **kw) -> dict:
        return {"job": name, "model": model, "budget": budget, "overrides": overrides, **kw}

    # Groups run concurrently (with --parallel) under the card's memory; the jobs of a group in order.
    groups: list[list[dict]] = []
    tiers = [t for t in args.tiers.split(",") if t]
    pairs = [(t, f) for t in tiers for f in args.families.split(",") if f]
    pairs += [tuple(x.split(":")) for x in args.also.split(",") if x]
    for tier, family in pairs:
        for t4 in [False, True] if args.t4 and tier == "16gb" and family == "llama" else [False]:
            budget = T4_GIB if t4 else CARDS[tier]
            try:
                plan = _plan([f"model.family={family}", f"model.tier={tier}", "use_samples=true"], budget, t4)
            except Exception as e:  # the planner refuses this family on this card: that is a result too
                runner.results.append({"job": f"{tier}-{family}", "ok": False, "error": f"planner: {e}"[:300]})
                continue
            longest = max(sp.max_seq_len for sp in plan.stages.values())
            rows = 2 * steps * max(sp.effective_batch for sp in plan.stages.values())
            groups.append(
                [
                    job(
                        f"{tier}{'-t4' if t4 else ''}-{family}-unsloth",
                        plan.model,
                        budget,
                        [f"model.tier={tier}", *base, *planned(plan), *data_for(f"{longest}-{rows}", longest, rows)],
                        t4=t4,
                        user_plan=user_plan(plan),
                    )
                ]
            )
    if args.methods:
        small = tiers[-1] if tiers else "8gb"
        plan = _plan([f"model.tier={small}", "model.family=llama", "use_samples=true"], CARDS[small], False)
        for method in args.methods.split(","):
            extra = [f"dpo.method={method}"] if method in ("kto", "orpo") else [f"dpo.loss_type={method}"]
            extra += ["sft.enabled=false"] if method == "orpo" else []  # ORPO is a single stage from the base
            groups.append(
                [
                    job(
                        f"{small}-llama-{method}",
                        plan.model,
                        CARDS[small],
                        [f"model.tier={small}", *base, *extra, *data_for("m1024", 1024, 8 * steps * 2)],
                    )
                ]
            )
    if args.resume_check:
        ov = [
            *base,
            "model.tier=8gb",
            "sft.max_steps=3",
            "sft.learning_rate=1e-3",
            "dpo.max_steps=8",
            "dpo.save_steps=3",
            "dpo.learning_rate=5e-4",
            "sft.batch_size=1",
            "sft.grad_accum=1",
            "sft.max_seq_len=512",
            "dpo.batch_size=1",
            "dpo.grad_accum=2",
            "dpo.max_seq_len=512",
            *data_for("resume", 512, 32),
        ]
        small = "unsloth/Llama-3.2-1B-Instruct-bnb-4bit"
        groups.append(
            [
                job("resume-killed", small, 8.0, ov, run="resume", kill_after="dpo/checkpoints/checkpoint-3"),
                job("resume-resumed", small, 8.0, [], run="resume", resume=True),
            ]
        )
    if args.long_context:
        groups.append([job("long-context-24gb", LONG_CONTEXT_MODEL, 24.0, None, long_context=True)])
    speed: list[dict] = []
    if args.compare_hf:
        plan = _plan(
            [f"model.name={args.compare_model}", "model.backend=hf", "use_samples=true"], args.compare_gib, False
        )
        longest = max(sp.max_seq_len for sp in plan.stages.values())
        rows = 2 * steps * max(sp.effective_batch for sp in plan.stages.values())
        ov = [*base, *planned(plan), *data_for(f"cmp-{longest}-{rows}", longest, rows)]
        for backend in ("unsloth", "hf"):  # same settings: the ones the plain backend's plan fits
            speed.append(
                job(
                    f"speed-{backend}",
                    args.compare_model,
                    args.compare_gib,
                    [*ov, f"model.backend={backend}"],
                    user_plan=user_plan(plan),
                )
            )

    # Every model once, at its real dimensions.
    model_dirs: dict[str, Path] = {}
    for j in [j for g in groups for j in g] + speed:
        if j["model"] not in model_dirs:
            model_dirs[j["model"]] = work / f"model-{len(model_dirs)}"
            shutil.rmtree(model_dirs[j["model"]], ignore_errors=True)
            t0 = time.monotonic()
            build_random_model(j["model"], model_dirs[j["model"]])
            print(f"built {j['model']} at real dimensions in {time.monotonic() - t0:.0f} s", flush=True)
    for j in [j for g in groups for j in g]:
        if j.get("long_context"):
            seq = longest_planned_seq(str(model_dirs[j["model"]]), j["budget"])
            print(
                f"planner's longest SFT sequence for {j['model']} r=32 batch 1 at {j['budget']:g} GiB: {seq}",
                flush=True,
            )
            j["overrides"] = [
                *base,
                "model.tier=24gb",
                "lora.r=32",
                "sft.batch_size=1",
                "sft.grad_accum=1",
                f"sft.max_seq_len={seq}",
                "sft.max_steps=1",
                "dpo.enabled=false",
                *data_for("long", seq, 4),
            ]
            j["extra"] = {"planned_longest_seq": seq}

    gate = _Gate(total)

    def run_group(group: list[dict]) -> None:
        for j in group:
            gate.acquire(j["budget"])
            try:
                run_dir = work / f"run-{j.get('run', j['job'])}"
                proc, info = runner.start(
                    j["job"],
                    model_dirs[j["model"]],
                    j["budget"],
                    j["overrides"] or [],
                    t4=j.get("t4", False),
                    resume=j.get("resume", False),
                    run_dir=run_dir,
                )
                extra = {"catalog_estimate_gib": j.get("user_plan"), **j.get("extra", {})}
                if j.get("kill_after"):
                    marker = run_dir / j["kill_after"] / "trainer_state.json"
                    while proc.poll() is None and not marker.is_file():
                        time.sleep(0.5)
                    time.sleep(1.0)  # the checkpoint is written; kill -9 the whole process group mid-training
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
                        extra["killed_after"] = j["kill_after"]
                runner.finish(proc, info, extra)
            finally:
                gate.release(j["budget"])

    if args.parallel:
        threads = [threading.Thread(target=run_group, args=(g,)) for g in groups]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for g in groups:
            run_group(g)
    for j in speed:  # alone on the GPU: their tokens/s are compared
        run_group([j])
    for d in model_dirs.values():
        shutil.rmtree(d, ignore_errors=True)
    lines = [header, "", *_table(runner.results)]
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


class _Gate:
    """Admit a job while the memory caps of the running ones, plus a CUDA context each, fit the card."""

    HEADROOM_GIB = 0.6

    def __init__(self, total_gib: float):
        self.total, self.used, self.n = total_gib, 0.0, 0
        self.cv = threading.Condition()

    def acquire(self, gib: float) -> None:
        with self.cv:
            while self.n and self.used + gib + self.HEADROOM_GIB * (self.n + 1) > self.total:
                self.cv.wait()
            self.used += gib
            self.n += 1

    def release(self, gib: float) -> None:
        with self.cv:
            self.used -= gib
            self.n -= 1
            self.cv.notify_all()


if __name__ == "__main__":
    main()
