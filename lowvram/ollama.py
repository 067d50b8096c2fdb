"""Ollama's Modelfile, with a TEMPLATE derived from the model's own Jinja chat template.

    fmt = derive_chat_format(tokenizer)          # from the tokenizer the model was trained with
    fmt.render(messages)                         # the prompt the Jinja template gives (checked)
    text = modelfile("model-q4_k_m.gguf", fmt, system="Be brief.")

How the TEMPLATE is derived, rather than guessed from the model's name: probe conversations
(system + user, user only, several turns) with unique marker strings as contents are rendered
through the tokenizer's chat template. The text around the markers gives each role's prefix and
suffix, the generation prompt and any default system prompt the template injects. The result is
then re-rendered in Python for every probe and compared with the Jinja output; if any differs
(templates that fold the system prompt into the first user turn, or reorder messages), no TEMPLATE
is written and Ollama falls back to the chat template stored in the GGUF, and the reason is given.

The Go template uses `.Messages` (Ollama puts the Modelfile's SYSTEM there as a system message).
Literal pieces are Go string literals, so whitespace and newlines survive `{{-` trimming exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
MARK = {"system": "LVSYSPROBE1", "user": "LVUSERPROBE1", "assistant": "LVASSTPROBE1", "user2": "LVUSERPROBE2"}


class TemplateUnsupported(Exception):
    """The chat template is not a per-message format a Go TEMPLATE can reproduce; the message says why."""


@dataclass(frozen=True)
class ChatFormat:
    """A chat template reduced to per-role wrappers: prefix + content + suffix, then the generation prompt."""

    bos: str  # text the Jinja template starts with that is the BOS token (llama.cpp/Ollama add BOS themselves)
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation_prompt: str
    default_system: str | None  # what the template says when the conversation has no system message
    stop: tuple[str, ...]  # end-of-turn tokens for PARAMETER stop

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt as the Go TEMPLATE produces it (without the BOS text)."""
        out = ""
        if self.default_system is not None and not any(m["role"] == "system" for m in messages):
            out += self.prefix["system"] + self.default_system + self.suffix["system"]
        for m in messages:
            out += self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]]
        return out + (self.generation_prompt if add_generation_prompt else "")

    def go_template(self) -> str:
        """The Ollama TEMPLATE (Go text/template) equivalent of the chat template."""
        q = _go_string
        lines = []
        if self.default_system is not None:
            lines += ['{{- $system := false }}',
                      '{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = true }}{{ end }}{{ end }}',
                      '{{- if not $system }}' + q(self.prefix["system"] + self.default_system + self.suffix["system"])
                      + '{{ end }}']
        lines.append("{{- range .Messages }}")
        for i, role in enumerate(ROLES):
            head = "{{- if" if i == 0 else "{{- else if"
            lines.append(f'{head} eq .Role "{role}" }}}}{q(self.prefix[role])}{{{{ .Content }}}}{q(self.suffix[role])}')
        lines += ["{{- end }}", "{{- end }}" + q(self.generation_prompt)]
        return "\n".join(lines)


def _go_string(text: str) -> str:
    """`{{ "..." }}` for a literal piece (empty string for an empty piece). JSON escapes are valid Go escapes."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def _render(template_fn, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return template_fn(messages, add_generation_prompt)
    except Exception as e:  # templates raise for layouts they refuse (e.g. a system role)
        raise TemplateUnsupported(f"the chat template refused {[m['role'] for m in messages]}: {e}") from None


def _split(text: str, marks: list[str]) -> list[str]:
    """`text` cut at each marker, in order: len(marks) + 1 pieces. Fails if a marker is missing or repeated."""
    pieces = []
    for mark in marks:
        if text.count(mark) != 1:
            raise TemplateUnsupported(f"marker content appears {text.count(mark)} times in the rendered prompt")
        head, text = text.split(mark)
        pieces.append(head)
    return pieces + [text]


def _cut_after_stop(between: str, stops: list[str]) -> int:
    """Where a message's suffix ends in the text between two contents: after its end-of-turn token
    and the whitespace that follows it; 0 when there is none (then it all belongs to the next prefix)."""
    best = None
    for s in stops:
        i = between.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, i + len(s))
    if best is None:
        return 0
    end = best[1]
    while end < len(between) and between[end] in " \n":
        end += 1
    return end


def derive_chat_format(template_fn, bos_token: str | None, special_tokens: list[str],
                       eos_tokens: list[str]) -> ChatFormat:
    """Reduce a chat template to a ChatFormat, or raise TemplateUnsupported saying why.

    `template_fn(messages, add_generation_prompt) -> str` renders with the model's own template
    (see `from_tokenizer`); `special_tokens` are the tokenizer's added special tokens, among which
    the end-of-turn token is found; `eos_tokens` always go into the stop list.
    """
    S, U, A, U2 = MARK["system"], MARK["user"], MARK["assistant"], MARK["user2"]
    msgs = {"system": {"role": "system", "content": S}, "user": {"role": "user", "content": U},
            "assistant": {"role": "assistant", "content": A}, "user2": {"role": "user", "content": U2}}
    full = _render(template_fn, [msgs["system"], msgs["user"], msgs["assistant"], msgs["user2"]], True)
    user_only = _render(template_fn, [msgs["user"]], True)
    user_only_nogen = _render(template_fn, [msgs["user"]], False)
    if not user_only.startswith(user_only_nogen):
        raise TemplateUnsupported("the generation prompt is not appended at the end")
    gen = user_only[len(user_only_nogen):]

    p0, p1, p2, p3, p4 = _split(full, [S, U, A, U2])
    q0, q1 = _split(user_only, [U])
    bos = bos_token if bos_token and p0.startswith(bos_token) and q0.startswith(bos_token) else ""
    p0, q0 = p0[len(bos):], q0[len(bos):]
    if not q1.endswith(gen) or not p4.endswith(gen):
        raise TemplateUnsupported("the text after the last user message does not end with the generation prompt")
    user_suffix = q1[: len(q1) - len(gen)]
    if p4[: len(p4) - len(gen)] != user_suffix or not p2.startswith(user_suffix):
        raise TemplateUnsupported("the user suffix depends on the position of the message")
    asst_prefix = p2[len(user_suffix):]

    # The end-of-turn token: the first special token after the assistant's content.
    stops = [t for t in special_tokens if t and t in p3 and t != bos_token]
    stops.sort(key=p3.find)
    eot = stops[:1]
    cut = _cut_after_stop(p3, eot)
    asst_suffix, user_prefix = p3[:cut], p3[cut:]
    if not p1.endswith(user_prefix):
        raise TemplateUnsupported("the system message is not followed by a user message in its usual form "
                                  "(the template may fold the system prompt into the first user turn)")
    system_suffix = p1[: len(p1) - len(user_prefix)]
    system_prefix = p0
    if not q0.endswith(user_prefix):
        raise TemplateUnsupported("the first user message is wrapped differently from later ones")
    head = q0[: len(q0) - len(user_prefix)]
    default_system = None
    if head:
        if not (head.startswith(system_prefix) and head.endswith(system_suffix)):
            raise TemplateUnsupported("the template adds text before a conversation without a system message")
        default_system = head[len(system_prefix): len(head) - len(system_suffix)]

    stop_list = list(dict.fromkeys(eot + [t for t in eos_tokens if t]))
    fmt = ChatFormat(bos, {"system": system_prefix, "user": user_prefix, "assistant": asst_prefix},
                     {"system": system_suffix, "user": user_suffix, "assistant": asst_suffix}, gen,
                     default_system, tuple(stop_list))
    for conv in probe_conversations():  # the reduction must reproduce the template exactly
        want = _render(template_fn, conv, True)
        want = want[len(bos):] if bos and want.startswith(bos) else want
        if fmt.render(conv) != want:
            raise TemplateUnsupported(f"re-rendering {[m['role'] for m in conv]} differs from the chat template")
    return fmt


def probe_conversations() -> list[list[dict]]:
    """Conversations every derived format is checked on (and the Go test renders)."""
    sys_ = {"role": "system", "content": "You are a helpful assistant.\nAnswer briefly."}
    return [
        [{"role": "user", "content": "What is 2+2?"}],
        [sys_, {"role": "user", "content": "Name a colour."}],
        [sys_, {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
         {"role": "user", "content": "Tell me a joke\nabout cats."}],
        [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"},
         {"role": "user", "content": "Three"}, {"role": "assistant", "content": "Four"},
         {"role": "user", "content": "Five \"quoted\" {{ braces }} and unicode: café 🙂"}],
    ]


def from_tokenizer(tokenizer) -> ChatFormat:
    """`derive_chat_format` for a transformers tokenizer (the one saved in the run directory)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateUnsupported("the tokenizer has no chat template")

    def fn(messages, add_generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    specials = [str(t) for t in tokenizer.all_special_tokens]
    specials += [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    eos = [tokenizer.eos_token] if tokenizer.eos_token else []
    return derive_chat_format(fn, tokenizer.bos_token, list(dict.fromkeys(specials)), eos)


def modelfile(gguf_name: str, fmt: ChatFormat | None, system: str | None = None,
              note: str | None = None, stop: list[str] | None = None) -> str:
    """Modelfile text: FROM, TEMPLATE, PARAMETER stop, optional SYSTEM."""
    lines = ["# Written by lowvram export. Create the model: ollama create NAME -f <this file>", f"FROM ./{gguf_name}"]
    if fmt is not None:
        lines.append(f'TEMPLATE """{fmt.go_template()}"""')
    elif note:
        lines.append(f"# No TEMPLATE: {note}. Ollama uses the chat template stored in the GGUF.")
    for s in (fmt.stop if fmt else tuple(stop or ())):
        lines.append(f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}")
    if system:
        if '"""' in system:
            raise ValueError('a SYSTEM prompt cannot contain """')
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
