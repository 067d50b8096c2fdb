"""Ollama's Modelfile, with a TEMPLATE derived from the model's own Jinja chat template.

    fmt = derive_chat_format(tokenizer)          # from the tokenizer the model was trained with
    fmt.render(messages)                         # the prompt the Jinja template gives (checked)
    text = modelfile("model-q4_k_m.gguf", fmt, system="Be brief.")

How the TEMPLATE is derived, rather than guessed from the model's name: probe conversations
(system + user, user only, several turns) with unique marker strings as contents are rendered
through the tokenizer's chat template. The text around the markers gives each role's prefix and
suffix, the generation prompt and any default system prompt the template injects. The result is
then re-rendered in Python for every probe and compared with the Jinja output. A system prompt may
be its own turn, folded into the first user message (Gemma) or the last one (Mistral [INST]), or
ignored or refused by the template; each shape has its Go TEMPLATE. A template of another shape
raises TemplateUnsupported with the reason, and export stops rather than write a Modelfile that
Ollama would misread (with no TEMPLATE, Ollama guesses one from a list by edit distance).

The Go template uses `.Messages` (Ollama puts the Modelfile's SYSTEM there as a system message).
Literal pieces are Go string literals, so whitespace and newlines survive `{{-` trimming exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
TRIPLE = '"' * 3  # opens and closes a multi-line Modelfile value
MARK = {"system": "LVSYSPROBE1", "user": "LVUSERPROBE1", "assistant": "LVASSTPROBE1", "user2": "LVUSERPROBE2"}


class TemplateUnsupported(Exception):
    """The chat template is not a per-message format a Go TEMPLATE can reproduce; the message says why."""


SYSTEM_MODES = {
    "turn": "its own turn",
    "first_user": "folded into the first user turn",
    "last_user": "folded into the last user turn",
    "ignored": "ignored by the template",
    "refused": "refused by the template (it raises on a system message)",
}


@dataclass(frozen=True)
class ChatFormat:
    """A chat template reduced to per-role wrappers: prefix + content + suffix, then the generation prompt.

    `system_mode` says where a system prompt goes: its own turn (prefix/suffix["system"]), or folded
    into the first or the last user message as fold[0] + system + fold[1] + content, or nowhere.
    """

    bos: str  # text the Jinja template starts with that is the BOS token (llama.cpp/Ollama add BOS themselves)
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation_prompt: str
    default_system: str | None  # what the template says when the conversation has no system message
    stop: tuple[str, ...]  # end-of-turn tokens for PARAMETER stop
    system_mode: str = "turn"
    fold: tuple[str, str] = ("", "")

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt as the Go TEMPLATE produces it (without the BOS text)."""
        out = ""
        if self.system_mode == "turn":
            if self.default_system is not None and not any(m["role"] == "system" for m in messages):
                out += self.prefix["system"] + self.default_system + self.suffix["system"]
            for m in messages:
                out += self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]]
            return out + (self.generation_prompt if add_generation_prompt else "")
        # Ollama joins every system message into .System with blank lines between them
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        target = None
        if system and users and self.system_mode == "first_user":
            target = users[0]
        elif system and self.system_mode == "last_user" and messages[-1]["role"] == "user":
            target = len(messages) - 1
        for i, m in enumerate(messages):
            if m["role"] == "system":
                continue
            content = self.fold[0] + system + self.fold[1] + m["content"] if i == target else m["content"]
            out += self.prefix[m["role"]] + content + self.suffix[m["role"]]
        return out + (self.generation_prompt if add_generation_prompt else "")

    @property
    def takes_system(self) -> bool:
        return self.system_mode in ("turn", "first_user", "last_user")

    def go_template(self) -> str:
        """The Ollama TEMPLATE (Go text/template) equivalent of the chat template."""
        q = _go_string
        lines = []
        if self.system_mode == "turn":
            if self.default_system is not None:
                lines += [
                    "{{- $system := false }}",
                    '{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = true }}{{ end }}{{ end }}',
                    "{{- if not $system }}"
                    + q(self.prefix["system"] + self.default_system + self.suffix["system"])
                    + "{{ end }}",
                ]
            lines.append("{{- range .Messages }}")
            for i, role in enumerate(ROLES):
                head = "{{- if" if i == 0 else "{{- else if"
                lines.append(
                    f'{head} eq .Role "{role}" }}}}{q(self.prefix[role])}{{{{ .Content }}}}{q(self.suffix[role])}'
                )
            lines += ["{{- end }}", "{{- end }}" + q(self.generation_prompt)]
            return "\n".join(lines)
        fold = ""
        if self.system_mode == "first_user":
            lines.append("{{- $first := true }}")
            fold = (
                "{{ if and $.System $first }}"
                + q(self.fold[0])
                + "{{ $.System }}"
                + q(self.fold[1])
                + "{{ end }}{{ $first = false }}"
            )
        elif self.system_mode == "last_user":
            fold = (
                "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}"
                + q(self.fold[0])
                + "{{ $.System }}"
                + q(self.fold[1])
                + "{{ end }}"
            )
        lines.append("{{- range $i, $_ := .Messages }}")
        lines.append(
            f'{{{{- if eq .Role "user" }}}}{q(self.prefix["user"])}{fold}{{{{ .Content }}}}{q(self.suffix["user"])}'
        )
        lines.append(
            f'{{{{- else if eq .Role "assistant" }}}}{q(self.prefix["assistant"])}{{{{ .Content }}}}'
            f"{q(self.suffix['assistant'])}"
        )
        lines += ["{{- end }}", "{{- end }}" + q(self.generation_prompt)]
        return "\n".join(lines)


def _go_string(text: str) -> str:
    """`{{ "..." }}` for a literal piece (empty string for an empty piece). JSON escapes are valid Go escapes;
    characters the Modelfile parser would drop (U+00A0, U+200B, ...) are written as Go \\u escapes."""
    if not text:
        return ""
    lit = json.dumps(text, ensure_ascii=False)
    lit = "".join(
        c if _modelfile_keeps(c) else (f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}") for c in lit
    )
    return "{{ " + lit + " }}"


def _modelfile_keeps(c: str) -> bool:
    """Whether Ollama's Modelfile parser keeps `c` inside a quoted value: Go's strconv.IsPrint (letters, marks,
    numbers, punctuation, symbols, ASCII space), plus the tab and newlines it writes through inside quotes."""
    import unicodedata

    return c in " \t\n\r" or unicodedata.category(c)[0] in "LMNPS"


def modelfile_problems(system: str | None, stop: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Why `system` or a stop string cannot be written into a Modelfile so that Ollama reads it back exactly.

    A Modelfile value has no escapes: three double quotes end a SYSTEM block early, and Ollama's parser drops
    characters that are not printable (no-break or zero-width spaces, joiners, control characters).
    """
    import unicodedata

    problems = []
    for what, text in [("the SYSTEM prompt", system)] + [(f"stop string {s!r}", s) for s in stop]:
        if not text:
            continue
        if TRIPLE in text:
            problems.append(f"{what} contains {TRIPLE}, which ends a Modelfile value early; use fewer quotes in a row")
        dropped = [c for c in dict.fromkeys(text) if not _modelfile_keeps(c)]
        if dropped:
            names = ", ".join(f"U+{ord(c):04X} {unicodedata.name(c, 'control character')}" for c in dropped[:5])
            problems.append(
                f"{what} contains characters Ollama's Modelfile parser drops: {names}; "
                "replace them (a plain space for a no-break space) or remove them"
            )
    return problems


def _value(text: str) -> str:
    """A Modelfile value that Ollama's parser reads back exactly (see `modelfile_problems` for what cannot be)."""
    return f'"{text}"' if '"' not in text else f"{TRIPLE}{text}{TRIPLE}"


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
            raise TemplateUnsupported(
                f"a message's content appears {text.count(mark)} times where it should appear once, in order"
            )
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


def derive_chat_format(
    template_fn, bos_token: str | None, special_tokens: list[str], eos_tokens: list[str], end_of_turn: str | None = None
) -> ChatFormat:
    """Reduce a chat template to a ChatFormat, or raise TemplateUnsupported saying why.

    `template_fn(messages, add_generation_prompt) -> str` renders with the model's own template
    (see `from_tokenizer`); `special_tokens` are the tokenizer's added special tokens, among which
    the end-of-turn token is found (or `end_of_turn` names it); `eos_tokens` always go into the stop list.
    """
    S, U, A, U2 = MARK["system"], MARK["user"], MARK["assistant"], MARK["user2"]
    sys_m, user = {"role": "system", "content": S}, {"role": "user", "content": U}
    asst, user2 = {"role": "assistant", "content": A}, {"role": "user", "content": U2}

    # 1. the per-message format, from conversations without a system message
    one = _render(template_fn, [user], True)
    one_nogen = _render(template_fn, [user], False)
    if not one.startswith(one_nogen):
        raise TemplateUnsupported("the generation prompt is not appended at the end")
    gen = one[len(one_nogen) :]
    multi = _render(template_fn, [user, asst, user2], True)
    m0, m1, m2, m3 = _split(multi, [U, A, U2])
    q0, q1 = _split(one, [U])
    bos = bos_token if bos_token and m0.startswith(bos_token) and q0.startswith(bos_token) else ""
    m0, q0 = m0[len(bos) :], q0[len(bos) :]
    if m0 != q0:
        raise TemplateUnsupported("the first user message is wrapped differently in longer conversations")
    if not q1.endswith(gen) or not m3.endswith(gen):
        raise TemplateUnsupported("the text after the last user message does not end with the generation prompt")
    user_suffix = q1[: len(q1) - len(gen)]
    if m3[: len(m3) - len(gen)] != user_suffix or not m1.startswith(user_suffix):
        raise TemplateUnsupported("the user suffix depends on the position of the message")
    asst_prefix = m1[len(user_suffix) :]
    # The end-of-turn token: the named one, else the first special token after the assistant's content.
    stops = [end_of_turn] if end_of_turn and end_of_turn in m2 else []
    if not stops:
        stops = sorted((t for t in special_tokens if t and t in m2 and t != bos_token), key=m2.find)[:1]
    cut = _cut_after_stop(m2, stops)
    asst_suffix, user_prefix = m2[:cut], m2[cut:]
    if not q0.endswith(user_prefix):
        raise TemplateUnsupported("the first user message is wrapped differently from later ones")
    head = q0[: len(q0) - len(user_prefix)]

    # 2. where a system prompt goes
    prefix = {"user": user_prefix, "assistant": asst_prefix, "system": ""}
    suffix = {"user": user_suffix, "assistant": asst_suffix, "system": ""}
    mode, fold, default_system = "turn", ("", ""), None
    try:
        with_sys = _render(template_fn, [sys_m, user], True)
    except TemplateUnsupported:
        mode = "refused"
    if mode != "refused" and S not in with_sys:
        if with_sys != one:
            raise TemplateUnsupported("a system message changes the prompt without appearing in it")
        mode = "ignored"
    if mode in ("refused", "ignored") and head:
        raise TemplateUnsupported("the template adds text before the first user message but takes no system prompt")
    if mode not in ("refused", "ignored"):
        s0, s1, s2 = _split(with_sys, [S, U])
        s0 = s0[len(bos) :] if bos and s0.startswith(bos) else s0
        if s2 != user_suffix + gen:
            raise TemplateUnsupported("the user message after a system message ends differently")
        if s1.endswith(user_prefix) and user_prefix:
            prefix["system"], suffix["system"] = s0, s1[: len(s1) - len(user_prefix)]
            if head:
                if not (head.startswith(prefix["system"]) and head.endswith(suffix["system"])):
                    raise TemplateUnsupported("the template adds text before a conversation without a system message")
                default_system = head[len(prefix["system"]) : len(head) - len(suffix["system"])]
        elif s0.startswith(head + user_prefix) and not head:
            fold = (s0[len(user_prefix) :], s1)
            longer = _render(template_fn, [sys_m, user, asst, user2], True)
            mode = "first_user" if longer.find(S) < longer.find(U) else "last_user"
        else:
            raise TemplateUnsupported("the system prompt is neither its own turn nor part of a user message")

    stop_list = list(dict.fromkeys(stops + [t for t in eos_tokens if t]))
    fmt = ChatFormat(bos, prefix, suffix, gen, default_system, tuple(stop_list), mode, fold)
    for conv in probe_conversations():  # the reduction must reproduce the template exactly
        if mode == "refused" and any(m["role"] == "system" for m in conv):
            continue
        want = _render(template_fn, conv, True)
        want = want[len(bos) :] if bos and want.startswith(bos) else want
        if fmt.render(conv) != want:
            raise TemplateUnsupported(f"re-rendering {[m['role'] for m in conv]} differs from the chat template")
    return fmt


def probe_conversations() -> list[list[dict]]:
    """Conversations every derived format is checked on (and the Go test renders)."""
    sys_ = {"role": "system", "content": "You are a helpful assistant.\nAnswer briefly."}
    return [
        [{"role": "user", "content": "What is 2+2?"}],
        [sys_, {"role": "user", "content": "Name a colour."}],
        [
            sys_,
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello. How can I help?"},
            {"role": "user", "content": "Tell me a joke\nabout cats."},
        ],
        [
            {"role": "user", "content": "One"},
            {"role": "assistant", "content": "Two"},
            {"role": "user", "content": "Three"},
            {"role": "assistant", "content": "Four"},
            {"role": "user", "content": 'Five "quoted" {{ braces }} and unicode: café 🙂'},
        ],
    ]


def from_tokenizer(tokenizer, end_of_turn: str | None = None) -> ChatFormat:
    """`derive_chat_format` for a transformers tokenizer (the one saved in the run directory)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateUnsupported("the tokenizer has no chat template")

    def fn(messages, add_generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    specials = [str(t) for t in tokenizer.all_special_tokens]
    specials += [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    eos = [tokenizer.eos_token] if tokenizer.eos_token else []
    # The template's leading BOS text is left to the runtime only when the tokenizer adds BOS itself (what the
    # converter records as tokenizer.ggml.add_bos_token). SmolLM2's BOS is <|im_start|>, which it never adds:
    # stripped from the TEMPLATE, every prompt would start "system\n..." without its turn marker.
    bos_id = tokenizer.bos_token_id
    adds_bos = bos_id is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos_id]
    bos = tokenizer.bos_token if adds_bos else None
    return derive_chat_format(fn, bos, list(dict.fromkeys(specials)), eos, end_of_turn)


RAW_TEMPLATE = "{{ .Prompt }}"


def modelfile(
    gguf_name: str,
    fmt: ChatFormat | None,
    system: str | None = None,
    note: str | None = None,
    stop: list[str] | None = None,
) -> str:
    """Modelfile text: FROM, TEMPLATE, PARAMETER stop, optional SYSTEM.

    `fmt` None means a model without a chat template (trained on plain text): the prompt goes in as is.
    A SYSTEM prompt for a template that has no place for one raises TemplateUnsupported.
    """
    lines = ["# Written by lowvram export. Create the model: ollama create NAME -f <this file>", f"FROM ./{gguf_name}"]
    if fmt is not None:
        if system and not fmt.takes_system:
            raise TemplateUnsupported(
                f"a SYSTEM prompt was asked for, but the chat template has no place for one "
                f"(system messages are {SYSTEM_MODES[fmt.system_mode]})"
            )
        lines.append(f'TEMPLATE """{fmt.go_template()}"""')
    else:
        lines.append(f"# {note or 'No chat template: the model was trained on plain text'}; the prompt goes in as is.")
        lines.append(f'TEMPLATE """{RAW_TEMPLATE}"""')
    stops = tuple(s for s in dict.fromkeys((fmt.stop if fmt else ()) + tuple(stop or ())) if s)
    problems = modelfile_problems(system, stops)
    if problems:  # export checks this before writing anything; this guards other callers
        raise ValueError("; ".join(problems))
    for s in stops:
        lines.append(f"PARAMETER stop {_value(s)}")  # no escapes in a Modelfile: written as is
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
