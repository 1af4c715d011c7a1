"""The one open-array cache: tasks open each zarr array once per process, never carry it.

Every task that reads or writes a store (block tasks, pyramid tasks, percentile and patch
reads) calls :func:`open_array` with coordinates and a *token* naming the array it expects: a
run key, or a level's shape/chunks/dtype. An array deleted and re-created by a later run has
another token, so it is opened afresh instead of being written through stale metadata.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable

import zarr

from bigcare.store.urls import freeze, store_kwargs

__all__ = ["open_array", "level_token"]

_MAX = 64
_ARRAYS: dict[tuple, zarr.Array] = {}
_LOCK = threading.Lock()


def level_token(level) -> tuple:
    """The token of a pyramid :class:`~bigcare.store.volume.Level`: its shape, chunks and dtype."""
    return (tuple(level.shape), tuple(level.chunks), level.dtype.str)


def open_array(url: str, path: str, mode: str = "r", storage_options: dict | None = None, *,
               zarr_format: int | None = None, token: Hashable = None) -> zarr.Array:
    """Open (once per process and token) the zarr array ``path`` of the group at ``url``.

    Parameters
    ----------
    url, path : str
        Group location (path or fsspec URL) and the array's path inside it.
    mode : {"r", "r+"}
    storage_options : dict, optional
        fsspec options (part of the cache key).
    zarr_format : {2, 3}, optional
        Skips format detection when known.
    token : hashable, optional
        What the caller expects the array to be (see the module docstring).
    """
    key = (url, path, mode, freeze(storage_options), zarr_format, token)
    with _LOCK:
        arr = _ARRAYS.get(key)
    if arr is None:
        arr = zarr.open_array(path=path, mode=mode, zarr_format=zarr_format,  # type: ignore[arg-type]
                              **store_kwargs(url, storage_options))
        with _LOCK:
            if len(_ARRAYS) >= _MAX:
                _ARRAYS.clear()
            _ARRAYS[key] = arr
    return arr

