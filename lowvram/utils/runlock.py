"""One process per folder: a lock on a run directory (training) or an export's output folder.

    with folder_lock(run_dir, "run", resume_hint="lowvram run --resume RUN"):
        ...   # a second `lowvram run --resume RUN` now stops at once, naming this process

The lock is an advisory `flock` on `FOLDER/.lowvram.lock`, which also holds the owner's PID and
command. The kernel releases a flock when its process dies, however it dies, so a lock left by a
kill -9 is never "held": the next process takes it over and says whose it was. The file is removed
on release. Where `fcntl` does not exist (Windows), the PID in the file decides: a lock whose
process is gone is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from lowvram.errors import UserError

LOCK_NAME = ".lowvram.lock"
_HELD: set[str] = set()  # folders this process has locked

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class FolderBusy(UserError):
    """Another live lowvram process holds the folder."""


def _read_owner(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _describe(owner: dict) -> str:
    parts = [f"PID {owner.get('pid', '?')}"]
    if owner.get("host") and owner["host"] != socket.gethostname():
        parts.append(f"on {owner['host']}")
    if isinstance(owner.get("since"), (int, float)):
        parts.append(time.strftime("since %H:%M:%S", time.localtime(owner["since"])))
    if owner.get("command"):
        parts.append(f"({owner['command']})")
    return " ".join(parts)


def _busy(folder: Path, what: str, owner: dict) -> FolderBusy:
    return FolderBusy(
        f"{folder} is in use by another lowvram {what}: {_describe(owner)}.",
        hint="Wait for it to finish, or stop it first (Ctrl-C saves a checkpoint). "
        "Two processes on one folder would overwrite each other's files.",
    )


def _owner_record() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.time(),
        "command": " ".join(["lowvram", *sys.argv[1:]])[:300],
    }


@contextlib.contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[str | None]:
    """Hold `folder`'s lock for the block; yields a note when a stale lock was taken over, else None.

    Raises FolderBusy (exit 2) naming the holder's PID when another live process holds it.
    The folder must exist.
    """
    path = Path(folder) / LOCK_NAME
    key = str(Path(folder).resolve())
    if key in _HELD:  # this process holds it already (an export into its own run directory)
        yield None
        return
    _HELD.add(key)
    try:
        with _locked(path, Path(folder), what) as note:
            yield note
    finally:
        _HELD.discard(key)


@contextlib.contextmanager
def _locked(path: Path, folder: Path, what: str) -> Iterator[str | None]:
    if fcntl is None:  # pragma: no cover - Windows
        with _pid_file_lock(path, folder, what) as note:
            yield note
        return
    note = None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(
                f"Cannot write in {folder}: {e.strerror or e}.",
                hint="lowvram needs a writable folder for this (it keeps a lock file there).",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(folder, what, _read_owner(path)) from None
        except OSError:  # a filesystem without flock: fall back to the PID in the file
            os.close(fd)
            with _pid_file_lock(path, folder, what) as note:
                yield note
            return
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and flock: try again on the new one
    try:
        old = _read_owner(path)
        if old.get("pid") and old.get("pid") != os.getpid():
            note = f"took over a stale lock on {folder} from {_describe(old)}, which is no longer running"
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner_record()).encode(), 0)
        yield note
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: nobody can have locked this inode meanwhile
        os.close(fd)


@contextlib.contextmanager
def _pid_file_lock(path: Path, folder: Path, what: str) -> Iterator[str | None]:
    """Exclusive creation of the lock file; a file whose PID is dead is stale and replaced."""
    note = None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            old = _read_owner(path)
            pid = old.get("pid")
            if isinstance(pid, int) and pid_alive(pid) and pid != os.getpid():
                raise _busy(folder, what, old) from None
            note = f"took over a stale lock on {folder} from {_describe(old)}, which is no longer running"
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        break
    else:
        raise _busy(folder, what, _read_owner(path))
    try:
        os.write(fd, json.dumps(_owner_record()).encode())
        os.close(fd)
        yield note
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
