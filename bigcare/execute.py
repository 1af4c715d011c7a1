"""Running block tasks: one queue for one volume or many, retries, progress, run statistics.

::

    runs ──► client.map(run_block) per run ──► as_completed(all runs' futures)
                                                 ├─ ok      -> statistics of its run, release
                                                 ├─ error   -> resubmit once (a retry), then
                                                 │             record the block as failed
                                                 └─ every 32 results: ask the scheduler how many
                                                    of them were rescheduled because their worker
                                                    died, then release them

Tasks of every run share one queue, so a batch of volumes keeps the cluster busy across volume
boundaries, and the model (sent once by :func:`shipping`) is built once per worker process.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from .tasks import run_block

__all__ = ["RunResult", "execute", "shipping", "cluster_info"]

#: a block that raised is resubmitted this many times before it counts as failed
MAX_RETRIES = 1


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
        Scheduler address, workers, threads and dashboard link of the cluster used.
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

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        """JSON-friendly copy (tuples become lists)."""
        d = dict(self.__dict__)
        d["failed"] = [{"block": list(i), "write_region": [list(r) for r in w], "error": e} for i, w, e in self.failed]
        d["voxels_per_second"] = self.voxels_per_second
        return d


def cluster_info(client) -> dict:
    """Scheduler address, worker count, threads and dashboard link of a client's cluster."""
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:  # older distributed
        info = client.scheduler_info()
    workers = info.get("workers", {})
    return {"scheduler": info.get("address", ""), "workers": len(workers),
            "threads": sum(w.get("nthreads", 0) for w in workers.values()),
            "dashboard": getattr(client, "dashboard_link", None)}


@contextlib.contextmanager
def shipping(client, payloads):
    """Send model payloads to every worker (also later ones) for the duration of a run."""
    from .restore.payload import ModelPlugin

    plugins = {p.hash: ModelPlugin(p) for p in payloads if p is not None}
    for plugin in plugins.values():
        client.register_plugin(plugin)
    try:
        yield
    finally:
        for plugin in plugins.values():
            with contextlib.suppress(Exception):
                client.unregister_worker_plugin(plugin.name)


def _rescheduled_count(client, keys: list) -> int:
    def count(dask_scheduler, keys):  # defined here: sent by value, the scheduler needs no bigcare
        tasks = dask_scheduler.tasks
        return sum(tasks[k].suspicious for k in keys if k in tasks)

    try:
        return int(client.run_on_scheduler(count, keys=keys))
    except Exception:  # a scheduler that refuses run_on_scheduler: the count is unknown
        return 0


def execute(client, runs, *, progress: bool = True) -> list:
    """Run the blocks still to do of started runs on one queue; one RunResult per run.

    Parameters
    ----------
    client : distributed.Client
    runs : list of bigcare.runs.VolumeRun
        Started runs (``spec`` and ``todo`` set).
    progress : bool
        Show a progress bar over all runs' blocks (blocks done / total, rate, ETA).

    Returns
    -------
    list of RunResult
    """
    from distributed import as_completed
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    info = cluster_info(client)
    results, meta, futures = [], {}, []
    for i, run in enumerate(runs):
        results.append(RunResult(outputs=run.images, blocks_total=len(run.plan),
                                 blocks_skipped=len(run.plan) - len(run.todo), blocks_computed=0,
                                 halo_overhead=run.plan.overhead, input=run.volume.url, cluster=info))
        if not run.todo:
            continue
        keys = [f"bigcare-block-{run.run_key[:8]}-{'-'.join(map(str, b.index))}" for b in run.todo]
        fs = client.map(run_block, run.todo, spec=run.spec, key=keys, resources=_resources(run), pure=False)
        for f, block in zip(fs, run.todo):
            meta[f.key] = (i, block, 0)
        futures += fs
    left = [len(r.todo) for r in runs]
    total = sum(left)
    bar = tqdm(total=total, unit="block", desc="restore" if len(runs) == 1 else f"restore {len(runs)} volumes",
               disable=not progress)
    finished, queue = [], as_completed(futures)
    del futures
    for future in queue:
        i, block, attempt = meta.pop(future.key)
        result, run = results[i], runs[i]
        if future.status != "finished":
            try:
                exc = future.exception()
            except BaseException as err:  # cancelled (e.g. the scheduler restarted)
                exc = err
            if attempt < MAX_RETRIES:
                retry = client.submit(run_block, block, spec=run.spec, key=f"{future.key}-retry{attempt + 1}",
                                      resources=_resources(run), pure=False)
                meta[retry.key] = (i, block, attempt + 1)
                queue.add(retry)
                result.retries += 1
                future.release()
                continue
            result.failed.append((block.index, block.write, f"{type(exc).__name__}: {exc}"))
            future.release()
        else:
            status = future.result()
            result.blocks_computed += 1
            result.voxels += status["voxels"]
            result.peak_worker_rss_mb = max(result.peak_worker_rss_mb, status["peak_rss_mb"])
            for part in ("read", "predict", "write"):
                result.seconds_in[part] += status[f"{part}_s"]
            finished.append((i, future))
        left[i] -= 1
        if left[i] == 0:
            result.seconds = time.perf_counter() - t0
        bar.update(1)
        if len(finished) >= 32 or not meta:
            _account(client, finished, results)
    _account(client, finished, results)
    bar.close()
    return results


def _resources(run) -> dict | None:
    return {"GPU": 1} if str(run.device).startswith("cuda") else None


def _account(client, finished: list, results: list) -> None:
    """Add rescheduled counts of finished futures to their runs, then release them."""
    if not finished:
        return
    by_run: dict[int, list] = {}
    for i, f in finished:
        by_run.setdefault(i, []).append(f.key)
    for i, keys in by_run.items():
        results[i].rescheduled += _rescheduled_count(client, keys)
    for _, f in finished:
        f.release()
    finished.clear()
