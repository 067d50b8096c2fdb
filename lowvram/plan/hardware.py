"""What machine are we on: GPU name, VRAM, compute capability, bf16 or fp16.

Detection asks `nvidia-smi` first so that `lowvram doctor` and `lowvram plan` never import
torch; training code calls `detect_device(use_torch=True)` for the allocator's own view.
`--vram GIB`, `--gpu NAME` or `LOWVRAM_VRAM_GIB` plan for a card you do not have.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass

from lowvram.errors import UserError

GIB = 1024**3
VRAM_ENV = "LOWVRAM_VRAM_GIB"
GPU_ENV = "LOWVRAM_GPU"

# Cards people actually train on. Memory is what the driver reports (nvidia-smi MiB / 1024),
# which is a little under the marketing number for some cards (A10G and L4 show 22.5 GiB).
KNOWN_CARDS: dict[str, tuple[str, float, tuple[int, int]]] = {
    "t4": ("Tesla T4", 15.0, (7, 5)),
    "rtx2080ti": ("NVIDIA GeForce RTX 2080 Ti", 11.0, (7, 5)),
    "rtx3060": ("NVIDIA GeForce RTX 3060", 12.0, (8, 6)),
    "rtx3060ti": ("NVIDIA GeForce RTX 3060 Ti", 8.0, (8, 6)),
    "rtx3070": ("NVIDIA GeForce RTX 3070", 8.0, (8, 6)),
    "rtx3080": ("NVIDIA GeForce RTX 3080", 10.0, (8, 6)),
    "rtx3090": ("NVIDIA GeForce RTX 3090", 24.0, (8, 6)),
    "rtx4060": ("NVIDIA GeForce RTX 4060", 8.0, (8, 9)),
    "rtx4060ti16": ("NVIDIA GeForce RTX 4060 Ti 16GB", 16.0, (8, 9)),
    "rtx4070": ("NVIDIA GeForce RTX 4070", 12.0, (8, 9)),
    "rtx4080": ("NVIDIA GeForce RTX 4080", 16.0, (8, 9)),
    "rtx4090": ("NVIDIA GeForce RTX 4090", 24.0, (8, 9)),
    "a10g": ("NVIDIA A10G", 22.49, (8, 6)),
    "l4": ("NVIDIA L4", 22.49, (8, 9)),
    "a100": ("NVIDIA A100-SXM4-40GB", 40.0, (8, 0)),
    "h100": ("NVIDIA H100 80GB HBM3", 79.6, (9, 0)),
}


@dataclass(frozen=True)
class Device:
    """One accelerator (or the CPU) as lowvram sees it."""

    kind: str  # "cuda", "mps" or "cpu"
    name: str
    total_vram_gib: float  # 0 for cpu
    usable_vram_gib: float  # free now (detected) or total (simulated)
    compute_capability: tuple[int, int] | None
    source: str  # how we know: nvidia-smi, torch, --vram, --gpu, LOWVRAM_VRAM_GIB, none

    @property
    def bf16(self) -> bool:
        """bf16 needs Ampere (compute capability 8.0) or newer; Apple and CPU use fp32 here."""
        return self.kind == "cuda" and self.compute_capability is not None and self.compute_capability >= (8, 0)

    @property
    def simulated(self) -> bool:
        return self.source not in ("nvidia-smi", "torch", "none", "platform")

    def dtype_choice(self) -> tuple[str, str]:
        """(dtype, reason) for training compute."""
        if self.kind == "cuda":
            cc = ".".join(map(str, self.compute_capability or (0, 0)))
            if self.bf16:
                return "bf16", f"compute capability {cc} supports bf16"
            return "fp16", f"compute capability {cc} has no bf16"
        if self.kind == "mps":
            return "fp32", "Apple GPUs train LoRA reliably in fp32 with PyTorch's MPS backend"
        return "fp32", "no GPU: CPU training runs in fp32"


def available_ram_bytes() -> int:
    """RAM the OS can give a new allocation now (psutil is a core dependency, and light to import)."""
    import psutil

    return psutil.virtual_memory().available


def simulated_device(
    vram_gib: float, name: str | None = None, cc: tuple[int, int] = (8, 6), source: str = "--vram"
) -> Device:
    """A card we do not have, for planning (`--vram GIB`)."""
    if not (vram_gib > 0) or not math.isfinite(vram_gib):
        raise UserError(
            f"{source} must be a positive, finite number of GiB, got {vram_gib!r}.", hint="Example: --vram 12"
        )
    label = name or f"planned card ({vram_gib:g} GiB)"
    return Device("cuda", label, float(vram_gib), float(vram_gib), cc, source)


def known_card(key: str) -> Device:
    """A card from KNOWN_CARDS by short name (`t4`, `rtx3060`, ...)."""
    norm = key.lower().replace(" ", "").replace("-", "").replace("_", "").replace("geforce", "").replace("nvidia", "")
    if norm.startswith("tesla"):
        norm = norm[len("tesla") :]
    if norm not in KNOWN_CARDS:
        known = ", ".join(sorted(KNOWN_CARDS))
        raise UserError(f"Unknown card {key!r}.", hint=f"Known cards: {known}. Or plan by memory with --vram GIB.")
    name, vram, cc = KNOWN_CARDS[norm]
    return Device("cuda", name, vram, vram, cc, "--gpu")


def _parse_float(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{what} must be a number of GiB, got {text!r}.", hint="Example: 12 or 15.5") from None


def _from_nvidia_smi() -> Device | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,memory.free,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=15,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    # lowvram trains on one GPU: the first visible one (CUDA_VISIBLE_DEVICES picks which).
    parts = [p.strip() for p in lines[0].split(",")]
    if len(parts) < 4:
        return None
    name, total_mib, free_mib, cc = parts[:4]
    try:
        major, minor = (int(x) for x in cc.split("."))
        return Device("cuda", name, float(total_mib) / 1024, float(free_mib) / 1024, (major, minor), "nvidia-smi")
    except ValueError:
        return None


def _from_torch() -> Device | None:
    import torch  # training paths only

    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        free, total = torch.cuda.mem_get_info(idx)
        return Device("cuda", props.name, total / GIB, free / GIB, (props.major, props.minor), "torch")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return Device("mps", "Apple GPU (MPS)", 0.0, 0.0, None, "torch")
    return None


def detect_device(vram_gib: float | str | None = None, gpu: str | None = None, use_torch: bool = False) -> Device:
    """The device to plan for, in order: --gpu, --vram, env vars, the real GPU, else CPU."""
    if gpu:
        return known_card(gpu)
    if vram_gib is not None:
        return simulated_device(_parse_float(str(vram_gib), "--vram"))
    if os.environ.get(GPU_ENV):
        dev = known_card(os.environ[GPU_ENV])
        return Device(dev.kind, dev.name, dev.total_vram_gib, dev.usable_vram_gib, dev.compute_capability, GPU_ENV)
    if os.environ.get(VRAM_ENV):
        return simulated_device(_parse_float(os.environ[VRAM_ENV], VRAM_ENV), source=VRAM_ENV)
    dev = _from_torch() if use_torch else _from_nvidia_smi()
    if dev is not None:
        return dev
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return Device("mps", "Apple GPU (MPS)", 0.0, 0.0, None, "platform")
    return Device("cpu", f"CPU ({platform.machine() or 'unknown'})", 0.0, 0.0, None, "none")
