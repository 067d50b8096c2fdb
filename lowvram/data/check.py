"""`lowvram data check`: read, validate and lint training data before a GPU-hour is spent on it.

    report = check_data(DataConfig(path="prefs.jsonl"), kind=None)     # kind detected from the columns
    print("\\n".join(report.lines()));  sys.exit(report.exit_code(strict=False))

Errors are rows training would refuse (invalid JSON, missing/empty fields, wrong types, undecodable
bytes), each with its file and line. Warnings are rows training would accept but that teach little or
teach the wrong thing; every threshold is stated in the message that uses it:
- identical or nearly identical chosen/rejected, chosen equal to the prompt, empty answers,
- duplicate (or swapped) pairs,
- a systematic length difference between chosen and rejected (the verbosity trap),
- examples longer than the recipe's token budget (truncated in training).
"""

from __future__ import annotations

import difflib
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowvram.data.formats import FORMAT_KIND
from lowvram.data.load import ParsedRows, parse_records, read_source
from lowvram.data.load import plural as _n
from lowvram.data.sources import DataFileError, Location, Problem
from lowvram.errors import EXIT_CHECK_FAILED, EXIT_OK
from lowvram.utils.ui import table

if TYPE_CHECKING:
    from lowvram.recipe import DataConfig

# Thresholds, each with why it is where it is.
NEAR_IDENTICAL_RATIO = 0.95  # difflib similarity: at most ~1 unit in 20 differs; DPO's signal rests on a few tokens
# Short answers are compared character by character (one changed word matters there), longer ones word by word:
# character-level difflib is quadratic, about 0.2 s for two unrelated 2,000-character answers.
SHORT_ANSWER_CHARS = 200
LENGTH_BIAS_SHARE = 0.75  # under no bias the longer answer is chosen about half the time; 3 in 4 is systematic
LENGTH_BIAS_RATIO = 1.25  # ... and the typical chosen answer is at least 25% longer (or 20% shorter) than rejected
LENGTH_BIAS_MIN_PAIRS = 10  # fewer pairs than this say nothing about a trend
CHARS_PER_TOKEN = 4.0  # rough English average, used only when no tokenizer is available locally
TOKENS_PER_MESSAGE = 4  # role markers a chat template adds around each message (approximate mode only)
SHOWN_LOCATIONS = 5  # per warning in text output; --json lists them all
SHOWN_ERRORS = 20


@dataclass(frozen=True)
class Finding:
    """One kind of warning, with every row it applies to."""

    code: str  # identical_pair, near_identical_pair, chosen_equals_prompt, empty_answer, duplicate_pair,
    #            swapped_pair, duplicate_example, length_bias, over_token_budget
    message: str  # says what, how many, the threshold, and why it matters
    locations: tuple[Location, ...] = ()

    def to_dict(self) -> dict:
        return {
            "code": self.code,
            "message": self.message,
            "count": len(self.locations),
            "locations": [loc.to_dict() for loc in self.locations],
        }


@dataclass(frozen=True)
class TokenBudget:
    """How many examples exceed the stage's max_seq_len, measured how."""

    max_seq_len: int
    budget_from: str  # e.g. "dpo stage of recipe demo (cpu tier default)"
    counted_with: str  # tokenizer used, or how the approximation works
    approximate: bool
    over: tuple[Location, ...]
    longest_tokens: int
    median_tokens: float
    examples: int

    def to_dict(self) -> dict:
        return {
            "max_seq_len": self.max_seq_len,
            "budget_from": self.budget_from,
            "counted_with": self.counted_with,
            "approximate": self.approximate,
            "over": len(self.over),
            "examples": self.examples,
            "longest_tokens": self.longest_tokens,
            "median_tokens": self.median_tokens,
            "over_locations": [loc.to_dict() for loc in self.over],
        }


@dataclass
class CheckReport:
    source: str
    kind: str | None = None
    format: str | None = None
    reason: str = ""
    rows_read: int = 0
    rows_valid: int = 0
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    tokens: TokenBudget | None = None
    stage: str | None = None  # recipe stage checked, if any
    parsed: ParsedRows | None = field(default=None, repr=False)  # kept for the token count

    def exit_code(self, strict: bool = False) -> int:
        return EXIT_CHECK_FAILED if self.errors or (strict and self.warnings) else EXIT_OK

    def to_dict(self, strict: bool = False) -> dict:
        return {
            "source": self.source,
            "stage": self.stage,
            "kind": self.kind,
            "format": self.format,
            "reason": self.reason,
            "rows": {"read": self.rows_read, "valid": self.rows_valid, "invalid": self.rows_read - self.rows_valid},
            "errors": [p.to_dict() for p in self.errors],
            "warnings": [w.to_dict() for w in self.warnings],
            "stats": self.stats,
            "token_budget": self.tokens.to_dict() if self.tokens else None,
            "exit_code": self.exit_code(strict),
        }

    def lines(self, strict: bool = False) -> list[str]:
        """The report: a table (lowvram.utils.ui) of what was found, whose plain text reads one finding per line."""
        import textwrap

        title = f"{self.stage} data" if self.stage else "data"
        title = f"{title}: {self.source}" + (f" ({self.kind})" if self.kind else "")
        rows: list[tuple[str, str, list[str]]] = []  # (field, first line, further lines as indented in plain text)
        if self.format:
            rows.append(("format", f"{self.format}  -- {self.reason}", []))
        rows.append(
            ("rows", f"{self.rows_read} read, {self.rows_valid} valid, {self.rows_read - self.rows_valid} invalid", [])
        )
        if self.errors:
            more = [f"  - {p}" for p in self.errors[:SHOWN_ERRORS]]
            if len(self.errors) > SHOWN_ERRORS:
                more.append(f"  ... and {len(self.errors) - SHOWN_ERRORS} more (--json lists every one)")
            rows.append(
                ("errors", f"{len(self.errors)} (training refuses these rows; data.drop_invalid=true skips them)", more)
            )
        if self.warnings:
            more = []
            for w in self.warnings:
                more.append(f"  - {w.message}")
                if w.locations:
                    shown = ", ".join(_short(loc) for loc in w.locations[:SHOWN_LOCATIONS])
                    extra = (
                        f" and {len(w.locations) - SHOWN_LOCATIONS} more" if len(w.locations) > SHOWN_LOCATIONS else ""
                    )
                    more.append(f"      at {shown}{extra}")
            rows.append(("warnings", f"{len(self.warnings)}", more))
        if "chosen_longer_share" in self.stats:
            s = self.stats
            rows.append(
                (
                    "lengths",
                    f"chosen longer than rejected in {s['chosen_longer_share']:.0%} of {s['pairs']} "
                    f"pairs, shorter in {s['chosen_shorter_share']:.0%}; median chosen/rejected length ratio "
                    f"{s['median_length_ratio']:.2f} (characters)",
                    [],
                )
            )
        if self.tokens:
            t = self.tokens
            approx = "~" if t.approximate else ""
            rows.append(
                (
                    "tokens",
                    f"{len(t.over)} of {t.examples} examples exceed max_seq_len {t.max_seq_len} "
                    f"({t.budget_from}) and would be truncated; longest {approx}{t.longest_tokens}, "
                    f"median {approx}{t.median_tokens:g}",
                    [f"          counted with {t.counted_with}"],
                )
            )
        if self.errors:
            result = f"FAIL: {_n(len(self.errors), 'error')}"
        elif self.warnings:
            result = f"{'FAIL (--strict)' if strict else 'OK'} with {_n(len(self.warnings), 'warning')}"
        else:
            result = "OK"
        rows.append(("result", result, []))
        plain = [title]
        for key, first, more in rows:
            plain += [f"{key:<9} {first}", *more]
        cells = [(key, "\n".join([first, *textwrap.dedent("\n".join(more)).splitlines()])) for key, first, more in rows]
        return [table(cells, title=title, plain="\n".join(plain))]


def _short(loc: Location) -> str:
    """A location without the file name when the report is about one file."""
    if loc.line is not None and loc.record is None:
        return f"line {loc.line}"
    if loc.record is not None and loc.line is None:
        return f"record {loc.record}"
    return str(loc)


# ------------------------------------------------------------------ checking


def check_data(
    cfg: DataConfig,
    kind: str | None = None,
    sample: Path | None = None,
    base_dir: Path | None = None,
    stage: str | None = None,
) -> CheckReport:
    """Read, validate and lint one stage's data. `kind` None detects sft vs preference from the columns.

    add_token_budget(report, ...) then counts the examples longer than a stage's max_seq_len.
    """
    source, records, eval_records = read_source_for_check(cfg, sample, base_dir)
    if isinstance(records, DataFileError):
        err = records
        return CheckReport(
            source, kind, errors=[Problem(err.location, "unreadable_file", err.message.split(": ", 1)[-1])], stage=stage
        )
    parsed = parse_records(records + (eval_records or []), source, kind, cfg.format, cfg.columns)
    kind = FORMAT_KIND[parsed.format]
    report = CheckReport(
        source,
        kind,
        parsed.format,
        parsed.reason,
        len(parsed.records),
        len(parsed.rows),
        list(parsed.problems),
        stage=stage,
        parsed=parsed,
    )
    if kind == "preference":
        report.warnings += preference_warnings(parsed, report.stats)
    else:
        report.warnings += sft_warnings(parsed)
    return report


def add_token_budget(
    report: CheckReport,
    max_seq_len: int,
    budget_from: str,
    tokenizer: Any = None,
    tokenizer_label: str = "",
    chat_template: str | None = None,
) -> None:
    """Count examples longer than max_seq_len with `tokenizer`, or approximately (and labelled so) without one."""
    if report.parsed is None or not report.parsed.rows:
        return
    t = report.tokens = token_budget(report.parsed, max_seq_len, budget_from, tokenizer, tokenizer_label, chat_template)
    if t.over:
        report.warnings.append(
            Finding(
                "over_token_budget",
                f"{len(t.over)} of {t.examples} examples are longer than max_seq_len {max_seq_len} "
                f"({'approximately, ' if t.approximate else ''}counted with {t.counted_with}): training truncates them"
                + (", cutting off the answers that carry the preference" if report.kind == "preference" else ""),
                t.over,
            )
        )


def read_source_for_check(cfg: DataConfig, sample: Path | None, base_dir: Path | None):
    """Like read_source, but a file that cannot be read as data is reported instead of raised."""
    try:
        return read_source(cfg, sample, base_dir)
    except DataFileError as e:
        return e.location.file, e, None


# ------------------------------------------------------------------ lints


def _norm(text: str) -> str:
    """Case and spacing do not make two answers different."""
    return " ".join(text.split()).casefold()


def _has_content(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def _pair_texts(canon: dict) -> tuple[str, str, str]:
    """(prompt's last user message, chosen answer, rejected answer) of a canonical pair."""
    prompt, chosen, rejected = canon["prompt"], canon["chosen"], canon["rejected"]
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m["role"] == "user"]
        return (users[-1] if users else ""), chosen[-1]["content"], rejected[-1]["content"]
    return prompt, chosen, rejected


def _prompt_key(canon: dict) -> str:
    prompt = canon["prompt"]
    if isinstance(prompt, list):
        return "\x00".join(f"{m['role']}:{_norm(m['content'])}" for m in prompt)
    return _norm(prompt)


def preference_warnings(parsed: ParsedRows, stats: dict) -> list[Finding]:
    identical, near, echo, empty, dupes, swapped = [], [], [], [], [], []
    seen: dict[tuple[str, str, str], Location] = {}
    longer = shorter = 0
    ratios: list[float] = []
    for loc, _, canon in parsed.rows:
        prompt, chosen, rejected = _pair_texts(canon)
        c, r = _norm(chosen), _norm(rejected)
        if not _has_content(chosen) or not _has_content(rejected):
            empty.append(loc)
        elif c == r:
            identical.append(loc)
        elif _similar(c, r):
            near.append(loc)
        if _has_content(chosen) and c == _norm(prompt):
            echo.append(loc)
        key = (_prompt_key(canon), c, r)
        if key in seen:
            dupes.append(loc)
        elif (key[0], r, c) in seen and c != r:
            swapped.append(loc)
        else:
            seen[key] = loc
        if chosen.strip() and rejected.strip():
            lc, lr = len(chosen.strip()), len(rejected.strip())
            longer += lc > lr
            shorter += lc < lr
            ratios.append(lc / lr)
    out = []
    if identical:
        out.append(
            Finding(
                "identical_pair",
                f"{_n(len(identical), 'pair')}: identical chosen and rejected answers "
                "(ignoring case and spacing): they carry no preference",
                tuple(identical),
            )
        )
    if near:
        out.append(
            Finding(
                "near_identical_pair",
                f"{_n(len(near), 'pair')}: nearly identical answers (difflib "
                f"similarity >= {NEAR_IDENTICAL_RATIO:.0%}, over characters below "
                f"{SHORT_ANSWER_CHARS} characters, else over words): the preference "
                "rests on a few tokens, which DPO then pushes on hard; check that "
                "the difference is the one you mean to teach",
                tuple(near),
            )
        )
    if echo:
        out.append(
            Finding(
                "chosen_equals_prompt",
                f"{_n(len(echo), 'pair')}: chosen answer equal to the prompt: "
                "they teach the model to repeat the question",
                tuple(echo),
            )
        )
    if empty:
        out.append(
            Finding(
                "empty_answer",
                f"{_n(len(empty), 'pair')}: an empty answer (no letters or digits) as chosen or rejected",
                tuple(empty),
            )
        )
    if dupes:
        out.append(
            Finding(
                "duplicate_pair",
                f"{_n(len(dupes), 'pair')} repeating an earlier pair (same prompt, chosen and "
                "rejected): they weigh double",
                tuple(dupes),
            )
        )
    if swapped:
        out.append(
            Finding(
                "swapped_pair",
                f"{_n(len(swapped), 'pair')}: an earlier pair with chosen and rejected swapped: the two cancel out",
                tuple(swapped),
            )
        )
    if ratios:
        n = len(ratios)
        median = statistics.median(ratios)
        stats.update(
            pairs=n,
            chosen_longer_share=longer / n,
            chosen_shorter_share=shorter / n,
            median_length_ratio=round(median, 3),
        )
        bias = length_bias(n, longer / n, shorter / n, median)
        if bias:
            out.append(Finding("length_bias", bias))
    return out


def length_bias(pairs: int, longer_share: float, shorter_share: float, median_ratio: float) -> str | None:
    """A warning when chosen answers are systematically longer (or shorter) than rejected ones."""
    if pairs < LENGTH_BIAS_MIN_PAIRS:
        return None
    rule = (
        f"(warned when one side is longer in >= {LENGTH_BIAS_SHARE:.0%} of at least {LENGTH_BIAS_MIN_PAIRS} pairs "
        f"and the median chosen/rejected length ratio is >= {LENGTH_BIAS_RATIO:g} or <= {1 / LENGTH_BIAS_RATIO:g})"
    )
    if longer_share >= LENGTH_BIAS_SHARE and median_ratio >= LENGTH_BIAS_RATIO:
        return (
            f"length bias: chosen is longer than rejected in {longer_share:.0%} of {pairs} pairs (median ratio "
            f"{median_ratio:.2f}): DPO learns that longer wins, the verbosity trap; balance the lengths, or use "
            f"an IPO or length-regularised loss {rule}"
        )
    if shorter_share >= LENGTH_BIAS_SHARE and median_ratio <= 1 / LENGTH_BIAS_RATIO:
        return (
            f"length bias: chosen is shorter than rejected in {shorter_share:.0%} of {pairs} pairs (median ratio "
            f"{median_ratio:.2f}): DPO learns that shorter wins; fine if brevity is the goal, otherwise balance "
            f"the lengths {rule}"
        )
    return None


def _similar(a: str, b: str) -> bool:
    """difflib similarity >= NEAR_IDENTICAL_RATIO, over characters (short answers) or words (long ones)."""
    x, y = (a, b) if max(len(a), len(b)) < SHORT_ANSWER_CHARS else (a.split(), b.split())
    total = len(x) + len(y)
    # Two upper bounds of difflib's ratio, each far cheaper than the ratio, rule out most pairs first.
    if not total or 2 * min(len(x), len(y)) / total < NEAR_IDENTICAL_RATIO:
        return False
    if 2 * sum((Counter(x) & Counter(y)).values()) / total < NEAR_IDENTICAL_RATIO:
        return False
    return difflib.SequenceMatcher(None, x, y, autojunk=False).ratio() >= NEAR_IDENTICAL_RATIO


def sft_warnings(parsed: ParsedRows) -> list[Finding]:
    empty, dupes = [], []
    seen: set[str] = set()
    for loc, _, canon in parsed.rows:
        if "messages" in canon:
            answers = [m["content"] for m in canon["messages"] if m["role"] == "assistant"]
        else:
            answers = [canon.get("completion", canon.get("text", ""))]
        if any(not _has_content(a) for a in answers):
            empty.append(loc)
        key = repr(canon)
        if key in seen:
            dupes.append(loc)
        seen.add(key)
    out = []
    if empty:
        out.append(
            Finding(
                "empty_answer",
                f"{_n(len(empty), 'example')} with an empty answer (no letters or digits): "
                "they teach the model to say nothing",
                tuple(empty),
            )
        )
    if dupes:
        out.append(
            Finding(
                "duplicate_example",
                f"{_n(len(dupes), 'example')} repeating an earlier one exactly: they weigh "
                "double and inflate the epoch",
                tuple(dupes),
            )
        )
    return out


# ------------------------------------------------------------------ token budget


def _texts_for_tokens(canon: dict, render) -> list[str]:
    """The text(s) training tokenizes for one example: one for SFT, prompt+chosen and prompt+rejected for pairs."""
    if "messages" in canon:
        return [render(canon["messages"])]
    if "text" in canon:
        return [canon["text"]]
    if "completion" in canon:
        return [canon["prompt"] + canon["completion"]]
    if isinstance(canon["prompt"], list):
        return [render(canon["prompt"] + canon["chosen"]), render(canon["prompt"] + canon["rejected"])]
    return [canon["prompt"] + canon["chosen"], canon["prompt"] + canon["rejected"]]


def _conversational(parsed: ParsedRows) -> bool:
    canon = parsed.rows[0][2]
    return "messages" in canon or isinstance(canon.get("prompt"), list)


def token_lengths(
    parsed: ParsedRows, tokenizer: Any = None, tokenizer_label: str = "", chat_template: str | None = None
) -> tuple[list[int], str, bool]:
    """(tokens per example, how they were counted, approximate?): the longer side of a pair, untruncated."""
    if tokenizer is not None:
        template = chat_template or None  # the recipe's model.chat_template wins, as in training
        if getattr(tokenizer, "chat_template", None) or template:

            def render(msgs):
                return tokenizer.apply_chat_template(msgs, tokenize=False, chat_template=template)

            how = f"{tokenizer_label}'s tokenizer" + (" and chat template" if _conversational(parsed) else "")
        else:

            def render(msgs):
                return "\n".join(m["content"] for m in msgs)

            how = f"{tokenizer_label}'s tokenizer (it has no chat template: message text only)"
        groups = [_texts_for_tokens(canon, render) for _, _, canon in parsed.rows]
        flat = [t for g in groups for t in g]
        ids = tokenizer(flat, add_special_tokens=False)["input_ids"]
        it = iter(len(x) for x in ids)
        lengths = [max(next(it) for _ in g) for g in groups]
        approximate = False
    else:

        def render(msgs):  # length in characters plus the markup a template adds
            return "\n".join(m["content"] for m in msgs) + " " * int(TOKENS_PER_MESSAGE * CHARS_PER_TOKEN) * len(msgs)

        lengths = [
            max(round(len(t) / CHARS_PER_TOKEN) for t in _texts_for_tokens(canon, render))
            for _, _, canon in parsed.rows
        ]
        approximate = True
        how = (
            f"an approximation ({CHARS_PER_TOKEN:g} characters per token, {TOKENS_PER_MESSAGE} per message for "
            f"chat markup; {tokenizer_label or 'no tokenizer'} not available locally)"
        )
    return lengths, how, approximate


def token_budget(
    parsed: ParsedRows,
    max_seq_len: int,
    budget_from: str,
    tokenizer: Any = None,
    tokenizer_label: str = "",
    chat_template: str | None = None,
) -> TokenBudget:
    """Token length of each example (the longer side of a pair) against max_seq_len."""
    lengths, how, approximate = token_lengths(parsed, tokenizer, tokenizer_label, chat_template)
    over = tuple(loc for (loc, _, _), n in zip(parsed.rows, lengths) if n > max_seq_len)
    return TokenBudget(
        max_seq_len, budget_from, how, approximate, over, max(lengths), statistics.median(lengths), len(lengths)
    )
