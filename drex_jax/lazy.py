"""Lazy package exports (PEP 562): a package lists the names it re-exports and the module each
comes from, and a name's module is imported on first use, so importing a host-only subpackage
does not load jax through its parent package."""
from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """(`__getattr__`, `__all__`) for `package`, re-exporting each name from its module."""
    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__, sorted(exports)
