"""A package's public face without import-time cost: `from lowvram.export import export_run` loads
lowvram/export/run.py on first use, not when anything under lowvram.export is imported.

    __getattr__, __dir__, __all__ = lazy_exports(__name__, {"export_run": "run", "ExportOptions": "run"})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable, Callable, list[str]]:
    """`names` maps each public name to the submodule (relative to `package`) that defines it."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{names[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__, sorted(names)
