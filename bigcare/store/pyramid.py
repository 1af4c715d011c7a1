"""The multiscale pyramid, built blockwise straight from and to the store.

One task per output chunk of level k carries only its coordinates (see :func:`write_pyramid`);
tasks run through the one task runner (:func:`bigcare.tasks.runner.run_tasks`) on a cluster or a
local thread pool.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from bigcare.errors import BlockError, OutputError
from bigcare.store.arrays import level_token, open_array
from bigcare.store.volume import Level, Volume
from bigcare.tasks.runner import run_tasks

__all__ = ["write_pyramid", "mean_reduce"]

@dataclass(frozen=True)
class _Step:
    """Everything a pyramid task needs besides its output region: small and picklable."""

    url: str
    storage_options: dict | None
    zarr_format: int
    src: Level
    dst: Level
    factors: tuple[int, ...]


def mean_reduce(block: np.ndarray, factors: tuple[int, ...], out_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Mean over ``factors``-sized cells; the block is edge-padded to ``out_shape * factors``."""
    pad = [(0, n * f - s) for n, f, s in zip(out_shape, factors, block.shape)]
    if any(p for _, p in pad):
        block = np.pad(block, pad, mode="edge")
    acc: np.dtype = np.dtype(np.float32 if dtype.itemsize <= 2 and dtype.kind in "uib" else np.float64)
    if dtype.kind == "f":
        acc = np.promote_types(dtype, np.float32)
    cells = block.reshape([x for n, f in zip(out_shape, factors) for x in (n, f)])
    mean = cells.mean(axis=tuple(range(1, 2 * len(factors), 2)), dtype=acc)
    if dtype.kind == "b":
        return mean >= 0.5
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(mean), info.min, info.max).astype(dtype)
    return mean.astype(dtype)


def _downsample_chunk(step: _Step, region: tuple[tuple[int, int], ...]) -> None:
    """One pyramid task: read ``region * factors`` of level k-1, reduce, write ``region`` of level k."""
    src = open_array(step.url, step.src.path, "r", step.storage_options, zarr_format=step.zarr_format,
                     token=level_token(step.src))
    dst = open_array(step.url, step.dst.path, "r+", step.storage_options, zarr_format=step.zarr_format,
                     token=level_token(step.dst))
    read = tuple(slice(a * f, min(b * f, n)) for (a, b), f, n in zip(region, step.factors, step.src.shape))
    out_shape = tuple(b - a for a, b in region)
    dst[tuple(slice(a, b) for a, b in region)] = mean_reduce(np.asarray(src[read]), step.factors, out_shape, dst.dtype)


def _chunk_regions(shape: tuple[int, ...], chunks: tuple[int, ...]):
    grid = [range(0, n, c) for n, c in zip(shape, chunks)]
    for starts in np.ndindex(*[len(g) for g in grid]):
        yield tuple((g[i], min(g[i] + c, n)) for g, i, c, n in zip(grid, starts, chunks, shape))


def _run(fn, regions: list, client, desc: str, progress: bool) -> None:
    """Run one level's tasks; one BlockError naming the failed regions."""
    failures = [(o.item[0], o.error) for o in run_tasks(fn, [(r,) for r in regions], client=client, in_flight=None,
                                                         ordered=False, outcomes=True, progress=progress,
                                                         desc=desc, unit="chunk") if not o.ok]
    if failures:
        shown = "; ".join(f"region {r}: {type(e).__name__}: {e}" for r, e in failures[:5])
        raise BlockError(f"{desc}: {len(failures)} of {len(regions)} chunks failed: {shown}")


def write_pyramid(volume: Volume, *, client=None, progress: bool = False) -> None:
    """Fill levels 1..n from level 0, blockwise, straight from and to the store.

    One task per output chunk of level k carries only its coordinates; it reads the matching
    region of level k-1, takes the mean over each downsampling cell (rounded and clipped for
    integer types, edge-padded where a level ends mid-cell) and writes its chunk. Memory per
    task is one output chunk times the cell size. Levels are built in order.

    Parameters
    ----------
    volume : Volume
        Image whose level 0 is written; levels 1..n exist (see :func:`create_volume`).
    client : distributed.Client, optional
        Run tasks with ``client.map``; without, the same task function runs on a local thread
        pool.
    progress : bool
        Show a progress bar per level.

    Raises
    ------
    OutputError
        If a level is not an integer downsampling of the previous one.
    BlockError
        If tasks failed; names the level and the failed regions.
    """
    for k in range(1, len(volume.levels)):
        src, dst = volume.levels[k - 1], volume.levels[k]
        factors = tuple(max(1, round(d / s)) for d, s in zip(dst.scale, src.scale))
        if any(not (n // f <= m <= -(-n // f)) for n, m, f in zip(src.shape, dst.shape, factors)):
            raise OutputError(
                f"{volume.url}: level {dst.path!r} shape {dst.shape} is not level {src.path!r} "
                f"shape {src.shape} downsampled by {factors} (scales {src.scale} -> {dst.scale})"
            )
        step = _Step(volume.url, volume.storage_options, volume.zarr_format, src, dst, factors)
        regions = list(_chunk_regions(dst.shape, dst.chunks))
        _run(functools.partial(_downsample_chunk, step), regions, client, f"pyramid level {dst.path}", progress)
