"""Files that are either whole or absent: write under a temporary name in the same folder, then rename.

    atomic_write_text(run_dir / "summary.json", text)

A kill -9 or a full disk while writing leaves at most a `.NAME.tmp-PID` file beside it, never a
half-written NAME (rename within one filesystem is atomic).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from lowvram.errors import UserError

FULL_BELOW_BYTES = 1 << 20  # "full": less than this is free


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


def disk_full(exc: BaseException, path: Path) -> bool:
    """Whether `exc` (raised while writing under `path`) is a full disk.

    torch.save and safetensors report a failed write as their own RuntimeError, without the errno:
    then the free space decides.
    """
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free < FULL_BELOW_BYTES
    except OSError:
        return False


def check_writable(folder: Path, what: str, hint: str) -> None:
    """UserError unless `folder` (or the nearest existing folder above it, where it will be made) is writable."""

    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise UserError(f"Cannot create the {what} {folder}: {p} is a file, not a folder.", hint=hint)
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"Cannot create the {what} {folder}: {p} is read-only for this user.", hint=hint)
