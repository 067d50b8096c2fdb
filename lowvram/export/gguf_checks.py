"""What a GGUF must carry to chat like the trained model: its end-of-turn token as EOS, the chat
template, the run's name, and a tokenizer that splits text exactly as the Hugging Face one does.

    set_end_of_turn(merged_dir, "<end_of_turn>")      # before conversion: the converter reads it
    info = check_gguf_tokenizer(gguf, merged_dir)     # after: UserError naming the first input that differs
    print(info.line())                                # "tokenizer llama (SentencePiece), pre-tokenizer default, ..."
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lowvram.errors import UserError
from lowvram.export.llamacpp import gguf_vocab

# Inputs a tokenizer port gets wrong first: Unicode (accents, CJK, emoji, combining marks, RTL), digit
# runs, whitespace runs (spaces, tabs, newlines), code, contractions, and text glued to special tokens.
PROBES = (
    "Hello world",
    "hello World HELLO wOrLd",
    "  two leading spaces, then     five, then a tab\tand\nnew\n\nlines\n",
    "\n\n\n",
    "   ",
    "digits 0 12 345 6789 1234567890 3.14159 -42 1e-5 1,000,000 2026-11-22",
    "café naïve façade résumé Ünïcödé",
    "日本語のテキスト 中文 한국어",
    "emoji 🙂🚀👍🏽 and ZWJ 👨‍👩‍👧",
    "combining e\u0301 and precomposed é",
    "Arabic مرحبا and Hebrew שלום",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '<div class="x">a &amp; b</div>',
    "It's, they're, I'll, we've, don't -- quotes \"like this\" and 'this'.",
    "URL https://example.com/path?q=1&r=2 and email a.b@example.org",
    "MixedCASE camelCase snake_case kebab-case SCREAMING_CASE",
    "trailing spaces   ",
    "a",
    "",
)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def set_end_of_turn(model_dir: Path, end_of_turn: str) -> str | None:
    """Make `end_of_turn` the EOS that llama.cpp's converter writes (and generation stops on).

    The turn end of a chat template (Gemma's <end_of_turn>, Llama 3's <|eot_id|>) is often not the
    tokenizer's EOS (<eos>, <|end_of_text|>); llama.cpp stops on EOS, so without this a chat never ends.
    Returns a line saying what changed, or None when it already was the EOS.
    """
    tc_path = model_dir / "tokenizer_config.json"
    tc = _read_json(tc_path)
    eos = tc.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos == end_of_turn:
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    eot_id = tok.convert_tokens_to_ids(end_of_turn)
    if eot_id is None or eot_id == tok.unk_token_id:
        raise UserError(
            f"The chat template ends a turn with {end_of_turn!r}, which is not a token of this tokenizer.",
            hint="Use a chat template whose control tokens the tokenizer has (lowvram recipes templates).",
        )
    tc["eos_token"] = end_of_turn
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False), encoding="utf-8")
    gc_path = model_dir / "generation_config.json"
    gc = _read_json(gc_path)
    old = gc.get("eos_token_id")
    old = old if isinstance(old, list) else [old] if old is not None else []
    gc["eos_token_id"] = list(
        dict.fromkeys([eot_id, *old, *([tok.eos_token_id] if tok.eos_token_id is not None else [])])
    )
    gc_path.write_text(json.dumps(gc, indent=2), encoding="utf-8")
    return f"end of turn {end_of_turn} (id {eot_id}) becomes the GGUF's EOS (was {eos})"


@dataclass(frozen=True)
class GGUFTokenizerInfo:
    model: str  # tokenizer.ggml.model: llama (SentencePiece), gpt2 (BPE), ...
    pre: str | None  # tokenizer.ggml.pre: the pre-tokenizer llama.cpp applies
    eos: str | None
    name: str | None
    has_template: bool
    probes: int
    repaired: bool = False  # SentencePiece scores rebuilt from tokenizer.json's merges

    def line(self) -> str:
        kind = {"llama": "SentencePiece", "gpt2": "BPE", "t5": "Unigram", "bert": "WordPiece"}.get(self.model, "")
        tokenizes = (
            f"tokenizes {self.probes} probes exactly as transformers"
            if self.probes
            else "tokenization not compared (llama.cpp's tokenizer needs xllamacpp)"
        )
        return (
            f"tokenizer {self.model}{f' ({kind})' if kind else ''}, pre-tokenizer {self.pre or 'none'}, "
            f"EOS {self.eos}, chat template {'stored' if self.has_template else 'MISSING'}, "
            f"name {self.name!r}; {tokenizes}"
            + (" (after rebuilding its merge scores from tokenizer.json)" if self.repaired else "")
        )


def probe_texts(tokenizer) -> list[str]:
    """PROBES plus the tokenizer's special tokens inside text, and a chat prompt when it has a template."""
    texts = list(PROBES)
    specials = [t for t in dict.fromkeys(tokenizer.all_special_tokens) if t]
    if specials:
        texts.append("x" + "y ".join(specials) + " z")
        texts.append("\n".join(f"{s}text{s}" for s in specials))
    if getattr(tokenizer, "chat_template", None):
        msgs = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi 👋, what's 2+2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "  And\tnow?\n"},
        ]
        for conv in (msgs, msgs[1:]):
            try:
                texts.append(tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True))
            except Exception:  # a template that refuses the system role
                continue
    return texts


def _first_mismatch(gguf_path: Path, tok, texts: list[str]):
    """(text, transformers ids, llama.cpp ids, metadata) of the first probe tokenized differently, else (None, .., meta)."""

    with gguf_vocab(gguf_path) as vocab:
        meta = dict(vocab.metadata)
        eos_id = meta.get("tokenizer.ggml.eos_token_id")
        meta["eos_text"] = vocab.token_text(int(eos_id)) if eos_id is not None else None
        for text in texts:
            want = tok(text, add_special_tokens=False)["input_ids"]
            got = vocab.tokenize(text)
            if got != want:
                return text, want, got, meta
    return None, None, None, meta


def _metadata(gguf_path: Path) -> dict:
    """The metadata _first_mismatch returns, read from the file by the converter's own gguf package (no llama.cpp)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path), "r")

    def text(key: str, index: int = 0) -> str | None:
        f = reader.fields.get(key)
        return bytes(f.parts[f.data[index]]).decode("utf-8", errors="replace") if f is not None else None

    meta = {
        k: text(k) for k in ("general.name", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template")
    }
    eos = reader.fields.get("tokenizer.ggml.eos_token_id")
    meta["eos_text"] = text("tokenizer.ggml.tokens", int(eos.parts[eos.data[0]][0])) if eos is not None else None
    return {k: v for k, v in meta.items() if v is not None or k == "eos_text"}


def check_gguf_tokenizer(
    gguf_path: Path, hf_dir: Path, expect_eos: str | None = None, expect_name: str | None = None, tokenize: bool = True
) -> GGUFTokenizerInfo:
    """Compare llama.cpp's tokenization of the probe texts with transformers'; UserError at the first difference.

    A SentencePiece-BPE vocabulary converted without tokenizer.model gets its merge scores rebuilt
    (repair_spm_scores) and is checked again before giving up. tokenize=False (xllamacpp is not
    installed): only the metadata is checked (EOS, name, chat template), read from the file itself.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    texts = probe_texts(tok) if tokenize else []
    text, want, got, meta = (
        _first_mismatch(gguf_path, tok, texts) if tokenize else (None, None, None, _metadata(gguf_path))
    )
    repaired = False
    if text is not None and repair_spm_scores(gguf_path, hf_dir):
        repaired = True
        text, want, got, meta = _first_mismatch(gguf_path, tok, texts)
    if text is not None:
        k = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        raise UserError(
            f"The GGUF's tokenizer splits {text!r} differently from the model's own tokenizer.",
            [
                f"transformers: {want[max(0, k - 2) : k + 6]} ({tok.convert_ids_to_tokens(want[k : k + 4])})",
                f"llama.cpp:    {got[max(0, k - 2) : k + 6]} (from token {k} on)",
                f"GGUF tokenizer {meta.get('tokenizer.ggml.model')}, pre-tokenizer {meta.get('tokenizer.ggml.pre')}",
            ],
            hint="llama.cpp's converter picked a tokenizer that does not match this model (a BPE pre-tokenizer is "
            "chosen by a hash of known models). Ship the base's tokenizer.model (SentencePiece) with it, or "
            "report the model to llama.cpp.",
        )
    eos = meta["eos_text"]
    if expect_eos is not None and eos != expect_eos:
        raise UserError(
            f"The GGUF's EOS is {eos!r}, not the end-of-turn token {expect_eos!r}: generation would "
            "not stop at the end of an answer.",
            hint="This is a bug in lowvram's export; please report it with export.log.",
        )
    info = GGUFTokenizerInfo(
        meta.get("tokenizer.ggml.model", "?"),
        meta.get("tokenizer.ggml.pre"),
        eos,
        meta.get("general.name"),
        bool(meta.get("tokenizer.chat_template")),
        len(texts),
        repaired,
    )
    if expect_name is not None and info.name != expect_name:
        raise UserError(
            f"The GGUF's general.name is {info.name!r}, expected {expect_name!r}.",
            hint="This is a bug in lowvram's export; please report it with export.log.",
        )
    if getattr(tok, "chat_template", None) and not info.has_template:
        raise UserError(
            "The GGUF carries no chat template although the model has one.",
            hint="This is a bug in lowvram's export; please report it with export.log.",
        )
    return info


def repair_spm_scores(gguf_path: Path, hf_dir: Path) -> bool:
    """Rewrite a SentencePiece-type GGUF's token scores from tokenizer.json's BPE merges, in place.

    Without tokenizer.model, llama.cpp's converter reads a SentencePiece-BPE vocabulary from
    tokenizer.json but not the merge priorities, and llama.cpp's tokenizer then merges in another
    order. Its SentencePiece tokenizer applies the merge whose result scores highest, so each merged
    token scoring minus its merge rank reproduces the BPE exactly. True when scores were rewritten.
    """
    from gguf import GGUFReader

    tj = _read_json(hf_dir / "tokenizer.json")
    model = tj.get("model") or {}
    merges, vocab = model.get("merges"), model.get("vocab")
    if model.get("type") != "BPE" or not merges or not isinstance(vocab, dict):
        return False
    score: dict[int, float] = {}
    for rank, merge in enumerate(merges):
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        tid = vocab.get(a + b)
        if tid is not None and tid not in score:
            score[tid] = -float(rank)
    reader = GGUFReader(str(gguf_path), "r+")
    field = reader.fields.get("tokenizer.ggml.scores")
    model_name = reader.fields.get("tokenizer.ggml.model")
    if field is None or model_name is None or bytes(model_name.parts[model_name.data[0]]).decode() != "llama":
        return False
    floor = -float(len(merges)) - 1.0  # tokens no merge produces: below every merge
    for i, idx in enumerate(field.data):
        field.parts[idx][0] = score.get(i, floor)
    reader.data.flush()
    del reader
    return True
