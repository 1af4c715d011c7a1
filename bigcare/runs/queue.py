"""The restore queue: every block of one volume or many on one cluster, through the task runner.

::

    runs ──► run_tasks(run_block, (block, spec) of every run, all at once, unordered,
                       one retry, GPU resources, rescheduled counts)
               ├─ ok      -> statistics of its run
               └─ failed  -> the block recorded as failed (with its error)

Tasks of every run share one queue, so a batch of volumes keeps the cluster busy across volume
boundaries, and the model (sent once by :func:`shipping`) is built once per worker process.
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback

from tqdm.auto import tqdm

from bigcare.errors import BlockError
from bigcare.predictors.ensemble import merge_reliability
from bigcare.runs.results import RunResult, cluster_info
from bigcare.tasks.block import run_block
from bigcare.tasks.cluster_size import ClusterSize
from bigcare.tasks.runner import run_tasks

__all__ = ["execute", "shipping", "block_error", "MAX_RETRIES", "QUEUE_WINDOW"]

#: a block that raised is resubmitted this many times before it counts as failed
MAX_RETRIES = 1
#: block tasks submitted ahead of the results taken (a run with fewer blocks submits all at once)
QUEUE_WINDOW = 2_000


@contextlib.contextmanager
def shipping(client, payloads):
    """Send model payloads to every worker (also later ones) for the duration of a run."""
    from bigcare.predictors.shipping import ModelPlugin

    plugins = {p.hash: ModelPlugin(p) for p in payloads if p is not None}
    for plugin in plugins.values():
        client.register_plugin(plugin)
    try:
        yield
    finally:
        for plugin in plugins.values():
            with contextlib.suppress(Exception):
                client.unregister_worker_plugin(plugin.name)


def execute(client, runs, *, progress: bool = True) -> list[RunResult]:
    """Run the blocks still to do of started runs on one queue; one RunResult per run.

    Parameters
    ----------
    client : distributed.Client
    runs : list of bigcare.runs.volume.VolumeRun
        Started runs (``spec`` and ``done`` set).
    progress : bool
        Show a progress bar over all runs' blocks (blocks done / total, rate, ETA).

    Returns
    -------
    list of RunResult
    """
    t0 = time.perf_counter()
    info = cluster_info(client)
    size = ClusterSize(client)
    results, index = [], {}  # id of a run's spec -> its position (items come back as submitted)
    for i, run in enumerate(runs):
        results.append(RunResult(outputs=run.images, blocks_total=len(run.plan),
                                 blocks_skipped=len(run.plan) - run.n_todo, blocks_computed=0,
                                 halo_overhead=run.plan.overhead, input=run.volume.url, cluster=info,
                                 precision=run.precision_ran or run.precision,
                                 backend=run.backend_ran or run.backend))
        index[id(run.spec)] = i
        if run.fill_spec is not None:  # background blocks (bigcare.runs.background) carry their own spec
            index[id(run.fill_spec)] = i
    items = ((block, run.spec_for(block)) for run in runs for block in run.pending())  # made as the window moves
    left = [r.n_todo for r in runs]
    total = sum(left)

    def key(item) -> str:
        block, spec = item
        return f"bigcare-block-{runs[index[id(spec)]].run_key[:8]}-{'-'.join(map(str, block.index))}"

    def resources(item) -> dict | None:
        return {"GPU": 1} if str(item[1].device).startswith("cuda") else None

    desc = "restore" if len(runs) == 1 else f"restore {len(runs)} volumes"
    # up to QUEUE_WINDOW block tasks are on the scheduler at once (all of them, for runs of up
    # to 2,000 blocks): a million-block volume is not a million tasks in the scheduler's memory, and
    # an interrupted run cancels a window (SIGTERM to exit: 7.5 s for the 4096x32768x32768 run on 2 cores; with 20,000, 25 s)
    with size:  # the cluster's workers over the run (adaptive clusters grow and shrink)
        for out in run_tasks(run_block, items, client=client, in_flight=QUEUE_WINDOW, ordered=False,
                             retries=MAX_RETRIES, key=key, resources=resources, outcomes=True,
                             count_rescheduled=True, progress=progress, desc=desc, unit="block", total=total):
            block, spec = out.item
            i = index[id(spec)]
            result = results[i]
            result.retries += out.attempts - 1
            if out.ok:
                result.rescheduled += out.rescheduled  # counted for blocks that finished
                status = out.result
                result.blocks_computed += 1
                result.blocks_background += bool(status.get("background"))
                result.voxels += status["voxels"]
                result.peak_worker_rss_mb = max(result.peak_worker_rss_mb, status["peak_rss_mb"])
                for part in ("read", "predict", "write"):
                    result.seconds_in[part] += status[f"{part}_s"]
                merge_reliability(result.reliability, status.get("reliability"))
            else:
                message = f"{type(out.error).__name__}: {out.error}"
                result.failed.append((block.index, block.write, message))
                result.tracebacks.append((block.index, "".join(traceback.format_exception(out.error))))
                if progress:  # one line, above the bar; the traceback goes to the failure log
                    tqdm.write(f"block {block.index} failed: {message.splitlines()[0] if message else ''}"[:300],
                               file=sys.stderr)
            left[i] -= 1
            if left[i] == 0:  # when its last block finished, not when the runner released it
                result.seconds = out.finished - t0
    info["size"] = size.as_dict()  # results share this dict
    return results


def block_error(runs, results) -> BlockError:
    """One BlockError naming every failed block of every run (first five per run in full)."""
    parts, listing, n_failed, n_todo = [], [], 0, 0
    for run, result in zip(runs, results):
        n_todo += result.blocks_total - result.blocks_skipped
        if not result.failed:
            continue
        n_failed += len(result.failed)
        where = f"{run.output}: " if len(runs) > 1 else ""
        shown = ", ".join(str(i) for i, _, _ in result.failed[:100])
        listing.append(where + shown + (f", ... ({len(result.failed)} in all)" if len(result.failed) > 100 else ""))
        parts.append(where + "; ".join(f"block {i} (write region {w}): {e}" for i, w, e in result.failed[:5]))
    return BlockError(
        f"{n_failed} of {n_todo} block(s) failed; the others are written and marked done, re-run the "
        f"same command to retry. Failed blocks: {' | '.join(listing)} (with errors in bigcare_summary.json). "
        f"First failures: " + " | ".join(parts),
        results,
    )
