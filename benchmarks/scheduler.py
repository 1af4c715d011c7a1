"""Scheduler and bookkeeping cost per block task (what sets the block size of a large cluster).

Figures, on a LocalCluster of separate worker processes (default 2 workers x 1 thread):

- ``raw``: sustained rate of no-op block tasks submitted as the engine submits them
  (``client.map(fn, blocks, spec=spec, key=..., pure=False)``, real ``bigcare.blocks.plan.Block``
  and ``bigcare.tasks.block.RunSpec`` arguments, the spec padded to ``--spec-kb`` as a run with
  storage options would have), each returning ``run_block``'s status dict; the client only
  waits (``as_completed`` without fetching results). Sustained = tasks between the 10th and
  90th percentile completions / that time.
- ``execute``: the same no-op tasks through the engine's real client loop
  (``bigcare.runs.queue.execute`` on ``bigcare.tasks.runner.run_tasks``: per-future ``result()``,
  statistics, retry bookkeeping, the rescheduled count asked from the scheduler every 32 results,
  tqdm progress), run_block
  swapped for the no-op. Its extra time per task over ``raw`` is the client-side cost.
- ``execute+marker`` (smallest N only): as ``execute``, each task also writes its done marker (zarr v3 uint8
  array, one chunk per block, local disk) through ``bigcare.store.arrays.open_array`` as run_block does.
- ``batched``: as ``raw`` but the client takes every status dict, gathered in batches
  (``as_completed(..., with_results=True)``): what a cheaper engine loop could reach.
- ``marker``: in one process, the time to write one done marker, and to read the whole
  marker array back (what a resumed run does first), per block.

    python benchmarks/scheduler.py                   # N = 2000 5000 10000, ~8 min on 2 busy cores
    python benchmarks/scheduler.py --quick           # N = 1000 2000
    python benchmarks/scheduler.py --n 20000 --workers 4

Figures are printed last; the last line is JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

import numpy as np  # noqa: E402
import zarr  # noqa: E402


def make_run(n, tmp: Path, spec_kb: float):
    """Real Blocks (a grid of >= n) and a real RunSpec padded to about ``spec_kb`` KiB."""
    from bigcare.blocks.layout import AxisLayout
    from bigcare.blocks.plan import plan_blocks
    from bigcare.normalization import Normalizer
    from bigcare.tasks.block import MARKER, RunSpec

    side = math.ceil(n ** (1 / 3))
    grid = (math.ceil(n / side**2), side, side)
    block = (128, 256, 256)
    plan = plan_blocks(tuple(g * b for g, b in zip(grid, block)), block, (24,) * 3, (4,) * 3, block)
    blocks = [b for _, b in zip(range(n), plan)]
    out = tmp / f"out_{n}.ome.zarr"
    root = zarr.open_group(str(out), mode="w", zarr_format=3)
    root.create_array(MARKER, shape=plan.grid, chunks=(1, 1, 1), dtype="uint8", fill_value=0)
    options = {"anon": False, "client_kwargs": {"endpoint_url": "https://s3.example.org", "region_name": "eu-1"},
               "config_kwargs": {"max_pool_connections": 64, "retries": {"max_attempts": 10}}}
    kwargs = dict(input_url=str(tmp / "in.ome.zarr"), input_path="0", input_options=None,
                  layout=AxisLayout("zyx", "zyx", 1), model_path=None, model_hash="f" * 64, device="cpu",
                  precision="bf16", normalizer=Normalizer(lo=(101.5,), hi=(2047.25,)),
                  outputs=(("restored", str(out), "0"),), output_options=None, output_dtype="uint16",
                  marker_url=str(out), run_key="a" * 64, torch_threads=None, predictor=None)
    names = {f.name for f in fields(RunSpec)}
    spec = RunSpec(**{k: v for k, v in kwargs.items() if k in names})
    pad = max(0, int(spec_kb * 1024) - len(pickle.dumps(spec)))
    if pad:
        options = dict(options, user_agent_extra="x" * pad)
        spec = RunSpec(**{k: v for k, v in dict(kwargs, input_options=options).items() if k in names})
    return plan, blocks, spec, str(out)


def noop_block(block, spec):
    """run_block's signature and status dict, no work."""
    return {"index": block.index, "voxels": block.write_voxels, "read_s": 0.0, "predict_s": 0.0,
            "write_s": 0.0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def marker_block(block, spec):
    """No work but run_block's bookkeeping: open (cached) and write the done marker."""
    from bigcare.store.arrays import open_array
    from bigcare.tasks.block import MARKER

    t = time.perf_counter()
    marker = open_array(spec.marker_url, MARKER, "r+", spec.output_options, token=spec.run_key)
    marker[block.index] = 1
    status = noop_block(block, spec)
    status["write_s"] = time.perf_counter() - t
    return status


def rate(stamps, t0):
    stamps = sorted(stamps)
    n = len(stamps)
    a, b = stamps[n // 10], stamps[(9 * n) // 10]
    return {"tasks": n, "total_s": stamps[-1] - t0, "tasks_per_s_total": n / (stamps[-1] - t0),
            "tasks_per_s_sustained": (9 * n // 10 - n // 10) / (b - a) if b > a else float("inf")}


def run_raw(client, blocks, spec, tag):
    from distributed import as_completed

    t0 = time.perf_counter()
    keys = [f"raw-{tag}-{'-'.join(map(str, b.index))}" for b in blocks]
    futures = client.map(noop_block, blocks, spec=spec, key=keys, pure=False)
    stamps = []
    for f in as_completed(futures):
        stamps.append(time.perf_counter())
        f.release()
    del futures
    return rate(stamps, t0)


def run_batched(client, blocks, spec, tag):
    """A sketch of a cheaper client loop: results gathered in batches by as_completed."""
    from distributed import as_completed

    t0 = time.perf_counter()
    keys = [f"batched-{tag}-{'-'.join(map(str, b.index))}" for b in blocks]
    futures = client.map(noop_block, blocks, spec=spec, key=keys, pure=False)
    voxels, peak = 0, 0.0
    for f, status in as_completed(futures, with_results=True):
        voxels += status["voxels"]
        peak = max(peak, status["peak_rss_mb"])
        f.release()
    del futures
    seconds = time.perf_counter() - t0
    return {"total_s": seconds, "tasks_per_s_total": len(blocks) / seconds}


def run_execute(client, plan, blocks, spec, out, fn, progress):
    """bigcare.runs.queue.execute with run_block swapped for ``fn`` (restored afterwards)."""
    import bigcare.runs.queue as ex

    # a fresh run key each call: execute() names the task keys after its first 8 characters
    run = SimpleNamespace(images={"restored": out}, plan=_Plan(len(blocks), plan.overhead), n_todo=len(blocks),
                          pending=lambda: iter(blocks), run_key=uuid.uuid4().hex,
                          volume=SimpleNamespace(url=spec.input_url), spec=spec, device="cpu",
                          precision="fp32", precision_ran="", backend="torch", backend_ran="", fill_spec=None, spec_for=lambda block: spec)
    original, ex.run_block = ex.run_block, fn
    try:
        t0 = time.perf_counter()
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # the bar still draws
            (res,) = ex.execute(client, [run], progress=progress)
        seconds = time.perf_counter() - t0
    finally:
        ex.run_block = original
    assert res.blocks_computed == len(blocks) and not res.failed, (res.blocks_computed, res.failed[:1])
    return {"tasks": len(blocks), "total_s": seconds, "tasks_per_s_total": len(blocks) / seconds,
            "write_s_per_task": res.seconds_in["write"] / len(blocks)}


class _Plan:
    def __init__(self, n, overhead):
        self.n, self.overhead = n, overhead

    def __len__(self):
        return self.n


def marker_costs(tmp: Path, m: int):
    """One process: write m done markers one by one, then read the array back."""
    from bigcare.store.arrays import open_array
    from bigcare.tasks.block import MARKER

    plan, blocks, spec, out = make_run(m, tmp / "m", 0)
    marker = open_array(spec.marker_url, MARKER, "r+", None, token=spec.run_key)
    t = time.perf_counter()
    for b in blocks:
        marker[b.index] = 1
    write = (time.perf_counter() - t) / m
    t = time.perf_counter()
    done = np.asarray(zarr.open_array(out, path=MARKER, mode="r")[...]).astype(bool)
    read = time.perf_counter() - t
    assert done.sum() == m
    files = sum(1 for _ in (Path(out) / MARKER).rglob("*") if _.is_file())
    return {"blocks": m, "write_ms_per_block": write * 1e3, "read_all_s": read,
            "read_ms_per_block": read / m * 1e3, "files": files}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[2000, 5000, 10000])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per worker")
    p.add_argument("--spec-kb", type=float, default=3.0, help="pickled RunSpec size to mimic")
    p.add_argument("--repeats", type=int, default=2, help="rounds of the variants, interleaved")
    p.add_argument("--markers", type=int, default=2000, help="done markers written in-process")
    p.add_argument("--no-progress", action="store_true", help="execute without the tqdm bar")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true", help="seconds: 50 tasks, one round (the test suite runs it)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.repeats, args.markers = [1000, 2000], 1, 500
    if args.smoke:
        args.n, args.repeats, args.markers, args.workers, args.no_progress = [50], 1, 20, 1, True
    from distributed import Client, LocalCluster

    tmp = Path(tempfile.mkdtemp(prefix="bigcare-sched-"))
    load0 = os.getloadavg()
    results = {"runs": {}}
    try:
        results["marker"] = marker_costs(tmp, args.markers)
        print("marker:", results["marker"], flush=True)
        with LocalCluster(n_workers=args.workers, threads_per_worker=args.threads, processes=True,
                          dashboard_address=":0", silence_logs=40) as cluster, Client(cluster) as client:
            client.run(lambda: __import__("bigcare.tasks.block"))  # imports not counted
            for n in args.n:
                plan, blocks, spec, out = make_run(n, tmp, args.spec_kb)
                size = len(pickle.dumps((blocks[0], spec)))
                rows = {"raw": [], "batched": [], "execute": [], "execute+marker": []}
                for r in range(args.repeats):
                    rows["raw"].append(run_raw(client, blocks, spec, f"{n}-{r}"))
                    rows["batched"].append(run_batched(client, blocks, spec, f"{n}-{r}"))
                    rows["execute"].append(run_execute(client, plan, blocks, spec, out, noop_block,
                                                       not args.no_progress))
                    if n == min(args.n):  # the marker's cost does not depend on N
                        rows["execute+marker"].append(run_execute(client, plan, blocks, spec, out,
                                                                  marker_block, not args.no_progress))
                    print(f"N={n} round {r + 1}: " + ", ".join(f"{k} {v[-1]['tasks_per_s_total']:.0f}/s"
                          for k, v in rows.items() if v) + f" (load {os.getloadavg()[0]:.1f})",
                          file=sys.stderr, flush=True)
                rows = {k: v for k, v in rows.items() if v}
                med = {k: {m: statistics.median(r[m] for r in v) for m in v[0] if m != "tasks"}
                       for k, v in rows.items()}
                med["task_pickle_bytes"] = size
                results["runs"][n] = med
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["info"] = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                                  f"{os.cpu_count()} cpus", "workers": args.workers, "threads": args.threads,
                       "load_before_after": [load0[0], os.getloadavg()[0]], "date": time.strftime("%Y-%m-%d"),
                       "distributed": __import__("distributed").__version__}
    print(f"\n{'N':>6} {'raw sustained/s':>16} {'raw total/s':>12} {'batched/s':>10} {'execute/s':>10} "
          f"{'exec+marker/s':>14} {'client ms/task':>15} {'marker ms/task':>15}")
    for n, m in results["runs"].items():
        client_ms = 1e3 * (1 / m["execute"]["tasks_per_s_total"] - 1 / m["raw"]["tasks_per_s_total"])
        m["client_ms_per_task"] = client_ms
        marker = ""
        if "execute+marker" in m:
            m["marker_ms_per_task_wall"] = 1e3 * (1 / m["execute+marker"]["tasks_per_s_total"]
                                                  - 1 / m["execute"]["tasks_per_s_total"])
            marker = f"{m['execute+marker']['tasks_per_s_total']:>14.0f} {'':>15} {m['marker_ms_per_task_wall']:>15.2f}"
        print(f"{n:>6} {m['raw']['tasks_per_s_sustained']:>16.0f} {m['raw']['tasks_per_s_total']:>12.0f} "
              f"{m['batched']['tasks_per_s_total']:>10.0f} {m['execute']['tasks_per_s_total']:>10.0f} "
              + (marker.replace(f"{'':>15}", f"{client_ms:>15.2f}") if marker else f"{'-':>14} {client_ms:>15.2f}"))
    mk = results["marker"]
    print(f"done marker, in process: write {mk['write_ms_per_block']:.2f} ms/block, read all "
          f"{mk['read_ms_per_block']:.3f} ms/block ({mk['blocks']} blocks, {mk['files']} files)")
    print(f"task pickle (Block + RunSpec): {next(iter(results['runs'].values()))['task_pickle_bytes']} bytes")
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
