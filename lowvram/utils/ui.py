"""Console output: tables and training progress. In a terminal rich draws them; anywhere else (CI, logs,
notebooks, a pipe) they are plain text: aligned columns, one line per progress update, no ANSI codes.

    echo(plan.lines())                            # lines; each table() among them is a rich table in a terminal
    text = table(rows, ("type", "size"))          # a str all the same: its plain form, fit for files and HTML
    bar = progress("sft", total=60, metrics=[("loss", "loss", "{:.3f}")])
    bar.update(10, {"loss": 1.23}, tokens_per_s=1500.0)   # ETA from the pace since the bar started
    bar.note("[sft held-out eval] at step 10  loss 1.30")  # a line above the bar
    bar.close()

rich is imported only when the output is a terminal, so `--help`, and the light commands when piped or in CI,
never load it (scripts/bench_startup.py measures both).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import IO, Any

Metric = tuple[str, str, str]  # (key in the trainer's logs, label, format), e.g. ("loss", "loss", "{:.3f}")
STATUS_STYLES = {"ok": "green", "warn": "yellow", "FAIL": "bold red", "OK": "green"}


def is_terminal(stream: IO | None = None) -> bool:
    """Whether `stream` (stdout by default) is an interactive terminal that understands cursor control."""
    stream = sys.stdout if stream is None else stream
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


# ------------------------------------------------------------------ tables


class Table(str):
    """A table as its plain text (what str operations, files, HTML and tests see), carrying its cells for rich."""

    rows: tuple[tuple[str, ...], ...]
    headers: tuple[str, ...] | None
    title: str | None


def table(
    rows: Iterable[Sequence], headers: Sequence | None = None, *, title: str | None = None, plain: str | None = None
) -> Table:
    """Rows of cells (None prints empty). Plain form: left-aligned columns, two spaces apart, a dashed rule
    under the headers; `plain` replaces it where a listing has its own established text form."""
    cells = tuple(tuple("" if c is None else str(c) for c in r) for r in rows)
    head = tuple(str(h) for h in headers) if headers else None
    text = _plain_table(cells, head) if plain is None else plain
    if title and plain is None:
        text = f"{title}\n{text}" if text else title
    out = Table(text)
    out.rows, out.headers, out.title = cells, head, title
    return out


def _plain_table(cells: tuple[tuple[str, ...], ...], headers: tuple[str, ...] | None) -> str:
    lines = ([headers] if headers else []) + list(cells)
    if not lines:
        return ""
    ncols = max(len(r) for r in lines)
    widths = [max(len(r[i]) for r in lines if i < len(r)) for i in range(ncols)]
    out = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in lines]
    if headers:
        out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def rich_table(t: Table):
    """The rich renderable for a table()."""
    from rich import box
    from rich.table import Table as RichTable
    from rich.text import Text

    # cells, headers and title as Text: never read as rich markup ("[...]" in a path or a message stays as is)
    rt = RichTable(
        show_header=t.headers is not None,
        box=box.SIMPLE_HEAD if t.headers else None,
        show_edge=False,
        header_style="bold",
        pad_edge=False,
        padding=(0, 1) if t.headers else (0, 2, 0, 0),
    )
    ncols = max([len(t.headers or ())] + [len(r) for r in t.rows] + [1])
    for i in range(ncols):
        header = t.headers[i] if t.headers and i < len(t.headers) else ""
        rt.add_column(Text(header), style="bold" if i == 0 and not t.headers else None, overflow="fold")
    for r in t.rows:
        rt.add_row(*(Text(c, style=STATUS_STYLES.get(c.split(":")[0].split(" ")[0], "")) for c in r))
    if not t.title:
        return rt
    from rich.console import Group

    return Group(Text(t.title, style="bold"), rt)  # a line of its own: a table's title would wrap at its width


def echo(*parts: str | Iterable[str], file: IO | None = None, console: Any = None) -> None:
    """Print text: strings, or lists of lines. Each table() among them is drawn by rich when the output is a
    terminal (or `console`, a rich Console, is given); elsewhere everything prints as plain text."""
    out = sys.stdout if file is None else file
    flat: list[str] = []
    for p in parts:
        flat.extend([p] if isinstance(p, str) else p)
    if console is None and not (any(isinstance(p, Table) for p in flat) and is_terminal(out)):
        print("\n".join(flat), file=out, flush=True)
        return
    console = console or _console(out)
    plain: list[str] = []
    for p in flat:
        if isinstance(p, Table):
            if plain:
                console.out("\n".join(plain), highlight=False)
                plain = []
            console.print(rich_table(p))
        else:
            plain.append(p)
    if plain:
        console.out("\n".join(plain), highlight=False)
    console.file.flush()


def _console(file: IO):
    from rich.console import Console

    return Console(file=file, highlight=False)


# ------------------------------------------------------------------ training progress


def metric_text(logs: dict, metrics: Sequence[Metric], prefix: str = "") -> str:
    """The key metrics present in `logs`, e.g. `loss 1.234  tok_acc 0.41` (`prefix` "eval_": a held-out eval's)."""
    return "  ".join(
        f"{label} {fmt.format(logs[prefix + key])}" for key, label, fmt in metrics if logs.get(prefix + key) is not None
    )


def note(*parts: str, bar: StageProgress | None = None) -> None:
    """One line of the non-empty `parts`, above `bar` when one is live, else printed."""
    text = "  ".join(p for p in parts if p)
    if bar is not None:
        bar.note(text)
    else:
        print(text, flush=True)


def progress(
    stage: str, total: int, metrics: Sequence[Metric] = (), start: int = 0, file: IO | None = None, console: Any = None
) -> StageProgress:
    """One stage's progress: a rich bar in a terminal (or on `console`), else one plain line per update."""
    out = sys.stdout if file is None else file
    if console is None and not is_terminal(out):
        return StageProgress(stage, total, metrics, start, out)
    return RichStageProgress(stage, total, metrics, start, out, console)


class StageProgress:
    """Plain progress: `[sft] step 10/60  loss 1.234  tok_acc 0.41  1,512 tok/s  ETA 0:42`, one line each update."""

    def __init__(self, stage: str, total: int, metrics: Sequence[Metric], start: int, file: IO):
        self.stage, self.total, self.metrics, self.file = stage, max(total, 1), list(metrics), file
        self.start_step, self.t0 = start, time.monotonic()
        self.step = start

    def eta_s(self, step: int, now: float | None = None) -> float | None:
        """Seconds left at the pace since the bar started (steps resumed from a checkpoint do not count)."""
        done = step - self.start_step
        if done <= 0:
            return None
        return ((now or time.monotonic()) - self.t0) / done * (self.total - step)

    def line(self, step: int, logs: dict, tokens_per_s: float | None = None) -> str:
        parts = [f"[{self.stage}] step {step}/{self.total}", metric_text(logs, self.metrics)]
        if tokens_per_s:
            parts.append(f"{tokens_per_s:,.0f} tok/s")
        eta = self.eta_s(step)
        if eta is not None:
            parts.append(f"ETA {_clock(eta)}")
        return "  ".join(p for p in parts if p)

    def update(self, step: int, logs: dict, tokens_per_s: float | None = None) -> None:
        self.step = step
        self.note(self.line(step, logs, tokens_per_s))

    def note(self, text: str) -> None:
        print(text, file=self.file, flush=True)

    def close(self) -> None:
        pass


class RichStageProgress(StageProgress):
    """A rich bar: stage, bar, steps, key metrics, tokens/s, elapsed and ETA; notes print above it."""

    def __init__(self, stage: str, total: int, metrics: Sequence[Metric], start: int, file: IO, console: Any = None):
        super().__init__(stage, total, metrics, start, file)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description}", style="bold", markup=False),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}", markup=False),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=console or _console(file),
            redirect_stdout=True,
            redirect_stderr=True,
        )  # other output during training prints above the bar
        self._task = self._progress.add_task(
            f"[{stage}]", total=self.total, completed=start, metrics="", rate="", eta="-"
        )
        self._progress.start()
        _open.add(self)

    def update(self, step: int, logs: dict, tokens_per_s: float | None = None) -> None:
        self.step = step
        eta = self.eta_s(step)
        self._progress.update(
            self._task,
            completed=step,
            metrics=metric_text(logs, self.metrics),
            rate=f"{tokens_per_s:,.0f} tok/s" if tokens_per_s else "",
            eta=_clock(eta) if eta is not None else "-",
        )
        self._progress.refresh()

    def note(self, text: str) -> None:
        from rich.text import Text

        self._progress.console.print(Text(text))

    def close(self) -> None:
        if self in _open:
            _open.discard(self)
            self._progress.stop()


_open: set[RichStageProgress] = set()


def close_progress() -> None:
    """Stop any live bar (a stage that ended in an exception): restores the cursor and the redirected output."""
    for bar in list(_open):
        bar.close()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# ------------------------------------------------------------------ the libraries' own output


def _not_the_kernels_notice(record) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


def quiet_libraries() -> None:
    """Per-dataset-map progress bars and weight-loading bars drown the training progress."""
    import logging
    import warnings

    import datasets
    import transformers

    # transformers 5 renamed the checkpointing flags that TRL and PEFT still pass; nothing for the user to do
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6.*", category=FutureWarning)
    # bitsandbytes, imported on a CPU with AVX512-BF16, asks for the `kernels` package, which fetches its faster
    # 4-bit CPU kernel from the Hub at run time; its own kernel works, offline: nothing for the user to do
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_kernels_notice)  # once: a set of filters
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
