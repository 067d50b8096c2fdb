"""Chat templates by name: `model.chat_template: gemma` instead of pasting a family's Jinja.

    tmpl = resolve_chat_template("gemma")        # NamedTemplate, or None for a raw Jinja string
    jinja = chat_template_text("gemma")          # the Jinja text the tokenizer gets
    lowvram recipes templates                    # the list, with each one's turn tokens

Each named template is the official chat template of its family, reduced to plain string messages
(tool calls and image parts removed), with the control tokens it needs as single tokens and the
token that ends an assistant turn. A base model (no chat template of its own) needs one of these,
or a Jinja string, before chat data can train it; lowvram/plan/preflight.py says so before any model
loads.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from lowvram.errors import UserError
from lowvram.utils.ui import table


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
        f"model.chat_template: {value!r} is neither a template name nor a Jinja template.", hint=choice_hint(value)
    )


def template_problem(value: str) -> str | None:
    """A recipe-validation message for model.chat_template, or None when it is valid."""
    try:
        resolve_chat_template(value)
    except UserError as e:
        return f"{e.message} {e.hint}"
    return None


def choice_hint(value: str | None = None) -> str:
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

    rows = [
        (t.name, t.family, " ".join(t.control_tokens) or "(none)", t.end_of_turn or "the tokenizer's EOS", t.system)
        for t in NAMED_TEMPLATES.values()
    ]
    return table(rows, ("name", "family", "control tokens", "ends a turn", "system prompt"))


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
