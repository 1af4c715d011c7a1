"""Lazily imported package attributes: ``import bigcare`` stays light (no torch, no dask)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, names: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """``__getattr__`` and ``__dir__`` for a package whose ``names`` live in other modules.

    Parameters
    ----------
    package : str
        The package's ``__name__`` (for the AttributeError).
    names : dict of str to str
        Attribute name -> module that defines it.
    namespace : dict
        The package's ``globals()``; a loaded attribute is cached there.
    """

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
