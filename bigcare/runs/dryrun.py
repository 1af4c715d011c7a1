"""What a restore would do, before it does it: ``bigcare plan`` and ``bigcare restore --dry-run``.

:func:`plan_restore` opens the input and the model and plans the run exactly as
:func:`bigcare.restore` does (the same checks: a run the restore would refuse is refused here,
with the same error), but starts no cluster and writes nothing: it reads metadata, and for a
resume lists the done markers. It reports the blocks, block and tile shapes, halo overhead,
network calls, an estimate of each worker's peak memory, the outputs it would create, and
whether it would start, resume or replace.

The memory estimate is a worker process with torch loaded (``WORKER_BASE_MB``) plus one network
call (one call at a time per worker: the model lock) plus the raw and normalized input and the
outputs of each thread's block. A U-Net call's peak is about ``CALL_BYTES_PER_FILTER`` bytes per
window voxel per base filter, measured on CPU for depth 2 and 3, 8 to 32 base filters (figures
in ``benchmarks/RESULTS.md``, "Dry run"). Other predictors have no estimate.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from bigcare.runs.models import resolve_model
from bigcare.runs.outputs import output_geometry
from bigcare.runs.volume import fit_to_cluster, plan_volume_run
from bigcare.store.arrays import written_chunks
from bigcare.store.urls import store_kwargs
from bigcare.tasks.block import MARKER
from bigcare.types import NgffVersion, PathLike, Precision, Shape, check_device

if TYPE_CHECKING:
    from bigcare.runs.volume import VolumeRun

__all__ = ["plan_restore", "describe_plan", "format_plan", "WORKER_BASE_MB", "CALL_BYTES_PER_FILTER"]

#: Resident memory of a dask worker process with torch and a model loaded, CPU (measured: 264-309 MB).
WORKER_BASE_MB = 300.0
#: Peak bytes of one U-Net call per window voxel per base filter (measured: 16.4-17.4).
CALL_BYTES_PER_FILTER = 17.0


def plan_restore(input: PathLike, output: PathLike, model, *, block_shape: Shape | None = None,
                 tile_shape: Shape | None = None, device: str | None = None, precision: Precision = "auto",
                 workers: int | None = None, threads_per_worker: int | None = None, overwrite: bool = False,
                 ngff_version: NgffVersion = "0.5", output_dtype: str = "float32", pyramid: bool = True,
                 storage_options: dict | None = None, output_storage_options: dict | None = None,
                 nan_fill: float | None = None, skip_background: float | None = None,
                 backend: str = "auto") -> dict[str, Any]:
    """Plan a restore as :func:`bigcare.restore` would, without running or writing anything.

    Parameters
    ----------
    input, output, model, block_shape, tile_shape, device, precision, overwrite, ngff_version,
    output_dtype, pyramid, storage_options, output_storage_options, nan_fill, skip_background, backend
        As in :func:`bigcare.restore` (which background blocks are skipped is decided by the run, from
        the data; the plan only checks the threshold and knows the run it would resume).
    workers, threads_per_worker : int, optional
        The cluster the run would have (devices for default block sizes; threads for memory):
        default one worker with every core, as a local cluster.

    Returns
    -------
    dict
        See :func:`describe_plan`.

    Raises
    ------
    InputError, ModelError, ModelMismatchError, OutputError, ConfigError
        Whatever the restore would refuse with, before writing.
    """
    from bigcare.runs.restore import default_device
    from bigcare.tasks.cluster import local_cluster_shape

    device = check_device(device or default_device())
    ref = resolve_model(model, ship_model=True)
    run = plan_volume_run(input, output, ref, block_shape=block_shape, tile_shape=tile_shape, device=device,
                          precision=precision, overwrite=overwrite, ngff_version=ngff_version,
                          output_dtype=output_dtype, storage_options=storage_options,
                          output_storage_options=output_storage_options, pyramid=pyramid, nan_fill=nan_fill,
                          skip_background=skip_background, backend=backend)
    n_workers, threads = local_cluster_shape(workers)
    if str(device).startswith("cuda"):
        import torch

        n_workers, threads = max(1, torch.cuda.device_count()), 1
    from bigcare.tasks.cluster import _memory_bytes

    if run.precision == "auto":  # as the workers of this machine would resolve it (the call size follows it)
        from bigcare.predictors.fastpath import resolve_precision

        run.precision_ran = f"auto: {resolve_precision('auto', device)}"
    config = getattr(ref.predictor, "config", None)
    if run.backend != "torch" and config is not None:  # as this machine's workers would resolve it
        from bigcare.exchange.openvino import resolve_backend

        run.backend_ran = resolve_backend(run.backend, device, run.precision, config)
    memory = _memory_bytes()  # a local cluster gives each worker its share of this machine's memory
    fit_to_cluster(run, n_workers, None if str(device).startswith("cuda") or not memory else memory / n_workers,
                   threads_per_worker or threads)
    if run.state == "resume":
        run.done = written_chunks(zarr.open_array(path=MARKER, mode="r", **store_kwargs(run.output, run.output_options)))
    return describe_plan(run, n_workers, threads_per_worker or threads)


def _largest(regions) -> tuple[int, ...]:
    return tuple(max(b - a for a, b in axis) for axis in zip(*regions))


def describe_plan(run: VolumeRun, workers: int, threads: int) -> dict[str, Any]:
    """The facts of a planned run: what it would do, write, cost and need (see the module)."""
    plan, layout, predictor = run.plan, run.layout, run.model.predictor
    geometry = output_geometry(run)
    first = plan.block((0,) * len(plan.grid))
    tiles = plan.tiles(first)
    window = _largest([t.predicted for t in tiles])
    read = _largest([first.read])
    spatial = [i for i, a in enumerate(run.volume.axis_names) if a in layout.spatial]
    done = int(np.count_nonzero(run.done)) if run.done is not None else 0
    arch = getattr(getattr(predictor, "config", None), "architecture", None)
    memory = None
    if arch is not None:
        call = math.prod(window[i] for i in spatial) * CALL_BYTES_PER_FILTER * arch.n_filter_base
        voxels_in = math.prod(read)  # every axis of the input, channels included
        voxels_out = (math.prod(b - a for i, (a, b) in enumerate(first.write) if i in spatial)
                      * predictor.n_channel_out * len(predictor.outputs))
        per_thread = voxels_in * (run.volume.dtype.itemsize + 4) + voxels_out * (4 + np.dtype(run.output_dtype).itemsize)
        memory = WORKER_BASE_MB + (call + threads * per_thread) / 2**20
    action = {"fresh": "start", "resume": f"resume ({done} of {len(plan)} blocks already done)",
              "replace": "replace the earlier output (another run's, --overwrite)"}[run.state]
    return {
        "input": run.volume.url, "input_shape": list(run.volume.shape), "input_dtype": str(run.volume.dtype),
        "axes": run.volume.axis_names, "model": run.model.label, "device": run.device, "precision": _precision(run),
        "backend": run.backend_ran or run.backend,
        "action": action, "state": run.state,
        "blocks": len(plan), "blocks_to_do": len(plan) - done, "grid": list(plan.grid),
        "block_shape": [plan.block_shape[i] for i in spatial], "tile_shape":
            None if plan.tile_shape is None else [plan.tile_shape[i] for i in spatial],
        "halo": [plan.halo[i] for i in spatial], "halo_overhead": plan.overhead, "network_calls": plan.calls,
        "largest_window": [window[i] for i in spatial], "zoom": plan.zoom,
        "workers": workers, "threads_per_worker": threads,
        "estimated_peak_worker_mb": None if memory is None else round(memory),
        "outputs": {name: {"url": url, "shape": list(geometry.shape), "chunks": list(geometry.chunks),
                           "dtype": run.output_dtype, "axes": "".join(a.name for a in geometry.axes),
                           "levels": geometry.levels if run.pyramid else 1}
                    for name, url in run.images.items()},
    }


def format_plan(d: dict[str, Any]) -> str:
    """The plan as a few lines for the terminal."""
    def shape(values) -> str:
        return "x".join(map(str, values)) if values else "-"

    memory = d["estimated_peak_worker_mb"]
    lines = [
        f"plan: {d['action']}: {d['input']} ({shape(d['input_shape'])} {d['axes']}, {d['input_dtype']})",
        f"  model {d['model']} on {d['device']} ({d['precision']}, backend {d['backend']}); {d['workers']} worker(s) x "
        f"{d['threads_per_worker']} thread(s)",
        f"  blocks {d['blocks_to_do']} to do of {d['blocks']} (grid {shape(d['grid'])}), block {shape(d['block_shape'])}, "
        f"tile {shape(d['tile_shape']) if d['tile_shape'] else 'the block'}, halo {shape(d['halo'])}",
        f"  network calls {d['network_calls']}, largest window {shape(d['largest_window'])}, "
        f"halo overhead {d['halo_overhead']:.2f}x",
        "  estimated peak memory per worker: " + (f"{memory} MB" if memory is not None else "unknown for this predictor"),
    ]
    for name, o in d["outputs"].items():
        lines.append(f"  output {name}: {o['url']} {shape(o['shape'])} {o['axes']} {o['dtype']}, chunks "
                     f"{shape(o['chunks'])}, {o['levels']} level(s)")
    lines.append("  nothing was written (dry run)")
    return "\n".join(lines)


def _precision(run) -> str:
    """The run's precision; ``auto`` with what it becomes on this machine's device."""
    if run.precision != "auto":
        return run.precision
    from bigcare.predictors.fastpath import resolve_precision

    return f"auto: {resolve_precision('auto', run.device)} on this machine"

