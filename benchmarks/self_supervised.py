"""Self-supervised denoising (Noise2Void, N2V2, structN2V) against NLM and supervised CARE, in one run.

    python benchmarks/self_supervised.py [--epochs 15 --steps 20 --out /tmp/bigcare-ssl]
    python benchmarks/self_supervised.py --smoke        # seconds, tiny sizes (the test suite runs it)
    python benchmarks/self_supervised.py --part synthetic --ablation   # + N2V with one N2V2 ingredient each

Part 1, synthetic (the protocol of benchmarks/care_quality.py: nuclei + membranes, photons 4,
background 0.1, read noise 0.05, held-out volumes at the same photon level):
  - N2V and N2V2 trained on the noisy training inputs alone (``self_supervised`` section);
  - CARE trained on the same inputs *with* their ground truth (same network size, steps, batch);
  - NLM with the oracle h of care_quality.py; all restored blockwise with ``bigcare.restore``;
  - PSNR / NRMSE / SSIM with CARE's normalisation (ground truth to percentiles 0.1/99.9,
    prediction fitted by the MSE-optimal affine map).

Part 2, real (the deskewed lattice light-sheet stack of ../shared/data, no ground truth; its noise
is correlated along X by the deskew interpolation): N2V vs structN2V (struct_axis x) trained on
the stack itself. Reported: the lag-1 autocorrelation of the residual (input - prediction) along
Z, Y and X (close to 0: the model removed noise, not structure; the input's own lag-1
correlation of its high-pass part is given for reference), and before/after PNGs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from care_quality import NOISE, nlm

import bigcare
from bigcare.metrics import nrmse, psnr, ssim
from bigcare.synth import write_pair
from bigcare.training import train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
METHODS = ("n2v", "n2v2")
#: ``--ablation``: N2V with one N2V2 ingredient at a time (name -> self_supervised, network overrides),
#: to find which of them costs N2V2 its dB on this protocol.
ABLATION = {"n2v_median": ({"method": "n2v", "replace": "median"}, {}),
            "n2v_maxblur": ({"method": "n2v"}, {"pooling": "maxblur"}),
            "n2v_no_top_skip": ({"method": "n2v"}, {"top_skip": False})}


def read(url) -> np.ndarray:
    return np.asarray(bigcare.open_volume(url).array()[...], dtype=np.float32)


def config(model_dir, sources, args, self_supervised=None, network=None) -> dict:
    cfg = {"model_dir": str(model_dir),
           "data": {"sources": sources, "patch_shape": list(args.patch), "n_patches": args.patches},
           "network": {"depth": 2, "n_filter_base": args.filters, **(network or {})},
           "training": {"epochs": args.epochs, "steps_per_epoch": args.steps, "batch_size": args.batch,
                        "resume": False}}
    if self_supervised:
        cfg["self_supervised"] = self_supervised
    return cfg


def lag1(v: np.ndarray, axis: int) -> float:
    """Correlation coefficient of ``v`` with itself shifted by one voxel along ``axis``."""
    a = np.moveaxis(v, axis, 0).astype(np.float64)
    x, y = a[:-1].ravel() - a.mean(), a[1:].ravel() - a.mean()
    return float((x * y).mean() / (a.var() + 1e-12))


def synthetic(args, out: Path, client) -> dict:
    n = args.train_volumes + args.test_volumes
    for k in range(n):
        split = "train" if k < args.train_volumes else "test"
        if args.reuse and (out / f"{split}_gt_{k}.ome.zarr").exists():
            continue
        write_pair(out / f"{split}_in_{k}.ome.zarr", out / f"{split}_gt_{k}.ome.zarr", args.shape,
                   chunks=(16, 64, 64), seed=1000 + 17 * k, **NOISE)
    inputs = [str(out / f"train_in_{k}.ome.zarr") for k in range(args.train_volumes)]
    pairs = [{"input": i, "target": i.replace("_in_", "_gt_")} for i in inputs]
    timings, models = {}, {}
    variants = {m: ({"method": m}, {}) for m in METHODS} | (ABLATION if args.ablation else {})
    for name in ("care", *variants):
        t = time.perf_counter()
        if args.reuse and (out / name / "best").exists():  # trained by an earlier run with these arguments
            models[name] = {"reused": str(out / name / "best")}
            continue
        if name == "care":
            cfg = config(out / name, pairs, args)
        else:
            cfg = config(out / name, inputs, args, *variants[name])
        result = train(cfg, client=client, progress=not args.smoke)
        timings[f"train_{name}_s"] = time.perf_counter() - t
        models[name] = {"best_epoch": result.best_epoch + 1, "best_val_loss": min(result.val_loss)}
    rows = []
    for k in range(args.train_volumes, n):
        noisy_url, gt = out / f"test_in_{k}.ome.zarr", read(out / f"test_gt_{k}.ome.zarr")
        noisy = read(noisy_url)
        images = {"input": noisy}
        for name in ("care", *variants):
            url = out / f"test_{name}_{k}.ome.zarr"
            bigcare.restore(noisy_url, url, out / name / "best", overwrite=True, client=client, progress=False)
            images[name] = read(url)
        t = time.perf_counter()
        images["nlm"], h = nlm(noisy, gt) if not args.smoke else (noisy, 1.0)
        timings[f"nlm_{k}_s"] = time.perf_counter() - t
        rows.append({"volume": k, "nlm_h_over_sigma": h, **{
            name: {"psnr": psnr(img, gt), "nrmse": nrmse(img, gt), "ssim": ssim(img, gt)}
            for name, img in images.items()}})
    names = ("input", "nlm", *variants, "care")
    mean = {name: {m: float(np.mean([r[name][m] for r in rows])) for m in ("psnr", "nrmse", "ssim")} for name in names}
    return {"timings": timings, "models": models, "per_volume": rows, "mean": mean}


def llsm(args, out: Path, client) -> dict:
    from bigcare.store.convert import tiff_to_ome_zarr

    tif = DATA / "llsm_cell_deskewed.tif"
    if not tif.exists():
        return {"skipped": f"{tif} not found"}
    url = out / "llsm.ome.zarr"
    if not url.exists():
        tiff_to_ome_zarr(tif, url, voxel_size=(0.157, 0.1, 0.1), chunks=(16, 64, 64))
    if args.smoke:  # a corner of the stack only
        small = out / "llsm_small.ome.zarr"
        if not small.exists():
            from bigcare.store.write import write_array

            write_array(small, read(url)[:16, :64, :96].astype(np.uint16), axes="zyx", scale=(0.157, 0.1, 0.1),
                        chunks=(16, 64, 64))
        url = small
    noisy = read(url)
    from scipy import ndimage as ndi

    high = noisy - ndi.uniform_filter(noisy, 5)  # the input's own noise correlation, for reference
    report = {"input_highpass_lag1": {a: lag1(high, i) for i, a in enumerate("zyx")}}
    images = {"input": noisy}
    for name, section in (("n2v", {"method": "n2v"}), ("structn2v", {"method": "structn2v", "struct_axis": "x",
                                                                      "struct_radius": args.struct_radius})):
        t = time.perf_counter()
        cfg = config(out / f"llsm_{name}", [str(url)], args, section)
        cfg["training"]["epochs"], cfg["training"]["steps_per_epoch"] = args.llsm_epochs, args.steps
        train(cfg, client=client, progress=not args.smoke)
        restored = out / f"llsm_{name}_restored.ome.zarr"
        bigcare.restore(url, restored, out / f"llsm_{name}" / "best", overwrite=True, client=client, progress=False)
        images[name] = read(restored)
        residual = noisy - images[name]
        report[name] = {"train_and_restore_s": time.perf_counter() - t,
                        "residual_lag1": {a: lag1(residual, i) for i, a in enumerate("zyx")},
                        "residual_std": float(residual.std())}
    report["png"] = str(_figure(images, out / "llsm_n2v_vs_structn2v.png"))
    return report


def _figure(images: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = images["input"].shape[0] // 2
    lo, hi = np.percentile(images["input"][z], (1, 99.8))
    fig, axes = plt.subplots(1, len(images), figsize=(4.2 * len(images), 4.2))
    for ax, (name, img) in zip(axes, images.items()):
        ax.imshow(img[z], cmap="magma", vmin=lo, vmax=hi)
        ax.set_title(f"{name} (z = {z})")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/bigcare-ssl")
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 128, 128))
    parser.add_argument("--train-volumes", type=int, default=4)
    parser.add_argument("--test-volumes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--llsm-epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--patch", type=int, nargs=3, default=(16, 64, 64))
    parser.add_argument("--patches", type=int, default=512)
    parser.add_argument("--struct-radius", type=int, default=2)
    parser.add_argument("--ablation", action="store_true", help="also train N2V with one N2V2 ingredient at a "
                        "time (median replacement, max-blur pooling, no top skip)")
    parser.add_argument("--part", choices=("all", "synthetic", "llsm"), default="all")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds; no figures to read")
    parser.add_argument("--reuse", action="store_true", help="keep the data and the trained models (best/) already in "
                        "--out (evaluate again)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.train_volumes, args.test_volumes = (16, 96, 96), 1, 1
        args.epochs = args.llsm_epochs = args.steps = 1
        args.batch, args.filters, args.patch, args.patches = 2, 2, (8, 32, 32), 8
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from bigcare.tasks.cluster import cluster_client

    report: dict = {"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M")}
    t0 = time.perf_counter()
    with cluster_client(None, workers=2, quiet=True) as client:
        if args.part in ("all", "synthetic"):
            report["synthetic"] = synthetic(args, out, client)
        if args.part in ("all", "llsm"):
            report["llsm"] = llsm(args, out, client)
    report["total_s"] = time.perf_counter() - t0
    (out / "self_supervised.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if "synthetic" in report:
        mean = report["synthetic"]["mean"]
        print(f"\n{'held-out mean':<16}{'PSNR':>8}{'NRMSE':>8}{'SSIM':>8}")
        for name, m in mean.items():
            print(f"{name:<16}{m['psnr']:>8.2f}{m['nrmse']:>8.4f}{m['ssim']:>8.4f}")
        print(f"N2V beats NLM on PSNR: {mean['n2v']['psnr'] > mean['nlm']['psnr']}; "
              f"N2V2 within 1.5 dB of CARE: {mean['care']['psnr'] - mean['n2v2']['psnr'] <= 1.5}")
    return report


if __name__ == "__main__":
    main()
