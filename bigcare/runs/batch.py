"""Batch restoration of whole scans: many volumes, one model, one queue on one cluster.

::

    inputs (paths, globs, @list.txt) ──► expand ──► plan every volume (nothing written yet;
                                                    a bad input stops the batch here)
       ──► start every run (outputs OUTPUT_DIR/<input name>) ──► send the model once
       ──► execute all blocks of all volumes as one queue ──► per volume: summary, pyramid,
           complete ──► OUTPUT_DIR/bigcare_batch_summary.json

Workers build the network once per process (the predictor cache is keyed by the model's
hash), so the model is not reloaded per volume. Re-running the same batch resumes every
volume where it stopped.
"""

from __future__ import annotations

import glob
import os
import time
from typing import TYPE_CHECKING, Any

import fsspec

from bigcare.errors import ConfigError, InputError, OutputError
from bigcare.runs.background import plan_background
from bigcare.runs.models import resolve_model
from bigcare.runs.queue import block_error, execute, shipping
from bigcare.runs.restore import client_for, default_device
from bigcare.runs.results import write_batch_summary
from bigcare.runs.volume import (
    check_apart,
    finish_volume_run,
    fit_to_cluster,
    measure_volume_run,
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
from bigcare.store.urls import is_url, normalize_url, relation, resolved
from bigcare.types import ClusterKind, PathLike, check_device

if TYPE_CHECKING:
    from collections.abc import Sequence

    from distributed import Client, Security

    from bigcare.predictors.base import Predictor
    from bigcare.predictors.shipping import ModelPayload
    from bigcare.runs.results import RunResult

__all__ = ["expand_inputs", "output_paths", "restore_many"]

_GLOB_CHARS = "*?["


def _read_list(item: str, storage_options: dict | None) -> list[str]:
    path = item[1:]
    try:
        with fsspec.open(path, "r", **((storage_options or {}) if is_url(path) else {})) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise InputError(f"input list {path} does not exist; expected a text file with one path per line") from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _glob(pattern: str, storage_options: dict | None) -> list[str]:
    if is_url(pattern):
        fs, _ = fsspec.core.url_to_fs(pattern, **(storage_options or {}))
        protocol = pattern.split("://", 1)[0]
        found = [f"{protocol}://{p}" for p in sorted(fs.glob(pattern))]
    else:
        found = sorted(glob.glob(os.path.expanduser(pattern)))
    if not found:
        raise InputError(f"input pattern {pattern!r} matches nothing")
    return found


def expand_inputs(items, storage_options: dict | None = None) -> list[str]:
    """Paths from plain paths, glob patterns and ``@list.txt`` files (one path or pattern per
    line, ``#`` comments), in order, without duplicates.

    Raises
    ------
    InputError
        If a pattern matches nothing or a list file is missing.
    ConfigError
        If no input is left.
    """
    out: list[str] = []
    for item in items:
        item = os.fspath(item)
        entries = _read_list(item, storage_options) if item.startswith("@") else [item]
        for entry in entries:
            for path in (_glob(entry, storage_options) if any(c in entry for c in _GLOB_CHARS) else [entry]):
                path = normalize_url(path)
                if path not in out:
                    out.append(path)
    if not out:
        raise ConfigError(f"no input volumes in {list(items)!r}")
    return out


def output_paths(inputs: list[str], output_dir) -> list[str]:
    """``OUTPUT_DIR/<input's folder name>`` per input; raises ConfigError on a name clash."""
    output_dir = normalize_url(output_dir)
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in inputs]
    seen: dict[str, str] = {}
    for name, path in zip(names, inputs):
        if name in seen:
            raise ConfigError(f"inputs {seen[name]} and {path} would both be written to "
                              f"{output_dir}/{name}; restore them into separate output folders")
        seen[name] = path
    return [f"{output_dir.rstrip('/')}/{n}" for n in names]


def restore_many(inputs: PathLike | Sequence[PathLike], output_dir: PathLike, model: PathLike | ModelPayload | Predictor, *,
                 client: Client | None = None, scheduler: str | None = None, cluster: ClusterKind = "local",
                 cluster_config: PathLike | None = None, workers: int | None = None, device: str | None = None,
                 progress: bool = True, pyramid: bool = True, ship_model: bool = True, security: Security | None = None,
                 storage_options: dict | None = None, output_storage_options: dict | None = None,
                 dashboard: bool | str = True, **options: Any) -> list[RunResult]:
    """Restore several volumes with one model as one queue of block tasks.

    Parameters
    ----------
    inputs : list of str
        Paths or URLs of OME-Zarr images, glob patterns, or ``@file`` lists of them.
    output_dir : str or os.PathLike
        Folder receiving one output per input, named after the input's folder, and
        ``bigcare_batch_summary.json``.
    model, client, scheduler, cluster, cluster_config, workers, device, progress, pyramid,
    ship_model, security, storage_options, output_storage_options, dashboard
        As in :func:`bigcare.restore` (storage options apply to every input / output).
    **options
        ``block_shape``, ``precision``, ``overwrite``, ``ngff_version``, ``output_dtype``,
        ``torch_threads``, ``nan_fill``, ``skip_background``, ``backend`` as in :func:`bigcare.restore`
        (``backend`` defaults to ``auto`` here too).

    Returns
    -------
    list of RunResult
        One per input, in order.

    Raises
    ------
    InputError, ModelError, ModelMismatchError, OutputError, ConfigError
        Before anything is written, if any input is unusable.
    BlockError
        After the whole batch, if blocks failed (its ``results`` holds every RunResult).
    """
    device = check_device(device or default_device())
    urls = expand_inputs(inputs, storage_options)
    outputs = output_paths(urls, output_dir)
    ref = resolve_model(model, ship_model, options.pop("interval", 0.9))  # an ensemble's interval level
    options.setdefault("ngff_version", "0.5")
    options.setdefault("backend", "auto")
    # no output may be (inside) any input of the batch: locations resolved once, then compared
    resolved_in = [resolved(u) for u in urls]
    for o in outputs:
        ro = resolved(o)
        for u, ru in zip(urls, resolved_in):
            if relation(ro, ru) is not None:
                check_apart(u, o)  # raises, naming both
    runs = [plan_volume_run(u, o, ref, device=device, storage_options=storage_options, pyramid=pyramid,
                            output_storage_options=output_storage_options, **options)
            for u, o in zip(urls, outputs)]
    t0 = time.perf_counter()
    with client_for(client, scheduler, cluster, cluster_config, workers, device, progress, security, dashboard) as c:
        check_device_on_workers(c, device, ref)
        devices, memory = cluster_devices(c, device), worker_memory(c)
        ran = precision_on_workers(c, device, runs[0].precision, ref.predictor) if runs else ""
        backend = backend_on_workers(c, runs[0].backend, device, runs[0].precision, ref.predictor) if runs else ""
        for run in runs:  # every check that reads data, before any output is written
            run.precision_ran, run.backend_ran = ran, backend
            fit_to_cluster(run, devices, *memory)
            measure_volume_run(run, c)
        fs, root = fsspec.core.url_to_fs(normalize_url(output_dir), **(output_storage_options or {}))
        try:
            fs.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot make the output folder {output_dir} ({type(exc).__name__}: {exc})") from None
        for run in runs:
            start_volume_run(run, c)
        with shipping(c, ref.payloads if any(r.n_todo for r in runs) else []):
            background = [plan_background(r, c, r.skip_background) if r.skip_background is not None else {}
                          for r in runs]
            results = execute(c, runs, progress=progress)
        for run, result, info in zip(runs, results, background):
            result.background = info
            finish_volume_run(run, result, c, progress, started=t0)
    write_batch_summary(normalize_url(output_dir), output_storage_options, runs, results, time.perf_counter() - t0)
    if any(r.failed for r in results):
        raise block_error(runs, results)
    return results
