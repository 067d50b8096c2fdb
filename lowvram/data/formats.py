"""Training-data formats: detect which one a dataset is in (with the reason) and turn rows into TRL's.

    fmt, reason = detect_format(rows, kind="preference")   # ("hh-rlhf", "column 'chosen' holds ...")
    canonical, problems = convert_row(fmt, row)            # problems: [(code, message)]

Canonical SFT rows: {"messages": [...]} (chat, ShareGPT, Alpaca), {"prompt", "completion"} strings, or
{"text"}. Canonical preference rows: all strings {"prompt", "chosen", "rejected"}, or all conversational
{"prompt": [messages before the final answer], "chosen": [final assistant message], "rejected": [...]}.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from lowvram.data.sources import is_missing, type_name

SFT_FORMATS = ("chat", "sharegpt", "alpaca", "prompt-completion", "text")
PREFERENCE_FORMATS = (
    "prompt-chosen-rejected",
    "chat-preference",
    "chat-transcripts",
    "hh-rlhf",
    "ranked-answers",
    "argilla-dpo-mix",
    "ultrafeedback-binarized",
)
DATA_FORMATS = ("auto", *SFT_FORMATS, *PREFERENCE_FORMATS)
KINDS = ("sft", "preference")

# The fields a recipe's data.columns may map a source column onto.
MAPPABLE_FIELDS = (
    "messages",
    "conversations",
    "instruction",
    "input",
    "output",
    "system",
    "prompt",
    "completion",
    "text",
    "chosen",
    "rejected",
    "question",
    "response_j",
    "response_k",
)

CHAT_ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speakers seen in the wild -> chat roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")

Problems = list[tuple[str, str]]  # (code, message)


# ------------------------------------------------------------------ field helpers


def _maybe_json_list(value: Any) -> Any:
    """CSV and Parquet exports often hold message lists as JSON text: read it back."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        return parsed if isinstance(parsed, list) else value
    return value


def _string(row: dict, key: str, problems: Problems) -> str | None:
    value = row.get(key)
    if is_missing(value):
        problems.append(("missing_field", f"missing field '{key}'"))
        return None
    if not isinstance(value, str):
        problems.append(("wrong_type", f"field '{key}': expected a string, got {type_name(value)}"))
        return None
    if not value.strip():
        problems.append(("empty_field", f"empty field '{key}'"))
        return None
    return value


def _optional_string(row: dict, key: str, problems: Problems) -> str:
    value = row.get(key)
    if is_missing(value):
        return ""
    if not isinstance(value, str):
        problems.append(("wrong_type", f"field '{key}': expected a string, got {type_name(value)}"))
        return ""
    return value


def _messages(
    row: dict,
    key: str,
    problems: Problems,
    role_key: str = "role",
    content_key: str = "content",
    roles: dict[str, str] | None = None,
) -> list[dict] | None:
    """A validated [{"role", "content"}] list from row[key]; None (and problems) when it is not one."""
    value = _maybe_json_list(row.get(key))
    if is_missing(value):
        problems.append(("missing_field", f"missing field '{key}'"))
        return None
    if not isinstance(value, list):
        problems.append(("wrong_type", f"field '{key}': expected a list of messages, got {type_name(value)}"))
        return None
    if not value:
        problems.append(("empty_field", f"empty field '{key}': no messages"))
        return None
    out, before = [], len(problems)
    for i, msg in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(msg, dict):
            problems.append(("wrong_type", f"{where}: expected a message object, got {type_name(msg)}"))
            continue
        role, content = msg.get(role_key), msg.get(content_key)
        if is_missing(role):
            problems.append(("missing_field", f"{where}: missing '{role_key}'"))
            continue
        if not isinstance(role, str):
            problems.append(("wrong_type", f"{where}.{role_key}: expected a string, got {type_name(role)}"))
            continue
        mapped = (roles.get(role.lower()) if roles else role) or ""
        if mapped not in CHAT_ROLES:
            known = ", ".join(sorted(roles) if roles else CHAT_ROLES)
            problems.append(("bad_value", f"{where}.{role_key}: unknown role {role!r} (expected {known})"))
            continue
        if is_missing(content):
            problems.append(("missing_field", f"{where}: missing '{content_key}'"))
            continue
        if not isinstance(content, str):
            problems.append(("wrong_type", f"{where}.{content_key}: expected a string, got {type_name(content)}"))
            continue
        out.append({"role": mapped, "content": content})
    return out if len(problems) == before else None


def _answer_list(row: dict, key: str, problems: Problems) -> list[dict] | None:
    """chosen/rejected of a conversational pair: a message list, or a bare string taken as the answer."""
    value = _maybe_json_list(row.get(key))
    if isinstance(value, str) and value.strip():
        return [{"role": "assistant", "content": value}]
    return _messages(row, key, problems)


def _hh_turns(text: str, key: str, problems: Problems) -> list[dict] | None:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages."""
    parts = HH_TURN.split(text)
    if len(parts) < 3:
        problems.append(("bad_value", f"field '{key}': no 'Human:' / 'Assistant:' turns"))
        return None
    if parts[0].strip():
        problems.append(("bad_value", f"field '{key}': text before the first 'Human:' turn: {parts[0][:40]!r}"))
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2])]


def _first_difference(a: list[dict], b: list[dict]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _conversational_pair(
    prompt: list[dict] | None, chosen: list[dict], rejected: list[dict], prompt_text: str | None, problems: Problems
) -> dict | None:
    """TRL's conversational pair: the prompt is every message before the final assistant answer.

    chosen/rejected are either the final answer alone (then a separate prompt is needed) or whole
    dialogues that must share everything before their last message (HH-RLHF, dpo-mix, UltraFeedback).
    """
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1]["role"] != "assistant":
            problems.append(
                (
                    "bad_value",
                    (f"field '{key}': the last message is from {msgs[-1]['role']!r}, not an assistant answer"),
                )
            )
    if problems:
        return None
    shared_c, shared_r = chosen[:-1], rejected[:-1]
    if shared_c or shared_r:
        if shared_c != shared_r:
            i = _first_difference(shared_c, shared_r)
            problems.append(
                (
                    "bad_value",
                    (
                        f"chosen and rejected differ before their final answer (at message {i}): "
                        "the prompt must be the dialogue they share"
                    ),
                )
            )
            return None
        if prompt_text is not None:
            users = [m for m in shared_c if m["role"] == "user"]
            if not users or users[-1]["content"].strip() != prompt_text.strip():
                problems.append(
                    ("bad_value", "field 'prompt' is not the last user message of the dialogue in 'chosen'")
                )
                return None
        elif prompt is not None and prompt != shared_c:
            problems.append(("bad_value", "field 'prompt' differs from the dialogue that 'chosen' starts with"))
            return None
        prompt = shared_c
    elif prompt is None:
        problems.append(
            (
                "missing_field",
                ("no prompt: 'chosen' and 'rejected' hold only the answer and there is no 'prompt' field"),
            )
        )
        return None
    if not any(m["role"] == "user" for m in prompt):
        problems.append(("bad_value", "the prompt has no user message"))
        return None
    return {"prompt": prompt, "chosen": [chosen[-1]], "rejected": [rejected[-1]]}


# ------------------------------------------------------------------ converters, one per format


def _chat(row: dict, p: Problems) -> dict | None:
    key = "messages" if "messages" in row or "conversations" not in row else "conversations"
    msgs = _messages(row, key, p)
    if msgs is None:
        return None
    if not any(m["role"] == "assistant" for m in msgs):
        p.append(("bad_value", f"field '{key}': no assistant message, so nothing to learn"))
        return None
    return {"messages": msgs}


def _sharegpt(row: dict, p: Problems) -> dict | None:
    key = "conversations" if "conversations" in row or "conversation" not in row else "conversation"
    msgs = _messages(row, key, p, role_key="from", content_key="value", roles=SHAREGPT_ROLES)
    if msgs is None:
        return None
    if not any(m["role"] == "assistant" for m in msgs):
        p.append(("bad_value", f"field '{key}': no 'gpt' turn, so nothing to learn"))
        return None
    return {"messages": msgs}


def _alpaca(row: dict, p: Problems) -> dict | None:
    instruction, output = _string(row, "instruction", p), _string(row, "output", p)
    extra, system = _optional_string(row, "input", p), _optional_string(row, "system", p)
    if p:
        return None
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    msgs = ([{"role": "system", "content": system}] if system.strip() else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": output},
    ]
    return {"messages": msgs}


def _prompt_completion(row: dict, p: Problems) -> dict | None:
    prompt, completion = _string(row, "prompt", p), _string(row, "completion", p)
    return None if p else {"prompt": prompt, "completion": completion}


def _text(row: dict, p: Problems) -> dict | None:
    text = _string(row, "text", p)
    return None if p else {"text": text}


def _prompt_chosen_rejected(row: dict, p: Problems) -> dict | None:
    prompt, chosen, rejected = (_string(row, k, p) for k in ("prompt", "chosen", "rejected"))
    return None if p else {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _ranked_answers(row: dict, p: Problems) -> dict | None:
    # Stack Exchange paired style: response_j is the preferred (higher-voted) answer.
    prompt, chosen, rejected = (_string(row, k, p) for k in ("question", "response_j", "response_k"))
    return None if p else {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _chat_preference(row: dict, p: Problems) -> dict | None:
    raw_prompt = _maybe_json_list(row.get("prompt"))
    prompt_text = None
    if isinstance(raw_prompt, str):
        prompt_text = _string(row, "prompt", p)
        prompt = [{"role": "user", "content": prompt_text}] if prompt_text else None
    else:
        prompt = _messages(row, "prompt", p)
    chosen, rejected = _answer_list(row, "chosen", p), _answer_list(row, "rejected", p)
    if p:
        return None
    # A string prompt with whole dialogues in chosen/rejected is checked against their last user turn.
    full = len(chosen) > 1 or len(rejected) > 1
    return _conversational_pair(
        None if full and prompt_text else prompt, chosen, rejected, prompt_text if full else None, p
    )


def _transcripts(row: dict, p: Problems) -> dict | None:
    chosen, rejected = _messages(row, "chosen", p), _messages(row, "rejected", p)
    return None if p else _conversational_pair(None, chosen, rejected, None, p)


def _hh_rlhf(row: dict, p: Problems) -> dict | None:
    chosen_text, rejected_text = _string(row, "chosen", p), _string(row, "rejected", p)
    if p:
        return None
    chosen, rejected = _hh_turns(chosen_text, "chosen", p), _hh_turns(rejected_text, "rejected", p)
    return None if p else _conversational_pair(None, chosen, rejected, None, p)


def _ultrafeedback(row: dict, p: Problems) -> dict | None:
    prompt_text = _string(row, "prompt", p)
    chosen, rejected = _messages(row, "chosen", p), _messages(row, "rejected", p)
    return None if p else _conversational_pair(None, chosen, rejected, prompt_text, p)


CONVERTERS: dict[str, Callable[[dict, Problems], dict | None]] = {
    "chat": _chat,
    "sharegpt": _sharegpt,
    "alpaca": _alpaca,
    "prompt-completion": _prompt_completion,
    "text": _text,
    "prompt-chosen-rejected": _prompt_chosen_rejected,
    "chat-preference": _chat_preference,
    "chat-transcripts": _transcripts,
    "hh-rlhf": _hh_rlhf,
    "ranked-answers": _ranked_answers,
    "argilla-dpo-mix": _transcripts,
    "ultrafeedback-binarized": _ultrafeedback,
}


def convert_row(fmt: str, row: dict) -> tuple[dict | None, Problems]:
    """(canonical row or None, problems) for one source row in format `fmt`."""
    problems: Problems = []
    out = CONVERTERS[fmt](row, problems)
    return (out if not problems else None), problems


# ------------------------------------------------------------------ detection


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_msgs(v: Any, role_key: str = "role") -> bool:
    v = _maybe_json_list(v)
    return isinstance(v, list) and bool(v) and isinstance(v[0], dict) and role_key in v[0]


def _is_hh(v: Any) -> bool:
    return isinstance(v, str) and "Assistant:" in v and ("\n\nHuman:" in v or v.lstrip().startswith("Human:"))


# (format, kind, test on one row, why it matched). Order breaks ties: specific shapes first.
SIGNATURES: list[tuple[str, str, Callable[[dict], bool], str]] = [
    (
        "hh-rlhf",
        "preference",
        lambda r: "prompt" not in r and _is_hh(r.get("chosen")) and _is_hh(r.get("rejected")),
        (
            "'chosen' and 'rejected' are '\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts with no 'prompt' column "
            "(HH-RLHF): the prompt is the dialogue they share"
        ),
    ),
    (
        "ultrafeedback-binarized",
        "preference",
        lambda r: (
            _is_str(r.get("prompt"))
            and _is_msgs(r.get("chosen"))
            and _is_msgs(r.get("rejected"))
            and (_maybe_json_list(r.get("chosen"))[0].get("role") != "assistant")
        ),
        (
            "'prompt' is a string and 'chosen'/'rejected' are whole dialogues (UltraFeedback-binarized style): "
            "the prompt is the dialogue before the final answer"
        ),
    ),
    (
        "argilla-dpo-mix",
        "preference",
        lambda r: (
            "prompt" not in r
            and _is_msgs(r.get("chosen"))
            and _is_msgs(r.get("rejected"))
            and any(k in r for k in ("chosen_rating", "chosen_model", "chosen-rating"))
        ),
        (
            "'chosen'/'rejected' are message lists with rating/model columns and no 'prompt' (Argilla dpo-mix style): "
            "the prompt is the dialogue they share"
        ),
    ),
    (
        "chat-transcripts",
        "preference",
        lambda r: "prompt" not in r and _is_msgs(r.get("chosen")) and _is_msgs(r.get("rejected")),
        "'chosen'/'rejected' are message lists with no 'prompt' column: the prompt is the dialogue they share",
    ),
    (
        "chat-preference",
        "preference",
        lambda r: (
            "prompt" in r
            and (_is_msgs(r.get("prompt")) or _is_msgs(r.get("chosen")))
            and "chosen" in r
            and "rejected" in r
        ),
        "'prompt', 'chosen' and 'rejected' hold message lists (conversational preference pairs)",
    ),
    (
        "ranked-answers",
        "preference",
        lambda r: all(k in r for k in ("question", "response_j", "response_k")),
        "columns 'question', 'response_j', 'response_k' (Stack Exchange paired style: response_j is preferred)",
    ),
    (
        "prompt-chosen-rejected",
        "preference",
        lambda r: all(k in r for k in ("prompt", "chosen", "rejected")),
        "columns 'prompt', 'chosen', 'rejected' hold strings",
    ),
    (
        "sharegpt",
        "sft",
        lambda r: (
            _is_msgs(r.get("conversations"), "from")
            or _is_msgs(r.get("conversation"), "from")
            or _is_msgs(r.get("messages"), "from")
        ),
        "'conversations' holds from/value turns (ShareGPT)",
    ),
    (
        "chat",
        "sft",
        lambda r: _is_msgs(r.get("messages")) or _is_msgs(r.get("conversations")),
        "'messages' holds role/content message lists (chat)",
    ),
    (
        "alpaca",
        "sft",
        lambda r: "instruction" in r and "output" in r,
        "columns 'instruction', 'output' (and optional 'input'): Alpaca, turned into user/assistant messages",
    ),
    ("prompt-completion", "sft", lambda r: "prompt" in r and "completion" in r, "columns 'prompt', 'completion'"),
    ("text", "sft", lambda r: "text" in r, "column 'text' holds plain text"),
]
FORMAT_KIND = {fmt: kind for fmt, kind, _, _ in SIGNATURES}
DETECTION_SAMPLE = 200  # rows looked at; enough to out-vote a few malformed ones


def detect_format(rows: list[dict], kind: str | None) -> tuple[str | None, str]:
    """(format, reason) by majority over the first rows; (None, what was seen) when nothing fits.

    `kind` ("sft" or "preference") limits the candidates; None lets the data decide.
    """
    sample = rows[:DETECTION_SAMPLE]
    best, best_hits, best_why = None, 0, ""
    for fmt, fmt_kind, test, why in SIGNATURES:
        if kind is not None and fmt_kind != kind:
            continue
        hits = sum(1 for r in sample if _safe(test, r))
        if hits > best_hits:
            best, best_hits, best_why = fmt, hits, why
    if best is None:
        cols = sorted({k for r in sample for k in r})
        return None, f"columns seen: {', '.join(cols) or '(none)'}"
    return best, f"{best_why} ({best_hits} of the first {len(sample)} rows)"


def _safe(test: Callable[[dict], bool], row: dict) -> bool:
    try:
        return bool(test(row))
    except (AttributeError, IndexError, TypeError):
        return False


def expected_columns(fmt: str) -> str:
    """The columns a format reads, for messages."""
    return {
        "chat": "messages: [{role, content}, ...]",
        "sharegpt": "conversations: [{from, value}, ...]",
        "alpaca": "instruction, output (input and system optional)",
        "prompt-completion": "prompt, completion",
        "text": "text",
        "prompt-chosen-rejected": "prompt, chosen, rejected (strings)",
        "chat-preference": "prompt, chosen, rejected (message lists)",
        "chat-transcripts": "chosen, rejected (whole dialogues as message lists)",
        "hh-rlhf": "chosen, rejected ('\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts)",
        "ranked-answers": "question, response_j (preferred), response_k",
        "argilla-dpo-mix": "chosen, rejected (message lists), chosen_rating, rejected_rating",
        "ultrafeedback-binarized": "prompt (string), chosen, rejected (whole dialogues as message lists)",
    }[fmt]
