"""Bad input of every kind ends with one clear message and an exit status, never a traceback (table-driven).

Each case builds its bad input in a temporary folder, runs the CLI in-process and checks the exit status
(2: a mistake to fix, unreadable training data included; 1: `data check` found errors; lowvram.errors), a fragment of the message, and that nothing was left half-written.
The cases come from attacking lowvram as a careless or hostile user would (issue 17).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from lowvram.cli import main

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
GOOD_LINE = json.dumps(GOOD) + "\n"


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


@dataclass
class Case:
    name: str
    build: Callable[[Path], list[str]]  # tmp -> argv
    code: int
    says: str


def _data(name: str, content: str | bytes, says: str, suffix: str = ".jsonl") -> Case:
    return Case(name, lambda t: ["data", "check", str(_write(t / f"d{suffix}", content)), "--kind", "sft"], 1, says)


def _run_on_data(content: str | bytes, t: Path, suffix: str = ".jsonl") -> list[str]:
    data = _write(t / f"data{suffix}", content)
    return [
        "run",
        "tiny",
        "--run-dir",
        str(t / "run"),
        "--no-export",
        "use_samples=false",
        f"sft.data.path={data}",
        "dpo.enabled=false",
    ]


def _resume_with_recipe(text: str) -> Callable[[Path], list[str]]:
    def build(t: Path) -> list[str]:
        _write(t / "run" / "recipe.yaml", text)
        return ["run", "--resume", str(t / "run"), "--no-export"]

    return build


CASES = [
    # ---- data: each refused with what is wrong and where, before any model loads
    _data("deep nesting", GOOD_LINE + "[" * 100_000 + "]" * 100_000 + "\n", "line 2: JSON nested too deeply"),
    _data(
        "huge integer",
        GOOD_LINE + '{"messages": [], "n": ' + "9" * 5000 + "}\n",
        "line 2: invalid JSON: Exceeds the limit",
    ),
    _data(
        "lone surrogate",
        GOOD_LINE + '{"messages": [{"role": "user", "content": "hi \\ud800"}, '
        '{"role": "assistant", "content": "yo"}]}\n',
        "line 2: invalid Unicode: a lone surrogate \\ud800",
    ),
    _data("UTF-16 file", GOOD_LINE.encode("utf-16"), "UTF-16 or UTF-32 encoded"),
    _data(
        "Latin-1 file",
        GOOD_LINE.replace("hello", "h\u00e9llo").encode("latin-1"),
        "no line is UTF-8: the file is in another encoding",
    ),
    _data("gzip file", gzip.compress(GOOD_LINE.encode()), "gzip-compressed"),
    _data("pretty-printed JSON in .jsonl", json.dumps(GOOD, indent=2), "one pretty-printed JSON document"),
    _data("empty file", "", "the file is empty"),
    _data("whitespace-only file", "\n  \n", "the file is empty"),
    _data(
        "deep nesting in a .json array",
        "[" + json.dumps(GOOD) + ", " + "[" * 100_000 + "]" * 100_000 + "]",
        "nested too deeply",
        suffix=".json",
    ),
    Case(
        "17 MiB example",
        lambda t: [
            "data",
            "check",
            str(
                _write(
                    t / "big.jsonl",
                    GOOD_LINE
                    + json.dumps(
                        {
                            "messages": [
                                {"role": "user", "content": "x" * (17 << 20)},
                                {"role": "assistant", "content": "y"},
                            ]
                        }
                    )
                    + "\n",
                )
            ),
            "--kind",
            "sft",
        ],
        1,
        "longer than any training example",
    ),
    # training refuses unreadable data with a user error, whatever the file type (once exit 1 for a whole-file error)
    Case("run on a gzip data file", lambda t: _run_on_data(gzip.compress(GOOD_LINE.encode()), t), 2, "gzip-compressed"),
    Case(
        "run on a broken .json array",
        lambda t: _run_on_data("[" + json.dumps(GOOD) + ", {not json]", t, ".json"),
        2,
        "invalid JSON",
    ),
    Case("run on a broken .jsonl line", lambda t: _run_on_data(GOOD_LINE + "{not json\n", t), 2, "line 2"),
    # ---- recipes and values
    Case(
        "name with ../",
        lambda t: ["run", "tiny", "--run-dir", str(t / "run"), "name=../../escape"],
        2,
        "cannot name a folder inside output_dir",
    ),
    Case("absolute name", lambda t: ["plan", "tiny", "name=/etc/x"], 2, "cannot name a folder"),
    Case("max_seq_len of 1", lambda t: ["plan", "tiny", "sft.max_seq_len=1"], 2, "sft.max_seq_len: must be >= 16"),
    Case("infinite learning rate", lambda t: ["plan", "tiny", "sft.learning_rate=.inf"], 2, "must be a finite number"),
    # ---- files and folders
    Case(
        "output_dir under a file",
        lambda t: ["run", "tiny", f"output_dir={_write(t / 'f', 'x')}/runs"],
        2,
        "is a file, not a folder",
    ),
    Case(
        "--run-dir under a file",
        lambda t: ["run", "tiny", "--run-dir", f"{_write(t / 'f', 'x')}/run"],
        2,
        "is a file, not a folder",
    ),
    Case("--resume: missing folder", lambda t: ["run", "--resume", str(t / "nope")], 2, "not a lowvram run directory"),
    Case("--resume: corrupt recipe.yaml", _resume_with_recipe("name: [unclosed\n  sft: {"), 2, "not valid YAML"),
    Case("--resume: empty recipe.yaml", _resume_with_recipe(""), 2, "the recipe file is empty"),
    Case("--resume: recipe.yaml is a list", _resume_with_recipe("- a\n- b\n"), 2, "must be a YAML mapping"),
    Case(
        "recipes copy into a missing folder",
        lambda t: ["recipes", "copy", "tiny", str(t / "no" / "such" / "x.yaml")],
        2,
        "Cannot copy tiny",
    ),
    Case(
        "chat: not a GGUF",
        lambda t: ["chat", str(_write(t / "m.gguf", b"not a model at all")), "-p", "hi"],
        2,
        "is not a GGUF file",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_clear_message(case, tmp_path, capsys, tiny_tokenizer_dir):
    if case.name.startswith("chat"):
        pytest.importorskip("xllamacpp", reason="xllamacpp (the export extra: llama.cpp, prebuilt) is not installed")
    before = set(tmp_path.rglob("*"))
    argv = case.build(tmp_path)
    made = set(tmp_path.rglob("*")) - before
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == case.code, out[-2000:] + err[-2000:]
    assert case.says in out + err, (out + err)[-3000:]  # `data check` reports in its table (stdout)
    assert "Traceback" not in out + err
    if case.code == 2:
        assert err.startswith("error:") and err.count("error:") == 1, err
    assert not list(tmp_path.rglob("checkpoints")) and not list(tmp_path.rglob("*.gguf.partial"))
    written = set(tmp_path.rglob("*")) - before - made
    assert not [p for p in written if p.name not in ("run",)], written  # nothing written (at most an empty run dir)


def _read_only(folder: Path):
    """Make `folder` read-only for this process: a read-only tmpfs for root (who ignores permissions), else chmod.

    Returns a function that undoes it; skips the test where neither works.
    """
    import subprocess

    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    staged = folder.with_name(folder.name + "-staged")
    folder.rename(staged)
    folder.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "lowvram-test", str(folder)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    for p in staged.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    return lambda: subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize(
    "what, says",
    [
        ("run", "read-only"),
        ("resume", "read-only"),
        ("recipes copy", "Cannot copy tiny"),
    ],
)
def test_read_only_folders(what, says, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    if what == "resume":
        from lowvram.recipe import dump_recipe, load_recipe

        (locked / "recipe.yaml").write_text(dump_recipe(load_recipe("tiny")[0]))
    undo = _read_only(locked)
    try:
        argv = {
            "run": ["run", "tiny", "--run-dir", str(locked / "run")],
            "resume": ["run", "--resume", str(locked)],
            "recipes copy": ["recipes", "copy", "tiny", str(locked / "x.yaml")],
        }[what]
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and says in err and "Traceback" not in err, err
        assert [p.name for p in locked.iterdir()] == (["recipe.yaml"] if what == "resume" else [])
    finally:
        undo()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can list any folder")
def test_unreadable_subfolder_of_data_is_an_error_not_a_skip(tmp_path, capsys):
    _write(tmp_path / "data" / "a.jsonl", GOOD_LINE)
    _write(tmp_path / "data" / "sub" / "b.jsonl", GOOD_LINE)
    (tmp_path / "data" / "sub").chmod(0o000)
    try:
        rc = main(["data", "check", str(tmp_path / "data"), "--kind", "sft"])
    finally:
        (tmp_path / "data" / "sub").chmod(0o755)
    err = capsys.readouterr().err
    assert rc == 2 and "Cannot read the data folder" in err and "Traceback" not in err, err
