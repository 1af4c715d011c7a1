"""What a restoration run did: :class:`RunResult`, a short text for people, a JSON file for machines.

Every run writes ``OUTPUT/bigcare_summary.json`` inside the output group (zarr readers ignore
files they do not know), local or on object storage, also when blocks failed. The same
numbers are kept in the output's ``bigcare.last_run`` attribute once the run is complete. A
batch also writes ``OUTPUT_DIR/bigcare_batch_summary.json`` with one entry per volume.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field

import fsspec

from bigcare.predictors.ensemble import reliability_summary
from bigcare.version import __version__

__all__ = ["RunResult", "cluster_info", "SUMMARY_NAME", "FAILURE_LOG_NAME", "BATCH_SUMMARY_NAME", "summary_dict",
           "format_summary", "write_summary", "write_failure_log", "write_batch_summary"]

SUMMARY_NAME = "bigcare_summary.json"
BATCH_SUMMARY_NAME = "bigcare_batch_summary.json"


@dataclass
class RunResult:
    """What a restoration run did (also written to ``OUTPUT/bigcare_summary.json``).

    Attributes
    ----------
    outputs : dict of str to str
        Output image URL per named output.
    blocks_total, blocks_skipped, blocks_computed : int
        Blocks in the plan, already done before this run, computed by this run.
    failed : list of (index, write region, message)
        Blocks that failed twice (after one retry).
    voxels : int
        Output voxels written by this run (per named output).
    seconds : float
        From the first submitted block to this run's last finished block.
    halo_overhead : float
        Voxels predicted per voxel written over the whole plan (the recomputed halo).
    normalization : dict
        The percentile statistics used.
    peak_worker_rss_mb : float
        Largest peak resident memory reported by a worker process.
    seconds_in : dict
        Task seconds spent reading, predicting and writing, summed over blocks.
    retries : int
        Blocks resubmitted after they raised.
    rescheduled : int
        Blocks that were running on a worker that died and ran again elsewhere.
    input, summary_path : str
        The input volume, and where the JSON summary was written.
    cluster : dict
        Kind (local, local-cuda, slurm, kubernetes, or scheduler for an existing one),
        scheduler address, workers and threads at the start, dashboard link, ``in_process``
        (its worker ran in the calling process, as a run of one block does), and ``size``:
        workers at the start, the most at once (peak) and at the end of the blocks, with every
        change as [seconds, workers] (:mod:`bigcare.tasks.cluster_size`).
    tiff : dict of str to str
        TIFF file per named output, for an output path ending in .tif / .tiff (the OME-Zarr
        images in ``outputs`` are what was restored).
    wall_seconds : float
        The whole call, from its start (cluster start, percentile pass, pyramid included).
    tracebacks : list of (index, str)
        The full (worker) traceback of each failed block; written to ``failure_log``.
    failure_log : str
        ``OUTPUT/bigcare_failures.log`` when blocks failed, else "".
    preview : str
        The before/after PNG, when one was asked for.
    precision : str
        The inference precision that ran (``fp32``, ``bf16``, ``fp16``, or ``auto: bf16`` with
        what the workers resolved ``auto`` to).
    backend : str
        What ran the network: ``torch`` or ``openvino`` (``auto`` resolved on the workers).
    blocks_background, background : int, dict
        With ``skip_background``: blocks written with the model's prediction of a constant
        background instead of the network, and the threshold, fraction of the plan, constant input
        and fill values (:mod:`bigcare.runs.background`).
    """

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
    retries: int = 0
    rescheduled: int = 0
    input: str = ""
    summary_path: str = ""
    cluster: dict = field(default_factory=dict)
    tiff: dict = field(default_factory=dict)
    wall_seconds: float = 0.0
    tracebacks: list = field(default_factory=list)
    failure_log: str = ""
    preview: str = ""
    precision: str = ""
    backend: str = ""  # what ran the network (torch, openvino; see bigcare.exchange.openvino)
    reliability: dict = field(default_factory=dict)  # sums of block_reliability over this run's blocks
    blocks_background: int = 0  # of blocks_computed: filled with the constant prediction (--skip-background)
    background: dict = field(default_factory=dict)  # threshold, blocks, fraction, fill (bigcare.runs.background)

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        """JSON-friendly copy (tuples become lists)."""
        d = dict(self.__dict__)
        d["failed"] = [{"block": list(i), "write_region": [list(r) for r in w], "error": e} for i, w, e in self.failed]
        d["voxels_per_second"] = self.voxels_per_second
        d["tracebacks"] = [[list(i), t] for i, t in self.tracebacks]
        return d


def cluster_info(client) -> dict:
    """Kind, scheduler address, worker count, threads and dashboard link of a client's cluster."""
    from bigcare.tasks.cluster_size import cluster_kind

    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:  # older distributed
        info = client.scheduler_info()
    workers = info.get("workers", {})
    return {"kind": cluster_kind(client), "scheduler": info.get("address", ""), "workers": len(workers),
            "threads": sum(w.get("nthreads", 0) for w in workers.values()),
            "dashboard": getattr(client, "dashboard_link", None),
            "in_process": getattr(getattr(client, "cluster", None), "processes", True) is False}


def summary_dict(result, *, model: str = "", model_hash: str = "", output: str = "") -> dict:
    """The JSON summary of one run.

    Keys: ``bigcare_version``, ``finished_at`` (UTC, ISO 8601), ``input``, ``output``,
    ``outputs``, ``model``, ``model_hash``, ``complete``, ``blocks`` (total, skipped,
    computed, failed), ``failed_blocks`` (block index, write region, error), ``voxels``,
    ``failure_log``, ``seconds`` (the blocks), ``wall_seconds`` (the whole call),
    ``voxels_per_second``, ``retries``, ``rescheduled``, ``halo_overhead``,
    ``peak_worker_rss_mb``, ``seconds_in`` (read, predict, write: task seconds summed over
    blocks), ``cluster`` (kind, scheduler, workers, threads, dashboard, size: start, peak,
    end, changes), ``normalization``, ``precision`` (what ran); for probabilistic models and
    ensembles ``reliability`` (mean interval width, mean D, fraction of voxels with D above 0.1,
    0.25, 0.5, over the blocks this run computed: :func:`~bigcare.predictors.ensemble.reliability_summary`).
    """
    d = result.as_dict()
    return {
        "bigcare_version": __version__,
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "input": result.input, "output": output, "outputs": d["outputs"], "model": model,
        "model_hash": model_hash, "complete": not result.failed,
        "blocks": {"total": result.blocks_total, "skipped": result.blocks_skipped,
                   "computed": result.blocks_computed, "failed": len(result.failed)},
        "failed_blocks": d["failed"],
        "failure_log": result.failure_log, "voxels": result.voxels, "seconds": round(result.seconds, 3),
        "wall_seconds": round(result.wall_seconds, 3),
        "voxels_per_second": round(result.voxels_per_second, 1),
        "retries": result.retries, "rescheduled": result.rescheduled,
        "halo_overhead": round(result.halo_overhead, 4),
        "peak_worker_rss_mb": round(result.peak_worker_rss_mb, 1),
        "seconds_in": {k: round(v, 3) for k, v in result.seconds_in.items()},
        "cluster": d["cluster"], "normalization": d["normalization"], "precision": result.precision,
        "backend": result.backend,
        **({"reliability": reliability_summary(result.reliability)} if result.reliability else {}),
        **({"background": {**result.background, "blocks_filled": result.blocks_background}}
           if result.background else {}),
    }


def format_summary(result, name: str = "") -> str:
    """A few lines for the terminal: blocks, voxels, time, rate, retries, failures, where to."""
    s = result.seconds_in
    lines = [
        f"{name + ': ' if name else ''}restored {result.blocks_computed} block(s) "
        f"({result.blocks_skipped} already done, {len(result.failed)} failed) of {result.blocks_total} "
        f"in {result.seconds:.1f} s (the whole command: {result.wall_seconds:.1f} s): {result.voxels / 1e6:.2f} Mvoxel, "
        f"{result.voxels_per_second / 1e6:.2f} Mvoxel/s",
        f"  retries {result.retries}, rescheduled after a worker died {result.rescheduled}, "
        f"halo overhead {result.halo_overhead:.2f}x, peak worker RSS {result.peak_worker_rss_mb:.0f} MB",
        f"  task seconds: read {s['read']:.1f}, predict {s['predict']:.1f}, write {s['write']:.1f}"
        + (f"; precision {result.precision}" if result.precision else "")
        + (f", backend {result.backend}" if result.backend else ""),
    ]
    size = result.cluster.get("size")
    if size:
        lines.append(f"  cluster: {result.cluster.get('kind', '?')}, workers {size['start']} at the start, "
                     f"{size['peak']} at most, {size['end']} at the end")
    if result.background:
        lines.append(f"  background (no voxel above {result.background['threshold']:g}): "
                     f"{result.blocks_background} block(s) filled without the network, "
                     f"{result.background['fraction']:.1%} of the plan skipped")
    rel = reliability_summary(result.reliability) if result.reliability else {}
    if rel:
        above = rel.get("fraction_disagreement_above", {})
        lines.append(f"  reliability: mean {rel['interval']:.0%} interval width {rel['mean_interval_width']:.4g}"
                     + (f", mean D {rel['mean_disagreement']:.3f}, D > 0.5 in {above['0.5']:.2%} of voxels" if above else ""))
    for name, path in result.tiff.items():
        lines.append(f"  TIFF{' ' + name if len(result.tiff) > 1 else ''}: {path}")
    if result.summary_path:
        lines.append(f"  summary: {result.summary_path}")
    if result.preview:
        lines.append(f"  preview: {result.preview}")
    if result.failure_log:
        lines.append(f"  tracebacks of the failed blocks: {result.failure_log}")
    return "\n".join(lines)


def _write_json(url: str, options: dict | None, data: dict) -> str:
    with fsspec.open(url, "w", **(options or {})) as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    return url


FAILURE_LOG_NAME = "bigcare_failures.log"


def write_failure_log(run, result) -> str:
    """Write the full traceback of every failed block next to the summary; return its URL."""
    url = f"{run.output.rstrip('/')}/{FAILURE_LOG_NAME}"
    with fsspec.open(url, "w", **(run.output_options or {})) as f:
        for index, text in sorted(result.tracebacks):
            f.write(f"=== block {tuple(index)} ===\n{text.rstrip()}\n\n")
    return url


def write_summary(run, result) -> str:
    """Write ``bigcare_summary.json`` into a run's output group; return its URL."""
    data = summary_dict(result, model=run.model.label, model_hash=run.model.hash, output=run.output)
    return _write_json(f"{run.output.rstrip('/')}/{SUMMARY_NAME}", run.output_options, data)


def write_batch_summary(output_dir: str, options: dict | None, runs, results, seconds: float) -> str:
    """Write ``bigcare_batch_summary.json`` (totals and one summary per volume); return its URL."""
    volumes = [summary_dict(r, model=run.model.label, model_hash=run.model.hash, output=run.output)
               for run, r in zip(runs, results)]
    voxels = sum(r.voxels for r in results)
    data = {
        "bigcare_version": __version__, "volumes": len(volumes), "seconds": round(seconds, 3),
        "voxels": voxels, "voxels_per_second": round(voxels / seconds, 1) if seconds > 0 else 0.0,
        "blocks_computed": sum(r.blocks_computed for r in results),
        "blocks_failed": sum(len(r.failed) for r in results),
        "retries": sum(r.retries for r in results), "rescheduled": sum(r.rescheduled for r in results),
        "complete": all(not r.failed for r in results), "per_volume": volumes,
    }
    return _write_json(f"{output_dir.rstrip('/')}/{BATCH_SUMMARY_NAME}", options, data)
