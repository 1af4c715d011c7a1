"""Beyond the diffraction limit: input vs Richardson-Lucy vs deconvolution CARE vs the GAN.

    python benchmarks/subdiffraction.py [--full --device cuda] [--smoke] [--out DIR]

Held-out synthetic widefield images of sub-diffraction tubules (FWHM 0.1 um) and granules
(bigcare.synth, 0.04 um pixels, widefield PSF NA 0.8 at 0.52 um, Perlin-like background, Poisson
+ Gaussian noise), 2D, trained on 128x128 patches as in the CARE paper (Fig. 4):

1. write training and held-out (input, truth) pairs as OME-Zarr (``write_synthetic``, other seeds
   for the held-out images);
2. train a 2D deconvolution CARE U-Net and the Wang et al. 2019 GAN (``training.method: gan``)
   with ``bigcare.train`` on the same pairs;
3. restore the held-out inputs blockwise with ``bigcare.restore``;
4. Richardson-Lucy (``skimage.restoration.richardson_lucy``, the true PSF) on the percentile-
   normalised inputs, the iteration count tuned on the held-out truth (an oracle that favours RL);
5. report PSNR and SSIM (bigcare.metrics, CARE normalisation), the mean FWHM of Gaussian fits
   across the true tubule centre lines (bigcare.resolution.tubule_fwhm) against the truth's, and
   hallucinations: local maxima above a threshold (on the output mapped onto the normalised
   truth) with no true granule and no tubule within a radius, i.e. structure absent from the
   truth (counted for every method, and for the truth itself as a check); the recall of the
   true granules; and the FRC resolution (1/7) between the outputs of two independent noisy
   images of the first held-out field (bigcare.resolution.frc_resolution).

The CPU default is cut to minutes on 2 cores (small networks, few steps); ``--full`` is the size
meant for a GPU (bigger training set, 32 filters, thousands of steps).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import bigcare
from bigcare.metrics import fit_affine, normalize_percentile, psnr, ssim
from bigcare.resolution import frc_resolution, tubule_fwhm
from bigcare.store.write import write_array
from bigcare.synth import Granules, Microscope, Tubules, make_psf, write_synthetic
from bigcare.synth.acquire import Background

VOXEL = (0.04, 0.04)
PSF = {"kind": "widefield", "na": 0.8, "wavelength": 0.52}
METHODS = ("input", "rl", "care", "gan")
HALF = 0.5  # um: profile half length, wide enough for the widefield blur (FWHM ~0.35 um)


def sizes(args) -> dict:
    """Image, patch, network and step counts of a mode."""
    if args.smoke:
        return dict(train=1, test=1, shape=(128, 128), patch=32, n_patches=16, filters=2, steps=2, epochs=1,
                    batch=2, rl=(2, 4))
    if args.full:
        size = dict(train=8, test=4, shape=(1024, 1024), patch=128, n_patches=4000, filters=32, steps=200, epochs=50,
                    batch=16, rl=(5, 10, 20, 40, 80, 160))
    else:
        size = dict(train=3, test=2, shape=(384, 384), patch=128, n_patches=300, filters=8, steps=40, epochs=8,
                    batch=4, rl=(5, 10, 20, 40, 80))
    return size | {k: v for k in ("epochs", "filters") if (v := getattr(args, k, None)) is not None}


def second_realisation(tubules, granules, shape, microscope: Microscope, seed: int, photons: float) -> np.ndarray:
    """The same camera image as ``acquire(seed=seed)`` but with independent Poisson + Gaussian noise."""
    from dataclasses import replace

    from bigcare.synth import acquire

    expected = acquire([tubules, granules], shape, VOXEL, replace(microscope, photons=1e9, read_noise=0.0), seed=seed)
    rng = np.random.default_rng(seed + 99)
    lam = np.clip((expected.astype(np.float64) + microscope.offset) * photons, 0, None)
    return (rng.poisson(lam) / photons + microscope.read_noise * rng.standard_normal(lam.shape)).astype(np.float32)


def richardson_lucy(image: list[np.ndarray], psf: np.ndarray, truth_list, checkpoints) -> tuple[list[np.ndarray], int]:
    """RL on each percentile-normalised input, the iteration count with the best mean PSNR."""
    from skimage.restoration import richardson_lucy as rl

    best = None
    for n in checkpoints:
        out = [rl(np.clip(normalize_percentile(x, 1, 99.8), 0, None), psf, num_iter=n, clip=False) for x in image]
        score = float(np.mean([psnr(o, t) for o, t in zip(out, truth_list)]))
        if best is None or score > best[0]:
            best = (score, out, n)
    assert best is not None
    return best[1], best[2]


def hallucinations(image: np.ndarray, truth: np.ndarray, granules: np.ndarray, paths: list[np.ndarray], *,
                   threshold: float = 0.3, radius: float = 3.0) -> dict:
    """Local maxima of ``image`` (mapped onto the normalised truth) above ``threshold`` with no true
    granule and no tubule point within ``radius`` pixels; and the recall of the true granules."""
    from scipy.spatial import cKDTree
    from skimage.feature import peak_local_max

    g = normalize_percentile(truth, 0.1, 99.9)
    a, b = fit_affine(image, g)
    peaks = peak_local_max(a * image + b, min_distance=2, threshold_abs=threshold, exclude_border=4)
    structure = np.concatenate([granules[:, :2], *paths]) if paths else granules[:, :2]
    far = cKDTree(structure).query(peaks, distance_upper_bound=radius)[0] == np.inf if len(peaks) else np.zeros(0, bool)
    inside = np.all((granules[:, :2] >= 4) & (granules[:, :2] < np.array(image.shape) - 4), axis=1)
    true = granules[inside, :2]
    found = cKDTree(peaks).query(true, distance_upper_bound=radius)[0] < np.inf if len(peaks) and len(true) else []
    return {"maxima": int(len(peaks)), "false_positive": int(np.sum(far)),
            "granule_recall": float(np.mean(found)) if len(true) else float("nan")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/bigcare-subdiffraction")
    ap.add_argument("--full", action="store_true", help="the GPU size (8 training images of 1024^2, 32 filters, "
                    "10000 steps each)")
    ap.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (the test suite runs it)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=1, help="local dask workers for reads and restores [1]")
    ap.add_argument("--photons", type=float, default=20.0)
    ap.add_argument("--epochs", type=int, help="epochs of CARE and the GAN instead of the mode's (CPU 8, full 50)")
    ap.add_argument("--filters", type=int, help="base filters of both networks instead of the mode's (CPU 8, full 32)")
    args = ap.parse_args(argv)
    s = sizes(args)
    out = Path(args.out)
    # denser than bigcare synth's defaults, so that a 384^2 image (15 um) holds ~20 tubules, ~50 granules
    tubules, granules = Tubules(density=0.08), Granules(density=0.2)
    structures = [tubules, granules]
    psf = make_psf(PSF, VOXEL, 2)
    microscope = Microscope(psf=psf, photons=args.photons, background=Background(amplitude=0.2), read_noise=0.01)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    seeds = {f"train_{k}": 100 + 10 * k for k in range(s["train"])} | {f"test_{k}": 5000 + 10 * k for k in range(s["test"])}
    for name, seed in seeds.items():
        write_synthetic(out / f"{name}_in.ome.zarr", out / f"{name}_gt.ome.zarr", s["shape"], structures, microscope,
                        voxel_size=VOXEL, chunks=(128, 128), seed=seed, overwrite=True)
    timings["data_s"] = time.perf_counter() - t

    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=40)
    client = Client(cluster)
    try:
        base = {"data": {"sources": [{"input": str(out / f"train_{k}_in.ome.zarr"),
                                      "target": str(out / f"train_{k}_gt.ome.zarr")} for k in range(s["train"])],
                         "patch_shape": [s["patch"]] * 2, "n_patches": s["n_patches"]},
                "training": {"epochs": s["epochs"], "steps_per_epoch": s["steps"], "batch_size": s["batch"],
                             "device": args.device, "resume": False}}
        configs = {
            "care": {**base, "model_dir": str(out / "care"),
                     "network": {"depth": 2, "n_filter_base": s["filters"], "kernel_size": 5},
                     "training": {**base["training"], "loss": "mae"}},
            "gan": {**base, "model_dir": str(out / "gan"), "network": {"n_filter_base": s["filters"]},
                    "training": {**base["training"], "method": "gan", "lambda": 1.0, "nu": 1.0}},
        }
        train_info = {}
        for name, config in configs.items():
            t = time.perf_counter()
            result = bigcare.train(config, client=client, progress=not args.smoke)
            timings[f"train_{name}_s"] = time.perf_counter() - t
            train_info[name] = {"steps": s["epochs"] * s["steps"], "best_val": float(min(result.val_loss))}
        tests = [k for k in range(s["test"])]
        images: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
        truths = []
        for k in tests:
            images["input"].append(np.asarray(bigcare.open_volume(out / f"test_{k}_in.ome.zarr").array()[...]))
            truths.append(np.asarray(bigcare.open_volume(out / f"test_{k}_gt.ome.zarr").array()[...]))
            for name in ("care", "gan"):
                t = time.perf_counter()
                bigcare.restore(out / f"test_{k}_in.ome.zarr", out / f"test_{k}_{name}.ome.zarr", out / name / "best",
                                block_shape=(128, 128), client=client, overwrite=True, progress=False)
                timings[f"restore_{name}_s"] = timings.get(f"restore_{name}_s", 0.0) + time.perf_counter() - t
                images[name].append(np.asarray(bigcare.open_volume(out / f"test_{k}_{name}.ome.zarr").array()[...]))
        # FRC: a second, independent noisy image of test_0 (same structures, background and blur)
        second = second_realisation(tubules, granules, s["shape"], microscope, seeds["test_0"], args.photons)
        write_array(out / "test_0_in_b.ome.zarr", second, chunks=(128, 128), scale=VOXEL, axes="yx", overwrite=True)
        pair = {"input": (images["input"][0], second)}
        for name in ("care", "gan"):
            bigcare.restore(out / "test_0_in_b.ome.zarr", out / f"test_0_{name}_b.ome.zarr", out / name / "best",
                            block_shape=(128, 128), client=client, overwrite=True, progress=False)
            pair[name] = (images[name][0], np.asarray(bigcare.open_volume(out / f"test_0_{name}_b.ome.zarr").array()[...]))
    finally:
        client.close()
        cluster.close()
    t = time.perf_counter()
    images["rl"], rl_iterations = richardson_lucy(images["input"], psf, truths, s["rl"])
    timings["rl_s"] = time.perf_counter() - t
    pair["rl"] = (images["rl"][0], richardson_lucy([second], psf, [truths[0]], (rl_iterations,))[0][0])
    frc_um = {m: frc_resolution(a.astype(np.float64), b.astype(np.float64), VOXEL[0]) for m, (a, b) in pair.items()}

    rows: dict[str, dict] = {}
    truth_fwhm, truth_fp = [], []
    per: dict[str, dict[str, list]] = {m: {"psnr": [], "ssim": [], "fwhm": [], "false_positive": [], "maxima": [], "granule_recall": []}
           for m in METHODS}
    for i, k in enumerate(tests):
        seed = seeds[f"test_{k}"]
        paths = [p for p, _ in tubules.paths(s["shape"], VOXEL, seed=seed)]
        points = granules.points(s["shape"], VOXEL, seed=seed + 1000)
        truth_fwhm += list(tubule_fwhm(truths[i], paths, VOXEL, half_length=HALF))
        truth_fp.append(hallucinations(truths[i], truths[i], points, paths)["false_positive"])
        for m in METHODS:
            img = images[m][i].astype(np.float64)
            per[m]["psnr"].append(psnr(img, truths[i]))
            per[m]["ssim"].append(ssim(img, truths[i]))
            per[m]["fwhm"] += list(tubule_fwhm(img, paths, VOXEL, half_length=HALF))
            for key, value in hallucinations(img, truths[i], points, paths).items():
                per[m][key].append(value)
    gt_fwhm = float(np.mean(truth_fwhm)) if truth_fwhm else float("nan")
    for m in METHODS:
        fwhm = float(np.mean(per[m]["fwhm"])) if per[m]["fwhm"] else float("nan")
        rows[m] = {"psnr": float(np.mean(per[m]["psnr"])), "ssim": float(np.mean(per[m]["ssim"])),
                   "fwhm_um": fwhm, "fwhm_over_truth": fwhm / gt_fwhm, "n_profiles": len(per[m]["fwhm"]),
                   "false_positive_maxima": int(np.sum(per[m]["false_positive"])),
                   "maxima": int(np.sum(per[m]["maxima"])),
                   "granule_recall": float(np.nanmean(per[m]["granule_recall"])), "frc_um": frc_um[m]}
    goals = {
        "care_and_gan_beat_rl_psnr_ssim": all(rows[m]["psnr"] > rows["rl"]["psnr"] and rows[m]["ssim"] > rows["rl"]["ssim"]
                                              for m in ("care", "gan")),
        "input_fwhm_over_1.5x_truth": rows["input"]["fwhm_over_truth"] > 1.5,
        **{f"{m}_fwhm_within_20pct": abs(rows[m]["fwhm_over_truth"] - 1) <= 0.2 for m in ("care", "gan")},
    }
    report = {"args": vars(args), "sizes": s, "psf": PSF, "voxel_um": VOXEL, "rl_iterations": rl_iterations,
              "truth": {"fwhm_um": gt_fwhm, "n_profiles": len(truth_fwhm), "false_positive_maxima": int(sum(truth_fp))},
              "training": train_info, "timings": timings, "methods": rows, "goals": goals}
    out.mkdir(parents=True, exist_ok=True)
    (out / "subdiffraction.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print("\n| method | PSNR | SSIM | tubule FWHM (um) | FWHM / truth | false-positive maxima | granule recall | FRC (um) |")
    print("|---|---|---|---|---|---|---|---|")
    for m in METHODS:
        r = rows[m]
        label = f"rl ({rl_iterations} it.)" if m == "rl" else m
        print(f"| {label} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['fwhm_um']:.3f} | {r['fwhm_over_truth']:.2f} | "
              f"{r['false_positive_maxima']} / {r['maxima']} | {r['granule_recall']:.2f} | {r['frc_um']:.3f} |")
    print(f"| truth | | | {gt_fwhm:.3f} | 1.00 | {int(sum(truth_fp))} | | |")
    print("goals:", goals)
    return report


if __name__ == "__main__":
    main()
