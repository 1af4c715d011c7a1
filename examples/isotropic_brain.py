"""Isotropic restoration of a real anisotropic volume, end to end, trained on the volume itself.

    python examples/isotropic_brain.py            # ~10-15 min on 2 CPU cores; --steps to change

The data: 30 planes of labelled cells in a cleared mouse brain (brainglobe cellfinder test data),
sampled at 5 um along Z and 2 um laterally, so Z is 2.5x coarser (and blurrier) than X and Y.

1. stream the TIFF into OME-Zarr with its voxel size (5, 2, 2) um;
2. find the axial blur from the data itself (this microscope's PSF is not known): the Gaussian
   axial sigma whose degraded lateral slices have the axial slices' spectrum
   (bigcare.training.isotropic.axial_blur_match; the lateral sigma, 1.5 um, is assumed);
   then train a 2D isotropic network on the volume's own lateral slices degraded by that PSF
   rotated into the lateral plane (with a known or measured PSF, give it instead);
3. restore the volume block by block on a local dask cluster onto the isotropic 2 um grid
   (73 planes instead of 30; the output's OME-Zarr voxel size says 2 um);
4. save a PNG of one XZ slice before (the input, linearly upsampled to the same grid) and after.

There is no ground truth here; the PNG (and the spectral isotropy ratio printed at the end,
axial over lateral high-frequency energy, 1 = isotropic) show what changed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import bigcare
from bigcare.blocks.zoom import upsample_rows, zoom_length
from bigcare.metrics import spectral_isotropy
from bigcare.store.convert import describe, tiff_to_ome_zarr
from bigcare.training.isotropic import axial_blur_match

HERE = Path(__file__).resolve().parent
DEFAULT_TIFF = HERE.parent.parent / "shared" / "data" / "brain_cells_5x2x2um.tif"


def save_png(before: np.ndarray, after: np.ndarray, path: Path, y: int, voxel: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = np.percentile(before, (1, 99.8))
    fig, axes = plt.subplots(2, 1, figsize=(9, 3.4), constrained_layout=True)
    extent = (0, before.shape[1] * voxel, before.shape[0] * voxel, 0)
    for ax, img, title in zip(axes, (before, after), ("input (5 um Z sampling, upsampled linearly)",
                                                      "bigcare isotropic restoration (2 um grid)")):
        a, b = (lo, hi) if img is before else np.percentile(img, (1, 99.8))
        ax.imshow(img, cmap="magma", vmin=a, vmax=b, extent=extent, interpolation="nearest")
        ax.set_title(f"XZ slice at y = {y * voxel:.0f} um: {title}", fontsize=9)
        ax.set_ylabel("z (um)")
    axes[1].set_xlabel("x (um)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiff", type=Path, default=DEFAULT_TIFF)
    parser.add_argument("--out", type=Path, default=Path("bigcare-isotropic"))
    parser.add_argument("--steps", type=int, default=1200, help="training steps in all")
    parser.add_argument("--png", type=Path, default=None, help="where to save the PNG (default OUT/xz_slice.png)")
    parser.add_argument("--reuse-model", action="store_true", help="keep OUT/model/best if it exists (skip training)")
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)

    volume = tiff_to_ome_zarr(args.tiff, args.out / "input.ome.zarr", voxel_size=(5.0, 2.0, 2.0),
                              chunks=(30, 128, 128), overwrite=True)
    print(describe(volume))

    data = np.asarray(volume.to_dask()).astype(np.float32)
    match = axial_blur_match(data, 2.5, sigma_xy=1.5, voxel_xy=2.0)
    sigma_z = round(match["sigma_z"], 2)
    print(f"axial blur matched to the data: sigma_z = {sigma_z} um (volume's spectral isotropy "
          f"{match['target']:.3f} after linear upsampling)")

    epochs = 12
    config = {
        "model_dir": str(args.out / "model"),
        "data": {"sources": [{"input": volume.url}], "patch_shape": [64, 64], "n_patches": 1500,
                 "foreground_threshold": 0.1},
        "network": {"depth": 2, "n_filter_base": 16, "kernel_size": 3},
        "training": {"epochs": epochs, "steps_per_epoch": max(1, args.steps // epochs), "batch_size": 16,
                     "resume": False},
        "isotropic": {"psf": {"kind": "gaussian", "sigma_xy": 1.5, "sigma_z": sigma_z}},
    }
    if not (args.reuse_model and (args.out / "model" / "best").exists()):
        result = bigcare.train(config)
        print(f"trained {result.epochs} epochs in {result.seconds:.0f} s; best epoch {result.best_epoch}")

    out = args.out / "isotropic.ome.zarr"
    run = bigcare.restore(volume.url, str(out), str(args.out / "model" / "best"), overwrite=True)
    restored = bigcare.open_volume(str(out))
    print(describe(restored))
    print(f"restored {run.voxels / 1e6:.1f} Mvoxel in {run.seconds:.0f} s, halo overhead {run.halo_overhead:.2f}x")

    before = upsample_rows(data, 0, 2.5, 0, 0, zoom_length(len(data), 2.5))
    after = np.asarray(restored.to_dask()).astype(np.float32)
    print(f"spectral isotropy (axial / lateral high-frequency energy): input {spectral_isotropy(before):.3f}, "
          f"restored {spectral_isotropy(after):.3f}")
    y = int(np.argmax(before.max(axis=(0, 2))[40:-40])) + 40  # a slice through bright cells
    png = args.png or args.out / "xz_slice.png"
    save_png(before[:, y], after[:, y], png, y, 2.0)
    print(f"saved {png}")


if __name__ == "__main__":
    main()
