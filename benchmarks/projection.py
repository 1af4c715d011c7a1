"""Surface projection CARE and upsampling CARE against their baselines, on held-out synthetic data.

    flock /tmp/bigcare-bench.lock python benchmarks/projection.py [--smoke] [--full --device cuda] [--out DIR]

Projection (CARE Fig. 2): synthetic surfaces (bigcare.synth.surface: a textured curved sheet,
dimmer blobs above and below, Gaussian PSF, background, Poisson + Gaussian noise). On held-out
stacks, against the true texture (PSNR/SSIM, bigcare.metrics: CARE normalisation):

- ``max``: maximum projection of the noisy stack;
- ``heightmap``: the plane of maximum local variance per pixel (7x7, on the laterally smoothed
  stack), median- and Gaussian-smoothed, sampled from the noisy stack;
- ``care3d_max`` / ``care3d_heightmap``: a 3D CARE network trained on the same stacks (noisy ->
  high-SNR stack), restored blockwise, then projected the same two ways (denoise, then project);
- ``projection``: ProjectionCARE (``projection:`` section) trained on (noisy stack, texture), restored
  blockwise to a 2D image.

Upsampling: nuclei volumes (phantom blurred by an isotropic Gaussian, high SNR) subsampled along
Z by ``FACTOR``; against the full-resolution truth: ``cubic`` (cubic spline along Z on the same
node-aligned grid), ``isotropic`` (bigcare's isotropic CARE trained on the subsampled volume
itself, isotropic Gaussian PSF) and ``upsampling`` (Upsampling CARE trained on other,
well-sampled volumes), all restored blockwise.

The CPU default is sized for ~10-15 minutes of training on 2 cores; ``--full`` is meant for a GPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

import bigcare
from bigcare.blocks.zoom import zoom_length
from bigcare.metrics import psnr, ssim
from bigcare.store.write import write_array
from bigcare.synth import phantom
from bigcare.synth.surface import write_surface

FACTOR = 3
SIGMA = 1.0  # isotropic blur of the upsampling volumes (voxels)


def sizes(args) -> dict:
    """Volumes, patches, networks and step counts of a mode."""
    if args.smoke:
        return dict(train=1, test=1, stack=(8, 48, 48), patch=16, proj_depth=1, proj_filters=2, filters=2, steps=2,
                    epochs=1, batch=2, n_patches=8, vol=(24, 64, 64), up_patch=(8, 16, 16), up_steps=2)
    if args.full:
        return dict(train=8, test=4, stack=(32, 256, 256), patch=128, proj_depth=4, proj_filters=8, filters=32,
                    steps=100, epochs=50, batch=16, n_patches=2000, vol=(96, 192, 192), up_patch=(32, 64, 64),
                    up_steps=5000)
    return dict(train=4, test=2, stack=(20, 128, 128), patch=64, proj_depth=3, proj_filters=8, filters=16, steps=30,
                epochs=8, batch=4, n_patches=400, vol=(48, 96, 96), up_patch=(16, 48, 48), up_steps=900)


def heightmap_projection(stack: np.ndarray, source: np.ndarray | None = None, window: int = 7,
                         smooth: float = 4.0) -> np.ndarray:
    """Per pixel the plane of maximum local lateral variance (smoothed height map), sampled from ``source``."""
    s = ndimage.gaussian_filter(stack.astype(np.float64), (0, 1, 1))
    var = ndimage.uniform_filter(s**2, (1, window, window)) - ndimage.uniform_filter(s, (1, window, window)) ** 2
    z = ndimage.gaussian_filter(ndimage.median_filter(np.argmax(var, axis=0).astype(np.float64), 9), smooth)
    zi = np.clip(np.rint(z).astype(int), 0, len(stack) - 1)
    return np.take_along_axis(stack if source is None else source, zi[None], 0)[0]


def cubic_z(data: np.ndarray, factor: float) -> np.ndarray:
    """Cubic-spline upsampling along Z onto the node-aligned grid of :mod:`bigcare.blocks.zoom`."""
    n = zoom_length(len(data), factor)
    coords = np.meshgrid(np.arange(n) / factor, np.arange(data.shape[1]), np.arange(data.shape[2]), indexing="ij")
    return ndimage.map_coordinates(data.astype(np.float32), coords, order=3, mode="nearest").astype(np.float32)


def upsampling_volume(shape, seed: int) -> np.ndarray:
    """A high-SNR nuclei volume (phantom blurred by SIGMA, ~1000 photons at the brightest voxel), uint16."""
    clean = ndimage.gaussian_filter(phantom(shape, shells=True, seed=seed).astype(np.float32), SIGMA)
    rng = np.random.default_rng(seed + 1)
    photons = 1000.0 / max(float(clean.max()), 1e-6)
    noisy = rng.poisson(np.clip(clean + 0.02, 0, None) * photons) / photons
    return np.clip(noisy * 4000 + 100, 0, 65535).astype(np.uint16), clean


def read(url) -> np.ndarray:
    return np.asarray(bigcare.open_volume(url).array()[...], dtype=np.float32)


def projection_part(args, s, out: Path, client, timings: dict) -> dict:
    samples = {f"train_{k}": 100 + 10 * k for k in range(s["train"])} | {f"test_{k}": 5000 + 10 * k for k in range(s["test"])}
    t = time.perf_counter()
    paths = {name: write_surface(out / name, s["stack"], seed=seed, chunks=(s["stack"][0], 64, 64),
                                 overwrite=True)
             for name, seed in samples.items()}
    timings["surface_data_s"] = time.perf_counter() - t
    train = [paths[f"train_{k}"] for k in range(s["train"])]
    common = {"training": {"epochs": s["epochs"], "steps_per_epoch": s["steps"], "batch_size": s["batch"],
                           "device": args.device, "resume": False, "lr": 1e-3}}
    configs = {
        "projection": {**common, "model_dir": str(out / "projection_model"),
                       "data": {"sources": [{"input": p["noisy"], "target": p["texture"]} for p in train],
                                "patch_shape": [s["patch"]] * 2, "n_patches": s["n_patches"]},
                       "network": {"depth": 2, "n_filter_base": s["filters"], "kernel_size": 3},
                       "projection": {"network": {"depth": s["proj_depth"], "n_filter_base": s["proj_filters"]}}},
        "care3d": {**common, "model_dir": str(out / "care3d_model"),
                   "data": {"sources": [{"input": p["noisy"], "target": p["high_snr"]} for p in train],
                            "patch_shape": [min(16, s["stack"][0] // 4 * 4), s["patch"], s["patch"]],
                            "n_patches": s["n_patches"]},
                   "network": {"depth": 2, "n_filter_base": s["filters"], "kernel_size": 3}},
    }
    info = {}
    for name, config in configs.items():
        t = time.perf_counter()
        result = bigcare.train(config, client=client, progress=not args.smoke)
        timings[f"train_{name}_s"] = time.perf_counter() - t
        info[name] = {"steps": s["epochs"] * s["steps"], "best_val": float(min(result.val_loss))}
    scores: dict[str, dict[str, list]] = {}
    for k in range(s["test"]):
        p = paths[f"test_{k}"]
        truth, noisy = read(p["texture"]), read(p["noisy"])
        images = {"max": noisy.max(0), "heightmap": heightmap_projection(noisy)}
        for name in configs:
            t = time.perf_counter()
            url = str(out / f"test_{k}_{name}.ome.zarr")
            bigcare.restore(p["noisy"], url, out / f"{name}_model" / "best", client=client, overwrite=True,
                            progress=False)
            timings[f"restore_{name}_s"] = timings.get(f"restore_{name}_s", 0.0) + time.perf_counter() - t
            restored = read(url)
            if name == "care3d":
                images["care3d_max"] = restored.max(0)
                images["care3d_heightmap"] = heightmap_projection(restored)
            else:
                images["projection"] = restored
        for m, img in images.items():
            row = scores.setdefault(m, {"psnr": [], "ssim": []})
            row["psnr"].append(psnr(img.astype(np.float64), truth))
            row["ssim"].append(ssim(img.astype(np.float64), truth))
    rows = {m: {"psnr": float(np.mean(v["psnr"])), "ssim": float(np.mean(v["ssim"]))} for m, v in scores.items()}
    others = [m for m in rows if m != "projection"]
    goal = all(rows["projection"][q] > rows[m][q] for m in others for q in ("psnr", "ssim"))
    return {"training": info, "methods": rows, "goal_projection_best_on_both": goal}


def upsampling_part(args, s, out: Path, client, timings: dict) -> dict:
    axes = "zyx"
    t = time.perf_counter()
    train_urls = []
    for k in range(s["train"]):
        data, _ = upsampling_volume(s["vol"], 300 + k)
        train_urls.append(str(out / f"up_train_{k}.ome.zarr"))
        write_array(train_urls[-1], data, chunks=(s["vol"][0], 64, 64), scale=(1.0, 1.0, 1.0), axes=axes, overwrite=True)
    tests = []
    for k in range(s["test"]):
        data, clean = upsampling_volume(s["vol"], 7000 + k)
        coarse = data[::FACTOR]
        url = str(out / f"up_test_{k}.ome.zarr")
        write_array(url, coarse, chunks=(len(coarse), 64, 64), scale=(float(FACTOR), 1.0, 1.0), axes=axes,
                    overwrite=True)
        tests.append((url, coarse, clean[: zoom_length(len(coarse), FACTOR)]))
    timings["upsampling_data_s"] = time.perf_counter() - t
    steps, epochs = s["up_steps"], max(1, min(s["epochs"], s["up_steps"]))
    training = {"epochs": epochs, "steps_per_epoch": max(1, steps // epochs), "batch_size": s["batch"],
                "device": args.device, "resume": False, "lr": 1e-3}
    up_config = {"model_dir": str(out / "upsampling_model"), "training": training,
                 "data": {"sources": train_urls, "patch_shape": list(s["up_patch"]), "n_patches": s["n_patches"]},
                 "network": {"depth": 2, "n_filter_base": s["filters"], "kernel_size": 3},
                 "upsampling": {"factor": FACTOR}}
    t = time.perf_counter()
    bigcare.train(up_config, client=client, progress=not args.smoke)
    timings["train_upsampling_s"] = time.perf_counter() - t
    rows: dict[str, dict[str, list]] = {m: {"psnr": [], "ssim": []} for m in ("cubic", "isotropic", "upsampling")}
    for k, (url, coarse, truth) in enumerate(tests):
        iso_config = {"model_dir": str(out / f"isotropic_model_{k}"), "training": {**training, "steps_per_epoch":
                                                                                   max(1, steps // epochs)},
                      "data": {"sources": [url], "patch_shape": list(s["up_patch"][1:]), "n_patches": s["n_patches"]},
                      "network": {"depth": 2, "n_filter_base": s["filters"], "kernel_size": 3},
                      "isotropic": {"psf": {"kind": "gaussian", "sigma_xy": SIGMA, "sigma_z": SIGMA}}}
        t = time.perf_counter()
        bigcare.train(iso_config, client=client, progress=not args.smoke)
        timings["train_isotropic_s"] = timings.get("train_isotropic_s", 0.0) + time.perf_counter() - t
        images = {"cubic": cubic_z(coarse, FACTOR)}
        for name, model in (("isotropic", out / f"isotropic_model_{k}" / "best"),
                            ("upsampling", out / "upsampling_model" / "best")):
            dest = str(out / f"up_test_{k}_{name}.ome.zarr")
            bigcare.restore(url, dest, model, client=client, overwrite=True, progress=False)
            images[name] = read(dest)
        for m, img in images.items():
            rows[m]["psnr"].append(psnr(img.astype(np.float64), truth))
            rows[m]["ssim"].append(ssim(img.astype(np.float64), truth))
    means = {m: {"psnr": float(np.mean(v["psnr"])), "ssim": float(np.mean(v["ssim"]))} for m, v in rows.items()}
    return {"factor": FACTOR, "methods": means}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/bigcare-projection")
    ap.add_argument("--full", action="store_true", help="GPU sizes")
    ap.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (the test suite runs it)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=1, help="local dask workers for reads and restores [1]")
    args = ap.parse_args(argv)
    s = sizes(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=40)
    client = Client(cluster)
    try:
        projection = projection_part(args, s, out, client, timings)
        upsampling = upsampling_part(args, s, out, client, timings)
    finally:
        client.close()
        cluster.close()
    report = {"args": vars(args), "sizes": s, "projection": projection, "upsampling": upsampling, "timings": timings}
    (out / "projection.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print("\n| projection method | PSNR | SSIM |\n|---|---|---|")
    for m, r in projection["methods"].items():
        print(f"| {m} | {r['psnr']:.2f} | {r['ssim']:.3f} |")
    print(f"goal (ProjectionCARE best on both): {projection['goal_projection_best_on_both']}")
    print(f"\n| upsampling method (factor {FACTOR}) | PSNR | SSIM |\n|---|---|---|")
    for m, r in upsampling["methods"].items():
        print(f"| {m} | {r['psnr']:.2f} | {r['ssim']:.3f} |")
    return report


if __name__ == "__main__":
    main()
