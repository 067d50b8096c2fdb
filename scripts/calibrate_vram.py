"""Check lowvram's memory estimator against measured peaks, beside the estimator Unsloth ships.

    python scripts/calibrate_vram.py            # table and summary; exit 1 if the bound is broken
    python scripts/calibrate_vram.py -v         # also each estimate's breakdown
    python scripts/calibrate_vram.py --csv PATH # another copy of the calibration data

For every row of scripts/data/vram_points.csv that lowvram can represent, it prints the measured
peak, lowvram's estimate and its error, and the estimate of Unsloth Studio's formula
(unslothai/unsloth, studio/backend/utils/hardware/VRAM_ESTIMATION.md, re-derived here from that
document) and its error. It fails (exit 1) when any represented row is off by more than 20%, or
when lowvram's mean absolute error is not below Unsloth's. CI runs it (.ci/run).

How rows are represented (scripts/data/README.md has what was checked against each source):
- Estimates are compared with what was measured: torch.cuda.max_memory_reserved() leaves out the
  CUDA context, so those rows are compared with the estimate's `reserved_gib`; nvidia-smi includes
  it, so those rows are compared with `total_gib`. Unsloth's formula is taken as published, with
  its 1.4 GB CUDA overhead: its documented total, and its better reading on every row here.
- Every row is estimated at its max_seq_len, as the planner does without the data: the worst
  batch. Rows whose samples are "mostly far shorter" (Alpaca) never fill that batch, so for them
  the estimate must be an upper bound (not below the measurement); rows whose batches fill
  max_seq_len (packed, or chat rows longer than it) must be within +-20%, and the mean error over
  those is compared with Unsloth's formula.
- The card's memory is passed to the estimate (Unsloth sizes its loss chunks to the free memory):
  a T4 reports 14.75 GiB in the notebooks, the A100 is the 80 GB one.
- Max context: the longest sequence the estimate fits at batch 1 on each card size of Unsloth's
  published table (Llama-3.1-8B, r=32, all linears), as a ratio to it. It must be at least 0.8 at
  12/16/24/40/80 GB and never above 1.
- torchtune rows are not represented: torchtune trains with its own NF4 (torchao), its own
  checkpointing and offloading, chunked cross-entropy and torch.compile; lowvram trains with
  Unsloth or transformers + PEFT, and its estimator describes those two.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout works without pip install

from lowvram.plan.catalog import CATALOG, ModelSpec, get_spec
from lowvram.plan.memory import ALL_LINEAR, GIB, STACKS, MemoryEstimate, Stack, estimate

DATA = Path(__file__).resolve().parent / "data" / "vram_points.csv"
ERROR_BOUND = 0.20

# Unsloth's published max context for Llama-3.1-8B Instruct, 4-bit QLoRA on all linears, r=32,
# batch 1, sequences padded to the length (docs.unsloth.ai/basics/unsloth-benchmarks, "Context
# length benchmarks"; unsloth.ai/blog/llama3-3). Card GB -> tokens.
UNSLOTH_MAX_CONTEXT = {8: 2_972, 12: 21_848, 16: 40_724, 24: 78_475, 40: 153_977, 48: 191_728, 80: 342_733}
CONTEXT_CHECKED_GB = (12, 16, 24, 40, 80)
CONTEXT_FLOOR = 0.8
# Memory of the cards rows name, as torch reports it (GiB): the T4 notebooks print 14.748.
CARD_GIB = {"T4": 14.75, "A100": 80.0, "RTX 4090": 24.0}

# The models of the calibration rows, by the name the CSV gives them. Catalog entries where lowvram
# ships the model; the two others from their published config.json.
MODELS: dict[str, ModelSpec] = {
    "Llama-3.1-8B": CATALOG["unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"],
    "Llama-3.2-3B": CATALOG["unsloth/Llama-3.2-3B-Instruct-bnb-4bit"],
    "Mistral-7B-v0.3": CATALOG["unsloth/mistral-7b-instruct-v0.3-bnb-4bit"],
    # microsoft/phi-4 config.json: hidden 5120, 40 layers, 40 heads, 10 KV heads, MLP 17920, vocab 100352.
    "Phi-4": ModelSpec("unsloth/Phi-4", "phi", 14.66, 40, 5120, 40, 10, 17920, 100352, False, False),
    # mistralai/Mistral-7B-v0.1: v0.3's shapes with the older 32000-token vocabulary.
    "Mistral-7B-v0.1": replace(
        CATALOG["unsloth/mistral-7b-instruct-v0.3-bnb-4bit"], name="mistralai/Mistral-7B-v0.1", vocab_size=32000
    ),
}

# fms-acceleration's baseline ran transformers 4.48 + TRL 0.13: the model's own loss upcasts full
# logits to fp32 (TRL's chunked LM head came in 1.15). TRL 0.13 casts embeddings back to bf16 after
# preparing the model for k-bit training (peft_module_casting_to_bf16), which the 4.01 GiB allocated
# at the end of training confirms. Its LoRA dropout (0.1) gives each adapter its own copy of the
# input, as the fp32 cast does in lowvram's hf backend. The same transformers + PEFT modules otherwise.
HF_448 = Stack("transformers 4.48 + PEFT", kernels="hf", logits="full_fp32", fp32_non_quantized=False)
# The notebooks ran Unsloth of 2024-2025 (the Llama-3.2-3B one prints 2024.10), whose fused loss sized
# one chunk to half the free memory, with no 2 GiB cap and no minimum of 8 chunks: unsloth_zoo's
# chunked CE came later (lowvram.plan.memory, UNSLOTH_CE_CHUNK_CAP_GIB). Their Stack says so.
UNSLOTH_NOTEBOOKS = replace(STACKS["unsloth"], name="unsloth (2024-2025 notebooks)", ce_chunk_cap_gib=None)


@dataclass(frozen=True)
class Setup:
    """One row as lowvram's estimator sees it."""

    spec: ModelSpec
    stage: str
    max_seq_len: int
    batch_size: int
    lora_r: int
    targets: tuple[str, ...]
    grad_ckpt: str
    optim: str
    dtype: str
    backend: str | Stack
    with_context: bool  # the measurement includes the CUDA context (nvidia-smi)
    repo_double_quant: bool  # what Unsloth's formula reads from the repo's quantization config
    vram_gib: float | None = None  # the card's memory, when the row names it
    short_rows: bool = False  # dynamic padding over samples mostly far shorter than max_seq_len
    bound_only: bool = False  # a lowvram row marked check=bound: checked as an upper bound only


@dataclass(frozen=True)
class Point:
    label: str
    stack: str
    measured_gib: float
    setup: Setup | None
    why_not: str | None = None  # when setup is None: why lowvram cannot represent the row


@dataclass(frozen=True)
class Result:
    point: Point
    lowvram: MemoryEstimate
    lowvram_gib: float
    unsloth_gib: float

    @property
    def lowvram_error(self) -> float:
        return self.lowvram_gib / self.point.measured_gib - 1

    @property
    def unsloth_error(self) -> float:
        return self.unsloth_gib / self.point.measured_gib - 1

    @property
    def full_length(self) -> bool:
        """Checked within +-20% (and counted in the mean error); the others as an upper bound only."""
        return not (self.point.setup.short_rows or self.point.setup.bound_only)

    @property
    def within(self) -> bool:
        """Full-length rows: within the bound. Short-row measurements: the estimate is an upper bound."""
        if self.full_length:
            return abs(self.lowvram_error) <= ERROR_BOUND
        return self.lowvram_error >= 0


@dataclass(frozen=True)
class Calibration:
    results: list[Result]
    skipped: list[Point]
    context: list[tuple[int, int, int]] = ()  # (card GB, lowvram's max context, Unsloth's published)

    @property
    def full(self) -> list[Result]:
        return [r for r in self.results if r.full_length]

    @property
    def lowvram_mae(self) -> float:
        return sum(abs(r.lowvram_error) for r in self.full) / max(len(self.full), 1)

    @property
    def unsloth_mae(self) -> float:
        return sum(abs(r.unsloth_error) for r in self.full) / max(len(self.full), 1)

    @property
    def out_of_bound(self) -> list[Result]:
        return [r for r in self.results if not r.within]

    @property
    def context_failures(self) -> list[tuple[int, int, int]]:
        return [
            (gb, ours, pub)
            for gb, ours, pub in self.context
            if ours > pub or (gb in CONTEXT_CHECKED_GB and ours < CONTEXT_FLOOR * pub)
        ]

    @property
    def ok(self) -> bool:
        return (
            bool(self.full)
            and not self.out_of_bound
            and self.lowvram_mae < self.unsloth_mae
            and not self.context_failures
        )


# ---------------------------------------------------------------- reading rows


def _leading_int(text: str) -> int:
    m = re.match(r"\s*(\d+)", text)
    if not m:
        raise ValueError(f"expected a number at the start of {text!r}")
    return int(m.group(1))


def _ckpt(value: str) -> str:
    return {
        "on": "standard",
        "true": "standard",
        "standard": "standard",
        "unsloth": "unsloth",
        "off": "off",
        "none": "off",
    }[value.strip().lower()]


def _lowvram_row(row: dict, label: str, measured: float) -> Point:
    """A row measured by running lowvram: `stack` is 'lowvram key=value ...' (scripts/data/README.md)."""
    opts = dict(kv.split("=", 1) for kv in row["stack"].split()[1:] if "=" in kv)
    spec = MODELS.get(row["model"]) or get_spec(row["model"])
    if spec is None:
        return Point(label, row["stack"], measured, None, f"unknown model {row['model']!r}: not in the catalog")
    targets = ALL_LINEAR if opts.get("targets", "all") == "all" else tuple(opts["targets"].split("+"))
    setup = Setup(
        spec,
        opts.get("stage", "sft"),
        _leading_int(row["max_seq_len"]),
        _leading_int(row["batch"]),
        _leading_int(row["lora_r"]),
        targets,
        _ckpt(row["grad_ckpt"]),
        opts.get("optim", "adamw_8bit"),
        opts.get("dtype", "bf16"),
        opts.get("backend", "unsloth"),
        "nvidia" in row["kind"].lower(),
        spec.prequantized_4bit,
        float(opts["vram_gib"]) if "vram_gib" in opts else None,
        "far shorter" in row["max_seq_len"],
        opts.get("check") == "bound",
    )
    return Point(label, row["stack"], measured, setup)


def read_points(csv_path: Path = DATA) -> list[Point]:
    points = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            stack, measured = row["stack"], float(row["peak_gib"])
            label = row["model"]
            if stack.startswith("lowvram"):
                points.append(_lowvram_row(row, label, measured))
                continue
            if "torchtune" in stack:
                points.append(
                    Point(
                        label,
                        stack,
                        measured,
                        None,
                        "torchtune's own QLoRA stack (torchao NF4, its own checkpointing and offloading, "
                        "chunked cross-entropy, torch.compile where used); lowvram's estimator describes "
                        "Unsloth and transformers+PEFT",
                    )
                )
                continue
            spec = MODELS.get(row["model"])
            if spec is None:
                points.append(Point(label, stack, measured, None, f"no dimensions for {row['model']!r}"))
                continue
            card = next((gib for name, gib in CARD_GIB.items() if name in stack), None)
            common = {
                "spec": spec,
                "max_seq_len": _leading_int(row["max_seq_len"]),
                "batch_size": _leading_int(row["batch"]),
                "lora_r": _leading_int(row["lora_r"]),
                "grad_ckpt": _ckpt(row["grad_ckpt"]),
                "vram_gib": card,
                "short_rows": "far shorter" in row["max_seq_len"],
            }
            if stack.startswith("unsloth SFT"):
                # The notebooks: all seven linears, adamw_8bit, fp16 on a T4, pre-quantized
                # (double-quant) repos, peak read with max_memory_reserved().
                setup = Setup(
                    stage="sft",
                    targets=ALL_LINEAR,
                    optim="adamw_8bit",
                    dtype="fp16" if "T4" in stack else "bf16",
                    backend=UNSLOTH_NOTEBOOKS,
                    with_context=False,
                    repo_double_quant=True,
                    **common,
                )
            elif stack.startswith("HF PEFT + bitsandbytes"):
                targets = ("q_proj", "k_proj", "v_proj", "o_proj") if "qkvo" in stack else ALL_LINEAR
                # HF Trainer's default optimizer (adamw_torch), bf16, read from nvidia-smi (scripts/data/README.md).
                # Quantized on load from mistralai/Mistral-7B-v0.1, whose config has no quantization section.
                setup = Setup(
                    stage="sft",
                    targets=targets,
                    optim="adamw_torch",
                    dtype="bf16",
                    backend=HF_448,
                    with_context=True,
                    repo_double_quant=False,
                    **common,
                )
            else:
                points.append(Point(label, stack, measured, None, "stack not described by lowvram's estimator"))
                continue
            points.append(Point(label, stack, measured, setup))
    return points


# ---------------------------------------------------------------- the two estimators


def lowvram_estimate(s: Setup) -> MemoryEstimate:
    return estimate(
        s.spec,
        s.stage,
        max_seq_len=s.max_seq_len,
        batch_size=s.batch_size,
        lora_r=s.lora_r,
        target_modules=s.targets,
        grad_ckpt=s.grad_ckpt,
        optim=s.optim,
        dtype=s.dtype,
        backend=s.backend,
        load_in_4bit=True,
        vram_gib=s.vram_gib,
    )


LLAMA_8B = MODELS["Llama-3.1-8B"]


def max_context(vram_gib: float, spec: ModelSpec = LLAMA_8B, lora_r: int = 32) -> int:
    """The longest sequence whose estimated peak (with the CUDA context) fits a card, at batch 1."""

    def fits(seq: int) -> bool:
        return (
            estimate(
                spec,
                "sft",
                max_seq_len=seq,
                batch_size=1,
                lora_r=lora_r,
                grad_ckpt="unsloth",
                optim="adamw_8bit",
                dtype="bf16",
                backend="unsloth",
                vram_gib=vram_gib,
            ).total_gib
            <= vram_gib
        )

    lo, hi = 0, 1 << 21
    while lo < hi:  # the estimate grows with the sequence: bisect
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


# Unsloth Studio's constants, as VRAM_ESTIMATION.md states them.
UNSLOTH_CUDA_OVERHEAD_BYTES = 1.4 * GIB
UNSLOTH_OPTIM_BYTES = {
    "adamw_8bit": 4,
    "paged_adamw_8bit": 4,
    "adamw_torch": 6,
    "adamw_torch_fused": 6,
    "paged_adamw_32bit": 8,
    "sgd": 4,
}


def unsloth_studio_gib(s: Setup) -> float:
    """Unsloth Studio's training estimate (VRAM_ESTIMATION.md, sections 1-7), for a dense decoder."""
    sp = s.spec
    h, n_layers, v, m = sp.hidden_size, sp.num_layers, sp.vocab_size, sp.intermediate_size
    k = sp.head_dim * sp.num_kv_heads
    r = s.lora_r
    # 1. weights: NF4 at 2/3.2 bytes per param (2/3.6 with double quant), the rest 16-bit.
    quantizable = ((h + k + k + h) * h + h * m * 3) * n_layers
    non_quantizable = 2 * h * n_layers + v * h + (0 if sp.tied_embeddings else v * h)
    weights = quantizable * 2 / (3.6 if s.repo_double_quant else 3.2) + non_quantizable * 2
    # 2. LoRA adapters, 2 bytes per param.
    per_module = {
        "q_proj": h * r + r * h,
        "k_proj": h * r + r * k,
        "v_proj": h * r + r * k,
        "o_proj": h * r + r * h,
        "gate_proj": h * r + r * m,
        "up_proj": h * r + r * m,
        "down_proj": m * r + r * h,
    }
    lora_params = sum(per_module[t] for t in s.targets) * n_layers
    lora = lora_params * 2
    # 3. optimizer states, calibrated bytes per param.
    optimizer = lora_params * UNSLOTH_OPTIM_BYTES.get(s.optim, 4)
    # 5. activations: one layer's (S*B*(H+2K) + 2*S*B + 2*S*B*M) * 2 * 1.25 under checkpointing (LoRA).
    # Its formula has no preference stage; chosen+rejected count as twice the batch.
    tokens = s.max_seq_len * s.batch_size * (2 if s.stage in ("dpo", "orpo") else 1)
    per_layer = (tokens * (h + k + k) + tokens * 2 + tokens * (m + m)) * 2 * 1.25
    activations = per_layer * (n_layers if s.grad_ckpt == "off" else 1.0)
    # 4 and 6. gradients: 2 bytes per param, floored by min(15% of weights, max(activations, optimizer)).
    gradients = max(lora_params * 2, min(weights * 0.15, max(activations, optimizer)))
    # 7. fixed CUDA overhead.
    return (weights + lora + optimizer + gradients + activations + UNSLOTH_CUDA_OVERHEAD_BYTES) / GIB


def calibrate(csv_path: Path = DATA) -> Calibration:
    results, skipped = [], []
    for p in read_points(csv_path):
        if p.setup is None:
            skipped.append(p)
            continue
        est = lowvram_estimate(p.setup)
        ours = est.total_gib if p.setup.with_context else est.reserved_gib
        results.append(Result(p, est, ours, unsloth_studio_gib(p.setup)))
    context = [(gb, max_context(gb), pub) for gb, pub in UNSLOTH_MAX_CONTEXT.items()]
    return Calibration(results, skipped, context)


# ---------------------------------------------------------------- report


def report(cal: Calibration, verbose: bool = False) -> list[str]:
    from lowvram.utils.ui import table

    rows = []
    for r in cal.results:
        s = r.point.setup
        what = "nvidia-smi" if s.with_context else "reserved"
        rows.append(
            (
                r.point.label,
                r.point.stack[:44],
                f"{s.max_seq_len}x{s.batch_size}",
                what,
                f"{r.point.measured_gib:.2f}",
                f"{r.lowvram_gib:.2f}",
                f"{r.lowvram_error:+.1%}",
                f"{r.unsloth_gib:.2f}",
                f"{r.unsloth_error:+.1%}",
            )
        )
    out = [
        table(
            rows,
            (
                "model",
                "stack",
                "seq x batch",
                "measured as",
                "measured GiB",
                "lowvram GiB",
                "error",
                "Unsloth GiB",
                "error",
            ),
        )
    ]
    if verbose:
        for r in cal.results:
            out.append(f"\n{r.point.label} ({r.point.stack}):")
            out += [f"  {line}" for line in r.lowvram.lines()]
            out.append(f"  reserved (no CUDA context) {r.lowvram.reserved_gib:6.2f} GiB")
    if cal.skipped:
        out.append("\nNot represented:")
        out += [f"  {p.label} ({p.stack}): {p.why_not}" for p in cal.skipped]
    if not cal.results:
        return out + ["\nNo row could be represented."]
    full = cal.full or cal.results
    worst = max(full, key=lambda r: abs(r.lowvram_error))
    worst_u = max(full, key=lambda r: abs(r.unsloth_error))
    short = [r for r in cal.results if not r.full_length]
    gpu = [r for r in cal.results if r.point.stack.startswith("lowvram")]
    out += [
        "",
        (
            f"rows that fill max_seq_len ({len(cal.full)}): lowvram mean |error| {cal.lowvram_mae:.1%}, worst "
            f"{worst.lowvram_error:+.1%} ({worst.point.label}); Unsloth mean |error| {cal.unsloth_mae:.1%}, worst "
            f"{worst_u.unsloth_error:+.1%} ({worst_u.point.label})"
        ),
    ]
    if short:
        out.append(
            f"upper-bound rows ({len(short)}: short samples estimated at max_seq_len, or check=bound): "
            + ", ".join(f"{r.point.label} {r.lowvram_error:+.1%}" for r in short)
        )
        every = cal.results
        out.append(
            f"all {len(every)} rows: lowvram mean |error| "
            f"{sum(abs(r.lowvram_error) for r in every) / len(every):.1%}, Unsloth "
            f"{sum(abs(r.unsloth_error) for r in every) / len(every):.1%}"
        )
    for stage in ("sft", "dpo", "orpo"):
        rows = [r for r in gpu if r.point.setup.stage == stage]
        if rows:
            errs = ", ".join(f"{r.lowvram_error:+.0%}" for r in rows)
            out.append(f"lowvram's own GPU rows, {stage} ({len(rows)}): {errs}")
    out.append(
        f"{len(cal.results) - len(cal.out_of_bound)}/{len(cal.results)} rows pass "
        f"(+-{ERROR_BOUND:.0%}, or an upper bound for short samples and check=bound rows)"
    )
    if cal.context:
        ctx = [(f"{gb} GB", f"{ours:,}", f"{pub:,}", f"{ours / pub:.2f}") for gb, ours, pub in cal.context]
        out += [
            "",
            "Max context, Llama-3.1-8B r=32 batch 1 (the longest sequence whose estimate fits the card):",
            table(ctx, ("card", "lowvram", "Unsloth published", "ratio")),
        ]
        checked = [ours / pub for gb, ours, pub in cal.context if gb in CONTEXT_CHECKED_GB]
        out.append(
            f"ratio at {'/'.join(map(str, CONTEXT_CHECKED_GB))} GB: min {min(checked):.2f}, "
            f"max {max(checked):.2f} (needs {CONTEXT_FLOOR} to 1)"
        )
    for r in cal.out_of_bound:
        what = f"beyond +-{ERROR_BOUND:.0%}" if r.full_length else "below the measurement (not an upper bound)"
        out.append(f"FAIL: {r.point.label} ({r.point.stack}) is off by {r.lowvram_error:+.1%}, {what}")
    if cal.lowvram_mae >= cal.unsloth_mae:
        out.append("FAIL: lowvram's mean error is not below Unsloth's")
    for gb, ours, pub in cal.context_failures:
        out.append(f"FAIL: max context at {gb} GB is {ours:,} tokens, {ours / pub:.2f}x Unsloth's {pub:,}")
    if cal.ok:
        out.append(
            "OK: every row passes, lowvram's mean error is below Unsloth's, and the max context is "
            f"{CONTEXT_FLOOR}x to 1x Unsloth's table"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csv", type=Path, default=DATA, help="calibration points (default: scripts/data/vram_points.csv)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each estimate's breakdown")
    args = ap.parse_args(argv)
    cal = calibrate(args.csv)
    print("\n".join(report(cal, args.verbose)))
    return 0 if cal.ok else 1


if __name__ == "__main__":
    sys.exit(main())
