"""The seeded space every blockwise generator draws from: regions, cells and counter-based noise.

A generator of a huge volume never draws "the next random number": everything random is a
function of the seed and a *global* position, so any block can be generated alone and equals
the same region of the whole volume::

    volume grid, cut into cells of CELL voxels (cells are a generator's unit of randomness)
    +--------+--------+--------+
    | c(0,0) | c(0,1) | c(0,2) |      objects of cell c: drawn by default_rng([seed, kind, *c]),
    +--------+--+-----+--+-----+      positions inside c (their extent may leave it)
    | c(1,0) |  :block:  | ... |
    +--------+--+-----+--+-----+      a block renders the objects of every cell within
              <-- margin -->           `margin` (the farthest an object reaches) of it

Region: ``((start, stop), ...)`` per axis in voxels of the volume; it may reach past the volume
(a margin does), where objects are simply rendered further.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import numpy as np

from bigcare.errors import ConfigError

__all__ = ["Region", "as_region", "grow", "cells_near", "cell_rng", "hash_uniform"]

Region = tuple[tuple[int, int], ...]

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def as_region(region, shape: Sequence[int]) -> Region:
    """``((start, stop), ...)`` from None (the whole ``shape``), slices or pairs.

    Raises
    ------
    ConfigError
        If the region has the wrong number of axes or an empty/inverted extent.
    """
    if region is None:
        return tuple((0, int(n)) for n in shape)
    out = []
    for r in region:
        start, stop = (r.start or 0, r.stop) if isinstance(r, slice) else r
        out.append((int(start), int(stop)))
    if len(out) != len(shape) or any(b <= a for a, b in out):
        raise ConfigError(f"region {region!r}: expected {len(shape)} non-empty (start, stop) pairs for shape "
                          f"{tuple(shape)}")
    return tuple(out)


def grow(region: Region, margin: Sequence[int] | int) -> Region:
    """``region`` widened by ``margin`` voxels on both sides (per axis or one for all)."""
    m = [int(margin)] * len(region) if isinstance(margin, (int, np.integer)) else [int(v) for v in margin]
    return tuple((a - k, b + k) for (a, b), k in zip(region, m))


def cells_near(region: Region, margin, cell: int, shape: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Indices (in C order) of the volume's cells within ``margin`` voxels of ``region``."""
    ranges = []
    for (a, b), m, n in zip(region, margin, shape):
        lo, hi = max(0, (a - m) // cell), min(math.ceil(n / cell), math.ceil((b + m) / cell))
        ranges.append(range(lo, max(lo, hi)))
    return itertools.product(*ranges)


def cell_rng(seed: int, stream: int, index: Sequence[int]) -> np.random.Generator:
    """The generator of one cell: the same (seed, stream, cell) always gives the same numbers."""
    return np.random.default_rng([int(seed), int(stream), *(int(i) for i in index)])


def _mix(x):
    """splitmix64's finaliser, vectorised: a bijective scramble of uint64 values."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9) & _MASK
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB) & _MASK
    return x ^ (x >> np.uint64(31))


def hash_uniform(seed: int, stream: int, *coords: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) numbers that are a pure function of (seed, stream, integer coordinates).

    Broadcasts the coordinate arrays; used for lattice values of the background, where each
    lattice node needs its own number wherever it is evaluated from.
    """
    with np.errstate(over="ignore"):
        h = _mix(np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(stream))
        for c in coords:
            h = _mix(h ^ (np.asarray(c).astype(np.int64).astype(np.uint64) + np.uint64(0x632BE59BD9B4E019)))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def check_positive(value, name: str) -> float:
    """``float(value)`` if it is a finite number > 0, else a ConfigError naming it."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number > 0, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{name} must be a number > 0, got {value!r}")
    return v


def check_range(value, name: str) -> tuple[float, float]:
    """A ``(low, high)`` pair with ``0 < low <= high`` (a single number means both)."""
    pair = (value, value) if isinstance(value, (int, float)) else tuple(value)
    if len(pair) != 2:
        raise ConfigError(f"{name} must be a number or a (low, high) pair, got {value!r}")
    low, high = (check_positive(v, name) for v in pair)
    if low > high:
        raise ConfigError(f"{name} must have low <= high, got {value!r}")
    return low, high
