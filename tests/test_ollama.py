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

from lowvram.ollama import TemplateUnsupported, derive_chat_format, from_tokenizer, modelfile, probe_conversations

GO_RENDERER = Path(__file__).parent / "go" / "render_template.go"
needs_go = pytest.mark.skipif(shutil.which("go") is None,
                              reason="Go is not installed (apt-get install golang-go); .ci/run installs it")

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
    [{"role": "system", "content": "Line one.\nLine two, with a tab\tand \\backslash."},
     {"role": "user", "content": "Summarise: a {{ not a template }} \"\"\" triple quotes."}],
    [{"role": "user", "content": "Only a user, ünïcödé 日本語"}],
]


@pytest.fixture(scope="module")
def tiny_tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _jinja(tok, template: str, bos: str, eos: str):
    def fn(messages, add_generation_prompt):
        return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                       add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos)
    return fn


def _template_from_modelfile(text: str) -> str:
    """The TEMPLATE value as Ollama's parser reads it: everything between the triple quotes."""
    start = text.index('TEMPLATE """') + len('TEMPLATE """')
    return text[start: text.index('"""', start)]


def _go_render(template: str, conversations: list[list[dict]]) -> list[str]:
    proc = subprocess.run(["go", "run", str(GO_RENDERER)], check=False, input=json.dumps(
        {"template": template, "conversations": conversations}), capture_output=True, text=True, timeout=300)
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
@pytest.mark.parametrize("name,template,bos,specials", [
    ("qwen2.5", QWEN25, "", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
    ("llama3", LLAMA3, "<|begin_of_text|>", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                             "<|eot_id|>"]),
])
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


def test_folded_system_prompt_is_refused_with_a_reason(tiny_tok):
    fn = _jinja(tiny_tok, LLAMA2, "<s>", "</s>")
    with pytest.raises(TemplateUnsupported, match="system"):
        derive_chat_format(fn, "<s>", ["<s>", "</s>"], ["</s>"])
    text = modelfile("m.gguf", None, note="the template folds the system prompt into the first user turn",
                     stop=["</s>"])
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "") and 'PARAMETER stop "</s>"' in text
