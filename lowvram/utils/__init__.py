"""Shared utilities that import no other lowvram package: console output, files, locks, processes.

ui.py        tables and progress (plain text, or rich in a terminal)
fileio.py    atomic writes, disk-full messages       runlock.py  one run per folder
children.py  child processes that die with lowvram   dist.py     process-group helpers (rank 0 writes)
safetensors_io.py  safetensors headers and tensors, read without loading the model
"""

from lowvram._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "echo": "ui",
        "table": "ui",
        "atomic_write_text": "fileio",
        "atomic_write_bytes": "fileio",
        "is_main": "dist",
        "wait_for_everyone": "dist",
    },
)
