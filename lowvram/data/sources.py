"""Reading training data into records that remember where they came from.

    records = read_local(Path("prefs.jsonl"))   # list[Record]; a bad line becomes a Record with a problem
    records = read_hub("argilla/dpo-mix-7k", "train")

Every record carries a Location (file and 1-based line, or record index) so that a problem can be
named precisely. A bad line (invalid JSON, undecodable bytes, a CSV row with extra fields) becomes a
Record with a problem instead of an exception: the caller decides whether to refuse or to drop it.
Problems that make a whole file unreadable (a broken JSON array, a missing file) raise UserError.
Source files are only ever opened for reading.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowvram.errors import UserError

# Suffix -> reader. `.json` files that turn out to hold one object per line are read as JSONL.
FILE_KINDS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}


@dataclass(frozen=True)
class Location:
    """Where a record lives: a file line (JSONL, CSV, JSON arrays) and/or a 1-based record index."""

    file: str
    line: int | None = None  # 1-based line in the file where the record starts
    record: int | None = None  # 1-based record index (JSON arrays, Parquet, Hub rows)

    def __str__(self) -> str:
        if self.record is not None and self.line is not None:
            return f"{self.file} record {self.record} (line {self.line})"
        if self.line is not None:
            return f"{self.file} line {self.line}"
        if self.record is not None:
            return f"{self.file} record {self.record}"
        return self.file

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "record": self.record}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one record. `code` is stable for scripts; `message` is for people."""

    location: Location
    code: str  # invalid_json, undecodable, not_an_object, missing_field, empty_field, wrong_type, bad_value, ...
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"

    def to_dict(self) -> dict:
        return {**self.location.to_dict(), "code": self.code, "message": self.message}


@dataclass(frozen=True)
class Record:
    location: Location
    row: dict[str, Any] | None  # None when the record could not be read
    problem: Problem | None = None


class DataFileError(UserError):
    """A whole file cannot be read as data (a broken JSON array, unparsable CSV, a gzip file).

    Training refuses the data like any other data mistake (exit status 2, lowvram.errors);
    `lowvram data check` catches it and reports it as one error row (its FAIL is exit status 1).
    """

    def __init__(self, location: Location, message: str, hint: str | None = None):
        self.location = location
        super().__init__(f"{location}: {message}", hint=hint)


def is_missing(value: Any) -> bool:
    """None, or the NaN that pandas/Parquet use for an empty cell."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# ------------------------------------------------------------------ local files


def _walk_error(err: OSError) -> None:
    raise UserError(
        f"Cannot read the data folder {err.filename}: {err.strerror or err}.",
        hint="Every file in a data folder is training data: fix its permissions, or move it out.",
    )


def local_files(path: Path) -> list[Path]:
    """The data files of a file or a folder (searched recursively, sorted), or UserError.

    A subfolder that cannot be listed is an error, not a silent skip (its rows would be missing).
    """
    if path.is_file():
        if path.suffix.lower() not in FILE_KINDS:
            raise UserError(
                f"{path}: unknown data file type {path.suffix!r}.",
                hint=f"lowvram reads {', '.join(sorted(FILE_KINDS))} files (or a folder of them).",
            )
        return [path]
    found = []
    for root, dirs, names in os.walk(path, onerror=_walk_error):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root) / n for n in names if not n.startswith(".")]
    files = sorted(p for p in found if p.is_file() and p.suffix.lower() in FILE_KINDS)
    if not files:
        raise UserError(
            f"{path}: the folder holds no data files.", hint=f"lowvram reads {', '.join(sorted(FILE_KINDS))} files."
        )
    return files


def read_local(path: Path) -> list[Record]:
    """Every record of a local file or folder, in file order."""
    records: list[Record] = []
    for f in local_files(path):
        records += read_file(f)
    return records


def read_file(path: Path) -> list[Record]:
    kind = FILE_KINDS[path.suffix.lower()]
    try:
        if kind == "parquet":
            return _read_parquet(path)
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"Cannot read {path}: {e.strerror or e}.") from None
    _sniff(data, str(path))
    if kind == "jsonl":
        return _read_jsonl(data, str(path))
    if kind == "json":
        return _read_json(data, str(path))
    return _read_csv(data, str(path), delimiter="\t" if kind == "tsv" else ",")


MAX_RECORD_BYTES = 16 << 20  # no training example is this long: refuse before any model loads
_COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PK\x03\x04": "zip",
}


def _sniff(data: bytes, name: str) -> None:
    """DataFileError for a whole file that is not text data at all: empty, compressed, or UTF-16/32."""
    if not data.strip():
        raise DataFileError(Location(name), "the file is empty.")
    for magic, what in _COMPRESSED.items():
        if data.startswith(magic):
            raise DataFileError(
                Location(name),
                f"the file is {what}-compressed, not text.",
                hint=f"Decompress it first (for gzip: gunzip -k {name}) and point the recipe at the result.",
            )
    if (
        data[:4] in (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)
        or data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
        or data[:4096].count(b"\x00") > len(data[:4096]) // 4
    ):
        raise DataFileError(
            Location(name),
            "the file is UTF-16 or UTF-32 encoded (it is full of zero bytes); lowvram reads UTF-8.",
            hint=f"Convert it: iconv -f UTF-16 -t UTF-8 {name} > fixed.jsonl",
        )


def _bad_strings(obj: Any) -> str | None:
    """A description of the first string in `obj` that is not valid Unicode (a lone surrogate), or None."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError as e:
                return (
                    f"invalid Unicode: a lone surrogate \\u{ord(x[e.start]):04x} (an escaped UTF-16 half) at "
                    f"character {e.start + 1} of a string"
                )
        elif isinstance(x, dict):
            stack += list(x.keys()) + list(x.values())
        elif isinstance(x, list):
            stack += x
    return None


def _parse_line(text: str) -> tuple[Any, str | None, str | None]:
    """(object, problem code, message) for one JSON text; the object is None when there is a problem."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, "invalid_json", f"invalid JSON: {e.msg} (column {e.colno})"
    except RecursionError:
        return None, "invalid_json", "JSON nested too deeply to read (thousands of levels)"
    except ValueError as e:  # an integer of more than 4300 digits
        return None, "invalid_json", f"invalid JSON: {str(e).split(';')[0]}"
    bad = _bad_strings(obj)
    if bad:
        return None, "bad_value", bad
    return obj, None, None


def _split_lines(data: bytes) -> list[bytes]:
    data = data.removeprefix(codecs.BOM_UTF8)
    return data.split(b"\n")


def _undecodable(raw: bytes) -> str | None:
    """None if `raw` is UTF-8, else a description of the first bad byte."""
    try:
        raw.decode("utf-8")
        return None
    except UnicodeDecodeError as e:
        return f"undecodable bytes: 0x{raw[e.start]:02x} at byte {e.start + 1} of the line is not UTF-8"


def _read_jsonl(data: bytes, name: str) -> list[Record]:
    records = []
    for lineno, raw in enumerate(_split_lines(data), 1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue  # blank lines carry nothing
        loc = Location(name, line=lineno)
        bad = _undecodable(raw)
        if bad:
            records.append(Record(loc, None, Problem(loc, "undecodable", bad)))
            continue
        if len(raw) > MAX_RECORD_BYTES:
            records.append(
                Record(
                    loc,
                    None,
                    Problem(
                        loc,
                        "too_long",
                        f"the line is {len(raw) / 2**20:.0f} MiB, longer "
                        f"than any training example ({MAX_RECORD_BYTES >> 20} MiB at most)",
                    ),
                )
            )
            continue
        obj, code, msg = _parse_line(raw.decode("utf-8"))
        if code:
            records.append(Record(loc, None, Problem(loc, code, msg)))
            continue
        if not isinstance(obj, dict):
            records.append(
                Record(loc, None, Problem(loc, "not_an_object", f"expected a JSON object, got {type_name(obj)}"))
            )
            continue
        records.append(Record(loc, obj))
    if records and all(r.row is None for r in records):
        _unreadable_file(data, name, records)
    return records


def _unreadable_file(data: bytes, name: str, records: list[Record]) -> None:
    """No line of a JSONL file could be read: say what the whole file is, with its first bad line."""
    first = records[0].problem
    if all(r.problem and r.problem.code == "undecodable" for r in records):
        raise DataFileError(
            Location(name),
            f"no line is UTF-8: the file is in another encoding (Latin-1? Windows-1252?); first bad line: {first}.",
            hint=f"Convert it: iconv -f LATIN1 -t UTF-8 {name} > fixed.jsonl",
        )
    try:
        json.loads(data.decode("utf-8", errors="replace"))
        whole_json = len(records) > 1  # several lines that only parse together
    except (ValueError, RecursionError):
        whole_json = False
    if whole_json:
        raise DataFileError(
            Location(name),
            f"the file is one pretty-printed JSON document, not one JSON object per line (JSONL): {first}.",
            hint="Rename it to .json (lowvram reads JSON arrays too), or write one object per line.",
        )
    raise DataFileError(Location(name), f"no line of the file could be read; the first: {first}.")


def _decode_marking_bad_lines(data: bytes) -> tuple[str, dict[int, str]]:
    """Text with bad bytes replaced (line structure kept) and {line: what was wrong}."""
    bad: dict[int, str] = {}
    lines = _split_lines(data)
    for lineno, raw in enumerate(lines, 1):
        what = _undecodable(raw)
        if what:
            bad[lineno] = what
    return b"\n".join(lines).decode("utf-8", errors="replace"), bad


def _read_json(data: bytes, name: str) -> list[Record]:
    text, bad_lines = _decode_marking_bad_lines(data)
    start = len(text) - len(text.lstrip())
    if not text.strip():
        raise DataFileError(Location(name), "the file is empty.")
    if text[start] != "[":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # one object per line in a file named .json
                return _read_jsonl(data, name)
            raise DataFileError(Location(name, line=e.lineno), f"invalid JSON at column {e.colno}: {e.msg}.") from None
        except RecursionError:
            raise DataFileError(Location(name), "JSON nested too deeply to read (thousands of levels).") from None
        except ValueError as e:  # an integer of more than 4300 digits
            raise DataFileError(Location(name), f"invalid JSON: {str(e).split(';')[0]}.") from None
        return _records_from_object(obj, name)
    # Walk the array element by element so each record knows its line.
    decoder = json.JSONDecoder()
    records: list[Record] = []
    pos, line = start + 1, 1 + text.count("\n", 0, start + 1)
    while True:
        nxt = _skip_ws(text, pos)
        line += text.count("\n", pos, nxt)
        pos = nxt
        if pos < len(text) and text[pos] == "]":
            break
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataFileError(
                Location(name, line=e.lineno),
                f"invalid JSON at column {e.colno}: {e.msg}.",
                hint="A broken JSON array cannot be read past the error. Fix it there, or store the data "
                "as JSONL (one object per line), where a bad line can be skipped.",
            ) from None
        except (RecursionError, ValueError) as e:
            what = "JSON nested too deeply to read" if isinstance(e, RecursionError) else str(e).split(";")[0]
            raise DataFileError(
                Location(name, line=line), f"invalid JSON in record {len(records) + 1}: {what}."
            ) from None
        loc = Location(name, line=line, record=len(records) + 1)
        span = range(line, line + text.count("\n", pos, end) + 1)
        what = next((bad_lines[n] for n in span if n in bad_lines), None)
        if what:
            records.append(Record(loc, None, Problem(loc, "undecodable", what)))
        elif not isinstance(obj, dict):
            records.append(
                Record(loc, None, Problem(loc, "not_an_object", f"expected a JSON object, got {type_name(obj)}"))
            )
        elif _bad_strings(obj):
            records.append(Record(loc, None, Problem(loc, "bad_value", _bad_strings(obj))))
        else:
            records.append(Record(loc, obj))
        line += text.count("\n", pos, end)
        pos = _skip_ws(text, end)
        line += text.count("\n", end, pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            break
        col = pos - text.rfind("\n", 0, pos)
        raise DataFileError(
            Location(name, line=line), f"invalid JSON at column {col}: expected ',' or ']' after record {len(records)}."
        )
    return records


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _records_from_object(obj: Any, name: str) -> list[Record]:
    """A top-level JSON object: {"data": [rows]} or columns {"prompt": [...], "chosen": [...]}."""
    if isinstance(obj, dict):
        lists = {k: v for k, v in obj.items() if isinstance(v, list)}
        if len(obj) == 1 and lists and all(isinstance(r, dict) for r in next(iter(lists.values()))):
            rows = next(iter(lists.values()))
            return [Record(Location(name, record=i), r) for i, r in enumerate(rows, 1)]
        if obj and len(lists) == len(obj) and len({len(v) for v in lists.values()}) == 1:
            n = len(next(iter(lists.values())))
            return [Record(Location(name, record=i + 1), {k: v[i] for k, v in obj.items()}) for i in range(n)]
    raise DataFileError(
        Location(name),
        f"expected a JSON array of objects (or one object per line), got {type_name(obj)}.",
        hint='Shapes lowvram reads: [{"prompt": ...}, ...], {"data": [{...}, ...]}, '
        '{"prompt": [...], "chosen": [...]} or JSONL.',
    )


def _read_csv(data: bytes, name: str, delimiter: str) -> list[Record]:
    text, bad_lines = _decode_marking_bad_lines(data)
    csv.field_size_limit(min(2**31 - 1, 1 << 30))  # answers can be long; the default limit is 128 KiB
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataFileError(Location(name, line=1), f"cannot read the CSV header: {e}.") from None
    if not header or not any(h.strip() for h in header):
        raise DataFileError(Location(name, line=1), "no header row; the first line must name the columns.")
    header = [h.strip() for h in header]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataFileError(Location(name, line=1), f"duplicate column names: {', '.join(dupes)}.")
    records: list[Record] = []
    start = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataFileError(
                Location(name, line=start),
                f"cannot parse CSV: {e}.",
                hint="Check the quoting there: a field with commas, quotes or newlines must be quoted.",
            ) from None
        end = reader.line_num
        loc = Location(name, line=start)
        span = range(start, end + 1)
        start = end + 1
        if not cells or all(not c.strip() for c in cells):
            continue
        what = next((bad_lines[n] for n in span if n in bad_lines), None)
        if what:
            records.append(Record(loc, None, Problem(loc, "undecodable", what)))
        elif len(cells) != len(header):
            records.append(
                Record(
                    loc,
                    None,
                    Problem(loc, "wrong_field_count", f"{len(cells)} fields, but the header names {len(header)}"),
                )
            )
        else:
            records.append(Record(loc, dict(zip(header, cells))))
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq  # only when a Parquet file is read

    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) for a broken file
        raise DataFileError(Location(str(path)), f"not a readable Parquet file: {e}.") from None
    return [Record(Location(str(path), record=i), r) for i, r in enumerate(rows, 1)]


# ------------------------------------------------------------------ the Hub


def looks_like_local_path(name: str) -> bool:
    """True for names that can only be meant as local paths (a data-file suffix, ./, ~, absolute)."""
    return (
        Path(name).suffix.lower() in FILE_KINDS
        or name.startswith((".", "~", os.sep))
        or name.count("/") > 1
        or "\\" in name
    )


def hub_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def read_hub(name: str, split: str) -> list[Record]:
    """Rows of a Hub dataset split (from the local cache when offline); UserError when unreachable."""
    import datasets  # heavy: only when a Hub dataset is named

    hint = (
        "Train on the shipped samples with use_samples=true, or point data.path at a local "
        "JSONL/JSON/CSV/Parquet file or folder."
    )
    try:
        ds = datasets.load_dataset(name, split=split)
    except ConnectionError as e:
        why = (
            "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not in the local cache"
            if hub_offline()
            else f"the Hub cannot be reached ({e})"
        )
        raise UserError(f"Cannot load Hub dataset {name!r}: {why}.", hint=hint) from None
    except FileNotFoundError as e:  # datasets' DatasetNotFoundError is one
        raise UserError(f"No local file or Hub dataset named {name!r}: {e}.", hint=hint) from None
    except ValueError as e:
        if "split" in str(e).lower():
            raise UserError(
                f"Hub dataset {name!r} has no split {split!r}: {e}.",
                hint="Set data.split (and data.eval_split) to a split the dataset has.",
            ) from None
        raise
    label = f"{name}[{split}]"
    return [Record(Location(label, record=i), dict(r)) for i, r in enumerate(ds, 1)]
