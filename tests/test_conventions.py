"""Conventions the code keeps, checked on the code itself (each was broken once).

- every exit status is defined once, in lowvram/errors.py (a data error once exited 1 in training, 2 elsewhere);
- the warning codes `data check` documents are the ones it emits;
- nothing in the code or its configuration points to a file outside the repository.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lowvram
from lowvram import errors

ROOT = Path(lowvram.__file__).resolve().parent.parent
PACKAGE = ROOT / "lowvram"


def _classes_setting_exit_code(path: Path) -> list[tuple[str, ast.expr]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "exit_code" for t in stmt.targets
                ):
                    found.append((node.name, stmt.value))
    return found


def test_exit_statuses_are_defined_once_in_errors():
    statuses = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert statuses == {0, 1, 2, 3, 130}
    for name in ("EXIT_OK", "EXIT_CHECK_FAILED", "EXIT_USER_ERROR", "EXIT_OUT_OF_MEMORY", "EXIT_INTERRUPTED"):
        assert name in errors.__doc__ and str(getattr(errors, name)) in errors.__doc__  # the table lists each
    elsewhere = [
        f"{path.relative_to(ROOT)}: {cls}.exit_code"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "errors.py"
        for cls, _ in _classes_setting_exit_code(path)
    ]
    assert elsewhere == []  # a subclass elsewhere takes its status from errors.py, or inherits UserError's


def test_every_user_error_exits_with_a_status_from_the_table():
    from lowvram.data.sources import DataFileError

    statuses = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    for cls in (errors.UserError, errors.OutOfMemory, errors.Interrupted, DataFileError):
        assert cls.exit_code in statuses, cls
    assert DataFileError.exit_code == errors.EXIT_USER_ERROR  # unreadable training data is a mistake to fix


def test_the_documented_warning_codes_are_the_emitted_ones():
    text = (PACKAGE / "data" / "check.py").read_text(encoding="utf-8")
    emitted = set(re.findall(r'Finding\(\s*"([a-z_]+)"', text))
    documented = re.search(r"code: str {2}# (.+?)\n\s+message:", text, re.S).group(1)
    documented = {c.strip() for c in documented.replace("#", "").replace("\n", ",").split(",") if c.strip()}
    assert emitted and emitted == documented


def test_nothing_points_outside_the_repository():
    patterns = ("../shared", "shared/calibration")  # the workspace beside the repository, not part of it
    files = [
        *PACKAGE.rglob("*.py"),
        *(ROOT / "scripts").rglob("*.py"),
        *(ROOT / "scripts").rglob("*.md"),
        *(ROOT / "recipes").glob("*"),
        *(ROOT / "tests").glob("*.py"),
        *ROOT.glob("constraints*.txt"),
        ROOT / "pyproject.toml",
        ROOT / "Makefile",
        ROOT / ".ci" / "run",
    ]
    hits = [
        f"{f.relative_to(ROOT)}:{n}"
        for f in files
        if f.is_file()
        for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if f.resolve() != Path(__file__).resolve() and any(p in line for p in patterns)
    ]
    assert hits == []
