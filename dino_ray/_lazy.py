"""Lazy package exports (PEP 562): a package can list its public names without importing torch or
faiss, so that importing one of its torch-free config modules stays cheap.

A name that is also a submodule of the package cannot be exported this way: importing the
submodule sets the package attribute, which shadows the lazy lookup."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` given ``{name: submodule}``."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
