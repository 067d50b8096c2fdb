"""Fold a LoRA adapter into 16-bit weights, one tensor at a time.

    base = choose_base(run_dir / "base.json")            # 16-bit original if local, else the 4-bit base
    adapter = read_adapter(run_dir / "dpo" / "adapter")
    report = merge_lora(base, adapter, out_dir)          # writes a Hugging Face folder
    print(report.line())

Why not PEFT's `merge_and_unload()`: it needs the whole model in memory, so an 8B merge needs
16 GB of RAM and fails on free Colab (12 GB). Here every safetensors shard is read through its
header (lowvram.utils.safetensors_io): tensors the adapter does not touch are copied byte for byte (or
converted in bounded chunks), and each targeted weight is loaded alone, gets `W += scale * B @ A`
in float32, and is written straight to the output. Peak memory is about one weight matrix, whatever the model size.
A 4-bit (bitsandbytes NF4/FP4) base is dequantized tensor by tensor in plain torch.

Only torch is imported, and only inside the functions that need it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from lowvram.errors import UserError
from lowvram.model import wheels
from lowvram.model.tiny import TINY_NAME, ensure_tiny_model
from lowvram.model.wheels import PYPI_PREFIX
from lowvram.utils.safetensors_io import (
    DTYPE_BYTES,
    FLOAT_DTYPES,
    SafetensorsWriter,
    TensorEntry,
    read_safetensors_header,
    read_tensor,
    torch_dtype,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OUT_DTYPES = {"bf16": "BF16", "f16": "F16"}
# bitsandbytes stores each 4-bit weight as packed bytes plus these companions (see `_dequantize_4bit`).
BNB_SUFFIXES = (
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
)


# ------------------------------------------------------------------ the base checkpoint


@dataclass(frozen=True)
class BaseChoice:
    """Which checkpoint the merge starts from, and why."""

    path: Path
    quantized_4bit: bool
    reason: str


def local_checkpoint(name: str | None) -> Path | None:
    """A local folder holding `name`'s safetensors: the path itself, or the Hugging Face cache. Never downloads."""
    if not name:
        return None
    p = Path(name).expanduser()
    if (p / "config.json").is_file():
        return p if _shards(p) else None
    if name.startswith(PYPI_PREFIX):
        return wheels.ensure(name)
    if name.startswith("builtin:"):
        return ensure_tiny_model() if name == TINY_NAME else None
    if name.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(name, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # not in the cache (or no hub library): not available locally
        return None
    return snap if (snap / "config.json").is_file() and _shards(snap) else None


def _is_4bit(model_dir: Path) -> bool:
    cfg = json.loads((model_dir / "config.json").read_text())
    q = cfg.get("quantization_config") or {}
    return bool(q.get("load_in_4bit")) or q.get("quant_method") == "bitsandbytes" and not q.get("load_in_8bit")


def choose_base(base_json: Path) -> BaseChoice:
    """The checkpoint to merge into: the 16-bit original when it is on this machine, else the 4-bit base.

    `base_json` is the run's base.json: {"model", "model_path", "base_16bit", "load_in_4bit"}.
    """
    try:
        info = json.loads(base_json.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(
            f"Cannot read {base_json}: {e}.", hint="The run directory is incomplete; re-run training."
        ) from None
    model = info.get("model")
    original = info.get("base_16bit")
    if original and (p := local_checkpoint(original)) is not None and not _is_4bit(p):
        return BaseChoice(p, False, f"16-bit original {original} found locally at {p}")
    loaded = local_checkpoint(info.get("model_path")) or local_checkpoint(model)
    if loaded is None:
        raise UserError(
            f"The base model {model!r} is not on this machine.",
            problems=[
                f"looked for {info.get('model_path') or model!r}"
                + (f" and the 16-bit original {original!r}" if original else "")
            ],
            hint="Export on the machine that trained, or download the base first "
            "(huggingface-cli download NAME) and run export again.",
        )
    if _is_4bit(loaded):
        why = f"the 16-bit original {original} is not downloaded" if original else "no 16-bit original is known"
        return BaseChoice(loaded, True, f"dequantizing the 4-bit base {model} ({why}; small rounding vs the original)")
    return BaseChoice(loaded, False, f"16-bit base {model} at {loaded}")


def _shards(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / f for f in files]
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else []


# ------------------------------------------------------------------ the adapter


@dataclass(frozen=True)
class LoraPair:
    """One adapted weight: W += scale * B @ A (transposed for embeddings / fan_in_fan_out)."""

    weight: str  # base tensor name, e.g. model.layers.0.self_attn.q_proj.weight
    a: TensorEntry
    b: TensorEntry
    scale: float
    transpose: bool = False


@dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter as the merge needs it: which base weights change and by how much."""

    path: Path
    rank: int
    alpha: float
    pairs: dict[str, LoraPair]  # base weight name -> pair
    replaced: dict[str, TensorEntry] = field(default_factory=dict)  # modules_to_save: full new weights
    rows: dict[str, tuple] = field(default_factory=dict)  # trainable tokens: weight -> (row values, indices)

    def line(self) -> str:
        extra = f", {len(self.replaced)} full tensors" if self.replaced else ""
        extra += f", rows of {', '.join(self.rows)}" if self.rows else ""
        return f"LoRA r={self.rank} alpha={self.alpha:g} on {len(self.pairs)} weights{extra} ({self.path})"


def _pattern_value(module: str, pattern: dict, default):
    # PEFT matches rank_pattern / alpha_pattern keys against the end of the module name.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(adapter_dir: Path) -> Adapter:
    """Read a PEFT LoRA adapter folder; a corrupt or unsupported one raises UserError naming the problem."""
    cfg_path, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    hint = "Re-run the training stage that wrote it (lowvram run --resume RUN_DIR), or export an earlier stage."
    missing = [p.name for p in (cfg_path, weights) if not p.is_file()]
    if missing:
        raise UserError(f"Adapter folder {adapter_dir} is incomplete: missing {', '.join(missing)}.", hint=hint)
    try:
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"Adapter config {cfg_path} is corrupt: {e}.", hint=hint) from None
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')!r}; only LoRA adapters can be merged")
    if cfg.get("use_dora"):
        problems.append("use_dora is true: DoRA magnitudes are not supported by the streaming merge")
    if not isinstance(cfg.get("r"), int) or cfg["r"] <= 0 or not isinstance(cfg.get("lora_alpha", 8), (int, float)):
        problems.append(f"r={cfg.get('r')!r}, lora_alpha={cfg.get('lora_alpha')!r}: expected positive numbers")
    if problems:
        raise UserError(f"Cannot merge the adapter in {adapter_dir}:", problems, hint=hint)
    try:
        entries, _ = read_safetensors_header(weights)
    except ValueError as e:
        raise UserError(f"Adapter weights {weights} are corrupt: {e}.", hint=hint) from None

    rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", 8))
    rslora, fan_in_fan_out = bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out"))
    pairs: dict[str, LoraPair] = {}
    replaced: dict[str, TensorEntry] = {}
    bad: list[str] = []
    token_cfg = cfg.get("trainable_token_indices") or {}
    rows: dict[str, tuple] = {}
    for key, entry in entries.items():
        name = key.removeprefix("base_model.model.")
        tt = re.fullmatch(r"(.+)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?", name)
        if tt:  # PEFT trainable tokens: the full new values of some rows of an embedding
            module = tt.group(1)
            idx = (
                token_cfg
                if isinstance(token_cfg, list)
                else next((v for k, v in token_cfg.items() if module == k or module.endswith("." + k)), None)
            )
            if not idx or len(idx) != entry.shape[0]:
                bad.append(f"{key}: {entry.shape[0]} rows, but trainable_token_indices gives {idx!r}")
            else:
                rows[module + ".weight"] = (entry, list(idx))
            continue
        # Saved names: X.lora_A.weight (linear) or X.lora_embedding_A (embedding), maybe with an adapter name.
        m = re.fullmatch(r"(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight", name) or re.fullmatch(
            r"(.+)\.lora_(embedding_A|embedding_B)(?:\.[^.]+)?", name
        )
        if not m:
            if ".lora_" in name:
                bad.append(f"{key}: not a LoRA A/B weight this merge understands")
            else:  # modules_to_save, or a saved embedding's base layer: a full copy of a base tensor
                base_name = name.replace(".modules_to_save", "").replace(".default", "").replace(".base_layer", "")
                replaced[base_name] = entry
            continue
        module, which = m.group(1), m.group(2)
        if which.endswith("B"):
            continue
        b_key = key.replace(f".lora_{which}", f".lora_{which[:-1]}B")
        if b_key not in entries:
            bad.append(f"{key}: its lora_B partner {b_key} is missing")
            continue
        a, b = entry, entries[b_key]
        embedding = which == "embedding_A"
        # A is (r, in) and B is (out, r) for linears; embeddings store A as (r, vocab) and B as (dim, r).
        r_a = a.shape[0]
        if len(a.shape) != 2 or len(b.shape) != 2 or b.shape[1] != r_a:
            bad.append(f"{module}: A {list(a.shape)} and B {list(b.shape)} do not share a rank")
            continue
        r_mod = int(_pattern_value(module, cfg.get("rank_pattern") or {}, rank))
        a_mod = float(_pattern_value(module, cfg.get("alpha_pattern") or {}, alpha))
        if r_mod != r_a:
            bad.append(f"{module}: rank {r_a} in the weights, {r_mod} in adapter_config.json")
            continue
        scale = a_mod / (math.sqrt(r_mod) if rslora else r_mod)
        pairs[module + ".weight"] = LoraPair(module + ".weight", a, b, scale, transpose=embedding or fan_in_fan_out)
    if not pairs and not replaced:
        bad.append("no LoRA weights found")
    if bad:
        raise UserError(f"Adapter weights {weights} do not look like a PEFT LoRA adapter:", bad[:8], hint=hint)
    return Adapter(adapter_dir, rank, alpha, pairs, replaced, rows)


# ------------------------------------------------------------------ 4-bit dequantization


def _bnb_state(entries: dict[str, TensorEntry], weight: str) -> dict | None:
    for suffix in (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4"):
        if weight + suffix in entries:
            return json.loads(read_tensor(entries[weight + suffix]).numpy().tobytes())
    return None


def _dequantize_4bit(entries: dict[str, TensorEntry], weight: str, state: dict):
    """bitsandbytes' blockwise 4-bit format, dequantized in plain torch (no GPU, no bitsandbytes).

    Each byte packs two 4-bit codes (high nibble first); code -> value via `quant_map` (NF4 or FP4
    levels), times the absmax of its block. With double quantization the absmaxes are themselves
    8-bit codes: nested_quant_map[code] * nested_absmax[block of 256] + offset.
    """
    import torch

    packed = read_tensor(entries[weight]).reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1).long()
    qmap = read_tensor(entries[weight + ".quant_map"]).float()
    absmax = read_tensor(entries[weight + ".absmax"])
    if weight + ".nested_absmax" in entries:
        nested_map = read_tensor(entries[weight + ".nested_quant_map"]).float()
        nested_absmax = read_tensor(entries[weight + ".nested_absmax"]).float()
        nested_block = int(state.get("nested_blocksize", 256))
        vals = nested_map[absmax.long()]
        vals = vals.view(-1)
        scales = nested_absmax.repeat_interleave(nested_block)[: vals.numel()]
        absmax = vals * scales + float(state.get("nested_offset", 0.0))
    absmax = absmax.float()
    shape = tuple(state["shape"])
    n = math.prod(shape)
    block = int(state["blocksize"])
    values = qmap[codes[:n]] * absmax.repeat_interleave(block)[:n]
    # In the dtype bitsandbytes itself dequantizes to (the model's compute dtype), so the merge starts
    # from exactly the weights the adapter was trained against.
    dtype = getattr(torch, str(state.get("dtype", "float32")).removeprefix("torch."), torch.float32)
    return values.reshape(shape).to(dtype)


# ------------------------------------------------------------------ the merge


@dataclass(frozen=True)
class MergeReport:
    """What `merge_lora` wrote."""

    out_dir: Path
    base: BaseChoice
    dtype: str  # "bf16" or "f16"
    dtype_reason: str
    merged: int  # weights that got a LoRA delta
    copied: int  # tensors written unchanged (or only converted)
    nbytes: int  # bytes of safetensors written

    def line(self) -> str:
        return (
            f"merged {self.merged} LoRA weights, {self.copied} tensors unchanged, {self.dtype} "
            f"({self.dtype_reason}); {self.nbytes / 2**20:.1f} MiB in {self.out_dir}"
        )


def merged_dtype(base_dir: Path, want: str = "auto") -> tuple[str, str]:
    """The merged weights' 16-bit dtype and why."""
    if want in OUT_DTYPES:
        return want, "asked for"
    cfg = json.loads((base_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg) if "torch_dtype" not in cfg and "dtype" not in cfg else cfg
    stored = str(cfg.get("dtype") or cfg.get("torch_dtype") or "")
    if "float16" == stored.removeprefix("torch."):
        return "f16", "the base checkpoint is float16"
    if "bfloat16" in stored:
        return "bf16", "the base checkpoint is bfloat16"
    return "bf16", f"the base checkpoint is {stored or 'float32'}; bf16 keeps its range, f16 could overflow"


class How(Enum):
    """How one output tensor is made from the base (and the adapter)."""

    COPY = "copy"  # the base's bytes, unchanged
    CONVERT = "convert"  # a float tensor converted to the output dtype
    MERGE = "merge"  # W + scale * B @ A, and/or trained rows replaced
    DEQUANT = "dequant"  # a 4-bit base weight dequantized, no adapter change
    DEQUANT_MERGE = "dequant+merge"  # dequantized, then merged
    REPLACE = "replace"  # the adapter's full copy (modules_to_save)

    @property
    def dequantizes(self) -> bool:
        return self in (How.DEQUANT, How.DEQUANT_MERGE)


@dataclass(frozen=True)
class LayoutRow:
    """One tensor of the merged output: what it is, where its base lies, and how it is made."""

    name: str
    dtype: str  # safetensors dtype written
    shape: tuple[int, ...]
    entry: TensorEntry  # the base tensor (the packed bytes, for a 4-bit weight)
    how: How
    entries: dict[str, TensorEntry] | None = None  # the base shard's tensors, for a 4-bit weight's companions


@dataclass(frozen=True)
class ShardLayout:
    """One output shard: named like the base's, with its tensors in the base's order."""

    shard: Path  # the base shard it mirrors
    rows: tuple[LayoutRow, ...]


def merge_layout(base_dir: Path, adapter: Adapter, quantized_4bit: bool, out_dtype: str) -> list[ShardLayout]:
    """Per output shard, each tensor and how it is made, checked against the adapter.

    Raises UserError when the adapter does not fit this base (a weight it names is missing or has another shape).
    """
    st_out = OUT_DTYPES[out_dtype]
    shards = _shards(base_dir)
    if not shards:
        raise UserError(
            f"{base_dir} holds no model.safetensors (or index): only safetensors checkpoints can be merged."
        )
    layout: list[ShardLayout] = []
    seen: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        try:
            entries, _ = read_safetensors_header(shard)
        except (OSError, ValueError) as e:
            raise UserError(f"Base checkpoint shard {shard} is unreadable: {e}.") from None
        rows = []
        for name, e in entries.items():
            if quantized_4bit and any(name.endswith(s) for s in BNB_SUFFIXES):
                continue  # folded into the dequantized weight
            state = _bnb_state(entries, name) if quantized_4bit else None
            if state is not None:
                shape, how, src_float = tuple(state["shape"]), How.DEQUANT, True
            else:
                shape, how, src_float = e.shape, How.COPY, e.dtype in FLOAT_DTYPES
            dtype = st_out if src_float else e.dtype
            if how is How.COPY and src_float and e.dtype != st_out:
                how = How.CONVERT
            if name in adapter.pairs or name in adapter.rows:
                how = How.DEQUANT_MERGE if how.dequantizes else How.MERGE
            if name in adapter.replaced:
                how = How.REPLACE
            seen[name] = shape
            rows.append(LayoutRow(name, dtype, shape, e, how, entries if how.dequantizes else None))
        layout.append(ShardLayout(shard, tuple(rows)))
    problems = []
    for name, pair in adapter.pairs.items():
        if name not in seen:
            problems.append(f"{name}: adapted by the adapter, absent from the base")
            continue
        out_f, in_f = seen[name] if len(seen[name]) == 2 else (None, None)
        want = (pair.a.shape[1], pair.b.shape[0]) if pair.transpose else (pair.b.shape[0], pair.a.shape[1])
        if (out_f, in_f) != want:
            problems.append(f"{name}: base shape {list(seen[name])}, the adapter's delta is {list(want)}")
    for name, entry in adapter.replaced.items():
        if name not in seen:
            problems.append(f"{name}: saved in the adapter (modules_to_save), absent from the base")
        elif seen[name] != entry.shape:
            problems.append(f"{name}: base shape {list(seen[name])}, adapter copy {list(entry.shape)}")
    for name, (values, idx) in adapter.rows.items():
        if name not in seen:
            problems.append(f"{name}: trained rows saved in the adapter, absent from the base")
        elif len(seen[name]) != 2 or seen[name][1] != values.shape[1] or max(idx) >= seen[name][0]:
            problems.append(f"{name}: base shape {list(seen[name])}, trained rows {list(values.shape)} at {idx}")
    if problems:
        raise UserError(
            f"The adapter in {adapter.path} does not fit the base {base_dir}:",
            problems[:8],
            hint="Was it trained on another model? Export needs the base the run trained.",
        )
    return layout


def merged_nbytes(layout: list[ShardLayout]) -> int:
    return sum(math.prod(row.shape) * DTYPE_BYTES[row.dtype] for shard in layout for row in shard.rows)


def _merged_weight(row: LayoutRow, pair: LoraPair | None, replaced: TensorEntry | None, st_out: str, rows=None):
    if replaced is not None:
        w = read_tensor(replaced).float()
    elif row.how.dequantizes:
        w = _dequantize_4bit(row.entries, row.name, _bnb_state(row.entries, row.name)).float()
    else:
        w = read_tensor(row.entry).float()
    if pair is not None:
        a, b = read_tensor(pair.a).float(), read_tensor(pair.b).float()
        if pair.transpose:
            w.addmm_(a.t(), b.t(), alpha=pair.scale)  # (B @ A)^T = A^T @ B^T, without a temporary
        else:
            w.addmm_(b, a, alpha=pair.scale)  # in place: no second full-size matrix
    if rows is not None:  # trainable tokens: those rows are replaced by their trained values
        values, idx = rows
        w[idx] = (read_tensor(values) if isinstance(values, TensorEntry) else values).float().reshape(len(idx), -1)
    return w.reshape(row.shape).to(torch_dtype(st_out))


def merge_lora(
    base: BaseChoice,
    adapter: Adapter,
    out_dir: Path,
    tokenizer_dir: Path | None = None,
    dtype: str = "auto",
    layout: list[ShardLayout] | None = None,
) -> MergeReport:
    """Write base + adapter as a 16-bit Hugging Face folder in `out_dir` (which must not exist yet).

    Shard files and names mirror the base. The tokenizer comes from `tokenizer_dir` (the one used in
    training) when given, else from the base folder. `layout`: merge_layout's, when already checked.
    """
    out_dtype, why = merged_dtype(base.path, dtype)
    st_out = OUT_DTYPES[out_dtype]
    layout = layout or merge_layout(base.path, adapter, base.quantized_4bit, out_dtype)
    out_dir.mkdir(parents=True)
    merged = copied = nbytes = 0
    weight_map: dict[str, str] = {}
    for shard in layout:
        declared = [(row.name, row.dtype, row.shape) for row in shard.rows]
        with SafetensorsWriter(out_dir / shard.shard.name, declared, {"format": "pt"}) as w:
            for row in shard.rows:
                weight_map[row.name] = shard.shard.name
                if row.how is How.COPY:
                    w.copy_from(row.entry)
                    copied += 1
                elif row.how is How.CONVERT:
                    w.convert_from(row.entry, row.dtype)
                    copied += 1
                else:
                    w.write(
                        row.name,
                        _merged_weight(
                            row,
                            adapter.pairs.get(row.name),
                            adapter.replaced.get(row.name),
                            st_out,
                            adapter.rows.get(row.name),
                        ),
                    )
                    merged += row.how is not How.DEQUANT
                    copied += row.how is How.DEQUANT
            nbytes += w.nbytes
    if len(layout) > 1:
        index = {"metadata": {"total_size": merged_nbytes(layout)}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    _write_config(base.path, out_dir, out_dtype)
    for extra in ("generation_config.json",):
        if (base.path / extra).is_file():
            shutil.copy2(base.path / extra, out_dir / extra)
    copy_tokenizer(tokenizer_dir or base.path, out_dir, fallback=base.path)
    _stop_on_tokenizer_eos(out_dir)
    return MergeReport(out_dir, base, out_dtype, why, merged, copied, nbytes)


def _stop_on_tokenizer_eos(out_dir: Path) -> None:
    """generation_config.json stops on the trained tokenizer's EOS too: a base given a named template
    trains with the template's end-of-turn token as its EOS (train._apply_template), which the base's
    generation config does not know; without it `generate` on the merged model never ends a turn."""
    cfg_path, tok_cfg = out_dir / "generation_config.json", out_dir / "tokenizer_config.json"
    if not tok_cfg.is_file():
        return
    eos = json.loads(tok_cfg.read_text()).get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    tok_json = out_dir / "tokenizer.json"
    if not eos or not tok_json.is_file():
        return
    added = {t["content"]: t["id"] for t in json.loads(tok_json.read_text()).get("added_tokens", [])}
    if eos not in added:
        return
    gen = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    have = gen.get("eos_token_id")
    have = [] if have is None else [have] if isinstance(have, int) else list(have)
    if added[eos] not in have:
        gen["eos_token_id"] = [added[eos], *have]
        cfg_path.write_text(json.dumps(gen, indent=2))


def _write_config(base_dir: Path, out_dir: Path, out_dtype: str) -> None:
    cfg = json.loads((base_dir / "config.json").read_text())
    cfg.pop("quantization_config", None)  # the merged weights are plain 16-bit
    cfg["dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"] = (
        "bfloat16" if out_dtype == "bf16" else "float16"
    )
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)


def copy_tokenizer(src: Path, out_dir: Path, fallback: Path | None = None) -> None:
    """Copy tokenizer files, making the added tokens visible to llama.cpp's converter.

    transformers 5's save_pretrained writes no `tokenizer.model`, but the converter needs that
    SentencePiece model for SentencePiece vocabularies (without it, it silently reads tokenizer.json
    another way and tokenizes differently): it is taken from `fallback` (the base checkpoint).

    transformers 5 keeps added tokens only in tokenizer.json, but the converter's SentencePiece
    path reads their ids and "special" flags from tokenizer_config.json's `added_tokens_decoder`.
    Without it, `<|im_end|>` would become ordinary text in the GGUF and llama.cpp would split it.
    """
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out_dir / name)
    if (
        fallback is not None
        and not (out_dir / "tokenizer.model").is_file()
        and (fallback / "tokenizer.model").is_file()
    ):
        shutil.copy2(fallback / "tokenizer.model", out_dir / "tokenizer.model")
    tj, tc = out_dir / "tokenizer.json", out_dir / "tokenizer_config.json"
    if tj.is_file() and tc.is_file():
        cfg = json.loads(tc.read_text())
        if "added_tokens_decoder" not in cfg:
            added = json.loads(tj.read_text()).get("added_tokens") or []
            cfg["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
            tc.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
