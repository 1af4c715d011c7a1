"""The block runner: plan a restoration, submit one dask task per block, resume, report.

::

    restore(input, output, model)
      open input ─► check model fits ─► plan blocks ─► fresh / resume / refuse?
         ─► (fresh) percentiles, create outputs (metadata first) + done markers
         ─► client.map(run_block, blocks not yet done)   one task per block, coordinates only
         ─► gather small statuses (progress bar) ─► pyramid ─► mark complete

Everything that can reject the input runs before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import fsspec
import numpy as np
import zarr

from . import __version__
from .blocks import BlockPlan, default_block_shape, plan_blocks
from .errors import BlockError, ConfigError, InputError, OutputError
from .models import model_hash
from .ngff import create_image, update_attrs, write_pyramid
from .normalize import Normalizer, compute_normalizer
from .restore import load_predictor
from .tasks import MARKER, AxisLayout, RunSpec, predict_region, run_block
from .volume import Volume, normalise_url, open_volume, store_kwargs

__all__ = ["restore", "predict", "RunResult", "plan_restoration"]

#: voxels per block (write region) aimed for when no block shape is given
TARGET_VOXELS = {"cpu": 2**22, "cuda": 2**25}


@dataclass
class RunResult:
    """What a restoration run did (also stored in the output's ``bigcare`` attributes)."""

    outputs: dict[str, str]
    blocks_total: int
    blocks_skipped: int
    blocks_computed: int
    failed: list = field(default_factory=list)
    voxels: int = 0
    seconds: float = 0.0
    halo_overhead: float = 1.0
    normalization: dict = field(default_factory=dict)
    peak_worker_rss_mb: float = 0.0
    seconds_in: dict = field(default_factory=lambda: {"read": 0.0, "predict": 0.0, "write": 0.0})

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["voxels_per_second"] = self.voxels_per_second
        return d


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _fs(url: str, options: dict | None):
    return fsspec.core.url_to_fs(str(url), **(options or {}))


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


def plan_restoration(volume: Volume, predictor, layout: AxisLayout, block_shape=None, device="cpu"):
    """Choose output chunks and the block plan for a volume and a predictor.

    Output chunks follow the input's chunks on spatial axes (the same grid), whole channels
    and one time point. A user block shape that is not a whole number of those chunks makes
    the output chunk equal to the block instead.

    Returns
    -------
    (chunks, BlockPlan)
    """
    axes, shape = volume.axis_names, volume.shape
    spatial = [a in layout.spatial for a in axes]
    chunks = tuple(n if a == "c" else (c if s else 1) for a, n, c, s in zip(axes, shape, volume.chunks, spatial))
    halo = tuple(predictor.halo[layout.spatial.index(a)] if s else 0 for a, s in zip(axes, spatial))
    align = tuple(predictor.align[layout.spatial.index(a)] if s else 1 for a, s in zip(axes, spatial))
    block = _spatial_block(volume, layout, block_shape)
    if block is None:
        target = TARGET_VOXELS["cuda" if str(device).startswith("cuda") else "cpu"]
        block = default_block_shape(shape, chunks, spatial, halo, target)
    elif any(b % c and b < n for b, c, n in zip(block, chunks, shape)):
        chunks = tuple(min(b, n) for b, n in zip(block, shape))
    return chunks, plan_blocks(shape, block, halo, align, chunks)


def _run_key(volume: Volume, mhash: str, plan: BlockPlan, outputs, dtype: str, precision: str) -> str:
    ident = {
        "input": volume.url, "shape": list(volume.shape), "dtype": str(volume.dtype),
        "model": mhash, "plan": plan.as_dict(), "outputs": list(outputs), "dtype_out": dtype,
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _output_state(url: str, options: dict | None, run_key: str, overwrite: bool) -> str:
    """'fresh', 'resume', or raise OutputError. Deletes our own old output when overwriting."""
    fs, path = _fs(url, options)
    if not fs.exists(path):
        return "fresh"
    try:
        attrs = dict(zarr.open_group(mode="r", **store_kwargs(url, options)).attrs)
    except Exception:
        attrs = {}
    ours = attrs.get("bigcare")
    if not isinstance(ours, dict) or "run_key" not in ours:
        raise OutputError(
            f"output path {url} already exists and was not written by bigcare; "
            "choose another path or remove it yourself"
        )
    if ours["run_key"] == run_key:
        return "resume"
    if not overwrite:
        raise OutputError(
            f"output {url} was written by a different run (other model, input or block layout); "
            "pass overwrite=True (--overwrite) to replace it, or choose another output path"
        )
    fs.rm(path, recursive=True)
    return "fresh"


def _create_outputs(volume, layout, chunks, predictor, output, options, ngff_version, dtype, attrs, grid):
    names = predictor.outputs
    out_shape = layout.out_shape(volume.shape)
    in_chunks = dict(zip(volume.axis_names, chunks))
    in_chunks["c"] = layout.n_channel_out
    out_chunks = tuple(in_chunks[a] for a in layout.out_axes)
    axes_by_name = {a.name: a for a in volume.axes}
    scale_by_name = dict(zip(volume.axis_names, volume.scale))
    trans_by_name = dict(zip(volume.axis_names, volume.levels[0].translation))
    from .volume import Axis

    out_axes = [axes_by_name.get(a, Axis("c", "channel", None)) for a in layout.out_axes]
    scale = [scale_by_name.get(a, 1.0) for a in layout.out_axes]
    translation = [trans_by_name.get(a, 0.0) for a in layout.out_axes]
    single = len(names) == 1
    if not single:
        zarr.open_group(mode="w", zarr_format=3 if ngff_version == "0.5" else 2, attributes=attrs,
                        **store_kwargs(output, options))
    images = {}
    for name in names:
        url = output if single else f"{str(output).rstrip('/')}/{name}"
        images[name] = create_image(
            url, shape=out_shape, dtype=dtype, chunks=out_chunks, axes=out_axes, scale=scale,
            translation=translation, ngff_version=ngff_version, storage_options=options,
            name=f"{volume.name or 'volume'} ({name})", attrs=attrs if single else None,
        )
    root = zarr.open_group(mode="r+", **store_kwargs(output, options))
    root.create_array(MARKER, shape=grid, chunks=(1,) * len(grid), dtype="uint8", fill_value=0)
    return images


def restore(
    input,
    output,
    model,
    *,
    client=None,
    scheduler: str | None = None,
    block_shape=None,
    device: str | None = None,
    precision: str = "fp32",
    workers: int | None = None,
    overwrite: bool = False,
    ngff_version: str | None = None,
    output_dtype: str = "float32",
    pyramid: bool = True,
    progress: bool = True,
    storage_options: dict | None = None,
    output_storage_options: dict | None = None,
    torch_threads: int | None = None,
) -> RunResult:
    """Restore an OME-Zarr volume block by block with a model, on a dask cluster.

    Parameters
    ----------
    input : str, os.PathLike or Volume
        OME-Zarr image (NGFF 0.4 or 0.5): a path or an fsspec URL.
    output : str or os.PathLike
        Where to write. A model with one output writes one OME-Zarr image there; a model with
        several named outputs (e.g. ``mean`` and ``scale``) writes a group holding one image per
        name (``output/mean``, ``output/scale``).
    model : str, os.PathLike or Predictor
        Model folder (config.json + model.safetensors), or a picklable predictor object such
        as :class:`bigcare.restore.identity.IdentityPredictor` (sent to workers with the run).
    client : distributed.Client, optional
        Cluster to run on. Without one, ``scheduler`` is connected to, or a LocalCluster with
        separate worker processes is started and closed afterwards.
    scheduler : str, optional
        Address of an existing scheduler, used when ``client`` is None.
    block_shape : tuple of int, optional
        Write-region shape per spatial axis (e.g. ``(64, 256, 256)``); default: a whole number
        of output chunks holding ~4 Mvoxels (CPU) or ~32 Mvoxels (GPU).
    device : str, optional
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; default CUDA when available. GPU tasks request
        one ``GPU`` worker resource each.
    precision : {"fp32", "bf16", "fp16"}
        Inference precision (autocast for the latter two).
    workers : int, optional
        Worker processes of the LocalCluster started when no client/scheduler is given.
    overwrite : bool
        Replace an output written by bigcare with another model/input/layout. A path bigcare
        did not write is never overwritten.
    ngff_version : {"0.5", "0.4"}, optional
        Output format; default "0.5" (zarr v3).
    output_dtype : str
        dtype of the outputs (float32 by default; integer types are rounded and clipped).
    pyramid : bool
        Build the multiscale pyramid of every output after the full-resolution level.
    progress : bool
        Show a progress bar.
    storage_options, output_storage_options : dict, optional
        fsspec options for the input and output stores.
    torch_threads : int, optional
        Threads per worker for torch; default: the worker's thread count.

    Returns
    -------
    RunResult

    Raises
    ------
    InputError, ModelError, ModelMismatchError, OutputError, ConfigError
        Before anything is written, when an argument is unusable.
    BlockError
        After the run, if some blocks failed (the others are written and marked done).
    """
    volume = input if isinstance(input, Volume) else open_volume(input, storage_options=storage_options)
    device = device or _default_device()
    ngff_version = ngff_version or "0.5"
    if ngff_version not in ("0.4", "0.5"):
        raise ConfigError(f"ngff_version must be '0.4' or '0.5', got {ngff_version!r}")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
    output = normalise_url(output)
    if hasattr(model, "predict"):  # a predictor object (e.g. IdentityPredictor): sent with the spec
        predictor, shipped, mhash = model, model, getattr(model, "fingerprint", type(model).__name__)
    else:
        mhash = model_hash(model)
        predictor = load_predictor(str(model), device="cpu")  # client side: metadata and validation
        shipped = None
    layout = AxisLayout.build(volume.axis_names, [a.type for a in volume.axes], predictor.spatial_axes,
                              predictor.n_channel_in, predictor.n_channel_out, volume.shape, volume.url)
    chunks, plan = plan_restoration(volume, predictor, layout, block_shape, device)
    run_key = _run_key(volume, mhash, plan, predictor.outputs, output_dtype, precision)
    state = _output_state(output, output_storage_options, run_key, overwrite)

    if state == "fresh":
        try:
            normalizer = compute_normalizer(volume.to_dask(), _channel_axis(volume), predictor.pmin,
                                            predictor.pmax, client=client, name=volume.url)
        except InputError:
            raise
        except Exception as exc:  # unreadable chunks etc.: nothing is written yet
            raise InputError(f"could not read {volume.url} to compute its percentiles: "
                             f"{type(exc).__name__}: {exc}") from exc
        attrs = {"bigcare": {
            "version": __version__, "run_key": run_key, "input": volume.url,
            "model": mhash if shipped else str(model),
            "model_hash": mhash, "outputs": list(predictor.outputs), "plan": plan.as_dict(),
            "normalization": normalizer.as_dict(), "complete": False,
        }}
        _create_outputs(volume, layout, chunks, predictor, output, output_storage_options,
                        ngff_version, output_dtype, attrs, plan.grid)
    else:
        attrs = dict(zarr.open_group(mode="r", **store_kwargs(output, output_storage_options)).attrs)
        normalizer = Normalizer.from_dict(attrs["bigcare"]["normalization"])

    single = len(predictor.outputs) == 1
    images = {name: (output if single else f"{output.rstrip('/')}/{name}") for name in predictor.outputs}
    spec = RunSpec(
        input_url=volume.url, input_path=volume.levels[0].path, input_options=volume.storage_options,
        layout=layout, model_path=None if shipped else str(model), model_hash=mhash, predictor=shipped, device=device, precision=precision,
        normalizer=normalizer, outputs=tuple((n, u, "0") for n, u in images.items()),
        output_options=output_storage_options, output_dtype=output_dtype, marker_url=output,
        run_key=run_key, torch_threads=torch_threads,
    )
    done = np.asarray(zarr.open_array(path=MARKER, mode="r", **store_kwargs(output, output_storage_options))[...])
    done = done.astype(bool)
    todo = [b for b in plan if not done[b.index]]
    if todo and state == "resume" and attrs["bigcare"].get("complete"):
        attrs["bigcare"]["complete"] = False  # blocks are missing after all: not complete
        update_attrs(output, {"bigcare": attrs["bigcare"]}, storage_options=output_storage_options)

    if client is None:
        from .cluster import cluster_client

        with cluster_client(scheduler, n_workers=workers, device=device, quiet=not progress) as c:
            result = _execute(c, todo, spec, plan, images, progress)
    else:
        result = _execute(client, todo, spec, plan, images, progress)
    result.normalization = normalizer.as_dict()

    if result.failed:
        result.failed.sort()
        raise BlockError(
            f"{len(result.failed)} of {len(todo)} block(s) failed; the others are written and "
            f"marked done, re-run the same command to retry. First failures: "
            + "; ".join(f"block {i} (write region {w}): {e}" for i, w, e in result.failed[:5])
        )
    if pyramid:
        for url in images.values():
            write_pyramid(open_volume(url, storage_options=output_storage_options), client=client)
    summary = {**attrs["bigcare"], "complete": True, "last_run": result.as_dict()}
    update_attrs(output, {"bigcare": summary}, storage_options=output_storage_options)
    return result


def _channel_axis(volume: Volume) -> int | None:
    names = volume.axis_names
    return names.index("c") if "c" in names else None


def _execute(client, todo, spec: RunSpec, plan: BlockPlan, images, progress: bool) -> RunResult:
    from distributed import as_completed
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    resources = {"GPU": 1} if spec.device.startswith("cuda") else None
    futures = client.map(run_block, todo, spec=spec, key=[f"bigcare-block-{spec.run_key[:8]}-{'-'.join(map(str, b.index))}" for b in todo],
                         resources=resources, pure=False, retries=1)
    by_key = {f.key: b for f, b in zip(futures, todo)}
    result = RunResult(outputs=images, blocks_total=len(plan), blocks_skipped=len(plan) - len(todo),
                       blocks_computed=0, halo_overhead=plan.overhead)
    bar = tqdm(total=len(todo), unit="block", desc="restore", disable=not progress)
    for future in as_completed(futures):
        if future.status == "error":
            block = by_key[future.key]
            exc = future.exception()
            result.failed.append((block.index, block.write, f"{type(exc).__name__}: {exc}"))
        else:
            status = future.result()
            result.blocks_computed += 1
            result.voxels += status["voxels"]
            result.peak_worker_rss_mb = max(result.peak_worker_rss_mb, status["peak_rss_mb"])
            for part in ("read", "predict", "write"):
                result.seconds_in[part] += status[f"{part}_s"]
        bar.update(1)
        future.release()
    bar.close()
    result.seconds = time.perf_counter() - t0
    return result


def predict(data: np.ndarray, model, *, axes: str, device: str = "cpu", precision: str = "fp32",
            normalizer: Normalizer | None = None) -> dict[str, np.ndarray]:
    """Restore an in-memory array in one piece (the whole-volume reference for small data).

    Parameters
    ----------
    data : numpy.ndarray
        The image, axes given by ``axes`` (e.g. ``"zyx"`` or ``"czyx"``).
    model : str or os.PathLike
        Model folder.
    axes : str
        Axis names of ``data``.
    device, precision : str
        As in :func:`restore`.
    normalizer : Normalizer, optional
        Percentile statistics; default: computed exactly from ``data``.

    Returns
    -------
    dict of str to numpy.ndarray
        One float32 array per named output.
    """
    import dask.array as da

    axes = axes.lower()
    predictor = load_predictor(str(model), device=device, precision=precision)
    types = ["channel" if a == "c" else "time" if a == "t" else "space" for a in axes]
    layout = AxisLayout.build(axes, types, predictor.spatial_axes, predictor.n_channel_in,
                              predictor.n_channel_out, data.shape, "the array")
    if normalizer is None:
        normalizer = compute_normalizer(da.from_array(data), axes.find("c") if "c" in axes else None,
                                        predictor.pmin, predictor.pmax, name="the array")
    return predict_region(predictor, layout, np.asarray(data), normalizer)
