"""Worker-side code of a restoration run: the run spec, the axis layout and the block task.

A task receives a :class:`RunSpec` (small, identical for every block of a run) and a
:class:`~bigcare.blocks.Block` (coordinates only). It reads the block's read region straight
from the input store, runs the predictor held by this worker process, crops the halo, writes
the block's write region of every named output straight to the output stores, marks the block
done, and returns a small status dict. No voxel data travels through the scheduler.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import time
from dataclasses import dataclass

import numpy as np
import zarr

from .blocks import Block, BlockPlan
from .errors import ModelMismatchError
from .normalize import Normalizer
from .resample import upsample_rows, zoom_length
from .volume import store_kwargs

__all__ = ["AxisLayout", "RunSpec", "run_block", "predict_region", "zoom_region", "volume_zoom", "MARKER"]

#: Name of the done-marker array kept in the output's root group (one uint8 per block).
MARKER = "bigcare_done"


@dataclass(frozen=True)
class AxisLayout:
    """How the volume's axes map onto the predictor's (batch..., channel, spatial...) order.

    Attributes
    ----------
    in_axes : str
        The input volume's axis names, e.g. ``"tczyx"``.
    spatial : str
        The predictor's spatial axes, e.g. ``"zyx"``.
    n_channel_out : int
        Channels per output.
    """

    in_axes: str
    spatial: str
    n_channel_out: int

    @classmethod
    def build(cls, in_axes: str, axis_types: list, spatial: str, n_in: int, n_out: int,
              shape: tuple, name: str) -> "AxisLayout":
        """Check that a volume fits a predictor and return the layout; raises ModelMismatchError."""
        vol_spatial = "".join(a for a, t in zip(in_axes, axis_types) if t == "space" or
                              (t is None and a in "zyx"))
        if sorted(vol_spatial) != sorted(spatial):
            raise ModelMismatchError(
                f"the model is {len(spatial)}D with spatial axes {spatial.upper()!r}, but {name} has "
                f"spatial axes {vol_spatial.upper() or 'none'!r} (axes {in_axes.upper()!r}, shape {shape}); "
                f"use a {len(vol_spatial)}D model for this volume"
            )
        c = in_axes.find("c")
        have = shape[c] if c >= 0 else 1
        if have != n_in:
            raise ModelMismatchError(
                f"the model expects {n_in} input channel(s), {name} has {have} "
                f"(axes {in_axes.upper()!r}, shape {shape})"
            )
        return cls(in_axes, spatial, n_out)

    @property
    def batch(self) -> str:
        return "".join(a for a in self.in_axes if a != "c" and a not in self.spatial)

    @property
    def core(self) -> str:
        """Axis order the predictor sees: batch axes, channel, spatial axes."""
        return self.batch + "c" + self.spatial

    @property
    def out_axes(self) -> str:
        if "c" in self.in_axes or self.n_channel_out == 1:
            return self.in_axes
        first_spatial = min(self.in_axes.index(a) for a in self.spatial)
        return self.in_axes[:first_spatial] + "c" + self.in_axes[first_spatial:]

    def out_shape(self, in_shape: tuple) -> tuple:
        sizes = dict(zip(self.in_axes, in_shape), c=self.n_channel_out)
        return tuple(sizes[a] for a in self.out_axes)

    def to_core(self, region: np.ndarray) -> np.ndarray:
        src = self.in_axes if "c" in self.in_axes else "c" + self.in_axes
        if "c" not in self.in_axes:
            region = region[None]
        return region.transpose([src.index(a) for a in self.core])

    def from_core(self, y: np.ndarray) -> np.ndarray:
        core = self.core
        if "c" not in self.out_axes:
            y = y.squeeze(core.index("c"))
            core = core.replace("c", "")
        return y.transpose([core.index(a) for a in self.out_axes])

    def out_slices(self, region: tuple[tuple[int, int], ...]) -> tuple[slice, ...]:
        """Output-array slices of an input-space region (the channel axis is taken whole)."""
        by_axis = {a: slice(s, e) for a, (s, e) in zip(self.in_axes, region)}
        return tuple(slice(None) if a == "c" else by_axis[a] for a in self.out_axes)


@dataclass(frozen=True)
class RunSpec:
    """Everything a block task needs, apart from the block itself. Small and picklable."""

    input_url: str
    input_path: str
    input_options: dict | None
    layout: AxisLayout
    model_path: str | None  # None: the model was sent to the workers (see bigcare.restore.payload)
    model_hash: str
    device: str
    precision: str
    normalizer: Normalizer
    outputs: tuple[tuple[str, str, str], ...]  # (output name, image url, level-0 array path)
    output_options: dict | None
    output_dtype: str
    marker_url: str
    run_key: str
    torch_threads: int | None = None
    predictor: object | None = None  # a shipped predictor object instead of a model folder
    plan: BlockPlan | None = None  # the block plan: zoom (methods that change the grid) and tiles


def _options_key(options: dict | None) -> str:
    return json.dumps(options or {}, sort_keys=True, default=str)


@functools.lru_cache(maxsize=64)
def _open_array(url: str, path: str, mode: str, options_key: str, run_key: str) -> zarr.Array:
    # run_key is part of the cache key only: an output re-created by a later run (overwrite)
    # must not be written through an Array object holding the old run's metadata.
    options = json.loads(options_key) or None
    return zarr.open_array(path=path, mode=mode, **store_kwargs(url, options))


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


def predict_region(predictor, layout: AxisLayout, region: np.ndarray, normalizer: Normalizer) -> dict[str, np.ndarray]:
    """Predict every named output of a region given in the volume's axis order.

    The same function serves whole-volume prediction (the region is the volume) and blockwise
    prediction (the region is a block's read region), so the two cannot drift apart.
    """
    x = layout.to_core(region)
    nb = len(layout.batch)
    results = {name: np.empty(x.shape[:nb] + (layout.n_channel_out,) + x.shape[nb + 1:], np.float32)
               for name in predictor.outputs}
    for b in np.ndindex(*x.shape[:nb]):
        for name, y in predictor.predict(x[b], normalizer).items():
            results[name][b] = y
    return {name: layout.from_core(y) for name, y in results.items()}


def volume_zoom(predictor, layout: AxisLayout) -> tuple[float, ...] | None:
    """The predictor's zoom per axis of the volume (None when it keeps the grid)."""
    zoom = getattr(predictor, "zoom", None)
    if zoom is None or all(f == 1.0 for f in zoom):
        return None
    by_axis = dict(zip(layout.spatial, zoom))
    return tuple(float(by_axis.get(a, 1.0)) for a in layout.in_axes)


def zoom_region(region: np.ndarray, zoom: tuple[float, ...] | None, read=None, window=None) -> np.ndarray:
    """Upsample a read region (or the whole volume) onto the output grid along zoomed axes.

    ``read`` and ``window`` are the block's input and output regions (global coordinates);
    omitted, the region is the whole volume and the window is the whole output grid.
    """
    if zoom is None:
        return region
    for axis, f in enumerate(zoom):
        if f == 1.0:
            continue
        i0 = 0 if read is None else read[axis][0]
        o0, o1 = (0, zoom_length(region.shape[axis], f)) if window is None else window[axis]
        region = upsample_rows(region, axis, f, i0, o0, o1)
    return region


def _cast(y: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(y), info.min, info.max).astype(dtype)
    return y.astype(dtype, copy=False)


def run_block(block: Block, spec: RunSpec) -> dict:
    """Restore one block: per tile (usually one) read, predict, crop; write outputs, mark done.

    Returns
    -------
    dict
        ``{"index", "voxels", "read_s", "predict_s", "write_s", "peak_rss_mb"}`` - never voxel
        data. ``peak_rss_mb`` is the worker process's peak resident memory so far.
    """
    from .restore import load_predictor

    _set_threads(spec.torch_threads)
    if spec.predictor is not None:
        predictor = spec.predictor
    elif spec.model_path is None:  # the model's bytes were sent to this worker (ModelPlugin)
        from .restore.payload import shipped_predictor

        predictor = shipped_predictor(spec.model_hash, spec.device, spec.precision)
    else:
        predictor = load_predictor(spec.model_path, device=spec.device, precision=spec.precision,
                                   expected_hash=spec.model_hash)
    t0 = time.perf_counter()
    source = _open_array(spec.input_url, spec.input_path, "r", _options_key(spec.input_options), spec.run_key)
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
        region = zoom_region(np.asarray(source[tile.read_slices]), zoom, tile.read, tile.window)
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
    target = layout.out_slices(block.write)
    for name, url, path in spec.outputs:
        dest = _open_array(url, path, "r+", _options_key(spec.output_options), spec.run_key)
        dest[target] = results[name] if results is not None else _cast(predictions[name][crop], dtype)
    marker = _open_array(spec.marker_url, MARKER, "r+", _options_key(spec.output_options), spec.run_key)
    marker[block.index] = 1
    t3 = time.perf_counter()
    return {"index": block.index, "voxels": block.write_voxels,
            "read_s": read_s, "predict_s": predict_s, "write_s": t3 - t2,
            "peak_rss_mb": peak_rss_mb()}


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
