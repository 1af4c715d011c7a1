"""The life of one volume's restoration run: plan (no writes), start (outputs), finish.

::

    plan_volume_run()      open input, check the model fits, plan blocks, decide
       (writes nothing)    fresh / resume / replace / refuse
    start_volume_run()     percentiles (fresh), create outputs metadata-first + done markers,
       (on the cluster)    the RunSpec and the blocks still to do
    execute()              one task per block (bigcare.runs.queue), for one run or a batch
    finish_volume_run()    if every block is done: the pyramid and ``bigcare.complete = True``;
                           always: the summary JSON (the caller raises BlockError on failures)

:func:`bigcare.restore` runs one volume through these steps; :func:`bigcare.runs.batch.restore_many`
plans every volume first (so a bad input stops the batch before anything is written), then
runs all their blocks as one queue.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import zarr

from bigcare.blocks.layout import AxisLayout
from bigcare.blocks.plan import Block, BlockPlan
from bigcare.blocks.sizing import call_voxels, plan_restoration
from bigcare.errors import ConfigError, InputError, ModelMismatchError, OutputError
from bigcare.normalization import Normalizer, volume_normalizer
from bigcare.runs.background import check_threshold
from bigcare.runs.models import ModelRef
from bigcare.runs.outputs import (
    check_writable,
    create_outputs,
    input_fingerprint,
    same_input,
)
from bigcare.store.arrays import written_chunks
from bigcare.store.pyramid import write_pyramid
from bigcare.store.urls import normalize_url, overlap, store_kwargs
from bigcare.store.volume import Volume, check_finished, open_volume
from bigcare.store.write import update_attrs
from bigcare.tasks.block import MARKER, RunSpec
from bigcare.types import (
    NGFF_VERSIONS,
    PRECISIONS,
    NgffVersion,
    PathLike,
    Precision,
    Shape,
    check_choice,
)
from bigcare.version import __version__

if TYPE_CHECKING:
    from collections.abc import Iterator


__all__ = ["VolumeRun", "plan_volume_run", "start_volume_run", "finish_volume_run", "fit_to_cluster", "check_apart",
           "measure_volume_run"]

def _check_anisotropy(volume: Volume, predictor) -> None:
    """An isotropic model's factor must match the volume's Z / lateral voxel sizes (within 5%)."""
    factor = predictor.factor
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
    precision: Precision
    ngff_version: NgffVersion
    output_dtype: str
    output_options: dict | None
    torch_threads: int | None
    attrs: dict = field(default_factory=dict)
    normalizer: Normalizer | None = None
    spec: RunSpec | None = None
    done: np.ndarray | None = None  # per block of the grid: written by an earlier attempt
    overwrite: bool = False
    default_blocks: bool = True  # no block or tile shape was given: the cluster's size may change them
    pyramid: bool = True  # levels 1..n are declared and written; without, only level 0 exists
    nan_fill: float | None = None  # input NaN/inf voxels read as this value (else refused)
    precision_ran: str = ""  # what the workers made of ``precision`` (see precision_on_workers)
    backend: str = "torch"  # what runs the network: torch, openvino or auto (bigcare.exchange.openvino)
    backend_ran: str = ""  # what the workers made of ``backend`` (see backend_on_workers)
    skip_background: float | None = None  # blocks reading nothing above this are filled (bigcare.runs.background)
    background: np.ndarray | None = None  # per block of the grid: filled without the network
    fill_spec: RunSpec | None = None  # the spec of those blocks' tasks (spec + the constant prediction)

    @property
    def n_todo(self) -> int:
        """Blocks still to do (all, until :func:`start_volume_run` has read the done markers)."""
        return len(self.plan) - (0 if self.done is None else int(np.count_nonzero(self.done)))

    def pending(self) -> Iterator[Block]:
        """The blocks still to do, made one by one: a million-block plan is never a list."""
        if self.done is None or not self.done.any():
            yield from self.plan
            return
        for index in zip(*np.nonzero(~self.done)):
            yield self.plan.block(tuple(int(i) for i in index))

    def spec_for(self, block: Block) -> RunSpec | None:
        """The spec a block's task gets: the fill spec for a background block, else the run's."""
        if self.background is not None and self.background[block.index]:
            return self.fill_spec
        return self.spec

    @property
    def images(self) -> dict[str, str]:
        """Output image URL per named output.

        Several outputs are the series ``0, 1, ...`` of a bioformats2raw-layout root (the layout
        NGFF readers list images by: :func:`bigcare.runs.outputs.create_outputs`); the root's
        ``bigcare.images`` attribute maps each name to its path.
        """
        names = self.model.predictor.outputs
        if len(names) == 1:
            return {names[0]: self.output}
        return {n: f"{self.output.rstrip('/')}/{i}" for i, n in enumerate(names)}


def _run_key(volume: Volume, mhash: str, plan: BlockPlan, outputs, dtype: str, precision: str,
             pyramid: bool = True, nan_fill: float | None = None, skip_background: float | None = None,
             backend: str = "auto") -> str:
    ident: dict[str, object] = {
        "input": volume.url, "shape": list(volume.shape), "dtype": str(volume.dtype),
        "model": mhash, "plan": plan.as_dict(), "outputs": list(outputs), "dtype_out": dtype,
        "precision": precision,
    }
    if not pyramid:  # only then: keys of runs with a pyramid stay what they were
        ident["pyramid"] = False
    if nan_fill is not None:  # likewise
        ident["nan_fill"] = nan_fill
    if skip_background is not None:  # filled blocks of one threshold do not mix with another's
        ident["skip_background"] = skip_background
    if backend != "auto":  # blocks of torch and OpenVINO agree to rounding only (1e-3 in bf16): no mixing
        ident["backend"] = backend
    if len(list(outputs)) > 1:  # images in series 0, 1, ...: an output of the named-folder layout does not resume
        ident["images"] = "bioformats2raw"
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
            group[MARKER]  # type: ignore[index]  # attrs were read: the group opened
        except KeyError:  # killed while the outputs were being created: no block was done
            return "replace"
        return "resume"
    if not overwrite:
        raise OutputError(
            f"output {url} was written by a different run (other model, input, block layout, precision or "
            "backend); "
            "pass overwrite=True (--overwrite) to replace it, or choose another output path"
        )
    return "replace"


def plan_volume_run(input: PathLike | Volume, output: PathLike, model: ModelRef, *, block_shape: Shape | None = None,
                    tile_shape: Shape | None = None, devices: int = 1, device: str = "cpu", precision: Precision = "auto",
                    overwrite: bool = False, ngff_version: NgffVersion = "0.5", output_dtype: str = "float32",
                    storage_options: dict | None = None, output_storage_options: dict | None = None,
                    torch_threads: int | None = None, pyramid: bool = True,
                    nan_fill: float | None = None, skip_background: float | None = None,
                    backend: str = "torch") -> VolumeRun:
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
    output_storage_options, torch_threads, pyramid, nan_fill, skip_background, backend
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
    check_finished(volume)
    check_choice("ngff_version", ngff_version, NGFF_VERSIONS)
    check_choice("precision", precision, PRECISIONS)
    backend = _run_backend(backend, model, device, precision)
    try:
        kind: str = np.dtype(output_dtype).kind
    except TypeError:
        kind = "?"
    if kind not in "uif":
        raise ConfigError(f"output_dtype must be a numeric type such as float32, uint16 or int8, got {output_dtype!r}")
    if nan_fill is not None:
        try:
            nan_fill = float(nan_fill)
        except (TypeError, ValueError):
            nan_fill = float("nan")
        if not np.isfinite(nan_fill):
            raise ConfigError("nan_fill (--nan-fill) must be a finite number, the value NaN/inf input voxels are read as")
    skip_background = check_threshold(skip_background)
    output = normalize_url(output)
    check_apart(volume.url, output)
    check_writable(output)
    predictor = model.predictor
    layout = AxisLayout.build(volume.axis_names, [a.kind for a in volume.axes], predictor.spatial_axes,
                              predictor.n_channel_in, predictor.n_channel_out, volume.shape, volume.url,
                              drop=getattr(predictor, "drop_axes", ""))
    _check_anisotropy(volume, predictor)
    if hasattr(predictor, "check_volume"):  # e.g. a projection: a stack deeper than one call holds
        predictor.check_volume(dict(zip(volume.axis_names, volume.shape)), device, volume.url)
    chunks, plan = plan_restoration(volume, predictor, layout, block_shape, device, tile_shape, devices)
    run_key = _run_key(volume, model.hash, plan, predictor.outputs, output_dtype, precision, pyramid, nan_fill,
                       skip_background, _key_backend(backend, model))
    state = _output_state(output, output_storage_options, run_key, overwrite)
    return VolumeRun(volume, output, model, layout, chunks, plan, run_key, state, device, precision,
                     ngff_version, output_dtype, output_storage_options, torch_threads, overwrite=overwrite,
                     default_blocks=block_shape is None and tile_shape is None, pyramid=pyramid, nan_fill=nan_fill,
                     skip_background=skip_background, backend=backend)


def _key_backend(backend: str, model: ModelRef) -> str:
    """The backend as the run key sees it: a model folder's (what was asked: auto, torch or
    openvino); ``auto`` for what only torch can run (an ensemble, a package, an object), where
    nothing can mix."""
    folder = model.ensemble is None and model.obj is None and getattr(model.predictor, "config", None) is not None
    return backend if folder else "auto"


def _run_backend(backend: str, model: ModelRef, device: str, precision: str) -> str:
    """The backend a run asks its workers for: ``torch`` where only torch can run the model (an
    ensemble, a bioimage.io package, a predictor object), else ``backend``; ``openvino`` that
    cannot run it is a ConfigError naming why, before anything is written."""
    from bigcare.exchange.openvino import BACKENDS, resolve_backend

    check_choice("backend", backend, BACKENDS)
    config = getattr(model.predictor, "config", None)
    if backend == "torch":
        return backend
    if model.ensemble is not None or model.obj is not None or config is None:
        if backend == "openvino":
            raise ConfigError("--backend openvino runs one bigcare model folder, not an ensemble, a bioimage.io "
                              "package or a predictor object; use --backend torch (or auto)")
        return "torch"
    if backend == "openvino":
        resolve_backend(backend, device, precision, config)  # raises, saying why it cannot
    return backend


def check_apart(input: str, output: str) -> None:
    """OutputError when an output is, lies inside or contains an input (whatever overwrite says).

    Paths are compared with symlinks resolved, ``file://`` URLs as the paths they name.
    """
    how = overlap(output, input)
    if how is not None:
        raise OutputError(
            f"output {output} {how} the input {input}; an output may never be (inside) an input of the "
            "same run, whatever --overwrite says: choose another output path"
        )


def fit_to_cluster(run: VolumeRun, devices: int, memory_limit: float | None = None, threads: int = 1) -> VolumeRun:
    """Re-plan default blocks for a cluster of ``devices`` (see :func:`plan_restoration`) whose
    workers have ``memory_limit`` bytes and ``threads`` threads (the call size follows them:
    :func:`~bigcare.blocks.sizing.call_voxels`).

    Only runs with default block shapes whose plan changes are touched (nothing is written).
    """
    if not run.default_blocks:
        return run
    arch = getattr(getattr(run.model.predictor, "config", None), "architecture", None)
    ran = run.precision_ran or run.precision
    precision = ran if ran in ("bf16", "fp16") else "bf16" if ran == "auto: bf16" else "fp32"
    cap = call_voxels(run.device, memory_limit=memory_limit, threads=threads, precision=precision,
                      n_filter_base=getattr(arch, "n_filter_base", None))
    chunks, plan = plan_restoration(run.volume, run.model.predictor, run.layout, None, run.device, None, devices,
                                    max_call_voxels=cap)
    if plan == run.plan:
        return run
    run.chunks, run.plan = chunks, plan
    run.run_key = _run_key(run.volume, run.model.hash, plan, run.model.predictor.outputs, run.output_dtype,
                           run.precision, run.pyramid, run.nan_fill, run.skip_background,
                           _key_backend(run.backend, run.model))
    run.state = _output_state(run.output, run.output_options, run.run_key, run.overwrite)
    return run


def measure_volume_run(run: VolumeRun, client=None) -> VolumeRun:
    """The percentile pass of a fresh (or replacing) run; writes nothing.

    A batch measures every volume before it starts any, so an unusable volume (all NaN,
    unreadable chunks) stops the batch before an output exists.

    Raises
    ------
    InputError
        If the input cannot be read for its percentiles, or holds NaN/inf.
    """
    if run.state in ("fresh", "replace") and run.normalizer is None:
        volume, predictor = run.volume, run.model.predictor
        try:
            run.normalizer = volume_normalizer(volume, predictor.pmin, predictor.pmax, client=client,
                                               nan_fill=run.nan_fill)
        except InputError:
            raise
        except Exception as exc:  # unreadable chunks etc.: nothing is written yet
            raise InputError(f"could not read {volume.url} to compute its percentiles: "
                             f"{type(exc).__name__}: {exc}") from exc
    return run


def start_volume_run(run: VolumeRun, client=None) -> VolumeRun:
    """Percentiles and outputs (fresh runs), the RunSpec, and the blocks still to do.

    Parameters
    ----------
    run : VolumeRun
        A planned run; ``normalizer``, ``attrs``, ``spec`` and ``done`` are filled in.
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
    fingerprint = input_fingerprint(volume)
    stored: dict[str, Any] = {}
    if run.state == "resume":
        stored = dict(zarr.open_group(mode="r", **store_kwargs(run.output, options)).attrs)
        if not same_input(stored["bigcare"].get("input_fingerprint"), fingerprint):
            if not run.overwrite:
                raise InputError(
                    f"{volume.url} changed since {run.output} was started (same shape and type, other voxels): "
                    "resuming would mix two inputs; pass overwrite=True (--overwrite) to start over, or restore "
                    "into another output path"
                )
            run.state = "replace"
    if run.state in ("fresh", "replace"):
        normalizer = measure_volume_run(run, client).normalizer
        assert normalizer is not None
        if run.state == "replace":  # only now that the new run can start
            fs, path = fsspec.core.url_to_fs(run.output, **(options or {}))
            fs.rm(path, recursive=True)
            fs.invalidate_cache()
        run.attrs = {"bigcare": {
            "version": __version__, "run_key": run.run_key, "input": volume.url,
            "model": run.model.label, "model_hash": run.model.hash, "outputs": list(predictor.outputs),
            "plan": run.plan.as_dict(), "normalization": normalizer.as_dict(), "complete": False,
            "input_fingerprint": fingerprint,
        }}
        if len(run.images) > 1:  # name -> path of each image in the root
            run.attrs["bigcare"]["images"] = {n: u.rsplit("/", 1)[1] for n, u in run.images.items()}
        if run.nan_fill is not None:  # provenance: these outputs saw NaN/inf input voxels as this value
            run.attrs["bigcare"]["nan_fill"] = run.nan_fill
        try:
            create_outputs(run)
        except OSError as exc:  # read-only location, no permission, disk full
            raise OutputError(f"cannot write the output {run.output} ({type(exc).__name__}: {exc})") from None
    else:
        run.attrs = stored
        normalizer = Normalizer.from_dict(run.attrs["bigcare"]["normalization"])
    run.normalizer = normalizer
    shipped = run.model.payload is not None or run.model.obj is not None or run.model.ensemble is not None
    run.spec = RunSpec(
        input_url=volume.url, input_path=volume.levels[0].path, input_options=volume.storage_options,
        layout=run.layout, model_path=None if shipped else run.model.path, model_hash=run.model.hash,
        predictor=run.model.obj, device=run.device, precision=run.precision, normalizer=normalizer,
        outputs=tuple((n, u, "0") for n, u in run.images.items()), output_options=options,
        output_dtype=run.output_dtype, marker_url=run.output, run_key=run.run_key,
        torch_threads=run.torch_threads, plan=run.plan, nan_fill=run.nan_fill, ensemble=run.model.ensemble,
        backend=run.backend, run_id=uuid.uuid4().hex,
    )
    if run.state == "resume":  # a fresh output has no done markers: no need to list them
        run.done = written_chunks(zarr.open_array(path=MARKER, mode="r", **store_kwargs(run.output, options)))
    else:
        run.done = np.zeros(run.plan.grid, bool)
    if run.n_todo and run.state == "resume" and run.attrs["bigcare"].get("complete"):
        run.attrs["bigcare"]["complete"] = False  # blocks are missing after all: not complete
        update_attrs(run.output, {"bigcare": run.attrs["bigcare"]}, storage_options=options)
    return run


def finish_volume_run(run: VolumeRun, result, client=None, progress: bool = False,
                      started: float | None = None) -> None:
    """Pyramid and completion flag of a run whose blocks all succeeded; summary JSON always.

    With failed blocks the summary is written and the output stays marked incomplete; the
    caller raises :class:`~bigcare.errors.BlockError`. ``started`` (a ``time.perf_counter()``)
    is when the caller's call began: the summary's ``wall_seconds`` counts from it.
    """
    from bigcare.runs.results import FAILURE_LOG_NAME, write_failure_log, write_summary

    result.normalization = run.normalizer.as_dict() if run.normalizer else {}
    result.failed.sort()
    try:
        if not result.failed:
            if run.pyramid:
                for url in run.images.values():
                    write_pyramid(open_volume(url, storage_options=run.output_options), client=client,
                                  progress=progress)
            bigcare_attrs = {**run.attrs["bigcare"], "complete": True, "last_run": result.as_dict()}
            update_attrs(run.output, {"bigcare": bigcare_attrs}, storage_options=run.output_options)
        if result.failed:
            result.failure_log = write_failure_log(run, result)
        else:  # an earlier attempt's log would describe blocks that are now done
            fs, root = fsspec.core.url_to_fs(run.output, **(run.output_options or {}))
            if fs.exists(f"{root.rstrip('/')}/{FAILURE_LOG_NAME}"):
                fs.rm(f"{root.rstrip('/')}/{FAILURE_LOG_NAME}")
        if started is not None:  # the whole call so far: cluster, percentiles, blocks, pyramid
            result.wall_seconds = time.perf_counter() - started
        result.summary_path = write_summary(run, result)
    except OSError as exc:  # disk full, store gone: the blocks are written and marked done
        raise OutputError(f"could not finish {run.output} ({type(exc).__name__}: {exc}); its {result.blocks_computed} "
                          "block(s) written now are kept and marked done: free space (or fix the store) and run the "
                          "same command again to finish it") from None
