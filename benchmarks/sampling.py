"""Benchmark of the lazy patch sampler: throughput (patches/s) and peak memory (RSS).

Data: synthetic (input, target) pairs of uint16 OME-Zarr images (NGFF 0.5, blosc-zstd with
bitshuffle, as bigcare writes them) on local disk: a lattice of bright blobs over a dim
background plus a few bits of noise (compressible, and with foreground for the sampler to
find). Generated slab by slab by tasks on a local cluster, never held in memory, then the
pyramid is written blockwise.

Figures:

- ``throughput``: 16x64x64 (input, target) patch pairs per second streamed by
  ``PatchSampler.batches()`` (batch 16, read ahead 4) with no cluster (local thread pool), a
  LocalCluster of 1 worker and one of 2 workers (1 thread each; the latter also with results
  through the cluster instead of shared memory), and 1 worker of 2 threads; plus a
  single-thread CPU profile of the read tasks (chunk fetch / decode / the rest, chunks touched
  and decoded per patch, the client's normalization) to show where the time goes;
- ``memory``: peak RSS of the client process plus every worker process while a sampler is
  built on a ~2 GB and a ~16 GB pair and streams batches, each in a fresh process and cluster.

Usage::

    python benchmarks/sampling.py                       # both, default sizes (the 16 GB pair takes
                                                        # ~12 min to generate on 2 busy cores; reused after)
    python benchmarks/sampling.py --quick               # small sizes, a few minutes
    python benchmarks/sampling.py throughput --codec lz4 --chunks 16,64,64 --batches 300
    python benchmarks/sampling.py memory --sizes-gb 2 16 --data /tmp/bigcare-bench

Generated data stay under ``--data`` and are reused by later runs (their generation time is
kept in their attributes and reported again). Throughput is also given per CPU-second of the
client and its workers, a figure that depends less on what else runs on the machine.

The figures are printed, the last line is JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from bigcare.store.arrays import level_token, open_array
from bigcare.store.axes import Axis
from bigcare.store.chunks import chunk_buffers, region_reader
from bigcare.store.pyramid import write_pyramid
from bigcare.store.volume import open_volume
from bigcare.store.write import create_volume
from bigcare.tasks.runner import run_tasks
from bigcare.training import sampling as sampling_module
from bigcare.training.reads import normalize_batch, read_patches
from bigcare.training.sampling import TASK_PATCHES, PatchSampler

PATCH = (16, 64, 64)
#: "zstd" is what bigcare's writers use (bigcare.store.write.create_volume); "lz4" decodes about 10x faster.
CODECS = {"zstd": BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
          "lz4": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")}
AXES = tuple(Axis(a, "space", "micrometer") for a in "zyx")


# --- data ----------------------------------------------------------------------------------------


def _bumps(n: int, period: int, width: float, phase: float) -> np.ndarray:
    d = (np.arange(n) + phase) % period - period / 2
    return np.exp(-0.5 * (d / width) ** 2).astype(np.float32)


def _write_slab(url: str, z0: int, z1: int, role: str, seed: int) -> int:
    """Task: generate and write level-0 slab ``z0:z1`` of one image."""
    vol = open_volume(url)
    arr = open_array(vol.url, vol.levels[0].path, "r+", None, zarr_format=vol.zarr_format, token=level_token(vol.levels[0]))
    _, ny, nx = vol.shape
    fz = _bumps(vol.shape[0], 64, 5.0, 7.0)[z0:z1]
    fy, fx = _bumps(ny, 96, 8.0, 11.0), _bumps(nx, 96, 8.0, 23.0)
    clean = 1000.0 * fz[:, None, None] * fy[None, :, None] * fx[None, None, :]
    rng = np.random.default_rng([seed, z0])
    if role == "target":
        slab = (100 + clean).astype(np.uint16)
        slab += rng.integers(0, 4, slab.shape, dtype=np.uint16)
    else:
        slab = (100 + 0.3 * clean).astype(np.uint16)
        slab += rng.integers(0, 64, slab.shape, dtype=np.uint16)
    arr[z0:z1] = slab
    return z1 - z0


def make_pair(root: str, shape, chunks, codec: str, client) -> tuple[str, str, float]:
    """Write (or reuse) an input/target pair under ``root``; return paths and seconds taken."""
    paths, seconds = [], 0.0
    for role in ("input", "target"):
        url = os.path.join(root, f"{role}.zarr")
        paths.append(url)
        try:
            vol = open_volume(url)
            if (vol.shape == tuple(shape) and vol.levels[0].chunks == tuple(chunks) and vol.attrs.get("complete")
                    and vol.attrs.get("codec") == codec):
                seconds += vol.attrs.get("generation_s", 0.0)  # reused: report how long it took when made
                continue
        except Exception:
            pass
        t0 = time.perf_counter()
        vol = create_volume(url, shape=shape, dtype=np.uint16, chunks=chunks, axes=AXES, scale=(1.0, 0.5, 0.5),
                           overwrite=True, attrs={"complete": False, "codec": codec})
        if codec != "zstd":  # bigcare writes blosc-zstd-bitshuffle; swap the (still empty) arrays' codec
            group = zarr.open_group(url, mode="r+")
            for lv in vol.levels:
                group.create_array(lv.path, shape=lv.shape, chunks=lv.chunks, dtype=lv.dtype, fill_value=0,
                                   compressors=CODECS[codec], dimension_names=list("zyx"), overwrite=True)
            vol = open_volume(url)
        slabs = [(url, z, min(z + chunks[0], shape[0]), role, 1 if role == "input" else 2)
                 for z in range(0, shape[0], chunks[0])]
        for _ in run_tasks(_write_slab, slabs, client=client, in_flight=4, ordered=False):
            pass
        write_pyramid(vol, client=client)
        from bigcare.store.write import update_attrs

        seconds += time.perf_counter() - t0
        update_attrs(url, {"complete": True, "generation_s": time.perf_counter() - t0})
    return paths[0], paths[1], seconds


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# --- throughput ----------------------------------------------------------------------------------


def _cpu_seconds(procs) -> float:
    import psutil

    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _stream(sampler, n_batches: int, warmup: int = 10) -> dict:
    """Patches/s of the batch stream, and patches per CPU-second of this process and its workers.

    The second figure does not depend on what else runs on the machine: on ``k`` idle cores the
    stream can reach about ``k`` times it.
    """
    import psutil

    it = sampler.batches("train")  # a PatchSampler or a PatchStore
    for _ in range(warmup):
        next(it)
    me = psutil.Process()
    procs = [me] + me.children(recursive=True)
    t0, c0 = time.perf_counter(), _cpu_seconds(procs)
    for _ in range(n_batches):
        next(it)
    dt, cpu = time.perf_counter() - t0, _cpu_seconds(procs) - c0
    it.close()
    n = n_batches * sampler.batch_size
    return {"patches_per_s": n / dt, "patches_per_cpu_s": n / cpu if cpu > 0 else float("nan"),
            "load_avg_1min": os.getloadavg()[0]}


def profile_task(sampler: PatchSampler, tasks: int = 16) -> dict:
    """Single-thread CPU cost per patch pair of the sampler's read tasks, and its parts.

    Tasks of ``TASK_PATCHES`` random training patches with random augmentations, as
    :meth:`PatchSampler.batches` makes them (the images' page cache warmed first). CPU time
    (``time.thread_time``), so that other jobs on the machine matter less. The parts: fetching
    and decoding the distinct chunks of each task (each done once per task, timed alone), the
    rest (the tasks again with fetch and decode stubbed: planning, copies into the augmented
    outputs, Python), and the client's normalization.
    """
    n = TASK_PATCHES
    rng = np.random.default_rng(0)
    pos = sampler.train_positions[rng.permutation(len(sampler.train_positions))[:n * tasks]]
    codes = rng.integers(0, 8, len(pos)).astype(np.uint8)
    groups = [(pos[a:a + n, 0], pos[a:a + n, 1:], None, codes[a:a + n]) for a in range(0, len(pos), n)]
    for g in groups + groups:  # page cache and malloc's heap warm (steady state, as in a long stream)
        read_patches(sampler.read_plan, *g)
    scaling = sampler.scaling("train", np.arange(n))
    total = norm = 0.0
    for g in groups:
        t = time.thread_time()
        x, y = read_patches(sampler.read_plan, *g)
        total += time.thread_time() - t
        t = time.thread_time()
        s = scaling[:len(x)]  # the last group may be short
        normalize_batch(x, s[:, :2]), normalize_batch(y, s[:, 2:])
        norm += time.thread_time() - t
        del x, y
    fetch = decode = 0.0
    touched = fetched = 0
    buffers = chunk_buffers()
    src = sampler.read_plan.sources[0]
    for ref in (src.input, src.target):
        reader = region_reader(ref)
        flat, _ = buffers.decoded(reader._nbytes, reader._stored, reader._chunks)
        for _, starts, _, _ in groups:
            keys = set()
            for start in starts:
                sel = ref.selection(start, src.footprint)
                ranges = [range(s.start // c, (s.stop - 1) // c + 1) for s, c in zip(sel, reader._chunks)]
                coords = list(itertools.product(*ranges))
                touched += len(coords)
                keys.update(coords)
            fetched += len(keys)
            for key in sorted(keys):
                t = time.thread_time()
                raw = reader._fetch(reader._encode_key(key), buffers)
                fetch += time.thread_time() - t
                t = time.thread_time()
                reader._decode(raw, flat)
                decode += time.thread_time() - t
    # the rest (planning, copies into the augmented outputs, Python): the tasks with fetch and decode stubbed
    readers = [region_reader(ref) for ref in (src.input, src.target)]
    raw, saved = bytes(16), [reader.__dict__.copy() for reader in readers]
    for reader in readers:
        reader._fetch, reader._decode = (lambda key, buffers: raw), (lambda raw, out: out)
    try:
        t = time.thread_time()
        for g in groups:
            read_patches(sampler.read_plan, *g)
        rest = time.thread_time() - t
    finally:
        for reader, attrs in zip(readers, saved):
            reader.__dict__.clear()
            reader.__dict__.update(attrs)
    pairs = len(pos)
    return {"task_ms_per_patch": 1e3 * total / pairs, "fetch_ms_per_patch": 1e3 * fetch / pairs,
            "decode_ms_per_patch": 1e3 * decode / pairs, "other_ms_per_patch": 1e3 * rest / pairs,
            "normalize_ms_per_patch": 1e3 * norm / pairs, "chunks_touched_per_patch": touched / pairs / 2,
            "chunks_decoded_per_patch": fetched / pairs / 2, "patches_per_task": n,
            "patches_per_s_one_thread": pairs / total}


def throughput(args) -> dict:
    from distributed import Client, LocalCluster

    shape = tuple(args.shape)
    chunks = tuple(args.chunks)
    os.makedirs(args.data, exist_ok=True)
    root = os.path.join(args.data, f"throughput-{args.codec}-" + "x".join(map(str, shape)) + "-c" + "x".join(map(str, chunks)))
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, silence_logs=40) as cluster, \
            Client(cluster) as client:
        x, y, gen_s = make_pair(root, shape, chunks, args.codec, client)
    out = {"shape": list(shape), "chunks": list(chunks), "codec": args.codec, "patch": list(PATCH), "batch_size": 16,
           "data_gb_raw": 2 * math.prod(shape) * 2 / 1e9, "data_gb_disk": (_du(x) + _du(y)) / 1e9,
           "generation_s": round(gen_s, 1)}
    print(f"data: 2 x {shape} uint16 chunks {chunks} blosc-{args.codec}: {out['data_gb_raw']:.2f} GB raw, "
          f"{out['data_gb_disk']:.2f} GB on disk, generated in {gen_s:.1f} s", flush=True)
    kwargs = dict(n_patches=args.patches, seed=0, batch_size=16, read_ahead=4)
    t = time.perf_counter()
    sampler = PatchSampler([(x, y)], PATCH, **kwargs)
    out["draw_s"] = round(time.perf_counter() - t, 2)
    _ = sampler.tables  # computed here, outside the profile
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a thread like a dask worker's (numcodecs' own contexts)
        out["profile"] = prof = pool.submit(profile_task, sampler).result()
    print(f"one read task ({prof['patches_per_task']} patches), one thread: {prof['task_ms_per_patch']:.2f} ms CPU per "
          f"patch pair (fetch {prof['fetch_ms_per_patch']:.2f}, decode {prof['decode_ms_per_patch']:.2f}, rest "
          f"{prof['other_ms_per_patch']:.2f} ms; chunks per patch and image: {prof['chunks_touched_per_patch']:.2f} "
          f"touched, {prof['chunks_decoded_per_patch']:.2f} decoded); client normalization "
          f"{prof['normalize_ms_per_patch']:.2f} ms", flush=True)
    rates = {}
    rates["threads"] = r = _stream(sampler, args.batches)
    print(f"no cluster (thread pool): {r['patches_per_s']:.0f} patches/s, {r['patches_per_cpu_s']:.0f} per CPU-second "
          f"(load average {r['load_avg_1min']:.1f})", flush=True)
    configs = [(1, 1, True), (2, 1, True), (2, 1, False), (1, 2, True)]
    for workers, threads, shared in configs:
        sampling_module.SHARED_MEMORY = shared
        with LocalCluster(n_workers=workers, threads_per_worker=threads, dashboard_address=None,
                          silence_logs=40) as cluster, Client(cluster) as client:
            s = PatchSampler([(x, y)], PATCH, client=client, **kwargs)
            s._tables = sampler.tables  # same statistics; not part of the streaming figure
            name = f"cluster_{workers}w{threads}t" + ("" if shared else "_no_shm")
            rates[name] = r = _stream(s, args.batches)
            print(f"LocalCluster {workers} worker(s) x {threads} thread(s), results through "
                  f"{'shared memory' if shared else 'the cluster'}: {r['patches_per_s']:.0f} patches/s, "
                  f"{r['patches_per_cpu_s']:.0f} per CPU-second (load average {r['load_avg_1min']:.1f})", flush=True)
    sampling_module.SHARED_MEMORY = True
    # the optional patch store: written once (thread pool), then streamed
    store_url = os.path.join(root, "patches.zarr")
    small = PatchSampler([(x, y)], PATCH, n_patches=args.store_patches, validation_fraction=0.0, seed=0)
    small._tables = sampler.tables
    t = time.perf_counter()
    store = small.write_patch_store(store_url, overwrite=True)
    write_s = time.perf_counter() - t
    rates["patch_store"] = r = _stream(store, min(args.batches, args.store_patches // 16 - 10))
    out["patch_store"] = {"patches": args.store_patches, "write_s": round(write_s, 1),
                          "gb_on_disk": round(_du(store_url) / 1e9, 2)}
    print(f"patch store: {args.store_patches} patches written in {write_s:.1f} s ({_du(store_url) / 1e9:.2f} GB), "
          f"then {r['patches_per_s']:.0f} patches/s, {r['patches_per_cpu_s']:.0f} per CPU-second", flush=True)
    out["stream"] = {k: {m: round(v, 1) for m, v in r.items()} for k, r in rates.items()}
    return out


# --- memory --------------------------------------------------------------------------------------


def _rss_tree(proc, children) -> tuple[int, int]:
    import psutil

    own = proc.memory_info().rss
    total = own
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return own, total


def rss_child(args) -> dict:
    """In a fresh process: build a sampler on the pair, stream batches, report peak RSS."""
    import psutil
    from distributed import Client, LocalCluster

    proc = psutil.Process()
    peak = {"client": 0, "total": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            own, total = _rss_tree(proc, children)
            peak["client"], peak["total"] = max(peak["client"], own), max(peak["total"], total)
            time.sleep(0.05)

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, silence_logs=40) as cluster, \
            Client(cluster) as client:
        children = proc.children(recursive=True)  # nannies, workers (listed once: scanning /proc is slow)
        base_client, base_total = _rss_tree(proc, children)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t = time.perf_counter()
        sampler = PatchSampler([(args.x, args.y)], PATCH, n_patches=args.patches, seed=0, client=client)
        draw_s = time.perf_counter() - t
        t = time.perf_counter()
        _ = sampler.tables
        stats_s = time.perf_counter() - t
        rate = _stream(sampler, args.batches)["patches_per_s"]
        stop.set()
        watcher.join()
    return {"baseline_client_mb": base_client / 2**20, "baseline_total_mb": base_total / 2**20,
            "peak_client_mb": peak["client"] / 2**20, "peak_total_mb": peak["total"] / 2**20,
            "draw_s": draw_s, "stats_s": stats_s, "patches_per_s": rate,
            "coarse": sampler.provenance["sources"][0]["coarse_factors"]}


def memory(args) -> dict:
    from distributed import Client, LocalCluster

    results = {}
    for gb in args.sizes_gb:
        # a pair of images of gb / 2 each, (Z, 2048, 2048) voxels (smaller lateral size for tiny runs)
        side = 2048 if gb >= 1 else 512
        z = max(PATCH[0], round(gb * 1e9 / 2 / 2 / side / side / 16) * 16)
        shape = (z, side, side)
        root = os.path.join(args.data, f"memory-{args.codec}-{gb:g}gb")
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, silence_logs=40) as cluster, \
                Client(cluster) as client:
            x, y, gen_s = make_pair(root, shape, tuple(args.chunks), args.codec, client)
        raw = 2 * math.prod(shape) * 2 / 1e9
        print(f"data {gb:g} GB: 2 x {shape} uint16, {raw:.1f} GB raw, {(_du(x) + _du(y)) / 1e9:.2f} GB on disk, "
              f"generated in {gen_s:.0f} s", flush=True)
        cmd = [sys.executable, __file__, "_rss", "--x", x, "--y", y, "--patches", str(args.patches),
               "--batches", str(args.batches)]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        res.update({"shape": list(shape), "data_gb_raw": round(raw, 2), "generation_s": round(gen_s, 1)})
        results[f"{gb:g}gb"] = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in res.items()}
        print(f"  peak RSS: client {res['peak_client_mb']:.0f} MB, client + 2 workers {res['peak_total_mb']:.0f} MB "
              f"(at start {res['baseline_total_mb']:.0f} MB); draw {res['draw_s']:.1f} s, statistics "
              f"{res['stats_s']:.1f} s, {res['patches_per_s']:.0f} patches/s", flush=True)
    return results


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", default="all", choices=["all", "throughput", "memory", "_rss"])
    parser.add_argument("--data", default="/tmp/bigcare-bench", help="folder for the generated data (kept, reused)")
    parser.add_argument("--shape", type=lambda s: tuple(map(int, s.split(","))), default=(128, 1024, 1024),
                        help="throughput image shape Z,Y,X (default 128,1024,1024)")
    parser.add_argument("--chunks", type=lambda s: tuple(map(int, s.split(","))), default=(16, 64, 64),
                        help="chunk shape Z,Y,X of the generated images (default 16,64,64)")
    parser.add_argument("--codec", choices=sorted(CODECS), default="zstd",
                        help="blosc codec of the generated images (default zstd, bigcare's own)")
    parser.add_argument("--patches", type=int, default=20000, help="n_patches of the sampler")
    parser.add_argument("--batches", type=int, default=None,
                        help="batches timed per configuration (default 400 for throughput, 200 for memory)")
    parser.add_argument("--store-patches", type=int, default=2048, help="patches written to the patch store")
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[2, 16], help="memory: dataset sizes (GB, pair)")
    parser.add_argument("--quick", action="store_true", help="small sizes: throughput 64x512x512, memory 0.25 and 1 GB")
    parser.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (the test suite runs it): no figures")
    parser.add_argument("--x"), parser.add_argument("--y")
    args = parser.parse_args(argv)
    if args.batches is None:
        args.batches = 200 if args.what in ("memory", "_rss") else 400
    if args.what == "_rss":
        print(json.dumps(rss_child(args)))
        return
    if args.quick:
        args.shape, args.sizes_gb, args.batches, args.patches, args.store_patches = (64, 512, 512), [0.25, 1], 60, 2000, 512
    if args.smoke:
        args.shape, args.sizes_gb, args.batches, args.patches, args.store_patches = (32, 256, 256), [0.01, 0.02], 4, 200, 32
    figures = {}
    if args.what in ("all", "throughput"):
        figures["throughput"] = throughput(args)
    if args.what in ("all", "memory"):
        figures["memory"] = memory(args)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
