"""The Modelfile TEMPLATE, rendered by Go's own text/template, gives the Jinja chat template's prompt.

Go comes from Debian (`apt-get install golang-go`; .ci/run installs it). Without `go` on PATH the
Go rendering tests are skipped with that reason; the Python-side checks still run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lowvram.export.ollama import (
    TemplateUnsupported,
    derive_chat_format,
    from_tokenizer,
    modelfile,
    probe_conversations,
)

GO_RENDERER = Path(__file__).parent / "go" / "render_template.go"
needs_go = pytest.mark.skipif(
    shutil.which("go") is None, reason="Go is not installed (apt-get install golang-go); .ci/run installs it"
)

# Shortened copies of real templates (tools and date logic removed), to check the derivation on
# the shapes that matter: a default system prompt (Qwen2.5), BOS + headers + trim (Llama 3), and a
# system prompt folded into the first user turn (Llama 2), which a per-message TEMPLATE cannot express.
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant') %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]"
    "['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message "
    "in loop_messages %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
    "system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}"
    "{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif "
    "message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
EXTRA = [  # beyond the probes the derivation itself checks
    [
        {"role": "system", "content": "Line one.\nLine two, with a tab\tand \\backslash."},
        {"role": "user", "content": 'Summarise: a {{ not a template }} """ triple quotes.'},
    ],
    [{"role": "user", "content": "Only a user, ünïcödé 日本語"}],
]


@pytest.fixture(scope="module")
def tiny_tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def _jinja(tok, template: str, bos: str, eos: str):
    def fn(messages, add_generation_prompt):
        return tok.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos,
            eos_token=eos,
        )

    return fn


def _template_from_modelfile(text: str) -> str:
    """The TEMPLATE value as Ollama's parser reads it: everything between the triple quotes."""
    start = text.index('TEMPLATE """') + len('TEMPLATE """')
    return text[start : text.index('"""', start)]


def _go_render(template: str, conversations: list[list[dict]]) -> list[str]:
    proc = subprocess.run(
        ["go", "run", str(GO_RENDERER)],
        check=False,
        input=json.dumps({"template": template, "conversations": conversations}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_tiny_chatml_format_and_modelfile(tiny_tok):
    fmt = from_tokenizer(tiny_tok)
    assert fmt.stop == ("<|im_end|>",)
    assert fmt.prefix["user"] == "<|im_start|>user\n" and fmt.generation_prompt == "<|im_start|>assistant\n"
    assert fmt.default_system is None
    for conv in probe_conversations() + EXTRA:
        assert fmt.render(conv) == tiny_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    text = modelfile("m-q4_k_m.gguf", fmt, system="Be brief.")
    assert text.splitlines()[1] == "FROM ./m-q4_k_m.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in text and text.rstrip().endswith('SYSTEM """Be brief."""')


@needs_go
def test_go_renders_the_tiny_models_template_like_jinja(tiny_tok):
    fmt = from_tokenizer(tiny_tok)
    template = _template_from_modelfile(modelfile("m.gguf", fmt, system="Be brief."))
    convs = probe_conversations() + EXTRA
    want = [tiny_tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    assert _go_render(template, convs) == want


@needs_go
@pytest.mark.parametrize(
    "name,template,bos,specials",
    [
        ("qwen2.5", QWEN25, "", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
        (
            "llama3",
            LLAMA3,
            "<|begin_of_text|>",
            ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        ),
    ],
)
def test_go_renders_other_template_shapes_like_jinja(tiny_tok, name, template, bos, specials):
    eos = specials[-1]
    fn = _jinja(tiny_tok, template, bos, eos)
    fmt = derive_chat_format(fn, bos or None, specials, [eos])
    convs = probe_conversations() + EXTRA
    want = [fn(c, True).removeprefix(bos) for c in convs]  # llama.cpp and Ollama add BOS as a token themselves
    assert _go_render(_template_from_modelfile(modelfile("m.gguf", fmt)), convs) == want
    if name == "qwen2.5":
        assert fmt.default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        assert fmt.stop == ("<|im_end|>", "<|endoftext|>")
    else:
        assert fmt.bos == bos and fmt.stop == ("<|eot_id|>",)
        assert fmt.suffix["user"] == "<|eot_id|>" and fmt.prefix["user"].startswith("<|start_header_id|>user")


def test_a_template_of_another_shape_is_refused_with_a_reason(tiny_tok):
    # Llama 2 puts BOS before every user turn: not a per-message format llama.cpp's single BOS reproduces.
    fn = _jinja(tiny_tok, LLAMA2, "<s>", "</s>")
    with pytest.raises(TemplateUnsupported, match="wrapped differently"):
        derive_chat_format(fn, "<s>", ["<s>", "</s>"], ["</s>"])


BOS_EOS = {
    "llama-3": ("<|begin_of_text|>", "<|end_of_text|>"),
    "gemma": ("<bos>", "<eos>"),
    "mistral": ("<s>", "</s>"),
    "alpaca": ("<s>", "</s>"),
}
SYSTEM_MODE = {
    "chatml": "turn",
    "qwen-2.5": "turn",
    "llama-3": "turn",
    "phi-4": "turn",
    "alpaca": "turn",
    "gemma": "first_user",
    "mistral": "last_user",
}
IGNORES_SYSTEM = (
    "{%- for message in messages %}{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
REFUSES_SYSTEM = (
    "{{ bos_token }}{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{%- endif %}"
    "{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\\n' + message['content']"
    " + '<end_of_turn>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)


def _named_format(tiny_tok, name):
    from lowvram.data.templates import NAMED_TEMPLATES

    t = NAMED_TEMPLATES[name]
    bos, eos = BOS_EOS.get(name, ("", "<|endoftext|>"))
    fn = _jinja(tiny_tok, t.jinja, bos, eos)
    specials = [x for x in (bos, eos, *t.control_tokens) if x]
    return fn, derive_chat_format(fn, bos or None, specials, [eos], t.turn_end(eos)), bos, eos


def _conversations_with_and_without_system():
    sys_ = {"role": "system", "content": "Be brief.\nNo lists."}
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
    ]
    return [turns[:1], [sys_, *turns[:1]], turns, [sys_, *turns], *probe_conversations(), *EXTRA]


@pytest.mark.parametrize("name", ["chatml", "qwen-2.5", "llama-3", "gemma", "mistral", "phi-4", "alpaca"])
def test_every_named_template_reduces_to_its_shape(tiny_tok, name):
    fn, fmt, bos, eos = _named_format(tiny_tok, name)
    assert fmt.system_mode == SYSTEM_MODE[name]
    from lowvram.data.templates import NAMED_TEMPLATES

    assert fmt.stop[0] == NAMED_TEMPLATES[name].turn_end(eos)
    for conv in _conversations_with_and_without_system():
        assert fmt.render(conv) == fn(conv, True).removeprefix(bos)


@needs_go
@pytest.mark.parametrize("name", ["chatml", "qwen-2.5", "llama-3", "gemma", "mistral", "phi-4", "alpaca"])
def test_go_renders_every_named_template_like_jinja(tiny_tok, name):
    fn, fmt, bos, eos = _named_format(tiny_tok, name)
    convs = _conversations_with_and_without_system()
    want = [fn(c, True).removeprefix(bos) for c in convs]
    text = modelfile("m.gguf", fmt, system="Be brief.")
    assert _go_render(_template_from_modelfile(text), convs) == want
    assert f"PARAMETER stop {json.dumps(fmt.stop[0])}" in text


@needs_go
@pytest.mark.parametrize("template,mode", [(IGNORES_SYSTEM, "ignored"), (REFUSES_SYSTEM, "refused")])
def test_templates_without_a_system_role(tiny_tok, template, mode):
    bos = "<bos>" if mode == "refused" else ""
    fn = _jinja(tiny_tok, template, bos, "<eos>")
    fmt = derive_chat_format(
        fn, bos or None, ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<bos>"], ["<eos>"]
    )
    assert fmt.system_mode == mode and not fmt.takes_system
    convs = [
        c
        for c in _conversations_with_and_without_system()
        if mode == "ignored" or not any(m["role"] == "system" for m in c)
    ]
    assert _go_render(_template_from_modelfile(modelfile("m.gguf", fmt)), convs) == [
        fn(c, True).removeprefix(bos) for c in convs
    ]
    with pytest.raises(TemplateUnsupported, match="no place for one"):
        modelfile("m.gguf", fmt, system="Be brief.")


def test_plain_text_model_gets_a_raw_prompt_template_and_its_stop():
    text = modelfile("m.gguf", None, stop=["</s>"])
    assert 'TEMPLATE """{{ .Prompt }}"""' in text and 'PARAMETER stop "</s>"' in text


# ------------------------------------------------------------------ strings Ollama's Modelfile parser would change


def test_stop_strings_are_written_without_escapes_ollama_does_not_read():
    """A Modelfile value has no escape sequences: json.dumps' \\n or \\" would reach Ollama as backslashes."""
    text = modelfile("m.gguf", None, stop=["</s>", "line\nbreak", 'say "hi"'])
    assert 'PARAMETER stop "</s>"' in text
    assert 'PARAMETER stop "line\nbreak"' in text  # a real newline inside the quotes, as Ollama keeps it
    assert 'PARAMETER stop """say "hi""""' in text
    assert "\\" not in text


@pytest.mark.parametrize(
    "system, why",
    [
        ('a """ b', 'contains """'),
        ("no\u00a0break", "U+00A0 NO-BREAK SPACE"),
        ("zero\u200bwidth", "U+200B"),
        ("bell\x07", "U+0007"),
    ],
)
def test_modelfile_refuses_what_ollama_would_drop_or_cut(system, why):
    from lowvram.export.ollama import modelfile_problems

    assert any(why in p for p in modelfile_problems(system)), modelfile_problems(system)
    with pytest.raises(ValueError):
        modelfile("m.gguf", None, system=system)
    assert modelfile_problems('Tabs\tand\nnewlines, café, 日本, 🙂 and "quotes" are fine') == []


NBSP_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\u00a0\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\u00a0\n{% endif %}"
)


@needs_go
def test_template_literal_with_a_no_break_space_survives_the_modelfile(tiny_tok):
    """The TEMPLATE's literal pieces escape U+00A0 (Go reads \\u00a0), so Ollama's parser cannot drop it."""
    fn = _jinja(tiny_tok, NBSP_CHATML, "", "<|im_end|>")
    fmt = derive_chat_format(fn, None, ["<|im_start|>", "<|im_end|>"], ["<|im_end|>"])
    text = modelfile("m.gguf", fmt)
    assert "\u00a0" not in text and "\\u00a0" in text
    convs = probe_conversations()
    assert _go_render(_template_from_modelfile(text), convs) == [fn(c, True) for c in convs]
