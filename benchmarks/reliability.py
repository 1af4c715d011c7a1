"""Reliability readouts on the synthetic protocol (CARE Fig. 5): probabilistic CARE, an ensemble,
its disagreement, and calibration, in one run.

    flock /tmp/bigcare-bench.lock python benchmarks/reliability.py [--out /tmp/bigcare-reliability]

1. write training pairs, one calibration pair, one held-out test pair, and an out-of-distribution
   input of the test volume with 4x fewer photons (bigcare.synth nuclei, care_quality's noise);
2. train plain CARE (MAE) and a probabilistic ensemble (``loss: laplace``, ``ensemble: M``; member 0
   is the single probabilistic model) with ``bigcare.train``, the same data and steps;
3. restore the test input blockwise with each (``bigcare.restore``, one local cluster);
4. report NRMSE/SSIM of plain CARE and of the probabilistic mean (goal: within 2%); coverage of
   the 90% interval and ECE on the held-out pair before and after recalibration on the
   calibration pair (goal 85-95% after); Spearman rho between the ensemble's disagreement D and
   the absolute error of its mean per voxel (goal >= 0.3), on the test input and on a graded input
   (the test volume's truth acquired with a photon budget falling along x from the training
   photons to 8x fewer: easy and hard regions in one volume, as light-sheet attenuation makes
   them); mean D in and out of distribution.

Prints one JSON report (and writes it to OUT/reliability.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import bigcare
from bigcare.metrics import _normalized, nrmse, ssim
from bigcare.runs.calibrate import calibrate
from bigcare.store.axes import Axis
from bigcare.store.write import write_array
from bigcare.synth import degrade, write_pair
from bigcare.training import train

NOISE = dict(photons=4.0, background=0.1, read_noise=0.05)
GRADED_RANGE = 8  # the graded input's photons fall from NOISE's to 1/8 of it along x


def _config(out: Path, args, name: str, **training) -> dict:
    return {
        "model_dir": str(out / name),
        "data": {"sources": [{"input": str(out / f"train_in_{k}.ome.zarr"), "target": str(out / f"train_gt_{k}.ome.zarr")}
                             for k in range(args.train_volumes)],
                 "patch_shape": list(args.patch), "n_patches": args.patches},
        "network": {"depth": 2, "n_filter_base": args.filters},
        "training": {"epochs": args.epochs, "steps_per_epoch": args.steps, "batch_size": args.batch, "resume": False,
                     **training},
    }


def _read(url: str) -> np.ndarray:
    return np.asarray(bigcare.open_volume(url).array()[...], dtype=np.float32)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/bigcare-reliability")
    parser.add_argument("--shape", type=int, nargs=3, default=(24, 96, 96))
    parser.add_argument("--train-volumes", type=int, default=3)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--filters", type=int, default=8)
    parser.add_argument("--patch", type=int, nargs=3, default=(16, 32, 32))
    parser.add_argument("--patches", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--laplace-beta", type=float, default=None,
                        help="training.laplace_beta of the ensemble (default: the config's default, 1)")
    parser.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (the test suite runs it): no figures")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.train_volumes, args.members = (16, 64, 64), 1, 2
        args.epochs, args.steps, args.filters, args.patch, args.patches, args.batch = 1, 2, 2, (8, 16, 16), 16, 2
    out = Path(args.out)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    for k in range(args.train_volumes):
        write_pair(out / f"train_in_{k}.ome.zarr", out / f"train_gt_{k}.ome.zarr", args.shape, chunks=(8, 32, 32),
                   seed=1000 + 17 * k, **NOISE)
    for split, seed in (("calib", 7001), ("test", 7002)):
        write_pair(out / f"{split}_in.ome.zarr", out / f"{split}_gt.ome.zarr", args.shape, chunks=(8, 32, 32),
                   seed=seed, **NOISE)
    # out of distribution: the test volume with 4x fewer photons (same structures, same seed)
    write_pair(out / "ood_in.ome.zarr", out / "ood_gt.ome.zarr", args.shape, chunks=(8, 32, 32), seed=7002,
               **{**NOISE, "photons": NOISE["photons"] / 4})
    # harder in places: the same truth, photons falling geometrically along x from NOISE's to 1/8 of it
    photon_map = NOISE["photons"] * np.geomspace(1.0, 1 / GRADED_RANGE, args.shape[-1])
    graded = degrade(_read(str(out / "test_gt.ome.zarr")), **{**NOISE, "photons": photon_map}, seed=7003)
    write_array(out / "graded_in.ome.zarr", graded, chunks=(8, 32, 32), scale=(1.0, 1.0, 1.0),
                axes=[Axis.named(a, "micrometer") for a in "zyx"], ngff_version="0.5")
    timings["data_s"] = time.perf_counter() - t

    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=None, silence_logs=40) as cluster, \
            Client(cluster) as client:
        t = time.perf_counter()
        train(_config(out, args, "care"), client=client, progress=False)
        timings["train_care_s"] = time.perf_counter() - t
        t = time.perf_counter()
        beta = {} if args.laplace_beta is None else {"laplace_beta": args.laplace_beta}
        train(_config(out, args, "ensemble", loss="laplace", ensemble=args.members, **beta), client=client,
              progress=False)
        timings["train_ensemble_s"] = time.perf_counter() - t
        single = out / "ensemble" / "member_0" / "best"

        t = time.perf_counter()
        kw = dict(client=client, overwrite=True, progress=False, precision="fp32")
        care = bigcare.restore(out / "test_in.ome.zarr", out / "test_care.ome.zarr", out / "care" / "best", **kw)
        prob = bigcare.restore(out / "test_in.ome.zarr", out / "test_prob.ome.zarr", single, **kw)
        timings["restore_single_s"] = time.perf_counter() - t

        # calibration: measured on the held-out test pair, fitted on the calibration pair
        pair_test = [(out / "test_in.ome.zarr", out / "test_gt.ome.zarr")]
        pair_cal = [(out / "calib_in.ome.zarr", out / "calib_gt.ome.zarr")]
        cal = {}
        for name, model in (("single", single), ("ensemble", out / "ensemble")):
            before = calibrate(model, pair_test, plot=False)
            fitted = calibrate(model, pair_cal, recalibrate=True)
            after = calibrate(model, pair_test, plot=False)
            cal[name] = {"coverage_90_before": before["coverage"][8], "ece_before": before["ece"],
                         "scale_factor": fitted["scale_factor"], "coverage_90_after": after["coverage"][8],
                         "ece_after": after["ece"], "width_90_after": after["mean_interval_width_90"],
                         "coverage_before": before["coverage"], "coverage_after": after["coverage"]}
        # the ensemble's readouts (recalibrated) on the test input and the out-of-distribution input
        t = time.perf_counter()
        ens = bigcare.restore(out / "test_in.ome.zarr", out / "test_ens.ome.zarr", out / "ensemble", **kw)
        ood = bigcare.restore(out / "ood_in.ome.zarr", out / "ood_ens.ome.zarr", out / "ensemble", **kw)
        grd = bigcare.restore(out / "graded_in.ome.zarr", out / "graded_ens.ome.zarr", out / "ensemble", **kw)
        timings["restore_ensemble_s"] = time.perf_counter() - t

    from scipy.stats import spearmanr

    gt = _read(str(out / "test_gt.ome.zarr"))
    noisy = _read(str(out / "test_in.ome.zarr"))
    images = {"input": noisy, "care": _read(care.outputs["restored"]), "probabilistic_mean": _read(prob.outputs["mean"]),
              "ensemble_mean": _read(ens.outputs["mean"])}
    quality = {k: {"nrmse": nrmse(v, gt), "ssim": ssim(v, gt)} for k, v in images.items()}
    fitted_mean, gt_n = _normalized(images["ensemble_mean"], gt)
    error = np.abs(fitted_mean - gt_n).ravel()
    d_in = _read(ens.outputs["disagreement"]).ravel()
    d_ood = _read(ood.outputs["disagreement"]).ravel()
    rho = float(spearmanr(d_in, error).statistic)
    # a diagnostic beside the goal (not instead of it): the same rho on the brighter half of the truth
    bright = gt_n.ravel() > np.median(gt_n)
    rho_bright = float(spearmanr(d_in[bright], error[bright]).statistic)
    # the graded input: does D follow the local difficulty? (per x-third: photons 4 -> 2, 2 -> 1, 1 -> 0.5)
    fitted_g, _ = _normalized(_read(grd.outputs["mean"]), gt)
    error_g = np.abs(fitted_g - gt_n)
    d_g = _read(grd.outputs["disagreement"])
    thirds = np.array_split(np.arange(gt.shape[-1]), 3)
    graded_report = {
        "spearman_rho_d_vs_abs_error": float(spearmanr(d_g.ravel(), error_g.ravel()).statistic),
        "mean_d_per_x_third": [float(d_g[..., i].mean()) for i in thirds],
        "mean_abs_error_per_x_third": [float(error_g[..., i].mean()) for i in thirds],
    }
    graded_report["goal_rho_ge_0.3"] = graded_report["spearman_rho_d_vs_abs_error"] >= 0.3
    p, c = quality["probabilistic_mean"], quality["care"]
    report = {
        "args": vars(args), "timings": timings, "quality": quality,
        "probabilistic_vs_care": {"nrmse_ratio": p["nrmse"] / c["nrmse"], "ssim_ratio": p["ssim"] / c["ssim"],
                                  "goal_within_2pct": p["nrmse"] <= 1.02 * c["nrmse"] and p["ssim"] >= 0.98 * c["ssim"]},
        "calibration": cal,
        "goal_coverage_90_after_in_85_95": {k: 0.85 <= v["coverage_90_after"] <= 0.95 for k, v in cal.items()},
        "disagreement": {"spearman_rho_d_vs_abs_error": rho, "goal_rho_ge_0.3": rho >= 0.3,
                         "spearman_rho_brighter_half_of_truth": rho_bright,
                         "mean_d_in_distribution": float(d_in.mean()), "mean_d_4x_fewer_photons": float(d_ood.mean()),
                         "goal_ood_higher": float(d_ood.mean()) > float(d_in.mean()),
                         "graded_input": graded_report},
    }
    (out / "reliability.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
