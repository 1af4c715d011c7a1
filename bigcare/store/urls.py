"""Where a store lives: local paths vs fsspec URLs, and the arguments that make zarr reach it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from bigcare.errors import InputError

__all__ = ["is_url", "normalize_url", "store_kwargs", "url_exists", "freeze", "resolved", "overlap", "relation"]


def is_url(url: str) -> bool:
    """True for fsspec URLs (``proto://...``), False for local paths."""
    return "://" in url


def normalize_url(url: str | os.PathLike) -> str:
    """Local paths become absolute; URLs keep their form without a trailing slash."""
    url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise InputError(f"expected a path or URL string, got {url!r}")
    if is_url(url):
        return url.rstrip("/") if not url.endswith("://") else url
    return os.path.abspath(os.path.expanduser(url))


def resolved(url: str | os.PathLike) -> str:
    """A canonical form for comparing locations: local paths (also ``file://``) with symlinks resolved."""
    url = normalize_url(url)
    for prefix in ("file://", "local://"):
        if url.startswith(prefix):
            url = url[len(prefix):]
    if is_url(url):
        return url.rstrip("/")
    return os.path.realpath(url)


def overlap(a: str | os.PathLike, b: str | os.PathLike) -> str | None:
    """How location ``a`` relates to ``b``: ``"is"``, ``"is inside"``, ``"contains"``, or None."""
    return relation(resolved(a), resolved(b))


def relation(ra: str, rb: str) -> str | None:
    """:func:`overlap` of two locations already :func:`resolved` (no file system calls)."""
    if ra == rb:
        return "is"
    if ra.startswith(rb.rstrip("/") + "/"):
        return "is inside"
    if rb.startswith(ra.rstrip("/") + "/"):
        return "contains"
    return None


def url_exists(url: str, storage_options: dict | None) -> bool:
    """Whether ``url`` exists; True when that cannot be told (unknown protocol, no credentials)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        return bool(fs.exists(path))
    except Exception:  # unknown protocol, no credentials, ...: let the caller say "not a group"
        return True


def store_kwargs(url: str, storage_options: dict | None) -> dict:
    """Keyword arguments that make ``zarr.open_*`` reach ``url``."""
    if is_url(url):
        options = dict(storage_options or {})
        if url.startswith(("file://", "local://")):
            options.setdefault("auto_mkdir", True)  # fsspec's local files do not create folders
        return {"store": url, "storage_options": options}
    return {"store": url}


def freeze(value: Any) -> Any:
    """A hashable stand-in for nested options (dicts and lists become sorted tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)
