"""Weight bytes of a 4-bit base as lowvram's hf backend loads it, against the memory estimator.

    python scripts/bench_4bit_weights.py                     # Llama-3.2-1B and -3B dimensions
    python scripts/bench_4bit_weights.py --models unsloth/Llama-3.2-1B-Instruct-bnb-4bit --keep /tmp/ckpts

For each catalog model: random bf16 weights at its real dimensions are saved once (safetensors in a
temporary folder, about 2 bytes per parameter of disk), then loaded on the CPU exactly as the hf
backend loads a 4-bit base: transformers + bitsandbytes, NF4 with double quantization, bf16
compute. Printed, in MiB:
- nf4 linears: what bitsandbytes allocates for the quantized layers (packed 4-bit codes, 8-bit block
  absmax codes, fp32 nested absmax, code tables), beside memory.py's NF4 formula (within 5% expected);
- other weights (embeddings, lm_head, norms) as loaded, after PEFT's prepare_model_for_kbit_training
  (everything fp32: what the hf backend did before) and after lowvram's prepare_4bit_model
  (embeddings bf16, norms fp32): the fp32 saving;
- the whole model after lowvram's preparation beside the estimator's weights term (hf stack, bf16).
Bytes are counted from the tensors themselves, so the figures do not depend on the machine; the
timings do. Needs about the model's bf16 size in RAM, and as much disk.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MIB = 2**20
DEFAULT_MODELS = ("unsloth/Llama-3.2-1B-Instruct-bnb-4bit", "unsloth/Llama-3.2-3B-Instruct-bnb-4bit")


def build_checkpoint(name: str, out: Path) -> Path:
    """Random bf16 weights at `name`'s catalog dimensions, saved as transformers saves a checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    from scripts.gpu_check import config_for  # the GPU check's models, at the same dimensions

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_for(name), dtype=torch.bfloat16)  # bf16: no fp32 copy in RAM
    model.save_pretrained(str(out), max_shard_size="1GB")
    del model
    return out


def nf4_bytes(model) -> tuple[int, int]:
    """(quantized weights' numel, bytes bitsandbytes holds for them) over every Linear4bit."""
    import bitsandbytes as bnb

    numel = nbytes = 0
    for m in model.modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        w, qs = m.weight, m.weight.quant_state
        numel += qs.shape.numel()
        parts = [w, qs.absmax, qs.code]
        if qs.nested:
            parts += [qs.state2.absmax, qs.state2.code, qs.offset]
        nbytes += sum(t.numel() * t.element_size() for t in parts if t is not None)
    return numel, nbytes


def other_bytes(model) -> dict[str, int]:
    """Bytes of the weights bitsandbytes did not quantize, by dtype (tied weights counted once)."""
    out: dict[str, int] = {}
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.__class__.__name__ == "Params4bit":
            continue
        key = str(p.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + p.numel() * p.element_size()
    return out


def fmt(d: dict[str, int]) -> str:
    return " + ".join(f"{v / MIB:,.1f} {k}" for k, v in sorted(d.items())) + f" = {sum(d.values()) / MIB:,.1f}"


def measure(name: str, ckpt: Path) -> dict:
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from lowvram.model.hf_backend import prepare_4bit_model, quantization_config
    from lowvram.plan.catalog import get_spec
    from lowvram.plan.memory import GIB, NF4_BYTES_PER_PARAM, NF4_SCALE_BYTES_PER_PARAM, estimate

    spec = get_spec(name)
    t0 = time.monotonic()
    qcfg = quantization_config(torch.bfloat16)  # the hf backend's, for a bf16 plan
    model = AutoModelForCausalLM.from_pretrained(
        str(ckpt), dtype=torch.bfloat16, quantization_config=qcfg, device_map={"": "cpu"}
    )
    load_s = time.monotonic() - t0
    n_q, q_bytes = nf4_bytes(model)
    formula = n_q * (NF4_BYTES_PER_PARAM + NF4_SCALE_BYTES_PER_PARAM)
    loaded = other_bytes(model)
    prepare_4bit_model(model, torch.bfloat16)
    ours = other_bytes(model)
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # upcasts what is still 16-bit
    peft = other_bytes(model)
    est = (
        estimate(
            spec,
            "sft",
            max_seq_len=512,
            batch_size=1,
            lora_r=16,
            grad_ckpt="standard",
            optim="adamw_8bit",
            dtype="bf16",
            backend="hf",
            load_in_4bit=True,
        ).weights_gib
        * GIB
    )
    total = q_bytes + sum(ours.values())
    return {
        "model": name,
        "params_b": spec.params_b,
        "load_s": load_s,
        "nf4_numel": n_q,
        "nf4_bytes": q_bytes,
        "nf4_formula": formula,
        "loaded": loaded,
        "peft": peft,
        "lowvram": ours,
        "total_lowvram": total,
        "total_peft": q_bytes + sum(peft.values()),
        "estimate": est,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--keep", help="folder to keep (and reuse) the random checkpoints in")
    args = ap.parse_args()
    import platform

    import bitsandbytes
    import torch
    import transformers

    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        for name in args.models.split(","):
            ckpt = root / name.replace("/", "_")
            if not (ckpt / "config.json").is_file():
                t0 = time.monotonic()
                build_checkpoint(name, ckpt)
                print(f"{name}: random bf16 checkpoint written in {time.monotonic() - t0:.0f} s", flush=True)
            r = measure(name, ckpt)
            rows.append(r)
            print(f"\n{name} ({r['params_b']:.2f}B), loaded in NF4 in {r['load_s']:.0f} s")
            print(
                f"  nf4 linears       {r['nf4_bytes'] / MIB:9,.1f} MiB measured, {r['nf4_formula'] / MIB:9,.1f} MiB "
                f"memory.py formula ({r['nf4_formula'] / r['nf4_bytes'] - 1:+.2%}); "
                f"{r['nf4_bytes'] / r['nf4_numel']:.4f} bytes/param"
            )
            print(f"  other, as loaded  {fmt(r['loaded'])} MiB")
            print(f"  other, PEFT prep  {fmt(r['peft'])} MiB  (before: prepare_model_for_kbit_training)")
            print(f"  other, lowvram    {fmt(r['lowvram'])} MiB  (after: prepare_4bit_model)")
            saved = r["total_peft"] - r["total_lowvram"]
            print(
                f"  whole model       {r['total_peft'] / MIB:9,.1f} MiB before, {r['total_lowvram'] / MIB:9,.1f} MiB "
                f"after ({saved / MIB:,.1f} MiB = {saved / r['total_peft']:.0%} saved)"
            )
            print(
                f"  estimator         {r['estimate'] / MIB:9,.1f} MiB weights term, hf stack "
                f"({r['estimate'] / r['total_lowvram'] - 1:+.2%} vs after)",
                flush=True,
            )
    print(
        "\nmodel                                    nf4 formula/measured  weights before  after   saved  estimate/after"
    )
    for r in rows:
        print(
            f"{r['model']:<40} {r['nf4_formula'] / r['nf4_bytes']:>20.4f}  {r['total_peft'] / 2**30:>10.3f} GiB "
            f"{r['total_lowvram'] / 2**30:6.3f}  {(r['total_peft'] - r['total_lowvram']) / 2**30:6.3f}  "
            f"{r['estimate'] / r['total_lowvram']:>14.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
