"""Load a recipe stage's data as canonical rows for TRL, refusing (or dropping) invalid rows.

    data = load_preference_data(recipe.dpo.data, recipe.sample_file(recipe.dpo.data), base_dir=recipe_path.parent)
    print(f"{data.format}: {data.reason}")      # why that format was chosen
    train_rows, eval_rows = data.train, data.eval

Nothing here modifies the source files; heavy libraries (datasets, pyarrow) load only when needed.
"""

from __future__ import annotations

import difflib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lowvram.data.formats import (
    DATA_FORMATS,
    FORMAT_KIND,
    MAPPABLE_FIELDS,
    convert_row,
    detect_format,
    expected_columns,
)
from lowvram.data.sources import Location, Problem, Record, looks_like_local_path, read_hub, read_local
from lowvram.errors import UserError

if TYPE_CHECKING:  # recipe.py imports this package for DATA_FORMATS: no import cycle at run time
    from lowvram.recipe import DataConfig

MAX_LISTED = 10  # problems printed in an error; `lowvram data check` lists them all
# A recipe's eval_split names a split of its Hub dataset; with local data (or the samples) this share is held
# out instead, so the run still evaluates.
LOCAL_EVAL_FRACTION = 0.1


@dataclass(frozen=True)
class LoadedData:
    """A stage's data, ready for TRL."""

    train: list[dict]  # canonical rows
    eval: list[dict] | None  # held-out rows (eval_split or eval_fraction), else None
    format: str  # detected or declared source format, e.g. "sharegpt", "hh-rlhf"
    reason: str  # why that format was chosen
    source: str  # file path(s) or Hub name actually read
    dropped: int  # invalid rows dropped (drop_invalid=True), else 0
    dropped_problems: tuple[Problem, ...] = ()  # what was wrong with the dropped rows (a row may have several)


@dataclass
class ParsedRows:
    """Source records turned into canonical rows: which format, why, the rows and what was wrong."""

    source: str
    format: str
    reason: str
    records: list[Record]
    rows: list[tuple[Location, dict, dict]] = field(default_factory=list)  # (where, source row, canonical row)
    problems: list[Problem] = field(default_factory=list)

    @property
    def invalid_records(self) -> int:
        return len({p.location for p in self.problems})


# ------------------------------------------------------------------ public entry points


def load_sft_data(
    cfg: DataConfig, sample: Path | None = None, base_dir: Path | None = None, seed: int = 42
) -> LoadedData:
    """SFT rows ({"messages"}, {"prompt","completion"} or {"text"}) from a stage's DataConfig.

    `sample`: the shipped sample file to read instead of cfg.path (Recipe.sample_file resolves it).
    """
    return _load(cfg, "sft", sample, base_dir, seed)


def load_preference_data(
    cfg: DataConfig, sample: Path | None = None, base_dir: Path | None = None, seed: int = 42
) -> LoadedData:
    """Preference rows ({"prompt","chosen","rejected"}, strings or conversational) from a stage's DataConfig."""
    return _load(cfg, "preference", sample, base_dir, seed)


def _load(cfg: DataConfig, kind: str, sample: Path | None, base_dir: Path | None, seed: int) -> LoadedData:
    source, records, eval_records = read_source(cfg, sample, base_dir)
    parsed = parse_records(records, source, kind, cfg.format, cfg.columns)
    train = _accept(parsed, cfg.drop_invalid)
    dropped_problems, dropped_rows = tuple(parsed.problems), parsed.invalid_records
    eval_rows = None
    if eval_records is not None:
        eval_parsed = parse_records(
            eval_records,
            f"{source} (eval split {cfg.eval_split})",
            kind,
            parsed.format,
            cfg.columns,
            reason=parsed.reason,
        )
        eval_rows = _accept(eval_parsed, cfg.drop_invalid)
        dropped_problems += tuple(eval_parsed.problems)
        dropped_rows += eval_parsed.invalid_records
    elif cfg.eval_fraction > 0 or cfg.eval_split:
        fraction = cfg.eval_fraction or LOCAL_EVAL_FRACTION
        train, eval_rows = split_eval(train, fraction, seed)
        if not cfg.eval_fraction:
            note = (
                f"eval: {fraction:.0%} held out, because eval_split {cfg.eval_split!r} names a split of the "
                "Hub dataset and this data is local"
            )
            parsed.reason = f"{parsed.reason}; {note}"
    if cfg.max_examples is not None:
        train = train[: cfg.max_examples]
    return LoadedData(train, eval_rows, parsed.format, parsed.reason, source, dropped_rows, dropped_problems)


def _accept(parsed: ParsedRows, drop_invalid: bool) -> list[dict]:
    """The canonical rows, or UserError naming the first bad rows unless they may be dropped."""
    if parsed.problems and not drop_invalid:
        raise UserError(
            f"{parsed.source}: {plural(parsed.invalid_records, 'invalid row')} ({parsed.format} data, "
            f"{plural(len(parsed.records), 'row')} in all):",
            _listing(parsed.problems),
            hint="Fix those rows, or set data.drop_invalid=true to train without them. "
            "`lowvram data check PATH` lists every problem.",
        )
    if not parsed.rows:
        raise UserError(f"{parsed.source}: no valid rows ({len(parsed.records)} read).", _listing(parsed.problems))
    return [canon for _, _, canon in parsed.rows]


def plural(count: int, noun: str) -> str:
    """'1 invalid row', '3 invalid rows'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _listing(problems: list[Problem]) -> list[str]:
    out = [str(p) for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        out.append(f"... and {len(problems) - MAX_LISTED} more")
    return out


def split_eval(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic held-out split: the same seed picks the same rows; both keep their file order."""
    if len(rows) < 2:
        raise UserError(
            f"eval_fraction={fraction:g} needs at least 2 rows to hold some out; there are {len(rows)}.",
            hint="Set data.eval_fraction=0 or add data.",
        )
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    held = set(random.Random(seed).sample(range(len(rows)), n_eval))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# ------------------------------------------------------------------ reading and parsing


def resolve_path(path: str, base_dir: Path | None) -> Path | None:
    """A local file/folder for `path` (relative to base_dir, then the cwd), or None if there is none."""
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [*([base_dir / p] if base_dir else []), Path.cwd() / p]
    return next((c for c in candidates if c.exists()), None)


def read_source(
    cfg: DataConfig, sample: Path | None, base_dir: Path | None
) -> tuple[str, list[Record], list[Record] | None]:
    """(source label, records, eval-split records or None) for a stage's data settings.

    `sample`, when given, is read instead of cfg.path: the shipped sample file the recipe resolved.
    """
    if sample is not None:
        if not sample.is_file():
            raise UserError(f"No shipped sample file {sample}.")
        return str(sample), read_local(sample), None
    if not cfg.path:
        raise UserError(
            "data.path is empty: name a local file or folder, or a Hub dataset.",
            hint="Or set use_samples=true to train on the shipped samples.",
        )
    local = resolve_path(cfg.path, base_dir)
    if local is not None:
        return str(local), read_local(local), None
    if looks_like_local_path(cfg.path):
        where = f" (looked in {base_dir} and {Path.cwd()})" if base_dir else f" (looked in {Path.cwd()})"
        raise UserError(
            f"No such data file or folder: {cfg.path!r}{where}.",
            hint="Relative paths are resolved against the recipe's folder, then the current folder.",
        )
    records = read_hub(cfg.path, cfg.split)
    eval_records = read_hub(cfg.path, cfg.eval_split) if cfg.eval_split else None
    return f"{cfg.path}[{cfg.split}]", records, eval_records


def apply_columns(rows: list[dict], columns: dict[str, str]) -> list[dict]:
    """Rows with source columns copied onto the names a format reads ({prompt: question, ...})."""
    if not columns:
        return rows
    problems = [
        f"{target!r} is not a field lowvram reads" + (f" (did you mean {close[0]!r}?)" if close else "")
        for target in columns
        if target not in MAPPABLE_FIELDS
        for close in [difflib.get_close_matches(target, MAPPABLE_FIELDS, n=1)]
    ]
    seen = {k for r in rows[:1000] for k in r}
    problems += [
        f"{target}: {src!r} is not a column of this data (columns: {', '.join(sorted(seen))})"
        for target, src in columns.items()
        if src not in seen
    ]
    if problems:
        raise UserError(
            "data.columns: bad column mapping:",
            problems,
            hint=f"Map fields lowvram reads ({', '.join(MAPPABLE_FIELDS)}) to columns of your data, "
            "e.g. {prompt: question, chosen: response_j, rejected: response_k}.",
        )
    out = []
    for r in rows:
        mapped = {k: v for k, v in r.items() if k not in columns.values()}
        mapped.update({target: r[src] for target, src in columns.items() if src in r})
        out.append(mapped)
    return out


def parse_records(
    records: list[Record],
    source: str,
    kind: str | None,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    reason: str | None = None,
) -> ParsedRows:
    """Detect (or check) the format and convert every record; problems are collected, not raised."""
    if fmt not in DATA_FORMATS:
        close = difflib.get_close_matches(fmt, DATA_FORMATS, n=1)
        raise UserError(
            f"data.format: {fmt!r} is not a format lowvram reads"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + ".",
            hint=f"Formats: {', '.join(DATA_FORMATS)}.",
        )
    readable = [r for r in records if r.row is not None]
    mapped = apply_columns([r.row for r in readable], columns or {})
    if fmt == "auto":
        fmt, why = detect_format(mapped, kind)
        if fmt is None:
            noun = {"sft": "SFT", "preference": "preference"}.get(kind or "", "training")
            raise UserError(
                f"{source}: cannot tell which {noun} format this is; {why}.",
                hint="Name it with data.format, or map your columns with data.columns "
                "(e.g. {prompt: question, chosen: response_j, rejected: response_k}). "
                "Formats: " + ", ".join(DATA_FORMATS[1:]) + ".",
            )
        reason = reason or why
    else:
        if kind is not None and FORMAT_KIND[fmt] != kind:
            raise UserError(f"data.format: {fmt!r} is {FORMAT_KIND[fmt]} data, but this stage needs {kind} data.")
        reason = reason or f"set by data.format; reads {expected_columns(fmt)}"
    if columns:
        reason += "; columns mapped: " + ", ".join(f"{t} <- {s}" for t, s in columns.items())
    parsed = ParsedRows(source, fmt, reason, records)
    parsed.problems += [r.problem for r in records if r.problem is not None]
    for rec, row in zip(readable, mapped):
        canon, problems = convert_row(fmt, row)
        if problems:
            parsed.problems += [Problem(rec.location, code, msg) for code, msg in problems]
        else:
            parsed.rows.append((rec.location, row, canon))
    parsed.problems.sort(key=lambda p: (p.location.file, p.location.line or 0, p.location.record or 0))
    return parsed
