"""Decoded input chunks kept per worker process, so neighbouring blocks decode a shared chunk once.

A block's read region (write region + halo) overlaps its neighbours' by the halo on each side:
with 64^3 chunks and a 24-voxel halo an interior block of one chunk touches 27 chunks, each of
them decoded again by every neighbour that reads it. :func:`read_region` reads a region chunk by
chunk through a small LRU cache of decoded chunks (bounded in bytes), so the blocks a worker
computes one after the other (the queue submits neighbours in order) decode each chunk once::

    read region ─► the chunks it touches ─► cached? take it : decode it (one chunk) and keep it
                                           └► copy the overlap of each into the region
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Hashable

import numpy as np

__all__ = ["read_region", "CACHE_BYTES", "CACHE_REGIONS", "STATS", "clear"]

#: Decoded bytes a worker process keeps at most, and at most this many times the bytes of the
#: region being read: the cache holds the chunks of the last few blocks, so a worker's memory
#: still follows the block size, not the volume's.
CACHE_BYTES = 256 * 2**20
CACHE_REGIONS = 16
#: Chunks decoded and chunks served from the cache in this process (for benchmarks).
STATS = {"decoded": 0, "hits": 0}

_CACHE: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
_SIZE = [0]
_LOCK = threading.Lock()


def clear() -> None:
    """Forget every cached chunk."""
    with _LOCK:
        _CACHE.clear()
        _SIZE[0] = 0


def _chunk(array, key: tuple, index: tuple[int, ...], chunks: tuple[int, ...], limit: int) -> np.ndarray:
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            STATS["hits"] += 1
            return hit
    sel = tuple(slice(i * c, min(n, (i + 1) * c)) for i, c, n in zip(index, chunks, array.shape))
    data = np.asarray(array[sel])
    with _LOCK:
        STATS["decoded"] += 1
        if data.nbytes <= limit // 4 and key not in _CACHE:  # another thread may have read it too
            _CACHE[key] = data
            _SIZE[0] += data.nbytes
            while _SIZE[0] > limit and _CACHE:
                _SIZE[0] -= _CACHE.popitem(last=False)[1].nbytes
    return data


def read_region(array, region: tuple[tuple[int, int], ...], token: Hashable) -> np.ndarray:
    """``array[region]`` assembled from decoded chunks, cached under ``token`` (the run and input).

    A region inside one chunk, or an array whose chunks exceed a quarter of the cache, is read
    directly (nothing to share). The cache keeps at most ``CACHE_REGIONS`` times this region's bytes
    (and ``CACHE_BYTES``).
    """
    chunks = tuple(array.chunks)
    ranges = [range(a // c, -(-b // c)) for (a, b), c in zip(region, chunks)]
    if all(len(r) <= 1 for r in ranges) or np.dtype(array.dtype).itemsize * np.prod(chunks) > CACHE_BYTES // 4:
        return np.asarray(array[tuple(slice(a, b) for a, b in region)])
    out = np.empty(tuple(b - a for a, b in region), array.dtype)
    limit = min(CACHE_BYTES, CACHE_REGIONS * out.nbytes)
    for index in itertools.product(*ranges):
        data = _chunk(array, (token, index), index, chunks, limit)
        src, dst = [], []
        for i, c, (a, b) in zip(index, chunks, region):
            lo, hi = max(a, i * c), min(b, (i + 1) * c)
            src.append(slice(lo - i * c, hi - i * c))
            dst.append(slice(lo - a, hi - a))
        out[tuple(dst)] = data[tuple(src)]
    return out
