"""The models lowvram's recipes offer, with the dimensions the memory planner needs.

Dimensions are copied from each model's published `config.json`, so planning needs no download.
`builtin:tiny-llama` is built on the spot by `lowvram.tiny` (offline demo and tests).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lowvram.errors import UserError

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class ModelSpec:
    """One model: where to load it and how big it is."""

    name: str  # what the trainer loads (Unsloth pre-quantized repo, local path, or builtin:)
    family: str
    params_b: float  # billions of parameters
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    prequantized_4bit: bool  # the repo holds bitsandbytes 4-bit weights
    base_16bit: str | None = None  # the 16-bit original, used by merge when available locally
    explicit_head_dim: int | None = None  # config.json's head_dim, where it is not hidden_size / heads

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads


def _spec(name, family, params_b, layers, hidden, heads, kv, inter, vocab, tied, q4=True, base=None,
          head_dim=None) -> ModelSpec:
    return ModelSpec(name, family, params_b, layers, hidden, heads, kv, inter, vocab, tied, q4, base, head_dim)


CATALOG: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        _spec("unsloth/Llama-3.2-1B-Instruct-bnb-4bit", "llama", 1.24, 16, 2048, 32, 8, 8192, 128256, True,
              base="unsloth/Llama-3.2-1B-Instruct"),
        _spec("unsloth/Llama-3.2-3B-Instruct-bnb-4bit", "llama", 3.21, 28, 3072, 24, 8, 8192, 128256, True,
              base="unsloth/Llama-3.2-3B-Instruct"),
        _spec("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit", "llama", 8.03, 32, 4096, 32, 8, 14336, 128256, False,
              base="unsloth/Meta-Llama-3.1-8B-Instruct"),
        _spec("unsloth/Qwen2.5-0.5B-Instruct", "qwen", 0.49, 24, 896, 14, 2, 4864, 151936, True, q4=False,
              base="unsloth/Qwen2.5-0.5B-Instruct"),
        _spec("unsloth/Qwen2.5-1.5B-Instruct-bnb-4bit", "qwen", 1.54, 28, 1536, 12, 2, 8960, 151936, True,
              base="unsloth/Qwen2.5-1.5B-Instruct"),
        _spec("unsloth/Qwen2.5-3B-Instruct-bnb-4bit", "qwen", 3.09, 36, 2048, 16, 2, 11008, 151936, True,
              base="unsloth/Qwen2.5-3B-Instruct"),
        _spec("unsloth/Qwen2.5-7B-Instruct-bnb-4bit", "qwen", 7.62, 28, 3584, 28, 4, 18944, 152064, False,
              base="unsloth/Qwen2.5-7B-Instruct"),
        _spec("unsloth/Qwen2.5-14B-Instruct-bnb-4bit", "qwen", 14.77, 48, 5120, 40, 8, 13824, 152064, False,
              base="unsloth/Qwen2.5-14B-Instruct"),
        _spec("unsloth/mistral-7b-instruct-v0.3-bnb-4bit", "mistral", 7.25, 32, 4096, 32, 8, 14336, 32768, False,
              base="unsloth/mistral-7b-instruct-v0.3"),
        _spec("unsloth/Mistral-Nemo-Instruct-2407-bnb-4bit", "mistral", 12.25, 40, 5120, 32, 8, 14336, 131072, False,
              base="unsloth/Mistral-Nemo-Instruct-2407", head_dim=128),
        _spec("unsloth/Mistral-Small-Instruct-2409-bnb-4bit", "mistral", 22.25, 56, 6144, 48, 8, 16384, 32768, False,
              base="unsloth/Mistral-Small-Instruct-2409", head_dim=128),
        # Phi-4 as Unsloth publishes it: Llama-style q/k/v and gate/up projections (unfused).
        _spec("unsloth/phi-4-bnb-4bit", "phi", 14.66, 40, 5120, 40, 10, 17920, 100352, False,
              base="unsloth/phi-4"),
        # Gemma-2: head_dim 256 is not hidden / heads (9B: 3584 / 16 = 224); tied 256k vocabulary.
        _spec("unsloth/gemma-2-2b-it-bnb-4bit", "gemma", 2.61, 26, 2304, 8, 4, 9216, 256000, True,
              base="unsloth/gemma-2-2b-it", head_dim=256),
        _spec("unsloth/gemma-2-9b-it-bnb-4bit", "gemma", 9.24, 42, 3584, 16, 8, 14336, 256000, True,
              base="unsloth/gemma-2-9b-it", head_dim=256),
        _spec("unsloth/gemma-2-27b-it-bnb-4bit", "gemma", 27.2, 46, 4608, 32, 16, 36864, 256000, True,
              base="unsloth/gemma-2-27b-it", head_dim=128),
        # Gemma-3 1B is text-only; the larger Gemma-3 models carry a vision tower the estimate does not count.
        _spec("unsloth/gemma-3-1b-it-bnb-4bit", "gemma", 1.0, 26, 1152, 4, 1, 6912, 262144, True,
              base="unsloth/gemma-3-1b-it", head_dim=256),
        # Built locally, never downloaded: the offline demo and the test suite train this one.
        _spec("builtin:tiny-llama", "tiny", 0.0009, 4, 128, 4, 2, 344, 1024, False, q4=False),
    ]
}

FAMILIES = sorted({s.family for s in CATALOG.values()})


def get_spec(name: str) -> ModelSpec | None:
    """The catalog entry for a model name, or the dimensions read from a local HF config.json."""
    if name in CATALOG:
        return CATALOG[name]
    cfg_path = Path(name) / "config.json"
    if cfg_path.is_file():
        return spec_from_config(json.loads(cfg_path.read_text()), name)
    return None


def spec_from_config(cfg: dict, name: str) -> ModelSpec:
    """A ModelSpec from a Hugging Face `config.json` dict (any decoder-only LM with the usual keys)."""
    cfg = cfg.get("text_config", cfg)
    try:
        hidden = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        inter = int(cfg["intermediate_size"])
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{name}/config.json lacks a decoder dimension lowvram needs: {e}.") from None
    tied = bool(cfg.get("tie_word_embeddings", cfg.get("model_type", "").startswith("gemma")))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    per_layer = hidden * head_dim * (heads + 2 * kv) + heads * head_dim * hidden + 3 * hidden * inter
    params = layers * per_layer + vocab * hidden * (1 if tied else 2)
    q4 = (cfg.get("quantization_config") or {}).get("load_in_4bit", False)
    return ModelSpec(name, cfg.get("model_type", "custom"), params / 1e9, layers, hidden, heads, kv, inter, vocab, tied,
                     bool(q4), explicit_head_dim=head_dim if head_dim != hidden // heads else None)
