"""Restore a real microscopy volume end to end, the way a user would with their own data.

    bigcare demo                                   # once: trains a small model -> bigcare-demo/model/best
    python examples/restore_real_volume.py [--tiff ../shared/data/llsm_cell_deskewed.tif]

1. stream the TIFF into OME-Zarr (page by page) with its voxel size;
2. print what bigcare sees (`bigcare info`);
3. restore it block by block on a local dask cluster (dashboard link printed);
4. open input and output lazily as xarray with physical coordinates and save a PNG of one
   XY plane before/after.

The demo model was trained on synthetic cells, so this shows the pipeline on real data (sizes,
metadata, blocks, resumability), not the quality of a model trained for this microscope.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import bigcare
from bigcare.store.convert import describe, tiff_to_ome_zarr

HERE = Path(__file__).resolve().parent
DEFAULT_TIFF = HERE.parent.parent / "shared" / "data" / "llsm_cell_deskewed.tif"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiff", type=Path, default=DEFAULT_TIFF)
    parser.add_argument("--voxel-size", type=float, nargs=3, default=(0.157, 0.1, 0.1))
    parser.add_argument("--model", type=Path, default=Path("bigcare-demo/model/best"))
    parser.add_argument("--out", type=Path, default=Path("bigcare-example"))
    args = parser.parse_args()

    args.out.mkdir(exist_ok=True)
    volume = tiff_to_ome_zarr(args.tiff, args.out / "input.ome.zarr", voxel_size=args.voxel_size,
                              chunks=(44, 160, 256), overwrite=True)
    print(describe(volume))

    result = bigcare.restore(volume, args.out / "restored.ome.zarr", args.model, block_shape=(88, 160, 256),
                             overwrite=True)
    print(f"{result.blocks_computed} blocks, {result.voxels_per_second / 1e6:.2f} Mvoxel/s, "
          f"halo overhead {result.halo_overhead:.2f}x")

    before = volume.to_xarray()
    after = bigcare.open_volume(args.out / "restored.ome.zarr").to_xarray()
    z = before.sizes["z"] // 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, image, title in zip(axes, (before, after), ("input", "restored")):
        image.isel(z=z).plot.imshow(ax=ax, cmap="magma", robust=True, add_colorbar=False)
        ax.set_title(f"{title}, z = {float(image.z[z]):.2f} {image.z.attrs.get('units', '')}")
        ax.set_aspect("equal")
    fig.savefig(args.out / "before_after.png", dpi=80)
    print(f"wrote {args.out / 'before_after.png'}")


if __name__ == "__main__":
    main()
