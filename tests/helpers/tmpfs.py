"""A real small filesystem for tests that fill a disk: a tmpfs mounted for the test, unmounted after."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(mnt: Path, size_mib: int) -> Iterator[Path]:
    """Mount a `size_mib` tmpfs at `mnt` (created); the test is skipped where mounting needs root it lacks."""
    mnt.mkdir(exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "lowvram-test", str(mnt)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path) -> Path:
    """Write a file in `folder` until its filesystem is full; return the file."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (256 << 10))
                f.flush()
        except OSError:
            pass
    return filler
