"""Worker-side code of a restoration run: the run spec, the axis layout and the block task.

A task receives a :class:`RunSpec` (small, identical for every block of a run) and a
:class:`~bigcare.blocks.plan.Block` (coordinates only). It reads the block's read region straight
from the input store, runs the predictor held by this worker process, crops the halo, writes
the block's write region of every named output straight to the output stores, marks the block
done, and returns a small status dict. No voxel data travels through the scheduler.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

import numpy as np

from bigcare.blocks.layout import AxisLayout
from bigcare.blocks.plan import Block, BlockPlan
from bigcare.blocks.zoom import zoom_region
from bigcare.errors import InputError
from bigcare.normalization import Normalizer
from bigcare.predictors.base import Predictor, predict_region
from bigcare.predictors.ensemble import EnsembleSpec
from bigcare.store.arrays import open_array
from bigcare.store.chunkcache import read_region
from bigcare.types import Precision

__all__ = ["RunSpec", "run_block", "worker_predictor", "peak_rss_mb", "MARKER"]

#: Name of the done-marker array kept in the output's root group (one uint8 per block).
MARKER = "bigcare_done"


@dataclass(frozen=True)
class RunSpec:
    """Everything a block task needs, apart from the block itself. Small and picklable."""

    input_url: str
    input_path: str
    input_options: dict | None
    layout: AxisLayout
    model_path: str | None  # None: the model was sent to the workers (see bigcare.predictors.shipping)
    model_hash: str
    device: str
    precision: Precision
    normalizer: Normalizer
    outputs: tuple[tuple[str, str, str], ...]  # (output name, image url, level-0 array path)
    output_options: dict | None
    output_dtype: str
    marker_url: str
    run_key: str
    torch_threads: int | None = None
    predictor: Predictor | None = None  # a predictor object sent with the spec instead of a model folder
    plan: BlockPlan | None = None  # the block plan: zoom (methods that change the grid) and tiles
    nan_fill: float | None = None  # NaN/inf input voxels are read as this value; None: they fail the block
    ensemble: EnsembleSpec | None = None  # an ensemble's members (bigcare.predictors.ensemble), each built once
    # background blocks (bigcare.runs.background): per output, the per-channel value written instead of a prediction
    fill: dict[str, tuple[float, ...]] | None = None
    backend: str = "torch"  # what runs the network: torch, openvino or auto (bigcare.exchange.openvino)
    run_id: str = ""  # made when the run starts: decoded input chunks are cached per run (bigcare.store.chunkcache)


def _set_threads(requested: int | None) -> None:
    """Give torch as many threads as this dask worker has (no oversubscription)."""
    import torch

    n = requested
    if n is None:
        try:
            from distributed import get_worker

            n = get_worker().state.nthreads
        except ValueError:  # not inside a worker
            n = os.cpu_count() or 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(max(1, int(n)))


def _cast(y: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(y), info.min, info.max).astype(dtype)
    return y.astype(dtype, copy=False)


def worker_predictor(spec: RunSpec) -> Predictor:
    """The predictor of a run in this worker process (built once, then cached)."""
    from bigcare.predictors.base import load_predictor

    _set_threads(spec.torch_threads)
    if spec.ensemble is not None:
        return spec.ensemble.predictor(spec.device, spec.precision)
    if spec.predictor is not None:
        return spec.predictor
    if spec.model_path is None:  # the model's bytes were sent to this worker (ModelPlugin)
        from bigcare.predictors.shipping import shipped_predictor

        return shipped_predictor(spec.model_hash, spec.device, spec.precision, spec.backend)
    return load_predictor(spec.model_path, device=spec.device, precision=spec.precision,
                          expected_hash=spec.model_hash, backend=spec.backend)


def _write_block(block: Block, spec: RunSpec, written: dict[str, np.ndarray]) -> None:
    """Write a block's outputs into their stores and mark it done."""
    target = spec.layout.out_slices(block.write)
    for name, url, path in spec.outputs:
        dest = open_array(url, path, "r+", spec.output_options, token=spec.run_key)
        dest[target] = written[name]
    marker = open_array(spec.marker_url, MARKER, "r+", spec.output_options, token=spec.run_key)
    marker[block.index] = 1


def _fill_block(block: Block, spec: RunSpec) -> dict:
    """A background block: the run's constant prediction written, no read, no network."""
    assert spec.fill is not None
    t0 = time.perf_counter()
    layout, dtype = spec.layout, np.dtype(spec.output_dtype)
    shape = layout.out_shape(tuple(b - a for a, b in block.write))
    c = layout.out_axes.find("c")
    written = {}
    for name, _, _ in spec.outputs:
        values = np.asarray(spec.fill[name], np.float32)
        y = np.empty(shape, np.float32)
        if c < 0:
            y[...] = values[0]
        else:
            y[...] = values.reshape([-1 if i == c else 1 for i in range(len(shape))])
        written[name] = _cast(y, dtype)
    _write_block(block, spec, written)
    return {"index": block.index, "voxels": block.write_voxels, "read_s": 0.0, "predict_s": 0.0,
            "write_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "background": True}


def run_block(block: Block, spec: RunSpec) -> dict:
    """Restore one block: per tile (usually one) read, predict, crop; write outputs, mark done.

    A spec with a ``fill`` (background blocks, :mod:`bigcare.runs.background`) writes that
    constant prediction instead, without reading or running the network.

    Returns
    -------
    dict
        ``{"index", "voxels", "read_s", "predict_s", "write_s", "peak_rss_mb"}`` - never voxel
        data (``"background": True`` for a filled block). ``peak_rss_mb`` is the worker process's
        peak resident memory so far.
    """
    if spec.fill is not None:
        return _fill_block(block, spec)
    predictor = worker_predictor(spec)
    t0 = time.perf_counter()
    source = open_array(spec.input_url, spec.input_path, "r", spec.input_options, token=spec.run_key)
    layout, dtype = spec.layout, np.dtype(spec.output_dtype)
    tiles = spec.plan.tiles(block) if spec.plan is not None else [block]
    zoom = spec.plan.zoom if spec.plan is not None else None
    read_s = predict_s = 0.0
    if len(tiles) == 1:
        results = None  # one network call: write its crop straight to the outputs
    else:  # several calls: assemble the block in memory, write it once
        shape = layout.out_shape(tuple(b - a for a, b in block.write))
        results = {name: np.empty(shape, dtype) for name, _, _ in spec.outputs}
    t_read = t0
    for tile in tiles:
        raw = read_region(source, tile.read, (spec.run_id, spec.run_key, spec.input_url, spec.input_path))
        if raw.dtype.kind in "fc" and not np.isfinite(raw).all():  # blocks the percentile sample missed
            finite = np.isfinite(raw)
            if spec.nan_fill is None:
                bad = int(raw.size - np.count_nonzero(finite))
                raise InputError(f"{spec.input_url}: the read region {tile.read} holds {bad} NaN/inf voxel(s); "
                                 "bigcare refuses them instead of spreading them: replace them with a number first, "
                                 "or pass --nan-fill VALUE (nan_fill=)")
            raw = np.where(finite, raw, raw.dtype.type(spec.nan_fill))
        region = zoom_region(raw, zoom, tile.read, tile.window)
        t_predict = time.perf_counter()
        predictions = predict_region(predictor, layout, region, spec.normalizer)
        read_s += t_predict - t_read
        t_read = time.perf_counter()
        predict_s += t_read - t_predict
        crop = layout.out_slices(tuple((c.start, c.stop) for c in tile.crop))
        if results is not None:
            offset = layout.out_slices(tuple((a - b0, b - b0) for (a, b), (b0, _) in zip(tile.write, block.write)))
            for name in results:
                results[name][offset] = _cast(predictions[name][crop], dtype)
    t2 = time.perf_counter()
    written = {name: results[name] if results is not None else _cast(predictions[name][crop], dtype)
               for name, _, _ in spec.outputs}
    _write_block(block, spec, written)
    t3 = time.perf_counter()
    from bigcare.predictors.ensemble import block_reliability

    return {"index": block.index, "voxels": block.write_voxels,
            "read_s": read_s, "predict_s": predict_s, "write_s": t3 - t2,
            "peak_rss_mb": peak_rss_mb(),
            # sums of the reliability readouts (probabilistic models, ensembles) for the run summary
            "reliability": block_reliability(written, getattr(predictor, "kinds", None) or {},
                                             getattr(predictor, "interval", 0.9))}


def peak_rss_mb() -> float:
    """This process's own peak resident memory (MB).

    ``VmHWM`` from /proc, not ``ru_maxrss``: on Linux the latter is inherited across fork+exec,
    so a worker spawned by a big client would report the client's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
