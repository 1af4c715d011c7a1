"""Is a bigcare model faster through ONNX Runtime (or OpenVINO) than through torch on this CPU?

CSBDeep's default 3D CARE net (depth 2, 32 filters, kernel 3, 996,769 parameters, random
weights) on one float32 region (default 48x128x128, in one call), in one process, variants
interleaved (order rotated every round), median of ``--repeats`` rounds after one warm-up call:

    torch fp32 / bf16   bigcare's fast path (prepare_model: channels-last, oneDNN convs, autocast)
    onnxruntime fp32    the exported package's model.onnx (opset 17), CPU execution provider,
                        graph optimisations on (ORT_ENABLE_ALL), intra-op threads = --threads
    openvino fp32/bf16  the same ONNX file compiled for CPU (INFERENCE_PRECISION_HINT), if installed

The ONNX file is written exactly as ``bigcare export`` writes it. Errors: max abs difference
against torch fp32 over max |torch fp32|.

    python benchmarks/onnx_backend.py                 # ~2 min on 2 cores
    python benchmarks/onnx_backend.py --shape 32 64 64 --repeats 2
    python benchmarks/onnx_backend.py --restore       # whole restores, torch vs OpenVINO, ~6 min
    python benchmarks/onnx_backend.py --restore --isotropic --restore-shape 32 384 384 --block-shape 64 128 128
    python benchmarks/onnx_backend.py --smoke         # seconds (tests/test_exchange_openvino.py)

The last line is JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def build(threads: int, shape: tuple[int, ...], workdir: Path) -> tuple[dict, np.ndarray]:
    """name -> callable(x numpy) -> numpy, for every runtime present; and the input."""
    from bigcare.exchange.bioimageio import _export_onnx
    from bigcare.exchange.unet_arch import BigcareUNet
    from bigcare.models import UNet, UNetConfig
    from bigcare.predictors.fastpath import prepare_model

    torch.manual_seed(0)
    cfg = UNetConfig(ndim=3)
    net = UNet(cfg).eval()
    assert sum(p.numel() for p in net.parameters()) == 996_769
    x = np.random.default_rng(0).random((1, 1, *shape), dtype=np.float32)
    runs = {}
    for precision in ("fp32", "bf16"):
        fast = prepare_model(net, device="cpu", precision=precision)

        def run(a, fast=fast):
            with torch.inference_mode():
                return fast(torch.from_numpy(a))["restored"].float().numpy()

        runs[f"torch {precision}"] = run
    packaged = BigcareUNet(ndim=3, depth=2, n_filter_base=32, kernel_size=3, n_conv_per_depth=2, pool=2,
                           n_channel_in=1, n_channel_out=1, residual=True, heads=[["restored", "linear"]]).eval()
    packaged.load_state_dict(net.state_dict())
    onnx_file = workdir / "model.onnx"
    _export_onnx(packaged, x, ["restored"], onnx_file)
    if importlib.util.find_spec("onnxruntime"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
        runs["onnxruntime fp32"] = lambda a: session.run(None, {"raw": a})[0]
    if importlib.util.find_spec("openvino"):
        import openvino as ov

        core = ov.Core()
        for precision, hint in (("fp32", "f32"), ("bf16", "bf16")):
            try:
                compiled = core.compile_model(str(onnx_file), "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                                     "INFERENCE_NUM_THREADS": threads})
            except Exception as e:  # a CPU without bf16 support refuses the hint
                print(f"openvino {precision}: not available ({e})")
                continue
            runs[f"openvino {precision}"] = lambda a, c=compiled: np.asarray(c([a])[0])
    return runs, x


def save_isotropic(path, *, n_filter_base=16, factor=2.0):
    """A 2D isotropic U-Net (random weights, depth 2, kernel 3) for volumes ``factor`` times coarser in Z."""
    from bigcare.models import IsotropicConfig, UNet, UNetConfig, save_model
    from bigcare.models.folder import ModelConfig

    arch = UNetConfig(ndim=2, depth=2, n_filter_base=n_filter_base, kernel_size=3)
    torch.manual_seed(0)
    save_model(path, UNet(arch), ModelConfig(axes="YX", architecture=arch, kind="isotropic",
                                             isotropic=IsotropicConfig(factor=factor)))
    return path


def bench_restore(args) -> None:
    """Whole ``bigcare.restore`` calls, OME-Zarr to OME-Zarr: ``--backend torch`` vs ``openvino``, fp32 and bf16.

    One uint16 volume (benchmarks/engine.py's synthetic cells, voxels 1.0 / 0.5 / 0.5), the default
    3D net (random weights) or with ``--isotropic`` a 2D isotropic U-Net (16 filters, factor 2) in
    blocks of ``--block-shape`` (output grid), one fresh LocalCluster (1 worker x ``--threads``
    threads) per variant, no pyramid; the time counts the whole call (percentiles, model load, blocks).
    """
    from distributed import Client, LocalCluster

    import bigcare
    from benchmarks.engine import make_volume, save_unet

    shape = tuple(args.restore_shape)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        make_volume(t / "in.ome.zarr", shape, (shape[0], shape[1], shape[2] // 2))
        model = save_isotropic(t / "model") if args.isotropic else save_unet(t / "model", n_filter_base=32)
        for precision in ("fp32", "bf16"):
            for backend in ("torch", "openvino"):
                with LocalCluster(n_workers=1, threads_per_worker=args.threads, dashboard_address=None) as cluster, \
                        Client(cluster) as client:
                    t0 = time.perf_counter()
                    run = bigcare.restore(t / "in.ome.zarr", t / f"{backend}_{precision}.ome.zarr", model, client=client,
                                          device="cpu", precision=precision, backend=backend, pyramid=False,
                                          block_shape=tuple(args.block_shape) if args.block_shape else None,
                                          progress=False)
                    sec = time.perf_counter() - t0
                rows[f"{backend} {precision}"] = {"s": round(sec, 2), "Mvox_s": round(float(np.prod(shape)) / sec / 1e6, 3),
                                                  "blocks": run.blocks_total, "backend": run.backend,
                                                  "peak_worker_rss_mb": round(run.peak_worker_rss_mb),
                                                  "load": round(os.getloadavg()[0], 1)}
                print(f"{backend} {precision}", rows[f"{backend} {precision}"], flush=True)
        import zarr

        ref = np.asarray(zarr.open_array(str(t / "torch_fp32.ome.zarr"), path="0")[...])
        for name in rows:
            got = np.asarray(zarr.open_array(str(t / (name.replace(" ", "_") + ".ome.zarr")), path="0")[...])
            rows[name]["max_rel_err_vs_torch_fp32"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    print("| variant | whole restore s | Mvoxel/s (input) | x torch same precision | max rel. error vs torch fp32 |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        base = rows["torch " + name.split()[1]]["Mvox_s"]
        print(f"| {name} | {r['s']} | {r['Mvox_s']} | {r['Mvox_s'] / base:.2f} | {r['max_rel_err_vs_torch_fp32']:.1e} |")
    print(json.dumps({"shape": shape, "isotropic": args.isotropic, "threads": args.threads, "rows": rows,
                      "date": time.strftime("%Y-%m-%d")}))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(48, 128, 128))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--restore", action="store_true", help="whole restore calls instead (torch vs OpenVINO)")
    p.add_argument("--restore-shape", type=int, nargs=3, default=(64, 256, 256))
    p.add_argument("--isotropic", action="store_true", help="--restore with a 2D isotropic model (factor 2)")
    p.add_argument("--block-shape", type=int, nargs=3, default=None, help="--restore's blocks [the defaults]")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one round: checks the script runs (tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.repeats, args.restore_shape = (16, 32, 32), 1, (16, 64, 64)
        args.block_shape = (16, 32, 32) if args.isotropic else args.block_shape
    torch.set_num_threads(args.threads)
    if args.restore:
        return bench_restore(args)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        runs, x = build(args.threads, tuple(args.shape), Path(tmp))
        reference = runs["torch fp32"](x)
        errors, times = {}, {name: [] for name in runs}
        for name, run in runs.items():  # warm-up (oneDNN primitives, ORT / OpenVINO graph setup)
            y = run(x)
            errors[name] = float(np.abs(y - reference).max() / np.abs(reference).max())
        names = list(runs)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                runs[name](x)
                times[name].append(time.perf_counter() - t0)
    voxels = int(np.prod(args.shape))
    rows = {name: {"median_s": statistics.median(t), "Mvox_s": voxels / statistics.median(t) / 1e6,
                   "max_rel_err": errors[name]} for name, t in times.items()}
    base = rows["torch fp32"]["Mvox_s"]
    print(f"shape {tuple(args.shape)}, {args.threads} threads, load {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print("| runtime | median s | Mvoxel/s | x torch fp32 | max rel. error vs torch fp32 |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['median_s']:.2f} | {r['Mvox_s']:.3f} | {r['Mvox_s'] / base:.2f} | {r['max_rel_err']:.1e} |")
    versions = {m: __import__(m).__version__ for m in ("torch", "onnxruntime", "openvino") if importlib.util.find_spec(m)}
    info = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus", "versions": versions,
            "shape": args.shape, "threads": args.threads, "repeats": args.repeats, "date": time.strftime("%Y-%m-%d"),
            "load_before_after": [load0, os.getloadavg()[0]]}
    print(json.dumps({"info": info, "rows": rows}))


if __name__ == "__main__":
    main()
