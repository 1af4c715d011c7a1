"""The GPU suite (issue 20, item 6): one command, one JSON, for the first GPU a session is lent.

    python benchmarks/gpu_suite.py                 # on the device machine: JSON to $OUT/gpu_suite.json
    python benchmarks/gpu_suite.py --smoke         # seconds, tiny sizes, any device (the test suite runs it)

What it measures, in this order (each part records its own error instead of stopping the suite):

1. **model only**: CSBDeep's default 3D CARE U-Net (depth 2, 32 base filters, kernel 3,
   996,769 parameters; random weights) through :func:`bigcare.predictors.fastpath.prepare_model`
   on one ``--window`` (default 64 x 256 x 256) per call, for fp32 / bf16 / fp16 x channels-last
   on/off (and torch.compile with channels-last; cudnn autotuning on): voxels per second (median of
   ``--repeats`` timed calls after warm-up, synchronised), and the relative L2 error of each
   against fp32 plain;
2. **end to end**: a uint16 OME-Zarr volume of ``--e2e-gb`` GB (default 2) generated on the
   machine (smooth noise, written in parallel), restored OME-Zarr -> OME-Zarr by
   :func:`bigcare.restore` on a ``local-cuda`` cluster with default blocks, in ``--precision``
   (default bf16): voxels per second (the run's own and the whole call's), the ratio to the
   matching model-only figure, and where the task time goes (read, predict, write, summed over
   blocks); the GPU utilisation sampled every 0.5 s during the run (``nvidia-smi``; absent on CPU).

Goals on an H100/H200 (issue 20): model only >= 0.5 Gvoxel/s in bf16; end to end >= 0.85 of
model only. The suite asserts nothing; RESULTS.md records what it printed, with the date.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _network(ndim: int = 3, n_filter_base: int = 32):
    import torch

    from bigcare.models import UNet, UNetConfig

    torch.manual_seed(0)
    return UNet(UNetConfig(ndim=ndim, depth=2, n_filter_base=n_filter_base, kernel_size=3))


def model_only(device: str, window: tuple[int, ...], repeats: int, n_filter_base: int, smoke: bool,
               compile_: bool = True) -> dict:
    """Voxels per second and error vs fp32 of every precision x layout x compile variant."""
    import torch

    from bigcare.predictors.fastpath import prepare_model

    net = _network(len(window), n_filter_base).eval()
    x = torch.from_numpy(np.random.default_rng(0).random((1, 1, *window), dtype=np.float32)).to(device)
    precisions = ["fp32", "bf16"] + (["fp16"] if device.startswith("cuda") else [])
    reference = None
    rows = []
    for precision in precisions:
        for channels_last in (False, True):
            # compiling costs tens of seconds per variant: only with channels-last (cuDNN's fast layout)
            for compiled in [False] + ([True] if compile_ and channels_last else []):
                row: dict = {"precision": precision, "channels_last": channels_last, "compile": compiled}
                try:
                    t0 = time.perf_counter()
                    f = prepare_model(net, device=device, precision=precision, channels_last=channels_last,
                                      compile=compiled, example_shape=tuple(x.shape) if compiled else None,
                                      cudnn_benchmark=True if device.startswith("cuda") else None)
                    for _ in range(1 if smoke else 2):  # warm-up: autotuning, compilation
                        out = f(x)
                    _sync(device)
                    row["prepare_s"] = round(time.perf_counter() - t0, 2)
                    times = []
                    for _ in range(repeats):
                        t = time.perf_counter()
                        out = f(x)
                        _sync(device)
                        times.append(time.perf_counter() - t)
                    y = next(iter(out.values())).float().cpu().numpy()
                    if reference is None:
                        reference = y
                    row["gvoxel_per_s"] = x.numel() / statistics.median(times) / 1e9
                    row["relative_l2_vs_fp32"] = float(np.linalg.norm(y - reference) / max(np.linalg.norm(reference), 1e-30))
                except Exception as exc:  # noqa: BLE001 - recorded, the suite goes on
                    row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                rows.append(row)
                print("model-only", json.dumps(row), flush=True)
    return {"window": list(window), "parameters": sum(p.numel() for p in net.parameters()), "variants": rows}


class _GpuSampler:
    """nvidia-smi utilisation and memory every ``every`` seconds, in a thread."""

    def __init__(self, every: float = 0.5):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                line = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                       "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                      timeout=5).stdout.strip().splitlines()[0]
                util, mem = (float(v) for v in line.split(","))
                self.samples.append((time.time(), util, mem))
            except Exception:  # noqa: BLE001 - no nvidia-smi (CPU): no samples
                return
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)

    def summary(self) -> dict:
        if not self.samples:
            return {"samples": 0}
        util = [u for _, u, _ in self.samples]
        return {"samples": len(util), "mean_utilisation_pct": round(float(np.mean(util)), 1),
                "median_utilisation_pct": float(np.median(util)), "max_memory_used_mib": max(m for _, _, m in self.samples)}


def _write_volume(url: Path, shape: tuple[int, int, int], chunks: tuple[int, int, int]) -> None:
    """A smooth uint16 volume written slab by slab by a thread pool (never whole in memory)."""
    from concurrent.futures import ThreadPoolExecutor

    from scipy import ndimage

    from bigcare.store.axes import Axis
    from bigcare.store.pyramid import write_pyramid
    from bigcare.store.write import create_volume

    volume = create_volume(url, shape=shape, dtype="uint16", chunks=chunks, axes=[Axis.named(a, "micrometer") for a in "zyx"],
                           scale=(1.0, 0.5, 0.5), overwrite=True)
    target = volume.array(0, mode="r+")

    def chunk(start: tuple[int, ...]) -> None:  # one chunk per task: every core busy, little memory
        rng = np.random.default_rng(list(start))
        region = tuple(slice(a, min(n, a + c)) for a, n, c in zip(start, shape, chunks))
        size = tuple(r.stop - r.start for r in region)
        data = ndimage.gaussian_filter(rng.random(size, dtype=np.float32), 1.5)
        target[region] = np.clip(data * 20000, 0, 65535).astype(np.uint16)

    starts = [tuple(i * c for i, c in zip(index, chunks))
              for index in np.ndindex(*[-(-n // c) for n, c in zip(shape, chunks)])]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(chunk, starts))
    write_pyramid(volume)


def end_to_end(device: str, gb: float, precision: str, workdir: Path, smoke: bool) -> dict:
    """Restore a generated volume OME-Zarr -> OME-Zarr on a local cluster; where the time goes."""
    import bigcare
    from bigcare.models import save_model
    from bigcare.models.folder import ModelConfig

    side = int(round((gb * 1e9 / 2 / 256) ** 0.5 / 256)) * 256 if not smoke else 64
    shape = (32, 64, 64) if smoke else (256, max(256, side), max(256, side))
    model_dir = workdir / "model"
    net = _network(3, 4 if smoke else 32)
    save_model(model_dir, net, ModelConfig(axes="ZYX", architecture=net.config), overwrite=True)
    t = time.perf_counter()
    _write_volume(workdir / "in.ome.zarr", shape, (64, 256, 256) if not smoke else (16, 32, 32))
    made = time.perf_counter() - t
    cluster = "local-cuda" if device.startswith("cuda") else "local"
    with _GpuSampler() as sampler:
        t = time.perf_counter()
        result = bigcare.restore(workdir / "in.ome.zarr", workdir / "out.ome.zarr", model_dir, cluster=cluster,
                                 device=device, precision=precision, progress=not smoke, pyramid=False, overwrite=True,
                                 workers=1 if smoke else None)
        wall = time.perf_counter() - t
    voxels = int(np.prod(shape))
    return {"shape": list(shape), "gbytes_in": voxels * 2 / 1e9, "generate_s": round(made, 1), "precision": precision,
            "cluster": result.cluster, "blocks": result.blocks_total, "halo_overhead": result.halo_overhead,
            "run_s": result.seconds, "call_s": wall, "gvoxel_per_s_run": voxels / result.seconds / 1e9,
            "gvoxel_per_s_call": voxels / wall / 1e9, "task_seconds": result.seconds_in,
            "peak_worker_rss_mb": result.peak_worker_rss_mb, "gpu": sampler.summary()}


def main(argv=None) -> dict:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON path [$OUT/gpu_suite.json, else ./gpu_suite.json]")
    p.add_argument("--window", type=int, nargs=3, default=(64, 256, 256))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--e2e-gb", type=float, default=2.0)
    p.add_argument("--precision", default="bf16", help="end-to-end precision [bf16]")
    p.add_argument("--workdir", default=None, help="scratch folder [a temporary one, removed]")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variants")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one variant per precision and layout")
    args = p.parse_args(argv)
    window = (16, 32, 32) if args.smoke else tuple(args.window)
    repeats = 1 if args.smoke else args.repeats
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_suite.json")
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": args.device, "torch": torch.__version__,
                    "cuda": torch.version.cuda, "smoke": args.smoke, "cpus": os.cpu_count(),
                    "gpu_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None}
    t0 = time.perf_counter()
    try:
        report["model_only"] = model_only(args.device, window, repeats, 4 if args.smoke else 32, args.smoke,
                                          compile_=not (args.smoke or args.no_compile))
    except Exception as exc:  # noqa: BLE001
        report["model_only"] = {"error": f"{type(exc).__name__}: {exc}"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))  # the model-only part survives a later kill
    if not args.skip_e2e:
        workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bigcare-gpu-suite-"))
        try:
            e2e = end_to_end(args.device, args.e2e_gb, args.precision, workdir, args.smoke)
            same = [v for v in report["model_only"].get("variants", []) if v.get("precision") == args.precision
                    and v.get("channels_last") and not v.get("compile") and "gvoxel_per_s" in v]
            if same:
                e2e["ratio_to_model_only"] = e2e["gvoxel_per_s_run"] / same[0]["gvoxel_per_s"]
            report["end_to_end"] = e2e
        except Exception as exc:  # noqa: BLE001
            report["end_to_end"] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
        finally:
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
    report["suite_s"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
