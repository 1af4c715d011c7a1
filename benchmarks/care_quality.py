"""CARE vs non-local means on held-out synthetic volumes (the quality run).

    python benchmarks/care_quality.py [--epochs 12 --steps 20 --out /tmp/care_quality]

1. write training pairs and held-out test pairs (bigcare.synth: nuclei + membranes, Poisson +
   Gaussian noise at a low photon count) as OME-Zarr;
2. train a 3D CARE U-Net with ``bigcare.train`` (lazy patches from the OME-Zarr pairs);
3. restore the held-out inputs blockwise with ``bigcare.restore``;
4. denoise the same inputs with scikit-image's non-local means (sigma estimated from the
   image, 5^3 patches, search distance 6; h tuned per volume against the ground truth over
   0.6-1.4 sigma: an oracle choice that favours NLM);
5. report NRMSE and SSIM as in the CARE paper (ground truth normalized to percentiles 0.1/99.9,
   prediction fitted by the MSE-optimal affine map).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import bigcare
from bigcare.metrics import nrmse, ssim
from bigcare.synth import write_pair
from bigcare.training import train

NOISE = dict(photons=4.0, background=0.1, read_noise=0.05)


def nlm(noisy: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-local means with the h (in units of the estimated sigma) that gives the lowest NRMSE."""
    from skimage.restoration import denoise_nl_means, estimate_sigma  # estimate_sigma needs PyWavelets

    sigma = float(estimate_sigma(noisy))
    best = None
    for factor in (0.6, 0.8, 1.0, 1.2, 1.4):
        out = denoise_nl_means(noisy, h=factor * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True)
        score = nrmse(out, gt)
        if best is None or score < best[0]:
            best = (score, out, factor)
    return best[1], best[2]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/bigcare-care-quality")
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 128, 128))
    parser.add_argument("--train-volumes", type=int, default=4)
    parser.add_argument("--test-volumes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--reuse", action="store_true", help="reuse the data and model of an earlier run in --out")
    parser.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (the test suite runs it): no figures")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.train_volumes, args.test_volumes = (16, 96, 96), 1, 1
        args.epochs, args.steps, args.filters = 1, 1, 2
    out = Path(args.out)
    timings = {}

    t = time.perf_counter()
    for k in range(0 if args.reuse else args.train_volumes + args.test_volumes):
        split = "train" if k < args.train_volumes else "test"
        write_pair(out / f"{split}_in_{k}.ome.zarr", out / f"{split}_gt_{k}.ome.zarr", args.shape,
                   chunks=(16, 64, 64), seed=1000 + 17 * k, **NOISE)
    timings["data_s"] = time.perf_counter() - t

    config = {
        "model_dir": str(out / "model"),
        "data": {"sources": [{"input": str(out / f"train_in_{k}.ome.zarr"), "target": str(out / f"train_gt_{k}.ome.zarr")}
                             for k in range(args.train_volumes)],
                 "patch_shape": [8, 32, 32] if args.smoke else [16, 64, 64], "n_patches": 16 if args.smoke else 512},
        "network": {"depth": 2, "n_filter_base": args.filters},
        "training": {"epochs": args.epochs, "steps_per_epoch": args.steps, "batch_size": 2 if args.smoke else 8,
                     "resume": False},
    }
    t = time.perf_counter()
    config["training"]["resume"] = args.reuse  # with --reuse: nothing left to train, loads last/
    result = train(config, progress=not args.smoke)
    timings["train_s"] = time.perf_counter() - t

    rows = []
    for k in range(args.train_volumes, args.train_volumes + args.test_volumes):
        noisy_url, gt_url = out / f"test_in_{k}.ome.zarr", out / f"test_gt_{k}.ome.zarr"
        t = time.perf_counter()
        bigcare.restore(noisy_url, out / f"test_care_{k}.ome.zarr", out / "model" / "best", overwrite=True,
                        progress=False)
        care_s = time.perf_counter() - t
        noisy = np.asarray(bigcare.open_volume(noisy_url).array()[...])
        gt = np.asarray(bigcare.open_volume(gt_url).array()[...])
        care = np.asarray(bigcare.open_volume(out / f"test_care_{k}.ome.zarr").array()[...])
        t = time.perf_counter()
        denoised, h = nlm(noisy, gt)
        nlm_s = time.perf_counter() - t
        rows.append({"volume": k, "care_s": care_s, "nlm_s_5_tries": nlm_s, "nlm_h_over_sigma": h, **{
            name: {"nrmse": nrmse(img, gt), "ssim": ssim(img, gt)}
            for name, img in (("input", noisy), ("nlm", denoised), ("care", care))}})
    summary = {name: {m: float(np.mean([r[name][m] for r in rows])) for m in ("nrmse", "ssim")}
               for name in ("input", "nlm", "care")}
    print(json.dumps({"args": vars(args), "timings": timings, "epochs": result.epochs,
                      "best_val_loss": min(result.val_loss), "per_volume": rows, "mean": summary}, indent=2))
    print(f"\n{'held-out mean':<16}{'NRMSE':>8}{'SSIM':>8}")
    for name in ("input", "nlm", "care"):
        print(f"{name:<16}{summary[name]['nrmse']:>8.4f}{summary[name]['ssim']:>8.4f}")
    beats = summary["care"]["nrmse"] < summary["nlm"]["nrmse"] and summary["care"]["ssim"] > summary["nlm"]["ssim"]
    print(f"CARE beats NLM on both: {beats}")
    return summary


if __name__ == "__main__":
    main()
