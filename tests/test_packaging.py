"""`pip install` of the repository (not editable) ships the package, its recipes and their sample data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {res.stderr[-300:]}")
    return next(out.glob("lowvram-*.whl"))


def test_wheel_holds_package_recipes_and_samples(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "lowvram/cli.py",
        "lowvram/data/load.py",
        "lowvram/recipes/demo.yaml",
        "lowvram/recipes/chat-assistant.py",
        "lowvram/recipes/data/chat_sft.jsonl",
        "lowvram/recipes/data/concise_prefs.jsonl",
    ):
        assert name in names, name
    assert any(n.endswith("entry_points.txt") for n in names)


def test_wheel_holds_every_module_of_the_source_tree(wheel):
    """An explicit package list in pyproject leaves a new subpackage out of the wheel while the tests, run from
    the source tree, stay green: every lowvram/**/*.py must be in it."""
    names = set(zipfile.ZipFile(wheel).namelist())
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "lowvram").rglob("*.py")}
    assert sorted(source - names) == []


def test_every_subpackage_imports_from_the_installed_copy(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = (
        "import sys, importlib, pkgutil; sys.path.insert(0, sys.argv[1]); import lowvram; "
        "assert lowvram.__file__.startswith(sys.argv[1]), lowvram.__file__; "
        "names = [m.name for m in pkgutil.walk_packages(lowvram.__path__, 'lowvram.') if not m.name.endswith('__main__')]; "
        "[importlib.import_module(n) for n in names]; print(len(names))"
    )
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.split()[-1]) > 40


def test_installed_copy_finds_its_own_recipes(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import lowvram.recipe as r; "
        "print(r.RECIPES_DIR); print(sorted(r.shipped_recipes())); r.load_recipe('demo')"
    )
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    recipes_dir, names = res.stdout.splitlines()[:2]
    assert Path(recipes_dir) == tmp_path / "lowvram" / "recipes"
    assert "tiny" in names and "orpo-tight" in names
