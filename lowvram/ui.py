"""Plain-text output helpers: tables that read well in terminals, notebooks and CI logs."""

from __future__ import annotations

import sys


def table(rows: list[tuple], headers: tuple | None = None) -> str:
    """Left-aligned columns separated by two spaces."""
    cells = [tuple("" if c is None else str(c) for c in r) for r in ([headers] if headers else []) + list(rows)]
    if not cells:
        return ""
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(len(r) for r in cells))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in cells]
    if headers:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def say(msg: str = "") -> None:
    print(msg, flush=True)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)
