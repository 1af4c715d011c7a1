"""The block runner's public face: restore a volume on a cluster, predict an array in memory.

::

    restore(input, output, model)
      model ─► ModelRef (client-side predictor; the model's bytes are sent to the workers once)
      plan_volume_run   open input ─► check model fits ─► plan blocks ─► fresh/resume/replace/refuse
      (cluster: the given client, an existing scheduler, or one started here by name)
      start_volume_run  percentiles, outputs metadata-first + done markers   (fresh runs)
      plan_background   (--skip-background) chunk maxima: background blocks, their constant fill
      execute           client.map(run_block, blocks not yet done): one task per block,
                        coordinates only; one retry per failed block; progress bar
      finish_volume_run summary JSON ─► pyramid ─► mark complete   (or BlockError)

Everything that can reject the input runs before anything is written. The stages live in
:mod:`bigcare.runs.volume` (one volume), :mod:`bigcare.runs.queue` (the queue of block tasks) and
:mod:`bigcare.runs.results`; :mod:`bigcare.runs.batch` runs many volumes as one queue.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import numpy as np

from bigcare.blocks.layout import AxisLayout
from bigcare.blocks.zoom import volume_zoom, zoom_region
from bigcare.errors import ConfigError
from bigcare.normalization import Normalizer, array_normalizer
from bigcare.predictors.base import load_predictor, predict_region
from bigcare.runs.background import plan_background
from bigcare.runs.models import resolve_model
from bigcare.runs.outputs import output_geometry
from bigcare.runs.queue import block_error, execute, shipping
from bigcare.runs.results import RunResult
from bigcare.runs.tiff import check_tiff_output, is_tiff, stage_tiff_input, staged_paths, write_tiff
from bigcare.runs.volume import (
    finish_volume_run,
    fit_to_cluster,
    plan_volume_run,
    start_volume_run,
)
from bigcare.runs.workers import (
    backend_on_workers,
    check_device_on_workers,
    cluster_devices,
    precision_on_workers,
    worker_memory,
)
from bigcare.store.axes import default_axis_type
from bigcare.types import (
    PRECISIONS,
    ClusterKind,
    DeviceKind,
    NgffVersion,
    PathLike,
    Precision,
    Shape,
    check_choice,
    check_device,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from distributed import Client, Security

    from bigcare.predictors.base import Predictor
    from bigcare.predictors.shipping import ModelPayload
    from bigcare.store.volume import Volume

__all__ = ["restore", "predict", "client_for", "default_device"]


def default_device() -> DeviceKind:
    """``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def client_for(client: Client | None, scheduler: str | None, cluster: ClusterKind, cluster_config: PathLike | None,
               workers: int | None, device: str, progress: bool, security: Security | None,
               dashboard: bool | str = True, processes: bool = True) -> Iterator[Client]:
    """The given client, or one to ``scheduler``, or to a cluster started (and closed) here
    (``processes=False``: a local one whose worker runs in this process)."""
    if client is not None:
        yield client
        return
    from bigcare.tasks.cluster import cluster_client

    with cluster_client(scheduler, cluster=cluster, config=cluster_config, workers=workers, device=device,
                        quiet=not progress, security=security, dashboard=dashboard, processes=processes) as c:
        yield c


def restore(
    input: PathLike | Volume,
    output: PathLike,
    model: PathLike | ModelPayload | Predictor,
    *,
    client: Client | None = None,
    scheduler: str | None = None,
    cluster: ClusterKind = "local",
    cluster_config: PathLike | None = None,
    block_shape: Shape | None = None,
    tile_shape: Shape | None = None,
    device: str | None = None,
    precision: Precision = "auto",
    backend: str = "auto",
    workers: int | None = None,
    overwrite: bool = False,
    ngff_version: NgffVersion | None = None,
    output_dtype: str = "float32",
    pyramid: bool = True,
    progress: bool = True,
    storage_options: dict | None = None,
    output_storage_options: dict | None = None,
    torch_threads: int | None = None,
    ship_model: bool = True,
    security: Security | None = None,
    dashboard: bool | str = True,
    nan_fill: float | None = None,
    preview: PathLike | None = None,
    interval: float = 0.9,
    skip_background: float | None = None,
) -> RunResult:
    """Restore an OME-Zarr volume block by block with a model, on a dask cluster.

    Parameters
    ----------
    input : str, os.PathLike or Volume
        OME-Zarr image (NGFF 0.4 or 0.5): a path or an fsspec URL (``s3://bucket/a.ome.zarr``);
        or a local TIFF / OME-TIFF file, converted first (streamed) into ``<output
        stem>.input.ome.zarr`` beside the output and reused by reruns (:mod:`bigcare.runs.tiff`).
    output : str or os.PathLike
        Where to write. A model with one output writes one OME-Zarr image there; a model with
        several named outputs (e.g. ``mean`` and ``scale``) writes a group holding one image per
        name, as the series ``output/0``, ``output/1``, ... of a bioformats2raw-layout root that
        names them (``RunResult.outputs`` maps each name to its image). ``output/bigcare_summary.json`` holds the run
        summary. A path ending in ``.tif`` / ``.tiff`` restores into ``<stem>.ome.zarr`` and then
        writes that as an OME-TIFF (refused before the run beyond ``TIFF_OUTPUT_LIMIT``, 8 GiB).
    model : str, os.PathLike, list of them, ModelPayload or Predictor
        Model folder (config.json + model.safetensors); an ensemble of probabilistic models (an
        ensemble folder, or a list of model folders: outputs ``mean``, ``lower``, ``upper`` and
        ``disagreement``, see :mod:`bigcare.predictors.ensemble`); a
        :class:`~bigcare.predictors.shipping.ModelPayload`, or a picklable predictor object such as
        :class:`bigcare.predictors.identity.IdentityPredictor` (sent to workers with the run).
    client : distributed.Client, optional
        Cluster to run on. Without one, ``scheduler`` is connected to, or a cluster of kind
        ``cluster`` is started and closed afterwards.
    scheduler : str, optional
        Address of an existing scheduler (``tcp://host:8786``, ``tls://...``).
    cluster : {"local", "local-cuda", "slurm", "kubernetes"}
        Kind of cluster to start when neither ``client`` nor ``scheduler`` is given. A local
        run of one block (and no ``workers``) runs its worker in this process: no worker
        process to start or model to ship (:func:`~bigcare.tasks.cluster.in_process_run`).
    cluster_config : str or os.PathLike, optional
        Config file of the slurm / kubernetes cluster (see ``cluster/``).
    block_shape : tuple of int, optional
        Write-region shape per spatial axis (e.g. ``(64, 256, 256)``); default: a whole number
        of output chunks chosen from the model's halo, the device and the cluster's size (see
        :func:`~bigcare.blocks.sizing.plan_restoration`).
    tile_shape : tuple of int, optional
        Largest write region of one network call, per spatial axis; a block larger than it is
        predicted in several calls (tiles) inside its task. Default: chosen with the blocks.
    device : str, optional
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; default CUDA when available. GPU tasks request
        one ``GPU`` worker resource each.
    precision : {"auto", "fp32", "bf16", "fp16"}
        Inference precision (autocast for bf16 / fp16). ``auto`` (default): bf16 on workers whose
        device computes it natively (GPUs, CPUs with AVX512_BF16 or AMX), fp32 elsewhere, decided
        on each worker; ``RunResult.precision`` says what ran. Give fp32 for bit-for-bit
        reproducible results (and blockwise results equal to whole-volume ones to 1e-5; in bf16
        they agree to bf16's rounding, about 1e-2 relative).
    backend : {"auto", "torch", "openvino"}
        What runs the network. ``auto`` (default): OpenVINO on CPU workers where it is installed
        (``bigcare[openvino]``) and can run the model (a CARE or isotropic U-Net of the packaged
        architecture, fp32 or bf16): 1.35-1.7x torch in fp32 on the project's CPU, equal to it within
        1e-7 relative; torch elsewhere (GPUs, ensembles, other models). ``RunResult.backend`` says
        what ran; ``openvino`` where it cannot run is an error before anything is written.
    workers : int, optional
        Worker processes of a local cluster started here.
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
        Show a progress bar and print the cluster's dashboard address.
    storage_options, output_storage_options : dict, optional
        fsspec options for the input and output stores (they travel to the workers). Without
        them, S3 endpoint and credentials come from the standard ``AWS_*`` variables.
    torch_threads : int, optional
        Threads per worker for torch; default: the worker's thread count.
    ship_model : bool
        Send a model folder's bytes (config JSON + safetensors, checked by hash) to every
        worker once, so workers need no access to the client's files (default). False: the
        workers load the model from ``model``'s path, which must be on shared storage.
    security : distributed.Security, optional
        TLS settings for a ``tls://`` scheduler.
    dashboard : bool or str
        Dashboard of a cluster started here: on 127.0.0.1 (True), none (False), or at this
        ``host:port`` (warned unless loopback: the dask dashboard has no authentication). A run
        of one block whose worker runs in this process serves it only at a given address.
    nan_fill : float, optional
        Read NaN/inf input voxels as this value (recorded in the output's ``bigcare.nan_fill``).
        By default an input holding them is refused (or its blocks that hold them fail by name).
    interval : float
        An ensemble's central interval level: its ``lower`` and ``upper`` outputs hold this much of
        the mixture's mass between them (default 0.9).
    skip_background : float, optional
        Off by default. Blocks whose whole read region has no voxel above this input intensity
        are written without running the network, with the model's prediction of a constant
        background input (the mean of the background chunks per channel, predicted once per run);
        decided from the maxima of the input's chunks, read once before the blocks (exact, never
        from a mean-downsampled level). The summary gives the fraction skipped
        (:mod:`bigcare.runs.background`).
    preview : str or os.PathLike, optional
        Write a PNG of XY and XZ slices of the input and every output through the input's busiest
        region, at full resolution, one display window for intensities (:mod:`bigcare.runs.preview`).

    Returns
    -------
    RunResult

    Raises
    ------
    InputError, ModelError, ModelMismatchError, OutputError, ConfigError
        Before anything is written, when an argument is unusable.
    BlockError
        After the run, if some blocks failed (the others are written and marked done); its
        ``results`` attribute holds the RunResult.
    """
    started = time.perf_counter()
    device = check_device(device or default_device())
    ref = resolve_model(model, ship_model, interval)
    tiff_out = str(output) if is_tiff(output) else None
    if tiff_out is not None or (not hasattr(input, "levels") and is_tiff(input)):
        input, output = _stage_tiffs(input, output, overwrite, progress)
    run = plan_volume_run(input, output, ref, block_shape=block_shape, tile_shape=tile_shape, device=device,
                          precision=precision,
                          overwrite=overwrite, ngff_version=ngff_version or "0.5", output_dtype=output_dtype,
                          storage_options=storage_options, output_storage_options=output_storage_options,
                          torch_threads=torch_threads, pyramid=pyramid, nan_fill=nan_fill,
                          skip_background=skip_background, backend=backend)
    if tiff_out is not None:
        check_tiff_output(output_geometry(run).shape, output_dtype, len(run.images))
    if preview is not None and run.layout.drop:  # its XY/XZ panels compare grids of the same axes
        raise ConfigError(f"--preview draws the input's and the output's slices side by side, but this model's output "
                          f"lacks the input's {run.layout.drop.upper()} axis (a projection); restore without --preview; "
                          "nothing was written")
    from bigcare.tasks.cluster import in_process_run

    processes = not in_process_run(len(run.plan), cluster, workers)
    with client_for(client, scheduler, cluster, cluster_config, workers, device, progress, security, dashboard,
                    processes) as c:
        check_device_on_workers(c, device, ref)
        run.precision_ran = precision_on_workers(c, device, run.precision, ref.predictor)
        run.backend_ran = backend_on_workers(c, run.backend, device, run.precision, ref.predictor)
        fit_to_cluster(run, cluster_devices(c, device), *worker_memory(c))
        start_volume_run(run, c)
        with shipping(c, ref.payloads if run.n_todo else []):
            background = plan_background(run, c, run.skip_background) if run.skip_background is not None else {}
            (result,) = execute(c, [run], progress=progress)
        result.background = background
        finish_volume_run(run, result, c, progress, started=started)
    if result.failed:
        raise block_error([run], [result])
    if tiff_out is not None:
        result.tiff = _export_tiffs(run.images, tiff_out)
    if preview is not None:
        from bigcare.runs.preview import write_preview

        result.preview = str(write_preview(run.volume.url, run.images, preview, storage_options=run.volume.storage_options,
                                           kinds=getattr(run.model.predictor, "kinds", None)))
    if tiff_out is not None or preview is not None:  # their time too, into the summary written before
        _rewrite_wall_time(run, result, started)
    return result


def _rewrite_wall_time(run, result, started: float) -> None:
    """The whole call's time (cluster, pyramid, TIFF included) into the result and its summary."""
    from bigcare.runs.results import write_summary

    result.wall_seconds = time.perf_counter() - started
    if result.summary_path:
        with contextlib.suppress(OSError):  # the summary already written holds the blocks' figures
            write_summary(run, result)


def _stage_tiffs(input, output, overwrite: bool, progress: bool):
    """The OME-Zarr input and output a TIFF input / output stand for (the input converted,
    streamed); an opened Volume stays as it is."""
    import os

    from bigcare.errors import OutputError

    opened = hasattr(input, "levels")
    zin, zout = staged_paths(input.url if opened else str(input), str(output))
    if is_tiff(output) and os.path.exists(output) and not overwrite:
        raise OutputError(f"{output} exists; pass overwrite=True (--overwrite) to replace that TIFF, or choose another path")
    if opened:
        return input, zout
    if is_tiff(input):
        zin = stage_tiff_input(str(input), zin, progress=progress)
    return zin, zout


def _export_tiffs(images: dict[str, str], tiff_out: str) -> dict[str, str]:
    """Write each restored image as a TIFF: ``tiff_out`` itself, or ``<stem>_<name>.tif`` for several."""
    if len(images) == 1:
        return {name: write_tiff(url, tiff_out) for name, url in images.items()}
    stem, suffix = tiff_out.rsplit(".", 1)
    return {name: write_tiff(url, f"{stem}_{name}.{suffix}") for name, url in images.items()}


def predict(data: np.ndarray, model: PathLike | list[PathLike], *, axes: str, device: str = "cpu",
            precision: Precision = "auto", normalizer: Normalizer | None = None,
            interval: float = 0.9, backend: str = "auto") -> dict[str, np.ndarray]:
    """Restore an in-memory array in one piece (the whole-volume reference for small data).

    Parameters
    ----------
    data : numpy.ndarray
        The image, axes given by ``axes`` (e.g. ``"zyx"`` or ``"czyx"``).
    model : str, os.PathLike or list of them
        Model folder, or an ensemble (folder or list of model folders) as in :func:`restore`.
    axes : str
        Axis names of ``data``.
    device, precision, interval, backend
        As in :func:`restore` (an ensemble runs in torch).
    normalizer : Normalizer, optional
        Percentile statistics; default: computed exactly from ``data``.

    Returns
    -------
    dict of str to numpy.ndarray
        One float32 array per named output; for an isotropic model on the Z-upsampled grid.
    """
    axes = axes.lower()
    check_choice("precision", precision, PRECISIONS)
    from bigcare.predictors.ensemble import ensemble_paths, resolve_ensemble

    predictor: Predictor
    if len(ensemble_paths(model) or ()) > 1:
        predictor = resolve_ensemble(model, ship_model=False, interval=interval).spec.predictor(check_device(device),
                                                                                               precision)
    else:
        from bigcare.exchange.zoo import is_zoo_package
        from bigcare.models.folder import model_hash

        one = model[0] if isinstance(model, (list, tuple)) else model
        # keyed by the hash: a model folder changed in place (e.g. recalibrated) is built anew
        mhash = None if is_zoo_package(one) else model_hash(one)
        predictor = load_predictor(str(one), device=check_device(device), precision=precision, expected_hash=mhash,
                                   backend=backend)
    types = [default_axis_type(a) or "space" for a in axes]
    layout = AxisLayout.build(axes, types, predictor.spatial_axes, predictor.n_channel_in,
                              predictor.n_channel_out, data.shape, "the array", drop=getattr(predictor, "drop_axes", ""))
    if normalizer is None:
        normalizer = array_normalizer(data, axes.find("c") if "c" in axes else None,
                                      predictor.pmin, predictor.pmax, name="the array")
    region = zoom_region(np.asarray(data), volume_zoom(predictor, layout))
    return predict_region(predictor, layout, region, normalizer)
