"""Isotropic restoration scored on real planes (issue 19, item 3).

    python benchmarks/isotropic_real.py            # CPU size: Y rows 80..240 of the stack
    python benchmarks/isotropic_real.py --full --device cuda   # all 320 rows, longer training

The deskewed lattice light-sheet stack ``../shared/data/llsm_cell_deskewed.tif`` (88 x 320 x 481,
voxel 0.157 / 0.1 / 0.1 um) is close to isotropic in sampling, not in resolution: its Z spectrum
falls like its Y spectrum times a Gaussian of sigma ~0.25-0.29 um (:func:`axial_excess`). Protocol:

0. a leading or trailing plane whose signal differs by more than 20% from its neighbours' is
   dropped (:func:`defective_ends`: the stack's first plane holds a third of their signal);
1. truth: the stack resampled along Z to the lateral voxel size, 0.1 um (cubic spline,
   node-aligned: plane k at z = 0.1 k um; 137 planes); with ``--truth isotropic`` (the default)
   also blurred along Y and X by the measured axial excess, so that the truth is what isotropic
   restoration aims at (lateral resolution in every direction; ``--truth stack`` scores against
   the stack as it is, where a method that restores axial to lateral resolution is penalised for
   being sharper than the truth's Z);
2. degraded: the truth blurred along Z by a Gaussian of sigma ``--blur`` um, every 4th plane kept
   (0.4 um planes, factor 4), written as OME-Zarr with voxel size (0.4, 0.1, 0.1); the lateral
   blur of an isotropic truth removes most of the stack's noise, so ``--add-noise`` adds the
   stack's own measured noise back to the kept planes (:func:`noise_model`);
3. bigcare trains an isotropic model on the degraded volume alone (Gaussian PSF whose split kernel
   is exactly the added blur), and restores it blockwise onto the 0.1 um grid;
4. scored against the truth on the dropped planes only (3 of every 4), inside the sample region,
   leaving out the planes within 3 sigma of the added blur of either Z end (the degradation
   extrapolates the stack there, which no acquisition does; their scores are printed beside):
   linear and cubic Z interpolation of the degraded volume, Richardson-Lucy along Z of the linear
   one (the added Gaussian, iterations picked on the truth: an oracle), and bigcare.

The sample region: deskewing leaves two wedges (about half the voxels) filled with one constant
value (98): the (z, x) columns whose values do not vary along Y. They carry no information, every
method reproduces them, and scoring them would dilute every difference, so a voxel is scored only
when its (z, x) column lies inside the acquired parallelogram, eroded by ``MARGIN`` voxels along X
(so the fill's edge, which no method can restore, stays out; wider by 3 sigma of an isotropic
truth's lateral blur, which smears the fill into the sample). PSNR (CARE normalisation,
:mod:`bigcare.metrics`) is over all scored voxels at once; SSIM is the mean over dropped planes of
:func:`bigcare.metrics.ssim` on each plane cropped to its scored columns. With ``--truth stack`` the truth
carries the stack's noise (correlated along X by the deskew interpolation), which no method can
predict. Writes ``benchmarks/isotropic_real_xz.png`` (cubic / bigcare / truth, one XZ slice).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

import bigcare
from bigcare.blocks.zoom import upsample_rows, zoom_length
from bigcare.metrics import psnr, ssim
from bigcare.store.axes import Axis
from bigcare.store.write import write_array

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "llsm_cell_deskewed.tif"
VOXEL_Z, VOXEL_XY, FACTOR, MARGIN = 0.157, 0.1, 4, 8
FILL = 98.0  # the deskew wedges' constant


def defective_ends(stack: np.ndarray, tolerance: float = 0.2) -> tuple[int, int]:
    """How many planes to drop at each Z end: leading / trailing planes whose mean signal (above the
    background FILL) over the acquired columns is more than ``tolerance`` away from the median of the
    next five planes inward.

    The first plane of the LLSM stack holds 0.33x its neighbours' signal (12.4 vs ~37 above the
    background; its 99.5th percentile 322 vs ~560-610): an acquisition artefact, not structure,
    that a truth built from it would turn into bright and dark stripes no method can predict.
    """
    v = stack.astype(np.float32) - FILL
    acquired = v.std(axis=1) > 0
    means = np.array([v[z][:, acquired[z]].clip(0).mean() if acquired[z].any() else np.nan for z in range(len(v))])

    def run(order) -> int:
        n = 0
        for z in order:
            inward = means[z + 1:z + 6] if order[0] == 0 else means[max(0, z - 5):z]
            ref = np.nanmedian(inward) if np.isfinite(inward).any() else np.nan
            if not (np.isfinite(means[z]) and np.isfinite(ref)) or abs(means[z] / ref - 1) <= tolerance:
                break
            n += 1
        return n

    return run(list(range(len(v)))), run(list(range(len(v) - 1, -1, -1)))


def make_truth(stack: np.ndarray, lateral_sigma: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(truth on the 0.1 um Z grid, scored-column mask (Z', X)) from the deskewed stack (Z, Y, X).

    ``lateral_sigma`` (um) > 0 blurs the truth along Y and X by that Gaussian, so that its lateral
    resolution matches its axial one (see :func:`axial_excess`); the scored columns then keep a
    wider margin from the fill, which the blur smears into the sample.
    """
    v = stack.astype(np.float32)
    n = math.floor((len(v) - 1) * VOXEL_Z / VOXEL_XY + 1e-9) + 1
    z = np.arange(n) * VOXEL_XY / VOXEL_Z
    coords = np.meshgrid(z, np.arange(v.shape[1]), np.arange(v.shape[2]), indexing="ij")
    truth = ndimage.map_coordinates(v, coords, order=3, mode="nearest").astype(np.float32)
    margin = MARGIN
    if lateral_sigma > 0:
        s = lateral_sigma / VOXEL_XY
        truth = ndimage.gaussian_filter(truth, (0, s, s), mode="nearest")
        margin += math.ceil(3 * s)
    acquired = v.std(axis=1) > 0  # (Z, X): the column varies along Y
    acquired = ndimage.binary_erosion(acquired, np.ones((1, 2 * margin + 1), bool), border_value=0)
    lo, hi = np.floor(z).astype(int), np.minimum(np.floor(z).astype(int) + 1, len(v) - 1)
    return truth, acquired[lo] & acquired[hi]


def _line_spectrum(lines: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean power spectrum (frequencies in 1/um, power) of ``lines`` (N, L), Hann-windowed."""
    lines = lines - lines.mean(axis=1, keepdims=True)
    power = np.mean(np.abs(np.fft.rfft(lines * np.hanning(lines.shape[1]), axis=1)) ** 2, axis=0)
    return np.fft.rfftfreq(lines.shape[1], spacing), power


def axial_excess(stack: np.ndarray, length_um: float = 6.3) -> dict:
    """How much blurrier the stack is along Z than along Y: the sigma (um) of a Gaussian ``g`` with
    axial spectrum = lateral spectrum x |g|^2, fitted where both spectra stand above their noise floor.

    The IsoNet premise is that the lateral slices show what the axial ones should look like; the
    truth of a real-plane protocol must then be isotropic, or a method that restores the axial
    resolution to the lateral one is scored against planes blurrier than what it aims at. Z lines
    come from the acquired (z, x) columns of the original 0.157 um planes, Y lines of the same
    physical length from the same columns; ln(P_z / P_y) = a - 4 pi^2 sigma^2 f^2 is fitted by least
    squares on the frequencies where both noise-floor-subtracted powers exceed 3x the floor.
    """
    v = stack.astype(np.float32)
    acquired = v.std(axis=1) > 0
    lz = min(round(length_um / VOXEL_Z), len(v))  # a short stack: shorter lines
    ly = round(lz * VOXEL_Z / VOXEL_XY)
    zl = [v[z0:z0 + lz, :, x].T for x in range(v.shape[2]) for z0 in range(0, len(v) - lz + 1, lz // 4)
          if acquired[z0:z0 + lz, x].all()]
    yl = [v[z, y0:y0 + ly, x] for z in range(len(v)) for x in np.flatnonzero(acquired[z])[::4]
          for y0 in range(0, v.shape[1] - ly + 1, ly // 2)]
    if not zl or not yl:
        raise ValueError("the stack has no acquired Z line of the requested length")
    fz, pz = _line_spectrum(np.concatenate(zl), VOXEL_Z)
    fy, py = _line_spectrum(np.asarray(yl), VOXEL_XY)
    floor_z, floor_y = np.median(pz[-len(pz) // 4:]), np.median(py[-len(py) // 4:])
    py = np.interp(fz, fy, py)
    sz, sy = pz - floor_z, py - floor_y
    use = (fz > 0) & (sz > 3 * floor_z) & (sy > 3 * floor_y)
    if use.sum() < 3:
        raise ValueError("too few frequencies above the noise floor to compare the axial and lateral spectra")
    f2 = fz[use] ** 2
    slope, _ = np.polyfit(f2, np.log(sz[use] / sy[use]), 1)
    sigma = math.sqrt(max(-slope, 0.0) / (4 * math.pi ** 2))
    return {"sigma_um": sigma, "frequencies_used": [round(float(f), 3) for f in fz[use]]}


def noise_model(stack: np.ndarray) -> tuple[float, float]:
    """(gain, offset variance) of the stack's noise, variance = gain * mean + offset, in raw units.

    Measured along Y, the axis whose noise the deskew leaves independent: for the second difference
    d = v[y] - (v[y-1] + v[y+1]) / 2 of white noise, var(d) = 1.5 var(v). Fitted over ten intensity
    deciles of the acquired voxels; the signal's own curvature makes this an upper bound.
    """
    v = stack.astype(np.float32)
    d = (v[:, 1:-1] - 0.5 * (v[:, :-2] + v[:, 2:])).ravel()
    m = ndimage.uniform_filter1d(v, 3, axis=1)[:, 1:-1].ravel()
    keep = np.broadcast_to((v.std(axis=1) > 0)[:, None, :], v[:, 1:-1].shape).ravel()
    d, m = d[keep], m[keep]
    edges = np.percentile(m, np.linspace(0, 100, 11))
    idx = np.clip(np.digitize(m, edges[1:-1]), 0, 9)
    means = np.array([m[idx == k].mean() for k in range(10)])
    variances = np.array([np.median(d[idx == k] ** 2) / 0.455 / 1.5 for k in range(10)])  # robust: median chi2_1
    gain, offset = np.polyfit(means, variances, 1)
    return float(gain), float(offset)


def degrade(truth: np.ndarray, blur_um: float, noise: tuple[float, float] | None = None, seed: int = 0) -> np.ndarray:
    """The truth blurred along Z by a Gaussian of ``blur_um`` and every FACTOR-th plane kept.

    ``noise`` = (gain, offset variance): heteroscedastic Gaussian noise of variance gain * value +
    offset added to the kept planes (the acquisition's noise, when the truth was smoothed).
    """
    blurred = ndimage.gaussian_filter1d(truth, blur_um / VOXEL_XY, axis=0, mode="nearest")[::FACTOR]
    if noise is not None:
        rng = np.random.default_rng(seed)
        blurred = blurred + np.sqrt(np.maximum(noise[0] * blurred + noise[1], 0)) * rng.standard_normal(blurred.shape)
    return np.clip(np.round(blurred), 0, 65535).astype(np.uint16)


def interpolate(data: np.ndarray, order: int) -> np.ndarray:
    """Node-aligned linear (the engine's) or cubic upsampling of ``data`` along Z by FACTOR."""
    x = data.astype(np.float32)
    n = zoom_length(len(x), FACTOR)
    if order == 1:
        return upsample_rows(x, 0, FACTOR, 0, 0, n)
    coords = np.meshgrid(np.arange(n) / FACTOR, np.arange(x.shape[1]), np.arange(x.shape[2]), indexing="ij")
    return ndimage.map_coordinates(x, coords, order=3, mode="nearest").astype(np.float32)


def richardson_lucy_z(up: np.ndarray, sigma: float, score, checkpoints=(2, 5, 10, 20, 40)):
    """Richardson-Lucy along Z with a Gaussian of ``sigma`` voxels; the best-scoring iterate and its count."""
    r = int(np.ceil(4 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    u = np.clip(up - up.min(), 1e-3, None).astype(np.float32)
    d = np.full_like(u, float(u.mean()))
    best: tuple[float, np.ndarray, int] | None = None
    for it in range(1, max(checkpoints) + 1):
        ratio = u / np.maximum(ndimage.convolve1d(d, k, axis=0, mode="reflect"), 1e-6)
        d *= ndimage.convolve1d(ratio, k[::-1], axis=0, mode="reflect")
        if it in checkpoints:
            s = score(d)
            if best is None or s > best[0]:
                best = (s, d.copy(), it)
    assert best is not None
    return best[1], best[2]


def scores(vol: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
    """PSNR over the scored voxels of the dropped planes, mean SSIM of their cropped planes."""
    planes = [k for k in range(len(truth)) if k % FACTOR and mask[k].any()]
    sel = np.broadcast_to(mask[:, None, :], truth.shape).copy()
    sel[[k for k in range(len(truth)) if k % FACTOR == 0]] = False
    out = {"psnr": psnr(vol[sel], truth[sel])}
    values = []
    for k in planes:
        cols = np.flatnonzero(mask[k])
        if cols[-1] - cols[0] >= 7:
            values.append(ssim(vol[k][:, cols[0]:cols[-1] + 1], truth[k][:, cols[0]:cols[-1] + 1]))
    out["ssim"] = float(np.mean(values))
    return out


def figure(images: dict, y: int, path: Path) -> Path:
    """One XZ slice (row ``y``) of each volume, same intensity window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = np.percentile(list(images.values())[-1][:, y], (1, 99.8))  # the truth's window
    fig, axes = plt.subplots(len(images), 1, figsize=(9, 1.2 + 2.2 * len(images)))
    for ax, (name, img) in zip(axes, images.items()):
        ax.imshow(img[:, y], cmap="magma", vmin=lo, vmax=hi, aspect="equal")
        ax.set_title(f"{name} (XZ, y = {y}, 0.1 um voxels)")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="all 320 rows, 32 filters, 4000 steps (GPU)")
    ap.add_argument("--blur", type=float, default=0.3, help="added axial blur, Gaussian sigma in um (default 0.3)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 4000 full, 2000 CPU)")
    ap.add_argument("--filters", type=int, default=None, help="first-level filters (default 32 full, 16 CPU)")
    ap.add_argument("--truth", choices=["isotropic", "stack"], default="isotropic",
                    help="isotropic: the stack blurred laterally by its measured axial excess (axial_excess), so "
                    "lateral and axial resolution match; stack: the resampled stack as it is (the first protocol)")
    ap.add_argument("--add-noise", action="store_true", help="add the stack's own measured noise (noise_model) "
                    "to the degraded planes (the lateral blur of --truth isotropic removes most of it)")
    ap.add_argument("--kernel", type=int, default=3, help="convolution kernel size (default 3; CSBDeep's 2D net: 5)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true", help="seconds, a small crop (the test suite runs it)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--reuse", action="store_true", help="keep the restored volume already in --workdir "
                    "(recompute the baselines and the table only)")
    ap.add_argument("--figure", default=str(Path(__file__).with_name("isotropic_real_xz.png")))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    stack = np.asarray(__import__("tifffile").imread(DATA))
    rows = slice(None) if args.full else slice(120, 200) if args.smoke else slice(80, 240)
    stack = stack[:40, rows, 100:260] if args.smoke else stack[:, rows]
    head, tail = defective_ends(stack)
    stack = stack[head:len(stack) - tail]
    excess = axial_excess(stack) if args.truth == "isotropic" else {"sigma_um": 0.0}
    noise = noise_model(stack) if args.add_noise else None
    truth, mask = make_truth(stack, excess["sigma_um"])
    data = degrade(truth, args.blur, noise)
    truth = truth[: zoom_length(len(data), FACTOR)]
    mask = mask[: len(truth)]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bigcare_iso_real_"))
    url = str(work / "degraded.ome.zarr")
    # what defines the run; --reuse of a folder made with other arguments would score a stale volume
    defining = {k: v for k, v in vars(args).items() if k not in ("reuse", "workdir", "figure")}
    record = work / "arguments.json"
    if args.reuse and Path(url).exists():
        made = json.loads(record.read_text()) if record.exists() else None
        if made != defining:
            raise SystemExit(f"--reuse: {work} was made with {made}, not {defining}; drop --reuse or use "
                             "another --workdir")
    work.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(defining))
    axes = tuple(Axis(a, "space", "micrometer") for a in "zyx")
    if not (args.reuse and Path(url).exists()):
        write_array(url, data, chunks=(len(data), 80, 128), scale=(FACTOR * VOXEL_XY, VOXEL_XY, VOXEL_XY),
                    axes=axes, overwrite=True)
    steps = 2 if args.smoke else args.steps or (4000 if args.full else 2000)
    epochs = 1 if args.smoke else 20 if args.full else 10
    filters = 4 if args.smoke else args.filters or (32 if args.full else 16)
    patch = 16 if args.smoke else 64
    sigma_xy = math.hypot(VOXEL_XY, excess["sigma_um"])  # the split kernel is the added blur either way
    config = {
        "model_dir": str(work / "model"),
        "data": {"sources": [{"input": url}], "patch_shape": [patch, patch],
                 "n_patches": 40 if args.smoke else 2000},
        "network": {"depth": 2, "n_filter_base": filters, "kernel_size": args.kernel},
        "training": {"epochs": epochs, "steps_per_epoch": max(1, steps // epochs), "batch_size": 4 if args.smoke else 16,
                     "device": args.device, "resume": False},
        "isotropic": {"psf": {"kind": "gaussian", "sigma_xy": sigma_xy, "sigma_z": math.hypot(sigma_xy, args.blur)}},
    }
    print(f"truth {truth.shape} (0.1 um, {args.truth}: lateral blur sigma {excess['sigma_um']:.3f} um), degraded "
          f"{data.shape} (0.4 um planes{', + the stack noise' if noise else ''}), scored columns "
          f"{mask.mean():.0%}; {time.perf_counter() - t0:.0f} s", flush=True)
    out = str(work / "restored.ome.zarr")
    t_train = t_restore = val_loss = None
    if not (args.reuse and Path(out).exists()):
        t1 = time.perf_counter()
        result = bigcare.train(config, progress=False)
        t_train, val_loss = round(time.perf_counter() - t1), round(min(result.val_loss), 5)
        t2 = time.perf_counter()
        bigcare.restore(url, out, str(work / "model" / "best"), device=args.device, overwrite=True, progress=False)
        t_restore = round(time.perf_counter() - t2)
    restored = np.asarray(bigcare.open_volume(out).to_dask()).astype(np.float32)

    linear, cubic = interpolate(data, 1), interpolate(data, 3)
    # planes within 3 sigma of the added blur of either Z end are not scored: the degradation there
    # extrapolates the stack (mode "nearest"), which no acquisition does; their scores come beside
    edge = math.ceil(3 * args.blur / VOXEL_XY)
    interior = mask.copy()
    interior[:edge] = interior[len(interior) - edge:] = False
    rl, rl_iter = richardson_lucy_z(linear, args.blur / VOXEL_XY, lambda d: scores(d, truth, interior)["psnr"])
    rows_ = [("linear", linear), ("cubic", cubic), (f"Richardson-Lucy ({rl_iter} it., oracle)", rl),
             ("bigcare isotropic", restored)]
    table = [{"method": name, **scores(vol, truth, interior),
              **{f"{k}_all_planes": v for k, v in scores(vol, truth, mask).items()}} for name, vol in rows_]
    info = {"truth": list(truth.shape), "dropped_end_planes": [head, tail], "edge_planes_unscored": edge,
            "truth_kind": args.truth, "lateral_sigma_um": round(excess["sigma_um"], 4),
            "added_noise": noise, "degraded": list(data.shape), "blur_um": args.blur, "steps": steps,
            "filters": filters, "kernel": args.kernel, "train_s": t_train, "restore_s": t_restore,
            "best_val_loss": val_loss, "device": args.device, "torch": torch.__version__,
            "python": platform.python_version(), "workdir": str(work)}
    print(json.dumps(info))
    print(f"\n{'method':36s} {'PSNR dB':>8s} {'SSIM':>7s}   (all dropped planes, the {edge} at each end too: PSNR, SSIM)")
    for r in table:
        print(f"{r['method']:36s} {r['psnr']:8.2f} {r['ssim']:7.4f}   {r['psnr_all_planes']:8.2f} {r['ssim_all_planes']:7.4f}")
    print(f"\nbigcare over cubic: {table[3]['psnr'] - table[1]['psnr']:+.2f} dB (goal >= +2 dB); all planes "
          f"{table[3]['psnr_all_planes'] - table[1]['psnr_all_planes']:+.2f} dB")
    if not args.smoke:
        images = {"cubic (before)": cubic, "bigcare (after)": restored, "truth (3 of 4 planes dropped in the input)": truth}
        print("figure:", figure(images, truth.shape[1] // 2, Path(args.figure)))
    return table


if __name__ == "__main__":
    main()
