"""The one open-array cache: tasks open each zarr array once per process, never carry it.

Every task that reads or writes a store (block tasks, pyramid tasks, percentile and patch
reads) calls :func:`open_array` with coordinates and a *token* naming the array it expects: a
run key, or a level's shape/chunks/dtype. An array deleted and re-created by a later run has
another token, so it is opened afresh instead of being written through stale metadata.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable

import numpy as np
import zarr
from zarr.core.sync import sync

from bigcare.store.urls import freeze, store_kwargs

__all__ = ["open_array", "level_token", "written_chunks"]

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



def written_chunks(array: zarr.Array) -> np.ndarray:
    """Boolean grid (one entry per chunk) of the chunks that exist in the store.

    It lists the array's keys, so it costs in proportion to the chunks written, not to the
    chunk count (reading a million-chunk grid of done markers opens a million keys).
    A store that cannot list (plain HTTP) is read instead; unwritten chunks hold the fill
    value, which is never counted.
    """
    grid = tuple(-(-n // c) for n, c in zip(array.shape, array.chunks))
    out = np.zeros(grid, bool)
    prefix = array.store_path.path
    md = array.metadata
    if getattr(md, "zarr_format", 3) == 3:
        sep = getattr(getattr(md, "chunk_key_encoding", None), "separator", "/")
        head = "c" + sep if type(getattr(md, "chunk_key_encoding", None)).__name__.startswith("Default") else ""
    else:
        sep, head = getattr(md, "dimension_separator", ".") or ".", ""

    async def listing() -> list[str]:
        return [k async for k in array.store_path.store.list_prefix(prefix)]

    try:
        keys = sync(listing())
    except Exception:  # noqa: BLE001 - no listing: read the values (cost: every chunk)
        return np.asarray(array[...]) != array.fill_value
    start = len(prefix) + 1 if prefix else 0
    rows = []
    for key in keys:
        rel = key[start:]
        if not rel.startswith(head):
            continue
        parts = rel[len(head):].split(sep)
        if len(parts) == len(grid) and all(p.isdigit() for p in parts):
            rows.append([int(p) for p in parts])
    if rows:
        index = np.asarray(rows, dtype=np.int64)
        inside = np.all(index < np.asarray(grid), axis=1)
        out[tuple(index[inside].T)] = True
    return out
