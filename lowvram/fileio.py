"""Files that are either whole or absent: write under a temporary name in the same folder, then rename.

    atomic_write_text(run_dir / "summary.json", text)

A kill -9 or a full disk while writing leaves at most a `.NAME.tmp-PID` file beside it, never a
half-written NAME (rename within one filesystem is atomic).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
