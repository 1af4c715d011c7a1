"""Where the dB of isotropic restoration go: ablations on one protocol, in one run (issue 19).

    python benchmarks/isotropic_ablation.py                 # ~30 min on 2 CPU cores
    python benchmarks/isotropic_ablation.py --arms base,grid_phase --steps 300
    python benchmarks/isotropic_ablation.py --smoke         # seconds (the test suite runs it)

The protocol is benchmarks/isotropic_synthetic.py's (IsoNet's nuclei phantom, Gaussian PSF
sigma_xy / sigma_z = 2 / 8 px, every 8th plane, Poisson + Gaussian camera noise), smaller:
96 x 256 x 256 on the isotropic grid (12 planes). Every arm trains the same 2D network from the
same seed on patches drawn from the same lateral planes at the same positions, and changes one
thing against ``base`` (the configuration the reduced benchmark ran, 16 filters, kernel 3):

    grid_phase   coarse rows at whole-voxel phases (as planes fall on the upsampled grid)
    noise        the degraded samples get back the noise the blur averaged away
    full_psf     the full rotated PSF instead of the split one
    csbdeep_net  CSBDeep's default 2D net (32 filters, kernel 5)
    mse          MSE loss instead of MAE
    no_augment   no lateral flips / rotations
    fixed_norm   fixed percentiles (2, 99.7) instead of per-patch draws in (1-3, 99.5-99.9)
    long         twice the steps
    geometric    base's model, XZ and YZ passes combined by the geometric mean (no training)
    small_patch  lateral patches of 2/3 the side (32 x 32 instead of 48 x 48; same steps and patches)
    large_patch  lateral patches of 4/3 the side (64 x 64)
    cosine       the learning rate annealed per step to 1/100 (training.lr_schedule: cosine) instead
                 of halved on a 10-epoch plateau, which short runs never reach
    grid_noise   grid_phase and noise together

Arms combine with "+" (``--arms noise,noise+csbdeep_net,noise+long``).

Training runs in this process with bigcare's own pieces: LateralDegradation (the degradation
``bigcare train`` applies), bigcare.training.trainer.fit (the trainer), and bigcare.predict with
the saved model folder (IsotropicPredictor: the volume upsampled along Z with
bigcare.blocks.zoom, XZ and YZ passes). Patches are drawn here rather than by the dask sampler
(same foreground rule idea: the patch's maximum above 0.2 of the volume's 99.9th percentile),
so arms differ only in what they name. Scores: PSNR / SSIM against the ground truth with CARE's
normalisation (bigcare.metrics), and the validation loss curve (steps until it stops falling).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import bigcare
from bigcare.metrics import psnr, ssim
from bigcare.models import IsotropicConfig, UNet, UNetConfig
from bigcare.models.folder import ModelConfig, Normalization
from bigcare.training.isotropic import LateralDegradation, psf_kernels
from bigcare.training.trainer import fit

ARMS = ("base", "grid_phase", "noise", "grid_noise", "full_psf", "csbdeep_net", "mse", "long", "no_augment",
        "fixed_norm", "geometric", "small_patch", "large_patch", "cosine")
#: what each arm changes; an arm named "noise+long" changes both
CHANGES = {"base": set(), "grid_noise": {"grid_phase", "noise"}}


def make_data(shape, seed=0):
    """(ground truth, input) of the synthetic protocol (benchmarks/isotropic_synthetic.py)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from isotropic_synthetic import make_data as synthetic

    return synthetic(shape, int(round(1500 * np.prod(shape) / 512**3)), seed=seed)


def draw_patches(data, read, n, seed, fixed_norm):
    """``n`` lateral patches of ``read`` shape, normalized per patch as the sampler does."""
    rng = np.random.default_rng([seed, 1])
    lo_hi = {p: np.percentile(data, p) for p in (1, 2, 3, 99.5, 99.7, 99.9)}
    thresh = 0.2 * np.percentile(data, 99.9)
    out = []
    while len(out) < n:
        z = rng.integers(0, len(data))
        y0, x0 = (rng.integers(0, s - r + 1) for s, r in zip(data.shape[1:], read))
        p = data[z, y0:y0 + read[0], x0:x0 + read[1]].astype(np.float32)
        if p.max() < thresh:
            continue
        if fixed_norm:
            lo, hi = lo_hi[2], lo_hi[99.7]
        else:  # a random percentile pair in (1-3, 99.5-99.9), interpolated in the image's table
            a, b = rng.uniform(1, 3), rng.uniform(99.5, 99.9)
            lo, hi = np.percentile(data, (a, b))
        out.append((p - lo) / (hi - lo))
    return np.stack(out)[:, None]


def batches(patches, deg, batch, seed, augment):
    rng = np.random.default_rng([seed, 2])
    k = 0
    while True:
        idx = rng.integers(0, len(patches), batch)
        y = patches[idx].copy()
        if augment:
            for i in range(batch):
                y[i, 0] = np.rot90(y[i, 0], rng.integers(0, 4))
                if rng.integers(0, 2):
                    y[i, 0] = y[i, 0][:, ::-1]
        yield deg(np.ascontiguousarray(y), np.random.default_rng([seed, 3, k]))
        k += 1


def run_arm(name, data, gt, crop, args, work, base_model=None):
    """Train (unless the arm only changes prediction) and score one arm."""
    t0 = time.perf_counter()
    mods = set().union(*(CHANGES.get(m, {m}) for m in name.split("+")))
    if name == "geometric":
        model_dir = base_model
    else:
        split = "full_psf" not in mods
        kernel = psf_kernels({"kind": "gaussian", "sigma_xy": 2.0, "sigma_z": 8.0}, (8.0, 1.0, 1.0), split=split)
        deg = LateralDegradation.build(kernel["kernel"], 8.0, phase="grid" if "grid_phase" in mods else "continuous",
                                       noise="noise" in mods)
        f, k = (32, 5) if "csbdeep_net" in mods else (args.filters, 3)
        arch = UNetConfig(ndim=2, depth=2, n_filter_base=f, kernel_size=k)
        scale = 2 / 3 if "small_patch" in mods else 4 / 3 if "large_patch" in mods else 1
        side = 4 * max(1, round(args.patch * scale / 4))  # 32 / 48 / 64 at the default --patch 48
        patch = (side, side)
        read = deg.read_shape(patch)
        pats = draw_patches(data, read, args.n_patches, 0, "fixed_norm" in mods)
        n_val = max(1, len(pats) // 10)
        val = list(deg(pats[i:i + args.batch], np.random.default_rng([7, i]))
                   for i in range(0, n_val, args.batch))
        steps = args.steps * (2 if "long" in mods else 1)
        epochs = max(1, steps // args.steps_per_epoch)
        cfg = ModelConfig(axes="YX", architecture=arch, normalization=Normalization(pmin=2.0, pmax=99.7),
                          kind="isotropic", isotropic=IsotropicConfig(factor=8.0, combine="mean"),
                          provenance={"ablation": name})
        torch.manual_seed(0)
        model = UNet(arch)
        result = fit(model, cfg, batches(pats[n_val:], deg, args.batch, 0, "no_augment" not in mods), validation=val,
                     epochs=epochs, steps_per_epoch=args.steps_per_epoch, lr=4e-4,
                     lr_schedule="cosine" if "cosine" in mods else "plateau",
                     loss="mse" if "mse" in mods else "mae", device=args.device, precision="fp32",
                     model_dir=work / name.replace("+", "_"), resume=False, seed=0, progress=False)
        model_dir = work / name.replace("+", "_") / "best"
        val_curve = [round(v, 5) for v in result.val_loss]
    t_train = time.perf_counter() - t0
    if name == "geometric":  # base's weights, the other combination
        import shutil

        geo = work / "geometric"
        shutil.rmtree(geo, ignore_errors=True)
        shutil.copytree(model_dir, geo)
        c = json.loads((geo / "config.json").read_text())
        c["isotropic"]["combine"] = "geometric"
        (geo / "config.json").write_text(json.dumps(c))
        model_dir, val_curve = geo, None
    sub = data[:, crop[0]:crop[1], crop[0]:crop[1]]
    pred = np.asarray(bigcare.predict(sub, model_dir, axes="zyx", device=args.device)["restored"])
    pred = pred.reshape(pred.shape[-3:])
    truth = gt[:, crop[0]:crop[1], crop[0]:crop[1]]
    row = {"arm": name, "psnr": psnr(pred, truth), "ssim": ssim(pred, truth), "train_s": round(t_train),
           "total_s": round(time.perf_counter() - t0), "val_loss": val_curve}
    if val_curve:
        best = int(np.argmin(val_curve))
        row["best_epoch"] = best + 1
    print(json.dumps(row), flush=True)
    return row, model_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--shape", type=int, nargs=3, default=(96, 256, 256))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--steps-per-epoch", type=int, default=50)
    ap.add_argument("--filters", type=int, default=16)
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n-patches", type=int, default=1200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (the test suite runs it)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    arms = args.arms.split(",")
    if args.smoke:
        args.shape, args.steps, args.steps_per_epoch, args.filters = (32, 112, 112), 2, 1, 2
        args.patch, args.batch, args.n_patches = 16, 2, 8
        arms = ["base", "grid_noise", "geometric", "noise+small_patch+cosine"]
    unknown = {m for a in arms for m in a.split("+")} - set(ARMS)
    if unknown:
        ap.error(f"unknown arms {sorted(unknown)}; expected some of {', '.join(ARMS)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bigcare_iso_ablation_"))
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    gt, data = make_data(tuple(args.shape))
    side = data.shape[1]
    crop = (side // 8, side - side // 8)
    from isotropic_synthetic import upsample

    sub = data[:, crop[0]:crop[1], crop[0]:crop[1]]
    truth = gt[:, crop[0]:crop[1], crop[0]:crop[1]]
    lin = upsample(sub, 1)
    rows = [{"arm": "input (linear)", "psnr": psnr(lin, truth), "ssim": ssim(lin, truth)}]
    print(json.dumps({"shape": list(args.shape), "input": list(data.shape), "steps": args.steps,
                      "torch": torch.__version__, "python": platform.python_version(), "workdir": str(work),
                      **rows[0]}), flush=True)
    base_model = None
    for name in arms:
        if name == "geometric" and base_model is None:
            continue
        row, model_dir = run_arm(name, data, gt, crop, args, work, base_model)
        if name == "base":
            base_model = model_dir
        rows.append(row)
    ref = rows[1]["psnr"] if len(rows) > 1 else None  # the first arm (base by default)
    print(f"\n{'arm':24s} {'PSNR dB':>8s} {'vs 1st':>8s} {'SSIM':>7s} {'train s':>8s}  best epoch")
    for r in rows:
        d = f"{r['psnr'] - ref:+8.2f}" if ref is not None and r["arm"] != "input (linear)" else " " * 8
        print(f"{r['arm']:24s} {r['psnr']:8.2f} {d} {r['ssim']:7.4f} {r.get('train_s', 0):8}  "
              f"{r.get('best_epoch', '')}")
    return rows


if __name__ == "__main__":
    main()
