"""Engine benchmarks: overhead vs a plain dask copy, U-Net throughput vs in-memory,
peak worker memory vs volume size. Prints its figures last; record them in RESULTS.md.

    python benchmarks/engine.py copy      # identity model vs dask zarr-to-zarr copy
    python benchmarks/engine.py care      # CARE 3D U-Net end to end vs in memory, fp32 and bf16
    python benchmarks/engine.py rss       # peak RSS per worker, volume vs 8x volume
    python benchmarks/engine.py background  # --skip-background on a half-empty volume: speed-up, max error
    python benchmarks/engine.py decodes   # input chunks decoded per block, without / with the chunk cache
    python benchmarks/engine.py window    # a volume larger than one 4-Mvoxel call: memory-sized windows vs 4 Mvoxel
    python benchmarks/engine.py all [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_volume(url, shape, chunks, seed=0):
    """A compressible uint16 volume (synthetic cells + noise), written slab by slab."""
    from bigcare.store.axes import Axis
    from bigcare.store.write import create_volume
    from bigcare.synth import degrade, phantom

    axes = [Axis(a, "space", "micrometer") for a in "zyx"]
    vol = create_volume(url, shape=shape, dtype="uint16", chunks=chunks, axes=axes, scale=(1.0, 0.5, 0.5))
    arr = vol.array(0, mode="r+")
    tile = tuple(min(n, c * 4) for n, c in zip(shape[1:], chunks[1:]))
    clean = phantom((chunks[0],) + tile, seed=seed)
    for z in range(0, shape[0], chunks[0]):
        slab = np.zeros((min(chunks[0], shape[0] - z),) + shape[1:], np.uint16)
        noisy = degrade(clean, seed=seed + z, photons=20)
        t = np.clip(300 * noisy[: slab.shape[0]], 0, 65535).astype(np.uint16)
        reps = [1] + [-(-n // t_) for n, t_ in zip(shape[1:], tile)]
        slab[...] = np.tile(t, reps)[:, : shape[1], : shape[2]]
        arr[z : z + slab.shape[0]] = slab
    return vol


def save_unet(path, *, n_filter_base, depth=2, kernel_size=3):
    from bigcare.models import UNet, UNetConfig, save_model
    from bigcare.models.folder import ModelConfig

    arch = UNetConfig(ndim=3, depth=depth, n_filter_base=n_filter_base, kernel_size=kernel_size)
    torch.manual_seed(0)
    model = UNet(arch)
    save_model(path, model, ModelConfig(axes="ZYX", architecture=arch))
    return path


def bench_copy(tmp: Path, args) -> dict:
    """Engine with an identity model vs a plain dask zarr-to-zarr copy, same cluster."""
    import dask.array as da
    import zarr
    from distributed import Client, LocalCluster

    import bigcare

    shape, chunks = ((32, 128, 128), (16, 64, 64)) if args.smoke else ((128, 1024, 1024), (64, 256, 256))
    make_volume(tmp / "in.ome.zarr", shape, chunks)
    from bigcare.predictors.identity import IdentityPredictor

    model = IdentityPredictor("zyx")
    with LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=None) as cluster, Client(cluster) as client:
        src = da.from_zarr(str(tmp / "in.ome.zarr"), component="0")
        t = time.perf_counter()
        target = zarr.create_array(str(tmp / "copy.zarr"), shape=shape, chunks=chunks, dtype="float32")
        da.store(src.astype(np.float32), target, lock=False, compute=True)
        copy_s = time.perf_counter() - t
        t = time.perf_counter()
        run = bigcare.restore(tmp / "in.ome.zarr", tmp / "out.ome.zarr", model, client=client, block_shape=chunks,
                              device=args.device, pyramid=False, progress=False)
        engine_s = time.perf_counter() - t
    out = np.asarray(zarr.open_array(str(tmp / "out.ome.zarr"), path="0")[:8])
    ref = np.asarray(zarr.open_array(str(tmp / "in.ome.zarr"), path="0")[:8]).astype(np.float32)
    vox = int(np.prod(shape))
    return {"shape": shape, "blocks": run.blocks_total, "copy_s": copy_s, "engine_s": engine_s,
            "copy_Mvox_s": vox / copy_s / 1e6, "engine_Mvox_s": vox / engine_s / 1e6,
            "ratio_engine_over_copy": copy_s / engine_s, "halo_overhead": run.halo_overhead,
            "identity_max_abs_err": float(np.abs(out - ref).max())}


def bench_care(tmp: Path, args) -> dict:
    """CARE 3D U-Net (CSBDeep default) end to end vs in memory in one piece."""
    from distributed import Client, LocalCluster

    import bigcare
    from bigcare.store.volume import open_volume

    shape = tuple(args.care_shape)
    chunks = (shape[0], shape[1], shape[2] // 2)
    make_volume(tmp / "care.ome.zarr", shape, chunks)
    model = save_unet(tmp / "care_model", n_filter_base=32)
    data = np.asarray(open_volume(tmp / "care.ome.zarr").array()[...])
    vox = int(np.prod(shape))
    results = {"shape": shape}
    for precision in ("fp32", "bf16"):
        torch.set_num_threads(args.threads)
        bigcare.predict(data[:, :64, :64], model, axes="zyx", device=args.device, precision=precision)  # warm up
        t = time.perf_counter()
        bigcare.predict(data, model, axes="zyx", device=args.device, precision=precision)
        mem_s = time.perf_counter() - t
        row = {"in_memory_Mvox_s": vox / mem_s / 1e6}
        with LocalCluster(n_workers=1, threads_per_worker=args.threads, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            for label, block in (("1 block", shape), ("2 blocks", chunks)):
                out = tmp / f"care_{precision}_{label[0]}.ome.zarr"
                t = time.perf_counter()
                run = bigcare.restore(tmp / "care.ome.zarr", out, model, client=client, block_shape=block,
                                      device=args.device, precision=precision, pyramid=False, progress=False)
                e2e = time.perf_counter() - t
                row[label] = {"end_to_end_Mvox_s": vox / e2e / 1e6, "ratio_vs_in_memory": mem_s / e2e,
                              "halo_overhead": run.halo_overhead, "seconds_in": run.seconds_in}
                shutil.rmtree(out)
        results[precision] = row
    return results


CSBDEEP_CPU = {"Mvox_s": 0.57, "peak_rss_gib": 3.5}  # CSBDeep/TF, this 2-core VM, 64x256x256 in memory


def bench_cpu_goal(tmp: Path, args) -> dict:
    """The CPU goal: default blocks, file to file, vs CSBDeep's in-memory figure.

    One fresh single-worker LocalCluster per variant (so the worker's peak RSS is the variant's),
    the CSBDeep default 3D net on a 64x256x256 uint16 OME-Zarr volume; the throughput counts
    the whole ``bigcare.restore`` call (percentiles, model shipping, blocks, no pyramid).
    """
    from distributed import Client, LocalCluster

    import bigcare

    shape = tuple(args.care_shape)
    make_volume(tmp / "goal.ome.zarr", shape, (shape[0], shape[1], shape[2] // 2))
    model = save_unet(tmp / "goal_model", n_filter_base=32)
    vox = int(np.prod(shape))
    rows = {}
    for precision in ("fp32", "bf16"):
        for block in (None, (shape[0], shape[1] // 2, shape[2] // 2)):
            label = f"{precision}, {'default blocks' if block is None else 'blocks ' + 'x'.join(map(str, block))}"
            with LocalCluster(n_workers=1, threads_per_worker=args.threads, dashboard_address=None) as cluster, \
                    Client(cluster) as client:
                out = tmp / "goal_out.ome.zarr"
                t = time.perf_counter()
                run = bigcare.restore(tmp / "goal.ome.zarr", out, model, client=client, block_shape=block,
                                      device="cpu", precision=precision, pyramid=False, progress=False)
                sec = time.perf_counter() - t
                shutil.rmtree(out)
            rate = vox / sec / 1e6
            rows[label] = {"Mvox_s": round(rate, 3), "vs_csbdeep": round(rate / CSBDEEP_CPU["Mvox_s"], 2),
                           "peak_worker_rss_mb": round(run.peak_worker_rss_mb),
                           "rss_vs_csbdeep": round(run.peak_worker_rss_mb / 1024 / CSBDEEP_CPU["peak_rss_gib"], 2),
                           "blocks": run.blocks_total, "halo_overhead": round(run.halo_overhead, 3)}
            print(label, rows[label], flush=True)
    return rows


def bench_rss(tmp: Path, args) -> dict:
    """Peak RSS of the worker process for a volume and one 8x larger (fresh cluster each).

    Both volumes have interior blocks along every axis, so the largest read region (which sets
    the activation memory) is the same; what must not grow is everything else.
    """
    from distributed import Client, LocalCluster

    import bigcare
    from bigcare.blocks.plan import plan_blocks

    model = save_unet(tmp / "small_model", n_filter_base=2)
    block = chunks = (16, 32, 32) if args.smoke else (32, 128, 128)
    sizes = (((48, 96, 96)), (96, 192, 192)) if args.smoke else ((96, 384, 384), (192, 768, 768))
    rows = {}
    for label, shape in zip(("1x", "8x"), sizes):
        make_volume(tmp / f"rss_{label}.ome.zarr", shape, chunks)
        with LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            t = time.perf_counter()
            run = bigcare.restore(tmp / f"rss_{label}.ome.zarr", tmp / f"rss_out_{label}.ome.zarr", model,
                                  client=client, block_shape=block, device=args.device, pyramid=False,
                                  progress=False)
            largest_read = max(b.read_voxels for b in plan_blocks(shape, block, (24,) * 3, (4,) * 3))
            rows[label] = {"shape": shape, "voxels": int(np.prod(shape)), "blocks": run.blocks_total,
                           "largest_read_region_voxels": largest_read,
                           "peak_worker_rss_mb": run.peak_worker_rss_mb, "seconds": time.perf_counter() - t}
    rows["ratio_8x_over_1x"] = rows["8x"]["peak_worker_rss_mb"] / rows["1x"]["peak_worker_rss_mb"]
    return rows


def bench_background(tmp: Path, args) -> dict:
    """``--skip-background`` against a full run on a volume whose half along X is empty (background).

    The signal half is engine.py's synthetic cells; the empty half holds voxels drawn from the
    signal half's own background (its values below the 20th percentile), so the threshold (the
    empty half's max) is what a user would read off the background. The shipped demo model (a
    trained CARE net: a random one would not map background noise to a smooth background; ``--bg-filters
    32`` takes CSBDeep's default width with random weights instead, for the speed-up of a slower network),
    fresh single-worker cluster per run, the whole ``bigcare.restore`` call timed.
    """
    from distributed import Client, LocalCluster

    import bigcare
    from bigcare.demo import DEMO_MODEL
    from bigcare.store.volume import open_volume

    shape = (16, 64, 256) if args.smoke else (64, 256, 1024)
    chunks = (16, 32, 32) if args.smoke else (64, 128, 128)
    model = DEMO_MODEL if args.bg_filters is None else save_unet(tmp / "bg_model", n_filter_base=args.bg_filters)
    vol = make_volume(tmp / "bg.ome.zarr", shape, chunks)
    arr = vol.array(0, mode="r+")
    data = np.asarray(arr[...])
    rng = np.random.default_rng(1)
    half = shape[2] // 2
    signal = data[:, :, :half]
    pool = signal[signal <= np.percentile(signal, 20)]
    data[:, :, half:] = rng.choice(pool, size=data[:, :, half:].shape)
    arr[...] = data
    threshold = float(data[:, :, half:].max())
    rows: dict = {"shape": shape, "block_shape": chunks, "threshold": threshold, "empty_fraction": 0.5,
                  "model": "demo (trained)" if args.bg_filters is None else f"random U-Net, {args.bg_filters} filters"}
    outs = {}
    for label, skip in (("full", None), ("skip", threshold)):
        with LocalCluster(n_workers=1, threads_per_worker=args.threads, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            t = time.perf_counter()
            run = bigcare.restore(tmp / "bg.ome.zarr", tmp / f"bg_{label}.ome.zarr", model, client=client,
                                  block_shape=chunks, device=args.device, pyramid=False, progress=False,
                                  skip_background=skip)
            rows[label] = {"seconds": time.perf_counter() - t, "blocks": run.blocks_total,
                           "blocks_filled": run.blocks_background, "precision": run.precision,
                           "background": run.background}
        outs[label] = np.asarray(open_volume(tmp / f"bg_{label}.ome.zarr").array()[...])
    full, skipped = outs["full"], outs["skip"]
    diff = np.abs(full - skipped)
    span = float(np.percentile(full, 99.8) - np.percentile(full, 1))
    rows["speed_up"] = rows["full"]["seconds"] / rows["skip"]["seconds"]
    rows["max_abs_error"] = float(diff.max())
    rows["max_error_over_output_range"] = float(diff.max()) / span if span else 0.0
    rows["output_range_p1_p99.8"] = span
    rows["mean_abs_error_in_filled_blocks"] = float(diff[diff > 0].mean()) if (diff > 0).any() else 0.0
    return rows


def bench_decodes(tmp: Path, args) -> dict:
    """Input chunks decoded per block, counted at zarr's codec pipeline, without and with the
    per-worker decoded-chunk cache (:mod:`bigcare.store.chunkcache`).

    One-chunk blocks of 32 x 64 x 64 and a U-Net with a 24-voxel halo: an interior block's read
    region touches 3 x 3 x 3 chunks. An in-process cluster (1 worker x 2 threads, threads share the
    counter), no pyramid; the output is the same both ways (checked).
    """
    from distributed import Client, LocalCluster
    from zarr.core.codec_pipeline import BatchedCodecPipeline

    import bigcare
    from bigcare.store import chunkcache
    from bigcare.store.volume import open_volume

    shape = (64, 128, 128) if args.smoke else (128, 512, 512)
    chunks = (32, 64, 64)
    make_volume(tmp / "dec.ome.zarr", shape, chunks)
    model = save_unet(tmp / "dec_model", n_filter_base=2)
    count = [0]
    original = BatchedCodecPipeline.decode_batch

    async def counted(self, chunk_bytes_and_specs):
        items = list(chunk_bytes_and_specs)
        count[0] += sum(1 for b, _ in items if b is not None)
        return await original(self, items)

    rows: dict = {"shape": shape, "chunks": chunks, "block_shape": chunks}
    outs = {}
    BatchedCodecPipeline.decode_batch = counted  # type: ignore[method-assign]
    try:
        for label, cache_bytes in (("no cache", 0), ("chunk cache", chunkcache.CACHE_BYTES)):
            chunkcache.clear()
            saved, chunkcache.CACHE_BYTES = chunkcache.CACHE_BYTES, cache_bytes
            with LocalCluster(n_workers=1, threads_per_worker=args.threads, processes=False,  # HTTP on loopback
                              dashboard_address="127.0.0.1:0", scheduler_kwargs={"dashboard": False}) as cluster, \
                    Client(cluster) as client:
                count[0] = 0
                t = time.perf_counter()
                run = bigcare.restore(tmp / "dec.ome.zarr", tmp / f"dec_{cache_bytes}.ome.zarr", model, client=client,
                                      block_shape=chunks, device=args.device, pyramid=False, progress=False,
                                      precision="fp32")
                seconds = time.perf_counter() - t
            chunkcache.CACHE_BYTES = saved
            outs[label] = np.asarray(open_volume(tmp / f"dec_{cache_bytes}.ome.zarr").array()[...])
            rows[label] = {"decodes": count[0], "blocks": run.blocks_total,
                           "decodes_per_block": count[0] / run.blocks_total, "seconds": seconds,
                           "read_task_s": run.seconds_in["read"]}
    finally:
        BatchedCodecPipeline.decode_batch = original  # type: ignore[method-assign]
    rows["same_output"] = bool(np.array_equal(outs["no cache"], outs["chunk cache"]))
    return rows


def bench_window(tmp: Path, args) -> dict:
    """File to file on a volume larger than one ``CALL_VOXELS`` call: default blocks (the window
    follows the worker's memory, :func:`bigcare.blocks.sizing.call_voxels`) against the blocks the
    fixed 4-Mvoxel window gave, and the network alone on the whole volume in memory.

    CSBDeep's default net (random weights), precision auto, one fresh 1-worker cluster per run,
    the whole restore call timed (cluster start excluded), no pyramid.
    """
    import math

    from distributed import Client, LocalCluster

    import bigcare
    from bigcare.blocks.sizing import CALL_VOXELS, default_block_shape

    shape = (32, 128, 128) if args.smoke else (128, 512, 512)
    chunks = (16, 32, 32) if args.smoke else (64, 128, 128)
    make_volume(tmp / "win.ome.zarr", shape, chunks)
    model = save_unet(tmp / "win_model", n_filter_base=4 if args.smoke else 32)
    from bigcare.store.volume import open_volume

    data = np.asarray(open_volume(tmp / "win.ome.zarr").array()[...])
    vox = math.prod(shape)
    torch.set_num_threads(args.threads)
    bigcare.predict(data[:32, :64, :64], model, axes="zyx", device=args.device)  # warm up
    t = time.perf_counter()
    bigcare.predict(data, model, axes="zyx", device=args.device)
    rows: dict = {"shape": shape, "in_memory_seconds": time.perf_counter() - t}
    old = default_block_shape(shape, chunks, [True] * 3, (24,) * 3, CALL_VOXELS["cpu"], overhead_goal=1.15)
    for label, block in (("memory-sized (default)", None), ("4 Mvoxel window (before)", old)):
        with LocalCluster(n_workers=1, threads_per_worker=args.threads, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            t = time.perf_counter()
            run = bigcare.restore(tmp / "win.ome.zarr", tmp / f"win_{len(rows)}.ome.zarr", model, client=client,
                                  block_shape=block, device=args.device, pyramid=False, progress=False)
            seconds = time.perf_counter() - t
        rows[label] = {"seconds": seconds, "blocks": run.blocks_total, "halo_overhead": run.halo_overhead,
                       "vs_in_memory": rows["in_memory_seconds"] / seconds, "precision": run.precision,
                       "peak_worker_rss_mb": run.peak_worker_rss_mb, "Mvox_s": vox / seconds / 1e6}
    rows["in_memory_Mvox_s"] = vox / rows["in_memory_seconds"] / 1e6
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["copy", "care", "rss", "cpu-goal", "background", "decodes", "window", "all"])
    parser.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (the test suite runs it): no figures")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--care-shape", type=int, nargs=3, default=(64, 256, 256))
    parser.add_argument("--bg-filters", type=int, default=None,
                        help="background: a random U-Net of this many base filters instead of the trained demo model")
    parser.add_argument("--tmp", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.care_shape = (16, 64, 64)
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="bigcare-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    benches = {"copy": bench_copy, "care": bench_care, "rss": bench_rss, "cpu-goal": bench_cpu_goal,
               "background": bench_background, "decodes": bench_decodes, "window": bench_window}
    names = list(benches) if args.which == "all" else [args.which]
    results = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                          f"{torch.get_num_threads()} torch threads", "torch": torch.__version__,
               "device": args.device}
    try:
        for name in names:
            results[name] = benches[name](tmp, args)
    finally:
        if not args.tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
