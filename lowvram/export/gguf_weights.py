"""A GGUF's own weights, back in the Hugging Face model: what transformers computes with exactly the numbers
llama.cpp runs, and how far each tensor is from the merged model's.

    report = load_gguf_weights(gguf_path, model, merged_dir)   # model now holds the GGUF's weights
    report.worst                                               # (relative error, GGUF name, GGML type, bound)
    report.problems                                            # tensors beyond their type's rounding, unmapped ones

gguf-py (the converter's own copy) dequantizes every GGML type in numpy, K-quants included. Names go
back through gguf-py's tensor-name map (the table the converter wrote them with), and the layout changes
the converter makes are undone by transformers' own GGUF tensor processors (llama's Q/K row permutation
for rotary embeddings, Gemma's norm offset): the same code `from_pretrained(gguf_file=...)` uses, called
directly because transformers only enables it for PyPI's `gguf`, which collides with the converter's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Relative RMS error ||gguf - merged|| / ||merged|| a faithful tensor stays under, by GGML type. Rounding to
# b bits per weight with a scale per block of 32 or 256 gives about 2^-b relative error; the bounds leave
# about 3x for heavy-tailed rows. A wrong, permuted or misplaced tensor is off by about 1 (141% for an
# unrelated one of the same size), so the bounds sit far below that.
REL_ERROR_BOUND = {
    "F32": 1e-5,
    "F16": 2e-3,  # from f32: 11-bit mantissa; from bf16: exact
    "BF16": 1e-2,
    "Q8_0": 0.03,
    "Q8_1": 0.03,
    "Q6_K": 0.06,
    "Q5_0": 0.12,
    "Q5_1": 0.12,
    "Q5_K": 0.12,
    "Q4_0": 0.2,
    "Q4_1": 0.2,
    "Q4_K": 0.2,
    "IQ4_NL": 0.2,
    "IQ4_XS": 0.2,
    "Q3_K": 0.35,
}
DEFAULT_BOUND = 0.6  # 2- and 3-bit types not listed: still well under an unrelated tensor's ~1.4
EXACT = 1e-3  # every tensor this close: the merged model's own forward stands for the GGUF's weights
NOT_WEIGHTS = ("rope_freqs.weight",)  # computed by the converter from the config, not a checkpoint tensor


@dataclass
class WeightReport:
    """What loading a GGUF's weights into the model found."""

    arch: str
    types: dict[str, int] = field(default_factory=dict)  # GGML type -> tensor count
    errors: list[tuple[float, str, str, float]] = field(default_factory=list)  # (rel error, name, type, bound)
    unmapped: list[str] = field(default_factory=list)  # GGUF tensors with no model parameter
    missing: list[str] = field(default_factory=list)  # model parameters no GGUF tensor filled
    dequantize_s: float = 0.0

    @property
    def worst(self) -> tuple[float, str, str, float] | None:
        return max(self.errors, key=lambda e: e[0] / e[3]) if self.errors else None

    @property
    def exact(self) -> bool:
        """Every tensor equals the merged one to EXACT (16-bit files of a 16-bit merge)."""
        return bool(self.errors) and not self.unmapped and not self.missing and max(e[0] for e in self.errors) <= EXACT

    @property
    def problems(self) -> list[str]:
        out = []
        bad = sorted((e for e in self.errors if not e[0] <= e[3]), key=lambda e: -e[0] / e[3])
        for err, name, ggml_type, bound in bad[:3]:
            out.append(
                f"tensor {name} ({ggml_type}) differs from the merged model's by {100 * err:.1f}% "
                f"(rounding to {ggml_type} stays under {100 * bound:g}%)"
            )
        if len(bad) > 3:
            out.append(f"... and {len(bad) - 3} more tensors")
        if self.missing:
            out.append(f"no GGUF tensor for {', '.join(self.missing[:3])}{' ...' if len(self.missing) > 3 else ''}")
        return out

    @property
    def warnings(self) -> list[str]:
        """What could not be checked: GGUF tensors this model has no parameter for."""
        if not self.unmapped:
            return []
        more = f" and {len(self.unmapped) - 3} more" if len(self.unmapped) > 3 else ""
        return [f"GGUF tensors with no place in the model, not checked: {', '.join(self.unmapped[:3])}{more}"]

    def line(self) -> str:
        w = self.worst
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(self.types.items(), key=lambda kv: -kv[1]))
        return f"{kinds}; largest rounding {100 * w[0]:.2f}% ({w[1]}, {w[2]})" if w else kinds


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> size
_STRING, _ARRAY, _UINT32 = 8, 9, 4


def read_tensors(path: Path) -> tuple[str, list]:
    """(architecture, [(name, GGMLQuantizationType, raw numpy view)]) of a GGUF, its weights memory-mapped.

    gguf-py's GGUFReader also parses every metadata value into numpy objects: for a 49k-token vocabulary
    that is most of the time verification spends per file. Here the metadata is skipped, only the
    architecture and alignment read; the tensors are the same views GGUFReader gives (typed for F32/F16,
    bytes in rows for the quantized types), which gguf.quants.dequantize takes.
    """
    import struct

    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    data = np.memmap(str(path), mode="r")
    buf = memoryview(data)
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version}, expected 2 or 3 (or a big-endian file)")
    offs = 24

    def string() -> str:
        nonlocal offs
        (n,) = struct.unpack_from("<Q", buf, offs)
        offs += 8 + n
        return bytes(buf[offs - n : offs]).decode("utf-8", errors="replace")

    def skip(vtype: int) -> None:
        nonlocal offs
        if vtype == _STRING:
            (n,) = struct.unpack_from("<Q", buf, offs)
            offs += 8 + n
        elif vtype == _ARRAY:
            etype, count = struct.unpack_from("<IQ", buf, offs)
            offs += 12
            if etype in _SCALAR_BYTES:
                offs += _SCALAR_BYTES[etype] * count
            else:
                for _ in range(count):
                    skip(etype)
        else:
            offs += _SCALAR_BYTES[vtype]

    arch, alignment = "", 32
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", buf, offs)
        offs += 4
        if key == "general.architecture" and vtype == _STRING:
            arch = string()
        elif key == "general.alignment" and vtype == _UINT32:
            (alignment,) = struct.unpack_from("<I", buf, offs)
            offs += 4
        else:
            skip(vtype)
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", buf, offs)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, offs + 4)
        ggml_type, rel = struct.unpack_from("<IQ", buf, offs + 4 + 8 * n_dims)
        offs += 4 + 8 * n_dims + 12
        infos.append((name, dims, GGMLQuantizationType(ggml_type), rel))
    start = -(-offs // alignment) * alignment
    tensors = []
    for name, dims, qtype, rel in infos:
        shape = tuple(reversed(dims))
        n = int(np.prod(dims))
        block, size = GGML_QUANT_SIZES[qtype]
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == GGMLQuantizationType.F32 else np.float16
            view = np.frombuffer(data, dtype=dtype, count=n, offset=start + rel).reshape(shape)
        else:
            view = np.frombuffer(data, dtype=np.uint8, count=n * size // block, offset=start + rel)
            view = view.reshape(quant_shape_to_byte_shape(shape, qtype))
        tensors.append((name, qtype, view))
    return arch, tensors


def _processor(arch: str, config):
    """transformers' per-architecture undo of the converter's layout changes (identity for most)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, Gemma2TensorProcessor, TensorProcessor

    processors = {"gemma": Gemma2TensorProcessor, **TENSOR_PROCESSORS}  # Gemma 1 stores norms + 1 too
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    return processors.get(arch, TensorProcessor)(config=cfg.to_dict())


def _name_map(arch: str, model) -> dict[str, str]:
    """GGUF tensor name -> model parameter name, from gguf-py's table (the one the converter writes with)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    key = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    if key is None:
        return {}
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    table = get_tensor_name_map(key, cfg.num_hidden_layers)
    out = {}
    for hf_name in model.state_dict():
        stem, _, suffix = hf_name.rpartition(".")
        gguf_name = table.get_name(stem)
        if gguf_name is not None:
            out.setdefault(f"{gguf_name}.{suffix}", hf_name)
    return out


def _merged_tensors(merged_dir: Path) -> dict[str, Path]:
    from safetensors import safe_open

    where = {}
    for shard in sorted(merged_dir.glob("*.safetensors")):
        with safe_open(str(shard), "np") as f:
            for k in f.keys():
                where[k] = shard
    return where


def load_gguf_weights(gguf_path: Path, model, merged_dir: Path | None = None) -> WeightReport:
    """Dequantize every tensor of `gguf_path` into `model` (in place) and measure each against `merged_dir`'s."""
    import time

    import numpy as np
    import torch
    from gguf.quants import dequantize
    from safetensors import safe_open

    arch, tensors = read_tensors(gguf_path)
    report = WeightReport(arch)
    processor = _processor(report.arch, model.config)
    names = _name_map(report.arch, model)
    params = model.state_dict()
    merged = _merged_tensors(merged_dir) if merged_dir is not None else {}
    handles = {}
    filled = set()
    try:
        for name, qtype, raw in tensors:
            ggml_type = qtype.name
            report.types[ggml_type] = report.types.get(ggml_type, 0) + 1
            if name in NOT_WEIGHTS:
                continue
            hf_name = names.get(name)
            if hf_name is None:
                report.unmapped.append(name)
                continue
            t0 = time.perf_counter()
            w = dequantize(raw, qtype)
            report.dequantize_s += time.perf_counter() - t0
            w = processor.process(weights=w, name=name).weights
            target = params[hf_name]
            w = np.require(w, np.float32, ["C", "W"]).reshape(tuple(target.shape))  # memmap views are read-only
            if hf_name in merged:
                shard = merged[hf_name]
                if shard not in handles:
                    handles[shard] = safe_open(str(shard), "pt")
                ref = handles[shard].get_tensor(hf_name).float().numpy().ravel()
                diff = w.ravel() - ref
                denom = float(np.dot(ref, ref))
                err = float(np.sqrt(np.dot(diff, diff) / denom)) if denom > 0 else float(np.dot(diff, diff) > 0)
                report.errors.append((err, name, ggml_type, REL_ERROR_BOUND.get(ggml_type, DEFAULT_BOUND)))
            with torch.no_grad():
                target.copy_(torch.from_numpy(w))
            filled.add(hf_name)
    finally:
        handles.clear()
        del tensors
    # tied weights (lm_head = embed_tokens) share storage with a filled one; buffers (rotary frequencies) are
    # computed, never stored in a GGUF
    filled_ptrs = {params[k].data_ptr() for k in filled}
    weights = dict(model.named_parameters(remove_duplicate=False))
    report.missing = [k for k in weights if k not in filled and weights[k].data_ptr() not in filled_ptrs]
    return report
