"""Which training checkpoints are complete, and the newest one to resume from.

    ckpt, skipped = newest_complete(run_dir / "sft" / "checkpoints")
    for path, why in skipped: print(f"skipped {path.name}: {why}")

A checkpoint counts only when all its files were written. Two things decide it:
- a marker, `.lowvram-complete`, written by `CompletionMarker` (a TrainerCallback) after the
  Trainer has saved every file, listing each file with its size: a file cut short later, or a
  save interrupted before the marker, is caught;
- validated reading of every file, done whether or not there is a marker: each JSON file
  parses, each safetensors file's header matches its size, each torch file (`optimizer.pt`,
  `rng_state.pth`, ...) is a complete zip archive. A full disk that left `trainer_state.json`
  at 0 bytes, or a truncated `optimizer.pt` or adapter, fails here.
A checkpoint without a marker that reads back whole is accepted (checkpoints written before the
marker existed, or a kill between the last file and the marker).

Only the standard library (and the header reader in lowvram.utils.safetensors_io) is used: no torch load.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

from lowvram.utils.dist import wait_for_everyone
from lowvram.utils.safetensors_io import read_safetensors_header

MARKER = ".lowvram-complete"
SET_ASIDE_PREFIX = "incomplete-"  # the Trainer's rotation globs checkpoint-*; this name is outside it
_STEP = re.compile(r"checkpoint-(\d+)")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def checkpoint_step(path: Path) -> int | None:
    m = _STEP.fullmatch(path.name)
    return int(m.group(1)) if m else None


def _files(ckpt: Path) -> dict[str, int]:
    out = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != MARKER and not p.name.startswith(f"{MARKER}."):
            out[p.relative_to(ckpt).as_posix()] = p.stat().st_size
    return out


def write_marker(ckpt: Path) -> None:
    """Record that every file of `ckpt` is written: their names and sizes. Written atomically, last."""
    tmp = ckpt / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"files": _files(ckpt)}, indent=1), encoding="utf-8")
    os.replace(tmp, ckpt / MARKER)


def _check_file(path: Path) -> str | None:
    """Why `path` is not a whole file of its kind, or None."""
    size = path.stat().st_size
    if path.suffix == ".json":
        if size == 0:
            return f"{path.name} is empty (0 bytes)"
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            return f"{path.name} is not valid JSON ({e})"
    elif path.suffix == ".safetensors":
        try:
            read_safetensors_header(path)
        except ValueError as e:
            return str(e)
    elif path.suffix in _TORCH_SUFFIXES:
        if size == 0:
            return f"{path.name} is empty (0 bytes)"
        try:
            with zipfile.ZipFile(path) as z:  # torch.save writes a zip; a cut-off one has no central directory
                z.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            return f"{path.name} is truncated or corrupt ({e})"
    return None


def validate(ckpt: Path, required: tuple[str, ...] = ()) -> str | None:
    """Why `ckpt` cannot be resumed from, or None when it is complete.

    `required`: files this stage writes into every checkpoint besides the Trainer's (the trained
    turn-token rows, saved in `on_save` after trainer_state.json: a kill in between leaves them out).
    """
    if not ckpt.is_dir():
        return "not a folder"
    state = ckpt / "trainer_state.json"
    if not state.is_file():
        return "trainer_state.json is missing (the save did not finish)"
    files = _files(ckpt)
    for rel in required:
        if rel not in files:
            return f"{rel} is missing (it is saved after the Trainer's files)"
    for rel in files:  # what each file says about itself first: the most specific reason
        why = _check_file(ckpt / rel)
        if why:
            return why
    marker = ckpt / MARKER
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"its completion marker {MARKER} is corrupt"
        for rel, size in recorded.items():
            if rel not in files:
                return f"{rel} is missing (it was written when the checkpoint was saved)"
            if files[rel] != size:
                return f"{rel} is {files[rel]} bytes, {size} when the checkpoint was saved (cut short?)"
    else:  # lowvram saves the optimizer and scheduler with every checkpoint (save_only_model=False)
        for name in ("optimizer.pt", "scheduler.pt"):
            if name not in files:
                return f"{name} is missing"
    try:
        step = json.loads(state.read_text(encoding="utf-8")).get("global_step")
    except (OSError, ValueError, AttributeError):
        return "trainer_state.json is not a JSON object"
    if not isinstance(step, int):
        return "trainer_state.json has no global_step"
    return None


def newest_complete(ckpt_dir: Path, required: tuple[str, ...] = ()) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete checkpoint or None, [(newer incomplete checkpoint, why), ...])."""
    found = [(checkpoint_step(p), p) for p in ckpt_dir.glob("checkpoint-*") if checkpoint_step(p) is not None]
    skipped = []
    for _, path in sorted(found, reverse=True):
        why = validate(path, required)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


def set_aside(path: Path) -> Path:
    """Rename an incomplete checkpoint out of the Trainer's way (it would save a new one under that name)."""
    dest = path.with_name(SET_ASIDE_PREFIX + path.name)
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{SET_ASIDE_PREFIX}{n}-{path.name}")
    path.rename(dest)
    return dest


def completion_callback(save_extra=None):
    """A TrainerCallback that writes the marker once the Trainer has saved a checkpoint's files.

    `save_extra(model, ckpt)` first writes what the Trainer does not save (lowvram's trained turn-token
    rows: special_tokens.save_rows), so the marker lists it too.
    """
    from transformers import TrainerCallback

    class CompletionMarker(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):

            wait_for_everyone()  # in a process group each process writes its own RNG state file
            if not state.is_world_process_zero:
                return
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                if save_extra is not None and model is not None:
                    save_extra(model, ckpt)
                write_marker(ckpt)

    return CompletionMarker()
