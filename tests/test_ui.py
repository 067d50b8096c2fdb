"""Console output (lowvram/utils/ui.py): plain text off a terminal, rich in one; both forms checked as written."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
from rich.console import Console

from lowvram.utils import ui

SFT = [("loss", "loss", "{:.3f}"), ("mean_token_accuracy", "tok_acc", "{:.2f}")]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _terminal(width: int = 120) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=width, color_system="standard"), buf


def test_plain_progress_is_one_clean_line_per_update():
    out = io.StringIO()  # not a terminal: what CI, a log file or a notebook sees
    bar = ui.progress("sft", 8, SFT, file=out)
    for step in range(1, 9):
        bar.update(step, {"loss": 2.0 / step, "mean_token_accuracy": step / 8, "grad_norm": 1.0}, tokens_per_s=1512.4)
        if step == 4:
            bar.note("[sft held-out eval] at step 4  loss 0.700")
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and not ANSI.search(text)
    lines = text.splitlines()
    assert len(lines) == 9 and lines[4] == "[sft held-out eval] at step 4  loss 0.700"
    updates = [x for x in lines if x.startswith("[sft] step")]
    assert [int(re.match(r"\[sft\] step (\d+)/8  ", x).group(1)) for x in updates] == list(range(1, 9))
    assert re.fullmatch(r"\[sft\] step 8/8  loss 0\.250  tok_acc 1\.00  1,512 tok/s  ETA 0:00", updates[-1])


def test_eta_counts_only_the_steps_this_bar_has_seen():
    bar = ui.progress("dpo", 100, file=io.StringIO(), start=40)  # resumed at step 40
    bar.t0 -= 60  # 60 s since the bar started
    assert bar.eta_s(50) == pytest.approx(60 / 10 * 50, rel=0.01)  # 10 steps in 60 s, 50 to go
    assert bar.eta_s(40) is None
    assert bar.line(50, {}) == "[dpo] step 50/100  ETA 5:00" and bar.line(41, {}).endswith("ETA 59:00")
    bar.t0 -= 60  # 120 s for 1 step, 59 to go
    assert bar.line(41, {}).endswith("ETA 1:58:00")


def test_terminal_progress_draws_a_bar_with_metrics_rate_and_eta():
    console, buf = _terminal()
    bar = ui.progress(
        "dpo", 10, [("loss", "loss", "{:.3f}"), ("rewards/margins", "margin", "{:+.3f}")], console=console
    )
    assert isinstance(bar, ui.RichStageProgress)
    for step in range(1, 11):
        bar.update(step, {"loss": 0.69 - step / 100, "rewards/margins": step / 50}, tokens_per_s=987.0)
        if step == 5:
            bar.note("[dpo held-out eval] at step 5  loss 0.650")
    bar.close()
    text = buf.getvalue()
    assert ANSI.search(text) and "━" in text  # drawn for a terminal
    last = ANSI.sub("", text.split("\r")[-1].replace("\x1b[2K", ""))
    last = re.sub(r"\[\?25[hl]", "", last)
    assert "[dpo]" in last and "10/10" in last and "loss 0.590" in last and "margin +0.200" in last
    assert "987 tok/s" in last and "ETA 0:00" in last
    assert "[dpo held-out eval] at step 5  loss 0.650" in ANSI.sub("", text)
    assert text.endswith("\x1b[?25h")  # the cursor is shown again


def test_a_bar_left_live_by_an_exception_is_closed():
    console, _ = _terminal()
    stdout = sys.stdout
    ui.progress("sft", 10, SFT, console=console)
    assert sys.stdout is not stdout  # live: rich redirects prints above the bar
    ui.close_progress()
    assert sys.stdout is stdout and not ui._open


def test_plain_table_and_its_text_everywhere():
    t = ui.table([("f16", "2.1 MiB", "ok"), ("q4_k_m", "0.9 MiB", "FAIL")], ("type", "size", "status"))
    assert t == "type    size     status\n------  -------  ------\nf16     2.1 MiB  ok\nq4_k_m  0.9 MiB  FAIL"
    assert "\n".join(["before", t]) == "before\n" + str(t)  # joins, files and HTML get the plain text
    fields = ui.table([("tier", "cpu", "why")], plain="tier      cpu  -- why")
    out = io.StringIO()
    ui.echo(["Plan:", fields, t], file=out)
    assert out.getvalue() == f"Plan:\ntier      cpu  -- why\n{t}\n"


def test_terminal_table_is_drawn_by_rich_with_status_colours():
    console, buf = _terminal(width=60)
    t = ui.table([("f16", "2.1 MiB", "ok"), ("q4_k_m", "0.9 MiB", "FAIL")], ("type", "size", "status"))
    ui.echo(["Verification:", t, "done"], console=console)
    text = buf.getvalue()
    plain = ANSI.sub("", text).replace("[0m", "")
    assert plain.splitlines()[0] == "Verification:" and plain.rstrip().splitlines()[-1] == "done"
    assert "─" in plain and "q4_k_m" in plain and "------" not in plain
    assert "\x1b[1;31mFAIL" in text and "\x1b[32mok" in text


def test_brackets_in_cells_titles_and_headers_are_text_not_markup():
    console, buf = _terminal()
    ui.echo(ui.table([("[bold]x[/bold]", "[/]")], ("[red]h[/red]",), title="data: runs/[1]/d.jsonl"), console=console)
    text = ANSI.sub("", buf.getvalue())
    assert "data: runs/[1]/d.jsonl" in text and "[red]h[/red]" in text and "[bold]x[/bold]" in text and "[/]" in text


def _on_a_pty(args: list[str]) -> str:
    leader, follower = os.openpty()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "100"}
    proc = subprocess.Popen([sys.executable, "-m", "lowvram", *args], stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    try:
        while data := os.read(leader, 65536):
            chunks.append(data)
    except OSError:  # EIO: the command exited
        pass
    os.close(leader)
    assert proc.wait() == 0
    return b"".join(chunks).decode()


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_the_cli_draws_tables_in_a_terminal_and_prints_plain_text_elsewhere():
    tty = _on_a_pty(["recipes"])
    assert ANSI.search(tty) and "─" in tty and "tiny" in tty
    piped = subprocess.run([sys.executable, "-m", "lowvram", "recipes"], capture_output=True, text=True, check=True)
    assert not ANSI.search(piped.stdout) and "─" not in piped.stdout
    assert piped.stdout.splitlines()[1].startswith("------")


def test_terminal_detection(monkeypatch):
    leader, follower = os.openpty()
    try:
        with open(follower, "w", closefd=False) as term:
            monkeypatch.setenv("TERM", "xterm")
            assert ui.is_terminal(term)
            monkeypatch.setenv("TERM", "dumb")  # no cursor control: plain lines
            assert not ui.is_terminal(term)
    finally:
        os.close(leader)
        os.close(follower)
    assert not ui.is_terminal(io.StringIO())


def test_only_the_main_process_of_a_group_shows_progress(tmp_path, capsys):
    from transformers import TrainerState

    from lowvram.train.callbacks import make_callback

    for zero in (True, False):
        state = TrainerState(max_steps=4, is_world_process_zero=zero)
        cb = make_callback("sft", tmp_path / "metrics.jsonl")
        cb.on_train_begin(None, state, None)
        assert (cb.bar is not None) == zero  # in a terminal another process's bar would be drawn over this one
        state.global_step = 1
        cb.on_log(None, state, None, logs={"loss": 1.5, "mean_token_accuracy": 0.5})
        cb.on_train_end(None, state, None)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("[sft] step 1/4  loss 1.500  tok_acc 0.50")
