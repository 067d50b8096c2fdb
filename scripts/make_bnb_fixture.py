"""Regenerate tests/data/bnb4bit.safetensors: weights quantized and dequantized by bitsandbytes itself.

    python scripts/make_bnb_fixture.py      # bitsandbytes comes with the test extra (CPU works)

lowvram dequantizes 4-bit bases in plain torch (lowvram/export/merge.py) so export runs without
bitsandbytes or a GPU. This file pins that code to bitsandbytes' own results: for NF4 and FP4,
with and without double quantization, it stores each weight exactly as transformers saves a
4-bit checkpoint (packed bytes + absmax + quant_map [+ nested_*] + quant_state JSON) and, beside
it, bitsandbytes' `dequantize_4bit` output as `<name>.reference`.
"""

from __future__ import annotations

from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "bnb4bit.safetensors"


def main() -> int:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tensors = {}
    for quant_type in ("nf4", "fp4"):
        for nested in (True, False):
            name = f"{quant_type}{'_nested' if nested else ''}.weight"
            # 96 x 128: 192 blocks of 64, fewer than one 256-block of nested absmax (its ragged end).
            # Rows are a multiple of the block size, as in real checkpoints: bitsandbytes' native CPU
            # dequantizer (0.50.2) restarts blocks at each row and disagrees with its quantizer otherwise.
            w = (torch.randn(96, 128) * 0.05).to(torch.bfloat16)
            packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=nested)
            tensors[name] = packed
            for key, value in state.as_dict(packed=True).items():
                tensors[f"{name}.{key}"] = value
            tensors[f"{name}.reference"] = F.dequantize_4bit(packed, state).to(torch.bfloat16)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(OUT),
        metadata={"bitsandbytes": bnb.__version__, "torch": torch.__version__},
    )
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes) with bitsandbytes {bnb.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
