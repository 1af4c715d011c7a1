"""The life of one volume's restoration run: plan (no writes), start (outputs), finish.

::

    plan_volume_run()      open input, check the model fits, plan blocks, decide
       (writes nothing)    fresh / resume / replace / refuse
    start_volume_run()     percentiles (fresh), create outputs metadata-first + done markers,
       (on the cluster)    the RunSpec and the blocks still to do
    execute()              one task per block (bigcare.execute), for one run or a batch
    finish_volume_run()    if every block is done: the pyramid and ``bigcare.complete = True``;
                           always: the summary JSON (the caller raises BlockError on failures)

:func:`bigcare.restore` runs one volume through these steps; :func:`bigcare.batch.restore_many`
plans every volume first (so a bad input stops the batch before anything is written), then
runs all their blocks as one queue.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import fsspec
import numpy as np
import zarr

from . import __version__
from .blocks import BlockPlan, default_block_shape, plan_blocks
from .errors import ConfigError, InputError, ModelMismatchError, OutputError
from .models import model_hash
from .ngff import create_image, update_attrs, write_pyramid
from .normalize import Normalizer, compute_normalizer
from .restore import load_predictor
from .resample import zoom_length
from .tasks import MARKER, AxisLayout, RunSpec, volume_zoom
from .volume import Axis, Volume, normalise_url, open_volume, store_kwargs

__all__ = ["ModelRef", "VolumeRun", "resolve_model", "plan_volume_run", "start_volume_run",
           "finish_volume_run", "plan_restoration", "min_block_voxels", "CALL_VOXELS", "cluster_devices", "fit_to_cluster"]

#: Largest window (write region + halo) one network call predicts, per device type: the memory a
#: call may use over the network's peak bytes per voxel (see benchmarks/RESULTS.md, "Block size").
CALL_VOXELS = {"cpu": 2**22, "cuda": 2**27}
#: Overhead (predicted / written voxels) at which default blocks stop growing.
OVERHEAD_GOAL = 1.15
#: Sustained block tasks per second of one dask scheduler (benchmarks/scheduler.py), and the share
#: of it a run may use; with the restored voxels per second of one device they set the smallest
#: block of a large cluster (:func:`min_block_voxels`).
#: Measured 2026-11-21 on the 2-core VM: 320-460 no-op block tasks/s through the scheduler,
#: 170-200/s through the engine's client loop (bigcare.execute) - the latter is the ceiling.
SCHEDULER_TASKS_PER_S = 170.0
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


@dataclass
class ModelRef:
    """A model as a run uses it: the client-side predictor (metadata) and how workers get it.

    Attributes
    ----------
    predictor : Predictor
        Client-side instance: halo, axes, channels, percentiles.
    hash : str
        Model identity (part of the run key).
    path : str or None
        Model folder the workers read (shared storage); None when the model is sent.
    payload : ModelPayload or None
        The model's bytes, sent once to every worker by a worker plugin.
    obj : object or None
        A picklable predictor object (e.g. IdentityPredictor) sent with the run spec.
    """

    predictor: object
    hash: str
    path: str | None = None
    payload: object | None = None
    obj: object | None = None

    @property
    def label(self) -> str:
        return self.path or (self.payload.source if self.payload is not None else "") or self.hash


def resolve_model(model, ship_model: bool = True) -> ModelRef:
    """Turn ``model`` into a :class:`ModelRef`: client-side predictor, hash, how workers get it.

    Parameters
    ----------
    model : str, os.PathLike, ModelPayload or predictor object
        A model folder, a model's bytes, or a picklable predictor (sent with the run spec).
    ship_model : bool
        For a folder: send its bytes to the workers (True) or let them read the path (False).

    Returns
    -------
    ModelRef

    Raises
    ------
    ModelError
        If the folder is missing or invalid, or a payload's bytes do not match its hash.
    """
    from .restore.payload import ModelPayload

    if isinstance(model, ModelPayload):
        model.verify()
        return ModelRef(model.build("cpu"), model.hash, payload=model)
    if hasattr(model, "predict"):  # a predictor object: sent with the spec
        return ModelRef(model, getattr(model, "fingerprint", type(model).__name__), obj=model)
    mhash = model_hash(model)
    predictor = load_predictor(str(model), device="cpu")
    if ship_model:
        payload = ModelPayload.from_folder(model)
        if payload.hash != mhash:
            raise ConfigError(f"model folder {model} changed while it was being read; try again")
        return ModelRef(predictor, mhash, path=str(model), payload=payload)
    return ModelRef(predictor, mhash, path=str(model))


def _spatial_block(volume: Volume, layout: AxisLayout, block: tuple[int, ...] | None) -> tuple[int, ...] | None:
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


def plan_restoration(volume: Volume, predictor, layout: AxisLayout, block_shape=None, device="cpu",
                     tile_shape=None, devices: int = 1):
    """Choose output chunks and the block plan for a volume and a predictor.

    Output chunks follow the input's chunks on spatial axes (the same grid; on an upsampled
    axis, the input chunk times the factor), whole channels and one time point. A user block
    shape (in output voxels) that is not a whole number of those chunks makes the output chunk
    equal to the block instead.

    Default blocks grow from the model's halo until the recomputed halo is at most
    ``OVERHEAD_GOAL`` or one network call would exceed ``CALL_VOXELS`` (device memory). On a
    cluster of ``devices`` so large that such blocks would be too many tasks for the scheduler
    (:func:`min_block_voxels`), blocks grow further and are predicted in tiles of the
    memory-bound shape.

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
    if block is None:
        cap = CALL_VOXELS["cuda" if str(device).startswith("cuda") else "cpu"]
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


def _check_anisotropy(volume: Volume, predictor) -> None:
    """An isotropic model's factor must match the volume's Z / lateral voxel sizes (within 5%)."""
    factor = getattr(predictor, "factor", None)
    if factor is None:
        return
    scale = dict(zip(volume.axis_names, volume.scale))
    if "z" not in scale or "x" not in scale:
        return
    ratio = scale["z"] / scale["x"]
    if abs(ratio - factor) > 0.05 * factor:
        raise ModelMismatchError(
            f"the isotropic model was trained for an axial factor of {factor:g} (Z voxel size / "
            f"lateral voxel size), but {volume.url} has voxel sizes z={scale['z']:g}, x={scale['x']:g} "
            f"(ratio {ratio:g}); train a model for this volume, or fix its voxel sizes "
            "(bigcare convert --voxel-size)"
        )


@dataclass
class VolumeRun:
    """One volume's run: what was planned, and (once started) what the workers need."""

    volume: Volume
    output: str
    model: ModelRef
    layout: AxisLayout
    chunks: tuple
    plan: BlockPlan
    run_key: str
    state: str  # fresh | resume | replace
    device: str
    precision: str
    ngff_version: str
    output_dtype: str
    output_options: dict | None
    torch_threads: int | None
    attrs: dict = field(default_factory=dict)
    normalizer: Normalizer | None = None
    spec: RunSpec | None = None
    todo: list = field(default_factory=list)
    overwrite: bool = False
    default_blocks: bool = True  # no block or tile shape was given: the cluster's size may change them

    @property
    def images(self) -> dict[str, str]:
        """Output image URL per named output."""
        names = self.model.predictor.outputs
        if len(names) == 1:
            return {names[0]: self.output}
        return {n: f"{self.output.rstrip('/')}/{n}" for n in names}


def _run_key(volume: Volume, mhash: str, plan: BlockPlan, outputs, dtype: str, precision: str) -> str:
    ident = {
        "input": volume.url, "shape": list(volume.shape), "dtype": str(volume.dtype),
        "model": mhash, "plan": plan.as_dict(), "outputs": list(outputs), "dtype_out": dtype,
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _output_state(url: str, options: dict | None, run_key: str, overwrite: bool) -> str:
    """'fresh', 'resume', 'replace', or raise OutputError. Nothing is deleted here.

    'replace' is our own output of another run with overwrite asked, or our own output of
    this run whose creation was cut short (no done markers yet: nothing to lose).
    """
    fs, path = fsspec.core.url_to_fs(str(url), **(options or {}))
    if not fs.exists(path):
        return "fresh"
    try:
        group = zarr.open_group(mode="r", **store_kwargs(url, options))
        attrs = dict(group.attrs)
    except Exception:
        group, attrs = None, {}
    ours = attrs.get("bigcare")
    if not isinstance(ours, dict) or "run_key" not in ours:
        raise OutputError(
            f"output path {url} already exists and was not written by bigcare; "
            "choose another path or remove it yourself"
        )
    if ours["run_key"] == run_key:
        try:
            group[MARKER]
        except KeyError:  # killed while the outputs were being created: no block was done
            return "replace"
        return "resume"
    if not overwrite:
        raise OutputError(
            f"output {url} was written by a different run (other model, input or block layout); "
            "pass overwrite=True (--overwrite) to replace it, or choose another output path"
        )
    return "replace"


def plan_volume_run(input, output, model: ModelRef, *, block_shape=None, tile_shape=None, devices=1,
                    device="cpu", precision="fp32",
                    overwrite=False, ngff_version="0.5", output_dtype="float32", storage_options=None,
                    output_storage_options=None, torch_threads=None) -> VolumeRun:
    """Open the input, check the model fits, plan the blocks, check the output. Writes nothing.

    Parameters
    ----------
    input : str, os.PathLike or Volume
        The OME-Zarr image.
    output : str or os.PathLike
        Output path or URL.
    model : ModelRef
        From :func:`resolve_model`.
    block_shape, tile_shape, devices, device, precision, overwrite, ngff_version, output_dtype, storage_options,
    output_storage_options, torch_threads
        As in :func:`bigcare.restore`.

    Returns
    -------
    VolumeRun
        With ``state`` "fresh", "resume" or "replace".

    Raises
    ------
    InputError, ModelMismatchError, OutputError, ConfigError
        When the input, the model or the output cannot be used.
    """
    volume = input if isinstance(input, Volume) else open_volume(input, storage_options=storage_options)
    if ngff_version not in ("0.4", "0.5"):
        raise ConfigError(f"ngff_version must be '0.4' or '0.5', got {ngff_version!r}")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
    output = normalise_url(output)
    predictor = model.predictor
    layout = AxisLayout.build(volume.axis_names, [a.type for a in volume.axes], predictor.spatial_axes,
                              predictor.n_channel_in, predictor.n_channel_out, volume.shape, volume.url)
    _check_anisotropy(volume, predictor)
    chunks, plan = plan_restoration(volume, predictor, layout, block_shape, device, tile_shape, devices)
    run_key = _run_key(volume, model.hash, plan, predictor.outputs, output_dtype, precision)
    state = _output_state(output, output_storage_options, run_key, overwrite)
    return VolumeRun(volume, output, model, layout, chunks, plan, run_key, state, device, precision,
                     ngff_version, output_dtype, output_storage_options, torch_threads, overwrite=overwrite,
                     default_blocks=block_shape is None and tile_shape is None)


def cluster_devices(client, device: str) -> int:
    """Devices a run spreads over: GPUs (``GPU`` worker resources) for CUDA, else workers."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values() if client is not None else []
    if str(device).startswith("cuda"):
        return max(1, int(sum(w.get("resources", {}).get("GPU", 0) for w in workers)))
    return max(1, len(workers))


def fit_to_cluster(run: VolumeRun, devices: int) -> VolumeRun:
    """Re-plan default blocks for a cluster of ``devices`` (see :func:`plan_restoration`).

    Only runs with default block shapes whose plan changes are touched (nothing is written).
    """
    if not run.default_blocks:
        return run
    chunks, plan = plan_restoration(run.volume, run.model.predictor, run.layout, None, run.device, None, devices)
    if plan == run.plan:
        return run
    run.chunks, run.plan = chunks, plan
    run.run_key = _run_key(run.volume, run.model.hash, plan, run.model.predictor.outputs, run.output_dtype,
                           run.precision)
    run.state = _output_state(run.output, run.output_options, run.run_key, run.overwrite)
    return run


def _channel_axis(volume: Volume) -> int | None:
    names = volume.axis_names
    return names.index("c") if "c" in names else None


def _create_outputs(run: VolumeRun) -> None:
    volume, layout, options = run.volume, run.layout, run.output_options
    in_chunks = dict(zip(volume.axis_names, run.chunks))
    in_chunks["c"] = layout.n_channel_out
    out_chunks = tuple(in_chunks[a] for a in layout.out_axes)
    axes_by_name = {a.name: a for a in volume.axes}
    scale_by_name = dict(zip(volume.axis_names, volume.scale))
    trans_by_name = dict(zip(volume.axis_names, volume.levels[0].translation))
    out_axes = [axes_by_name.get(a, Axis("c", "channel", None)) for a in layout.out_axes]
    zoom = dict(zip(volume.axis_names, run.plan.zoom or (1.0,) * len(volume.axis_names)))
    scale = [scale_by_name.get(a, 1.0) / zoom.get(a, 1.0) for a in layout.out_axes]
    translation = [trans_by_name.get(a, 0.0) for a in layout.out_axes]
    images = run.images
    single = len(images) == 1
    if not single:
        zarr.open_group(mode="w", zarr_format=3 if run.ngff_version == "0.5" else 2, attributes=run.attrs,
                        **store_kwargs(run.output, options))
    for name, url in images.items():
        create_image(
            url, shape=layout.out_shape(run.plan.shape), dtype=run.output_dtype, chunks=out_chunks, axes=out_axes,
            scale=scale, translation=translation, ngff_version=run.ngff_version, storage_options=options,
            name=f"{volume.name or 'volume'} ({name})", attrs=run.attrs if single else None,
        )
    root = zarr.open_group(mode="r+", **store_kwargs(run.output, options))
    grid = run.plan.grid
    root.create_array(MARKER, shape=grid, chunks=(1,) * len(grid), dtype="uint8", fill_value=0)


def start_volume_run(run: VolumeRun, client=None) -> VolumeRun:
    """Percentiles and outputs (fresh runs), the RunSpec, and the blocks still to do.

    Parameters
    ----------
    run : VolumeRun
        A planned run; ``normalizer``, ``attrs``, ``spec`` and ``todo`` are filled in.
    client : distributed.Client, optional
        Where the percentile reads run.

    Returns
    -------
    VolumeRun
        The same object.

    Raises
    ------
    InputError
        If the input cannot be read for its percentiles (nothing is written then).
    """
    volume, options, predictor = run.volume, run.output_options, run.model.predictor
    if run.state in ("fresh", "replace"):
        try:
            normalizer = compute_normalizer(volume.to_dask(), _channel_axis(volume), predictor.pmin,
                                            predictor.pmax, client=client, name=volume.url)
        except InputError:
            raise
        except Exception as exc:  # unreadable chunks etc.: nothing is written yet
            raise InputError(f"could not read {volume.url} to compute its percentiles: "
                             f"{type(exc).__name__}: {exc}") from exc
        if run.state == "replace":  # only now that the new run can start
            fs, path = fsspec.core.url_to_fs(run.output, **(options or {}))
            fs.rm(path, recursive=True)
            fs.invalidate_cache()
        run.attrs = {"bigcare": {
            "version": __version__, "run_key": run.run_key, "input": volume.url,
            "model": run.model.label, "model_hash": run.model.hash, "outputs": list(predictor.outputs),
            "plan": run.plan.as_dict(), "normalization": normalizer.as_dict(), "complete": False,
        }}
        _create_outputs(run)
    else:
        run.attrs = dict(zarr.open_group(mode="r", **store_kwargs(run.output, options)).attrs)
        normalizer = Normalizer.from_dict(run.attrs["bigcare"]["normalization"])
    run.normalizer = normalizer
    shipped = run.model.payload is not None or run.model.obj is not None
    run.spec = RunSpec(
        input_url=volume.url, input_path=volume.levels[0].path, input_options=volume.storage_options,
        layout=run.layout, model_path=None if shipped else run.model.path, model_hash=run.model.hash,
        predictor=run.model.obj, device=run.device, precision=run.precision, normalizer=normalizer,
        outputs=tuple((n, u, "0") for n, u in run.images.items()), output_options=options,
        output_dtype=run.output_dtype, marker_url=run.output, run_key=run.run_key,
        torch_threads=run.torch_threads, plan=run.plan,
    )
    done = np.asarray(zarr.open_array(path=MARKER, mode="r", **store_kwargs(run.output, options))[...]).astype(bool)
    run.todo = [b for b in run.plan if not done[b.index]]
    if run.todo and run.state == "resume" and run.attrs["bigcare"].get("complete"):
        run.attrs["bigcare"]["complete"] = False  # blocks are missing after all: not complete
        update_attrs(run.output, {"bigcare": run.attrs["bigcare"]}, storage_options=options)
    return run


def finish_volume_run(run: VolumeRun, result, client=None, pyramid: bool = True, progress: bool = False) -> None:
    """Pyramid and completion flag of a run whose blocks all succeeded; summary JSON always.

    With failed blocks the summary is written and the output stays marked incomplete; the
    caller raises :class:`~bigcare.errors.BlockError`.
    """
    from .summary import write_summary

    result.normalization = run.normalizer.as_dict() if run.normalizer else {}
    result.failed.sort()
    if not result.failed:
        if pyramid:
            for url in run.images.values():
                write_pyramid(open_volume(url, storage_options=run.output_options), client=client, progress=progress)
        bigcare_attrs = {**run.attrs["bigcare"], "complete": True, "last_run": result.as_dict()}
        update_attrs(run.output, {"bigcare": bigcare_attrs}, storage_options=run.output_options)
    result.summary_path = write_summary(run, result)
