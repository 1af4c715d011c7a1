"""How big a block is: the default sizing rule, from the model's halo, the device and the cluster.

Default blocks grow from one output chunk until the recomputed halo is at most
``OVERHEAD_GOAL`` or one network call (a *tile*) would exceed ``CALL_VOXELS`` (device memory).
On a cluster so large that such blocks would be too many tasks for one scheduler
(:func:`min_block_voxels`), blocks grow further and are predicted in tiles of the memory-bound
shape. The measurements behind the constants are in ``benchmarks/RESULTS.md`` ("Block size",
"Scheduler").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bigcare.blocks.layout import AxisLayout
from bigcare.blocks.plan import BlockPlan, plan_blocks
from bigcare.blocks.zoom import volume_zoom, zoom_length
from bigcare.errors import ConfigError

if TYPE_CHECKING:
    from bigcare.predictors.base import Predictor
    from bigcare.store.volume import Volume

__all__ = ["CALL_VOXELS", "OVERHEAD_GOAL", "min_block_voxels", "window_overhead", "default_block_shape",
           "plan_restoration", "call_voxels", "CALL_BYTES_PER_FILTER", "CALL_MEMORY_SHARE"]

#: Largest window (write region + halo) one network call predicts, per device type: the memory a
#: call may use over the network's peak bytes per voxel (see benchmarks/RESULTS.md, "Block size").
CALL_VOXELS = {"cpu": 2**22, "cuda": 2**27}
#: Peak bytes of one U-Net call per window voxel per base filter, by precision (CPU, channels-last:
#: 507 / 258 B per voxel for CSBDeep's 32-filter default in fp32 / bf16, benchmarks/THROUGHPUT_NOTES.md;
#: fp32's 17.0 is the constant bigcare.runs.dryrun estimates memory with).
CALL_BYTES_PER_FILTER = {"fp32": 17.0, "bf16": 8.6, "fp16": 8.6}
#: Bytes per window voxel each worker thread holds besides the call (its read region, normalized
#: copy and output), the process's own resident memory, and the share of a worker's memory limit
#: the whole may use (the rest: dask, the chunk cache, fragmentation).
THREAD_BYTES_PER_VOXEL = 14.0
WORKER_BASE_BYTES = 400 * 2**20
CALL_MEMORY_SHARE = 0.25
#: Overhead (predicted / written voxels) at which default blocks stop growing.
OVERHEAD_GOAL = 1.15
#: Sustained block tasks per second through the restore queue (benchmarks/scheduler.py; figures in
#: benchmarks/RESULTS.md, "Scheduler"), and the share of it a run may use; with the restored voxels
#: per second of one device they set the smallest block of a large cluster (:func:`min_block_voxels`).
SCHEDULER_TASKS_PER_S = 450.0  # the batched client loop: 516-521/s on 2 workers (raw scheduler 548-629/s), 2026-12-02
SCHEDULER_SHARE = 0.25
DEVICE_RATE = {"cpu": 3e5, "cuda": 5e8}


def min_block_voxels(devices: int, device: str = "cuda") -> int:
    """Smallest block (written voxels) that keeps the scheduler below its share on ``devices``.

    ``devices * rate / (tasks_per_s * share)``: at ``rate`` voxels per second per device, the
    cluster finishes ``devices * rate / block`` tasks per second, which must stay below
    ``SCHEDULER_SHARE`` of what the scheduler sustains.
    """
    rate = DEVICE_RATE["cuda" if str(device).startswith("cuda") else "cpu"]
    return math.ceil(max(1, devices) * rate / (SCHEDULER_TASKS_PER_S * SCHEDULER_SHARE))


def call_voxels(device: str = "cpu", *, memory_limit: float | None = None, threads: int = 1,
                precision: str = "fp32", n_filter_base: int | None = None) -> int:
    """Largest window (voxels) one network call predicts on a worker.

    ``CALL_VOXELS[device]``, or, for a CPU worker whose memory limit and network width are known,
    what ``CALL_MEMORY_SHARE`` of the limit holds when larger: the call at
    ``CALL_BYTES_PER_FILTER[precision] * n_filter_base`` bytes per voxel plus every thread's
    reads and writes (``THREAD_BYTES_PER_VOXEL``), over the process's ``WORKER_BASE_BYTES``. Big
    workers so predict big windows and recompute less halo; GPU windows stay at the device cap.

    Parameters
    ----------
    device : str
        ``"cpu"`` or ``"cuda..."``.
    memory_limit : float, optional
        The worker's memory limit in bytes (dask's ``memory_limit``); None: unknown.
    threads : int
        Threads per worker.
    precision : str
        What the workers run (fp32 when unknown: the larger footprint).
    n_filter_base : int, optional
        The U-Net's base filters; None (another predictor): the device cap.

    Returns
    -------
    int
    """
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    base = CALL_VOXELS[kind]
    if kind != "cpu" or not memory_limit or not n_filter_base:
        return base
    per_voxel = CALL_BYTES_PER_FILTER.get(precision, CALL_BYTES_PER_FILTER["fp32"]) * n_filter_base \
        + THREAD_BYTES_PER_VOXEL * max(1, threads)
    return max(base, int((memory_limit * CALL_MEMORY_SHARE - WORKER_BASE_BYTES) / per_voxel))


def window_overhead(block: Sequence[int], shape: Sequence[int], halo: Sequence[int]) -> float:
    """Predicted voxels per written voxel of an interior block (an axis the block spans whole
    needs no halo). The plan's exact figure is :attr:`BlockPlan.overhead`."""
    return math.prod((min(n, b + 2 * h) if b < n else n) / b for b, n, h in zip(block, shape, halo))


def default_block_shape(
    shape: Sequence[int],
    chunks: Sequence[int],
    spatial: Sequence[bool],
    halo: Sequence[int],
    max_window_voxels: float,
    *,
    min_voxels: int = 0,
    overhead_goal: float = 1.15,
) -> tuple[int, ...]:
    """Grow a block, a whole number of chunks at a time, from the model's halo and a memory cap.

    Starting from one chunk, the spatial axis whose growth lowers the halo overhead most is
    doubled (in chunks), as long as the block's window (write region + halo) stays within
    ``max_window_voxels``; growth stops as soon as the overhead is at most ``overhead_goal``
    and the block holds at least ``min_voxels``. Non-spatial axes keep one chunk per block.

    Parameters
    ----------
    shape, chunks : sequence of int
        Volume (output) shape and output chunk shape.
    spatial : sequence of bool
        Which axes are spatial (grown); others stay at one chunk.
    halo : sequence of int
        Halo per axis.
    max_window_voxels : float
        Largest window one network call may predict (device memory / bytes per voxel);
        ``math.inf`` for blocks that are predicted in tiles.
    min_voxels : int
        Smallest write region wanted (e.g. so the scheduler keeps up with a large cluster).
    overhead_goal : float
        Overhead (predicted / written voxels) good enough to stop growing.

    Returns
    -------
    tuple of int
    """
    block = [min(c, n) for c, n in zip(chunks, shape)]

    def window(b):
        return math.prod(min(n, x + 2 * h) for x, n, h in zip(b, shape, halo))

    while window_overhead(block, shape, halo) > overhead_goal or math.prod(block) < min_voxels:
        candidates = []
        for axis, is_spatial in enumerate(spatial):
            if not is_spatial or block[axis] >= shape[axis]:
                continue
            grown = list(block)
            grown[axis] = min(shape[axis], block[axis] + chunks[axis] * max(1, block[axis] // chunks[axis]))
            if window(grown) <= max_window_voxels:
                candidates.append((window_overhead(grown, shape, halo), axis, grown))
        if not candidates:
            break
        block = min(candidates)[2]
    return tuple(block)


def _spatial_block(volume: Volume, layout: AxisLayout, block: Sequence[int] | None) -> tuple[int, ...] | None:
    """Expand a spatial block shape (Z, Y, X) to every axis of the volume."""
    if block is None:
        return None
    if len(block) != len(layout.spatial):
        raise ConfigError(
            f"block has {len(block)} entries {tuple(block)}, expected one per spatial axis "
            f"{layout.spatial.upper()!r}"
        )
    by_axis = dict(zip(layout.spatial, block))
    return tuple(n if a == "c" else by_axis.get(a, 1) for a, n in zip(volume.axis_names, volume.shape))


def plan_restoration(volume: Volume, predictor: Predictor, layout: AxisLayout, block_shape: Sequence[int] | None = None,
                     device: str = "cpu", tile_shape: Sequence[int] | None = None,
                     devices: int = 1, max_call_voxels: int | None = None) -> tuple[tuple[int, ...], BlockPlan]:
    """Choose output chunks and the block plan for a volume and a predictor.

    Output chunks follow the input's chunks on spatial axes (the same grid; on an upsampled
    axis, the input chunk times the factor), whole channels and one time point. A user block
    shape (in output voxels) that is not a whole number of those chunks makes the output chunk
    equal to the block instead.

    Default blocks grow from the model's halo until the recomputed halo is at most
    ``OVERHEAD_GOAL`` or one network call would exceed ``CALL_VOXELS`` (device memory). On a
    cluster of ``devices`` so large that such blocks would be too many tasks for the scheduler
    (:func:`min_block_voxels`), blocks grow further and are predicted in tiles of the
    memory-bound shape. ``max_call_voxels`` (from :func:`call_voxels`: the workers' memory)
    replaces ``CALL_VOXELS``.

    Returns
    -------
    (chunks, BlockPlan)
    """
    axes, in_shape = volume.axis_names, volume.shape
    zoom = volume_zoom(predictor, layout)
    factors = zoom or (1.0,) * len(axes)
    shape = tuple(zoom_length(n, f) for n, f in zip(in_shape, factors))
    spatial = [a in layout.spatial for a in axes]
    chunks = tuple(n if a == "c" else (min(n, max(1, round(c * f))) if s else 1)
                   for a, n, c, s, f in zip(axes, shape, volume.chunks, spatial, factors))
    halo = tuple(predictor.halo[layout.spatial.index(a)] if s else 0 for a, s in zip(axes, spatial))
    align = tuple(predictor.align[layout.spatial.index(a)] if s else 1 for a, s in zip(axes, spatial))
    block = _spatial_block(volume, layout, block_shape)
    tile = _spatial_block(volume, layout, tile_shape)
    if layout.drop:  # axes the output lacks (a projection's Z): every block and tile spans them whole
        chunks = tuple(n if a in layout.drop else c for a, n, c in zip(axes, shape, chunks))
        block = None if block is None else tuple(n if a in layout.drop else b for a, n, b in zip(axes, shape, block))
        tile = None if tile is None else tuple(n if a in layout.drop else t for a, n, t in zip(axes, shape, tile))
    if block is None:
        cap = max_call_voxels or CALL_VOXELS["cuda" if str(device).startswith("cuda") else "cpu"]
        block = default_block_shape(shape, chunks, spatial, halo, cap, overhead_goal=OVERHEAD_GOAL)
        # big enough for the scheduler, small enough that every device gets >= 2 tasks
        need = min(min_block_voxels(devices, device), math.prod(shape) // (2 * max(1, devices)))
        if math.prod(block) < need and tile is None:
            tile = block
            block = default_block_shape(shape, chunks, spatial, halo, math.inf, min_voxels=need,
                                        overhead_goal=OVERHEAD_GOAL)
    elif any(b % c and b < n for b, c, n in zip(block, chunks, shape)):
        chunks = tuple(min(b, n) for b, n in zip(block, shape))
    return chunks, plan_blocks(in_shape, block, halo, align, chunks, zoom, tile)
