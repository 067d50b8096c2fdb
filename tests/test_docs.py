"""The README and docs/ stay true to the repository: every file they name exists, every `lowvram` command line
they show parses with the real parser, every `make` target they name is in the Makefile, and the README stays
short enough to read (<= 15 KB; the rest belongs in docs/).

Fast and model-free: it reads Markdown and builds lowvram's argparse parser (cli.build_parser), nothing more.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from lowvram import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_BYTES = 15_000

# Modules the file map already lists that other work in progress adds (the map shows the layout being built).
# Remove a name here once its module exists; the map test then insists on it like on any other.
COMING = {
    "lowvram/pairs",
    "lowvram/pairs/build.py",
    "lowvram/pairs/judges.py",
    "lowvram/pairs/memory.py",
    "lowvram/pairs/sampler.py",
}
# Modules that work in progress removes, so the map no longer lists them (none now).
GOING: set[str] = set()

REPO_DIRS = {"lowvram", "tests", "scripts", "recipes", "notebooks", "docs", ".ci"}
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|\*|\$|\{|\}")


def _text(doc: Path) -> str:
    return doc.read_text(encoding="utf-8")


def _fences(text: str) -> list[str]:
    return FENCE.findall(text)


def _spans(text: str) -> list[str]:
    """Inline code spans, outside fenced blocks."""
    return SPAN.findall(FENCE.sub("", text))


def _is_file_map(block: str) -> bool:
    return block.splitlines()[:1] == ["."]


def _repo_files() -> set[str]:
    skip = {".git", ".venv", ".venv-gpuvers", "runs", "__pycache__", ".pytest_cache", ".ruff_cache"}
    files = set()
    for p in ROOT.rglob("*"):
        rel = p.relative_to(ROOT)
        if p.is_file() and not (set(rel.parts) & skip) and not rel.parts[0].endswith(".egg-info"):
            files.add(rel.as_posix())
    return files


def test_readme_fits_on_a_few_screens():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/ (limit {README_MAX_BYTES})"


# ---- links ---------------------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", _text(doc)).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_relative_links_point_at_files_and_headings_that_exist():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(FENCE.sub("", _text(doc))):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            where = f"{doc.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert broken == []


# ---- paths named in code -------------------------------------------------------------------------------------


def _path_tokens(code: str) -> list[str]:
    out = []
    for raw in code.split():
        tok = raw.strip("\"'(),;:.").rstrip(":")
        if tok.startswith("./"):
            tok = tok[2:]
        if tok:
            out.append(tok)
    return out


def _named_paths(doc: Path) -> list[str]:
    text = _text(doc)
    code = _spans(text) + [b for b in _fences(text) if not _is_file_map(b)]
    return [tok for c in code for tok in _path_tokens(c)]


def _check_path(tok: str, files: set[str]) -> str | None:
    """None when `tok` is not a repository path or names one that exists; else what is wrong."""
    path, _, test_name = tok.partition("::")
    if PLACEHOLDER.search(path) or re.search(r"(^|/)[A-Z_]{3,}(/|\.|$)", path):
        return None  # RUN/export/, recipes/NAME.py, runs/demo-<time>: placeholders, not files
    first = path.split("/")[0]
    if "/" in path and first in REPO_DIRS:
        rel = path.rstrip("/")
        if rel in COMING:
            return None
        if not (rel in files or any(f.startswith(rel + "/") for f in files)):
            return f"{tok}: no such file or folder"
        if test_name and f"def {test_name}(" not in (ROOT / rel).read_text(encoding="utf-8"):
            return f"{tok}: no test {test_name} in {rel}"
        return None
    if "/" not in path and path.endswith(".py") and re.fullmatch(r"[\w.-]+\.py", path):
        names = {f.rsplit("/", 1)[-1] for f in files | COMING}
        return None if path in names else f"{tok}: no file of that name in the repository"
    return None


def test_every_path_the_docs_name_exists():
    files = _repo_files()
    bad = []
    for doc in DOCS:
        for tok in _named_paths(doc):
            problem = _check_path(tok, files)
            if problem:
                bad.append(f"{doc.relative_to(ROOT)}: {problem}")
    assert bad == []


def test_the_path_check_would_catch_a_wrong_path():
    files = _repo_files()
    assert _check_path("lowvram/cli.py", files) is None
    assert _check_path("lowvram/nothing_here.py", files)
    assert _check_path("tests/test_docs.py::test_readme_fits_on_a_few_screens", files) is None
    assert _check_path("tests/test_docs.py::test_not_there", files)
    assert _check_path("runs/demo-<time>/report.html", files) is None
    assert _check_path("nonexistent_module.py", files)


# ---- the file map --------------------------------------------------------------------------------------------


def _file_map() -> list[str]:
    """Paths in the README's file map (a tree: one line per file or folder, `├── ` / `│   ` four wide)."""
    blocks = [b for b in _fences(_text(README)) if _is_file_map(b)]
    assert len(blocks) == 1, "README.md should have one file map: a fenced block starting with '.'"
    paths, stack = [], []
    for line in blocks[0].splitlines()[1:]:
        m = re.match(r"((?:│   |    )*)(?:├── |└── )(\S+)", line)
        assert m, f"not a tree line: {line!r}"
        depth = len(m.group(1)) // 4
        stack[depth:] = [m.group(2).rstrip("/")]
        paths.append("/".join(stack))
    return paths


def test_the_file_map_names_what_exists():
    files = _repo_files()
    missing = [
        p
        for p in _file_map()
        if p.rstrip("/") not in COMING
        and p.rstrip("/") not in files
        and not any(f.startswith(p.rstrip("/") + "/") for f in files)
    ]
    assert missing == []


def test_the_file_map_lists_every_module():
    mapped = {p.rstrip("/") for p in _file_map()}
    modules = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "lowvram").rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }
    assert sorted(modules - mapped - GOING) == []


# ---- commands ------------------------------------------------------------------------------------------------


def _lowvram_argv(tokens: list[str]) -> list[str] | None:
    """The arguments lowvram's parser gets from a shell command, or None when it does not run lowvram."""
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):  # VAR=value before the command
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] == "lowvram" or tokens[0].endswith("/lowvram"):
        return tokens[1:]
    if "-m" in tokens and tokens[tokens.index("-m") + 1 : tokens.index("-m") + 2] == ["lowvram"]:
        return tokens[tokens.index("-m") + 2 :]  # python -m lowvram, accelerate launch ... -m lowvram
    if tokens[0].startswith("python") and len(tokens) > 1 and re.fullmatch(r"recipes/[\w-]+\.py", tokens[1]):
        yaml = tokens[1][: -len(".py")] + ".yaml"  # cli.run_recipe_script
        rest = tokens[2:]
        return ["plan", yaml, *rest[1:]] if rest[:1] == ["--plan"] else ["run", yaml, *rest]
    return None


def _command_lines(block: str) -> list[list[str]]:
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"(;|&&|\|\|)(\s|$)", r" \1 ", line)  # `a; b`: shlex leaves the `;` on `a`
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        segment: list[str] = []
        for tok in [*tokens, ";"]:
            if tok in (";", "&&", "||", "|"):
                argv = _lowvram_argv(segment)
                if argv is not None:
                    out.append(argv)
                segment = []
            else:
                segment.append(tok)
    return out


def _parse(argv: list[str]) -> str | None:
    """None when lowvram's parser accepts `argv` as cli.main would; else argparse's complaint."""
    parser = cli.build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args, extra = parser.parse_known_args(argv)
            if extra and not (
                hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra)
            ):  # cli.main's rule: what argparse leaves over must be key=value overrides
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "exited"
    return None


def _subparsers() -> dict:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_every_command_line_shown_parses():
    bad, seen = [], 0
    for doc in DOCS:
        for block in _fences(_text(doc)):
            for argv in _command_lines(block):
                seen += 1
                problem = _parse(argv)
                if problem:
                    bad.append(f"{doc.relative_to(ROOT)}: lowvram {' '.join(argv)}: {problem}")
    assert seen > 20  # the docs show commands; finding none would mean this test reads nothing
    assert bad == []


def test_every_command_named_inline_exists_with_its_options():
    subs = _subparsers()
    bad = []
    for doc in DOCS:
        for span in _spans(_text(doc)):
            try:
                tokens = shlex.split(span)
            except ValueError:
                tokens = span.split()
            argv = _lowvram_argv(tokens)
            if not argv or argv[0].startswith("-"):
                continue
            where = f"{doc.relative_to(ROOT)}: `{span}`"
            if argv[0] not in subs:
                bad.append(f"{where}: no command {argv[0]!r}")
                continue
            options = set(subs[argv[0]]._option_string_actions)
            for tok in argv[1:]:
                opt = tok.split("=", 1)[0]
                if opt.startswith("-") and not re.fullmatch(r"-\d.*", opt) and opt not in options:
                    bad.append(f"{where}: {argv[0]} has no option {opt}")
    assert bad == []


def test_the_command_checks_would_catch_a_mistake():
    assert _parse(["run", "demo", "dpo.beta=0.2", "--no-export"]) is None
    assert _parse(["run", "demo", "--no-such-flag"])
    assert _parse(["export", "runs/x", "--gguf", "q4_k_m", "--no-verify"]) is None
    assert _parse(["nonsense"])
    assert _command_lines("lowvram sft demo; lowvram dpo demo --from runs/x  # one stage\n") == [
        ["sft", "demo"],
        ["dpo", "demo", "--from", "runs/x"],
    ]
    assert _lowvram_argv(["python", "recipes/demo.py", "--plan"]) == ["plan", "recipes/demo.yaml"]


# ---- make targets --------------------------------------------------------------------------------------------


def test_every_make_target_named_exists():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M))
    bad = []
    for doc in DOCS:
        text = _text(doc)
        for code in _spans(text) + _fences(text):
            for target in re.findall(r"(?<![\w/-])make ([a-z][\w-]*)", code):
                if target not in targets:
                    bad.append(f"{doc.relative_to(ROOT)}: make {target}")
    assert bad == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_lead_markers_are_well_formed(doc):
    """Facts still changing are marked `<!-- LEAD: ... -->`, figures still to measure `<!-- LEAD-FIGURES: ... -->`,
    for whoever lands them; each must be closed."""
    text = _text(doc)
    opened = len(re.findall(r"<!-- LEAD(?:-FIGURES)?:", text))
    assert opened == len(re.findall(r"<!-- LEAD(?:-FIGURES)?:.*?-->", text, re.S))


def test_code_spans_close_on_their_line():
    """A `span` split over two lines renders, but the checks above would not read it: keep each on one line."""
    bad = [
        f"{doc.relative_to(ROOT)}: {line[:80]}"
        for doc in DOCS
        for line in FENCE.sub("", _text(doc)).splitlines()
        if line.count("`") % 2
    ]
    assert bad == []
