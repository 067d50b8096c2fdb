"""The safetensors format, read and written one tensor at a time (the merge's file layer).

    entries, metadata = read_safetensors_header(path)        # name -> TensorEntry, without reading data
    w = read_tensor(entries["model.norm.weight"])            # one tensor, a private copy
    with SafetensorsWriter(out, [(name, "BF16", shape), ...], {"format": "pt"}) as w:
        w.copy_from(entry); w.convert_from(entry, "BF16"); w.write(name, tensor)   # in the declared order

Only torch is imported, and only inside the functions that need it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

COPY_CHUNK_BYTES = 64 << 20  # bounded buffer for tensors copied or converted without merging
# Bytes per element of the safetensors dtypes a checkpoint may hold.
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorEntry], dict]:
    """The tensors of a safetensors file (name -> entry) and its `__metadata__`, without reading data.

    Raises ValueError when the file is not a complete safetensors file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path.name}: {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(size - 8, 100 << 20):
            raise ValueError(f"{path.name}: header length {header_len} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path.name}: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: header is not a JSON object")
    data_start = 8 + header_len
    meta = header.pop("__metadata__", None) or {}
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path.name}: tensor {name!r} has a malformed header entry") from None
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"{path.name}: tensor {name!r} has unsupported dtype {dtype}")
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype] or data_start + end > size:
            raise ValueError(f"{path.name}: tensor {name!r} lies outside the file (truncated?)")
        entries[name] = TensorEntry(name, dtype, shape, path, data_start + begin, end - begin)
    return entries, meta


def read_tensor(entry: TensorEntry):
    """One tensor as a torch tensor (a private copy: the file is read, not mapped)."""
    import torch

    buf = bytearray(entry.nbytes)
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        if f.readinto(buf) != entry.nbytes:
            raise ValueError(f"{entry.file.name}: tensor {entry.name!r} is truncated")
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))
    return torch.frombuffer(buf, dtype=torch_dtype(entry.dtype)).reshape(entry.shape)


def torch_dtype(st_dtype: str):
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }[st_dtype]


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor: the header (all shapes known up front), then the data.

    with SafetensorsWriter(path, [(name, dtype, shape), ...], metadata) as w:
        w.write(name, tensor_or_bytes)     # in the declared order
    """

    def __init__(self, path: Path, layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        header: dict = {"__metadata__": dict(metadata or {})} if metadata else {}
        offset = 0
        self._order = []
        for name, dtype, shape in layout:
            nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
        self.nbytes = 8 + len(raw) + offset
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0
        self._written = 0

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()
        if exc[0] is None and self._next != len(self._order):
            raise RuntimeError(f"{len(self._order) - self._next} declared tensors were never written")

    def _expect(self, name: str) -> int:
        want, nbytes = self._order[self._next]
        if name != want:
            raise RuntimeError(f"tensors out of order: expected {want}, got {name}")
        self._next += 1
        return nbytes

    def write(self, name: str, tensor) -> None:
        """Write a whole tensor (already in its declared dtype)."""
        nbytes = self._expect(name)
        import torch

        data = tensor.contiguous().view(-1).view(torch.uint8).numpy() if nbytes else b""
        if len(data) != nbytes:
            raise RuntimeError(f"{name}: {len(data)} bytes written, {nbytes} declared")
        self._f.write(memoryview(data))  # no extra copy of the tensor

    def copy_from(self, entry: TensorEntry) -> None:
        """Copy a tensor's bytes from its source file without holding them (kernel copy when possible)."""
        nbytes = self._expect(entry.name)
        if nbytes != entry.nbytes:
            raise RuntimeError(f"{entry.name}: {entry.nbytes} bytes in source, {nbytes} declared")
        self._f.flush()
        with open(entry.file, "rb") as src:
            copied, off = 0, entry.start
            while copied < nbytes:
                try:
                    n = os.copy_file_range(src.fileno(), self._f.fileno(), nbytes - copied, off)
                except (AttributeError, OSError):
                    n = 0
                if n <= 0:  # no kernel copy here (other OS, other filesystem): plain bounded reads
                    src.seek(off)
                    n = len(chunk := src.read(min(COPY_CHUNK_BYTES, nbytes - copied)))
                    if n == 0:
                        raise ValueError(f"{entry.file.name}: tensor {entry.name!r} is truncated")
                    self._f.write(chunk)
                    self._f.flush()
                copied += n
                off += n
        self._f.seek(0, os.SEEK_END)

    def convert_from(self, entry: TensorEntry, out_dtype: str) -> None:
        """Copy a float tensor converted to `out_dtype`, reading a bounded chunk at a time."""
        import torch

        self._expect(entry.name)
        src_dtype, dst_dtype = torch_dtype(entry.dtype), torch_dtype(out_dtype)
        elem = DTYPE_BYTES[entry.dtype]
        step = max(1, COPY_CHUNK_BYTES // elem) * elem
        with open(entry.file, "rb") as src:
            src.seek(entry.start)
            left = entry.nbytes
            while left > 0:
                chunk = bytearray(src.read(min(step, left)))
                if not chunk:
                    raise ValueError(f"{entry.file.name}: tensor {entry.name!r} is truncated")
                left -= len(chunk)
                t = torch.frombuffer(chunk, dtype=src_dtype).to(dst_dtype)
                self._f.write(memoryview(t.view(torch.uint8).numpy()))
