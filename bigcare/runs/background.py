"""Skip what needs no network: blocks whose whole read region is background (``--skip-background``).

::

    chunk statistics pass      one task per box of input chunks (level 0, read once, decoded,
      (before any block)       never sent): per chunk its max (NaN/inf: +inf) and its sum and
                               voxel count per channel
    background blocks          a block whose read region's chunks all have max <= THRESHOLD
                               (the chunks cover the read region: their max is >= the region's)
    the fill                   one worker predicts a constant input (per channel: the mean of the
                               background chunks) on a window wider than the receptive field and
                               keeps its centre voxel, per output and channel; once per run
    their tasks                write that constant and mark the block done: no read, no network

Why not a coarser pyramid level: a mean-downsampled level's max can be far below level 0's (a
lone bright voxel averages away), so deciding from it could skip signal. The chunk pass reads
level 0 once, at decode speed (hundreds of Mvoxel/s against the network's ~1), and is exact:
a block is skipped only if no voxel that it reads is above the threshold.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np

from bigcare.errors import ConfigError
from bigcare.store.arrays import open_array
from bigcare.tasks.runner import run_tasks

if TYPE_CHECKING:
    from bigcare.runs.volume import VolumeRun
    from bigcare.tasks.block import RunSpec

__all__ = ["check_threshold", "chunk_statistics", "background_grid", "constant_prediction", "plan_background",
           "BOX_VOXELS"]

#: Input voxels one statistics task reads (a box of whole chunks).
BOX_VOXELS = 2**25


def check_threshold(threshold) -> float | None:
    """The threshold as a float (None: off); ConfigError when it is not a finite number."""
    if threshold is None:
        return None
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(threshold, bool) or not math.isfinite(value):
        raise ConfigError(f"skip_background (--skip-background) must be a finite number, the input intensity at or "
                          f"below which a block's whole read region counts as background; got {threshold!r}")
    return value


def _box_statistics(url: str, path: str, options, box: tuple, chunks: tuple, channel_axis: int | None,
                    n_channels: int, nan_fill: float | None):
    """Task: max, per-channel sum and count of every chunk of a box of the chunk grid."""
    arr = open_array(url, path, "r", options)
    slices = tuple(slice(a * c, min(n, b * c)) for (a, b), c, n in zip(box, chunks, arr.shape))
    x = np.asarray(arr[slices])
    grid = tuple(b - a for a, b in box)
    maxima = np.empty(grid, np.float64)
    sums = np.zeros(grid + (n_channels,), np.float64)
    counts = np.zeros(grid + (n_channels,), np.int64)
    for local in np.ndindex(*grid):
        sub = x[tuple(slice(i * c, (i + 1) * c) for i, c in zip(local, chunks))]
        if sub.dtype.kind in "fc" and not np.isfinite(sub).all():
            if nan_fill is None:
                maxima[local] = np.inf  # such a block fails when it reads them: never skipped
                continue
            sub = np.where(np.isfinite(sub), sub, nan_fill)
        maxima[local] = float(sub.max()) if sub.size else -np.inf
        if channel_axis is None:
            sums[local][0], counts[local][0] = float(sub.sum(dtype=np.float64)), sub.size
        else:
            start = slices[channel_axis].start + local[channel_axis] * chunks[channel_axis]
            other = tuple(i for i in range(sub.ndim) if i != channel_axis)
            k = np.arange(start, start + sub.shape[channel_axis])
            sums[local][k] = sub.sum(axis=other, dtype=np.float64)
            counts[local][k] = sub.size // max(1, sub.shape[channel_axis])
    return box, maxima, sums, counts


def chunk_statistics(volume, *, client=None, nan_fill: float | None = None):
    """Per input chunk of level 0: max, and sum and voxel count per channel (one pass, in tasks).

    Returns
    -------
    (maxima, sums, counts) : numpy.ndarray
        ``maxima`` has the chunk grid's shape; ``sums`` and ``counts`` one more axis (channels).
    """
    shape, chunks, c = volume.shape, volume.chunks, volume.channel_axis
    n_channels = 1 if c is None else shape[c]
    grid = tuple(-(-n // k) for n, k in zip(shape, chunks))
    per_chunk = math.prod(chunks)
    box = [1] * len(grid)  # chunks per task along each axis: grown from the last axis
    for axis in reversed(range(len(grid))):
        rest = math.prod(box) * per_chunk
        box[axis] = max(1, min(grid[axis], BOX_VOXELS // max(1, rest)))
    starts = np.ndindex(*(-(-g // b) for g, b in zip(grid, box)))
    boxes = [tuple((i * b, min(g, i * b + b)) for i, g, b in zip(start, grid, box)) for start in starts]
    level = volume.levels[0]
    items = [(volume.url, level.path, volume.storage_options, bx, chunks, c, n_channels, nan_fill) for bx in boxes]
    maxima = np.full(grid, np.inf)
    sums = np.zeros(grid + (n_channels,))
    counts = np.zeros(grid + (n_channels,), np.int64)
    for bx, m, s, n in run_tasks(_box_statistics, items, client=client, in_flight=16, ordered=False,
                                 desc="background", unit="box"):
        where = tuple(slice(a, b) for a, b in bx)
        maxima[where], sums[where], counts[where] = m, s, n
    return maxima, sums, counts


def background_grid(plan, chunks, maxima: np.ndarray, threshold: float, done: np.ndarray | None = None) -> np.ndarray:
    """Per block of ``plan``: True when every input chunk its read region touches has max <= threshold.

    Blocks already ``done`` are never marked. The chunks cover the read region, so their max is
    at least the region's: no block holding a voxel above the threshold is marked.
    """
    grid = np.zeros(plan.grid, bool)
    quiet = maxima <= threshold
    if not quiet.any():
        return grid
    for block in plan:
        if done is not None and done[block.index]:
            continue
        where = tuple(slice(a // c, -(-b // c)) for (a, b), c in zip(block.read, chunks))
        grid[block.index] = bool(quiet[where].all())
    return grid


def constant_prediction(spec: RunSpec, values: tuple[float, ...]) -> dict[str, tuple[float, ...]]:
    """Task: what the run's predictor makes of a constant input (``values`` per input channel).

    The window is wider than twice the halo along every axis the network sees, so its centre voxel
    does not see the window's border; returns per output its per-channel value there.

    Raises
    ------
    ConfigError
        If the prediction is not finite.
    """
    from bigcare.predictors.base import predict_region
    from bigcare.tasks.block import worker_predictor

    predictor, layout = worker_predictor(spec), spec.layout
    plan = spec.plan
    assert plan is not None
    sizes = []
    for axis, n_out, h, a in zip(layout.in_axes, plan.shape, plan.halo, plan.align):
        if axis == "c":
            sizes.append(len(values))
        elif axis not in layout.spatial:
            sizes.append(1)
        elif axis in layout.drop:  # a projection's Z: taken whole, as blocks do
            sizes.append(n_out)
        else:
            sizes.append(min(n_out, -(-(2 * h + a) // a) * a))
    region = np.empty(sizes, np.float32)
    for k, value in enumerate(values):
        region[tuple(k if a == "c" else slice(None) for a in layout.in_axes)] = value
    fill = {}
    for name, y in predict_region(predictor, layout, region, spec.normalizer).items():
        centre = tuple(slice(None) if a == "c" else n // 2 for a, n in zip(layout.out_axes, y.shape))
        v = np.atleast_1d(np.asarray(y[centre], np.float64))
        if not np.isfinite(v).all():
            raise ConfigError(f"the model's prediction of a constant background {values} is not finite ({v}); "
                              "restore without --skip-background")
        fill[name] = tuple(float(x) for x in v)
    return fill


def plan_background(run: VolumeRun, client, threshold: float) -> dict:
    """Mark the run's background blocks and make the spec of their fill tasks; the summary's figures.

    Sets ``run.background`` (per block: filled without the network) and ``run.fill_spec``.
    """
    assert run.spec is not None
    maxima, sums, counts = chunk_statistics(run.volume, client=client, nan_fill=run.nan_fill)
    grid = background_grid(run.plan, run.volume.chunks, maxima, threshold, run.done)
    info: dict = {"threshold": threshold, "blocks": int(grid.sum()),
                  "fraction": float(grid.sum()) / max(1, len(run.plan)), "decided_from": "level-0 chunk maxima"}
    run.background = grid if grid.any() else None
    if run.background is None:
        return info
    quiet = maxima <= threshold
    level = tuple(float(s / n) if n else threshold
                  for s, n in zip(sums[quiet].sum(axis=0), counts[quiet].sum(axis=0)))
    if client is None:
        fill = constant_prediction(run.spec, level)
    else:
        fill = client.submit(constant_prediction, run.spec, level, pure=False).result()
    run.fill_spec = dataclasses.replace(run.spec, fill=fill)
    info.update(constant_input=list(level), fill={k: list(v) for k, v in fill.items()})
    return info
