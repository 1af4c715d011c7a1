"""``restore --preview PNG``: before/after slices where there is something to see.

The busiest region is found on a coarse pyramid level of the input (the largest local mean after
a box filter of about a crop's size, so a bright speck does not win over a textured region);
XY and XZ slices through it are cut at full resolution, a crop of ``crop`` voxels per side, not
the whole field of view, from the input and from each restored image. Every intensity panel
shares one display window (the input crop's 1 / 99.8 percentiles: the outputs are in the input's
units), so brighter or darker means brighter or darker; other outputs (a scale, a probability)
get their own window: a scale in viridis, an ensemble's disagreement D in magma on its fixed [0, 1]
scale, beside a histogram of D over a small pyramid level. XZ panels are drawn at the physical
aspect ratio. Reads a few crops (and for D one small level) only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from bigcare.store.volume import Volume, open_volume

__all__ = ["busiest_point", "write_preview"]


def _spatial(volume: Volume) -> list[int]:
    return [i for i, a in enumerate(volume.axes) if a.kind == "space"]


def _lead_index(volume: Volume) -> list[int | slice]:
    """Index of the first time point and channel; slices on spatial axes."""
    return [slice(None) if a.kind == "space" else 0 for a in volume.axes]


def busiest_point(volume: Volume, crop: int = 256) -> tuple[int, ...]:
    """Full-resolution position (per spatial axis) of the busiest region of ``volume``.

    On the coarsest level with at least 16 voxels along every spatial axis (level 0 if none),
    the position of the largest box-filtered mean, the box about ``crop`` full-resolution voxels.
    """
    spatial = _spatial(volume)
    chosen = 0
    for k, lv in enumerate(volume.levels):
        if all(lv.shape[i] >= min(16, volume.levels[0].shape[i]) for i in spatial):
            chosen = k
    lv, base = volume.levels[chosen], volume.levels[0]
    data = np.asarray(volume.array(chosen)[tuple(_lead_index(volume))], dtype=np.float32)
    data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    factors = [base.shape[i] / lv.shape[i] for i in spatial]
    size = [max(1, round(crop / f)) if n > 1 else 1 for f, n in zip(factors, data.shape)]
    busy = ndimage.uniform_filter(data, size=[min(s, n) for s, n in zip(size, data.shape)], mode="nearest")
    at = np.unravel_index(int(np.argmax(busy)), busy.shape)
    return tuple(min(n - 1, int((i + 0.5) * f)) for i, f, n in zip(at, factors, (base.shape[i] for i in spatial)))


def _slices(volume: Volume, centre_um: tuple[float, ...], crop: int) -> tuple[np.ndarray, np.ndarray | None]:
    """XY (and, for 3D, XZ) crops of level 0 around a physical position."""
    spatial = _spatial(volume)
    scale = [volume.scale[i] for i in spatial]
    shape = [volume.shape[i] for i in spatial]
    centre = [min(n - 1, max(0, int(round(c / s)))) for c, s, n in zip(centre_um, scale, shape)]

    def window(axis: int) -> slice:
        a = max(0, min(shape[axis] - crop, centre[axis] - crop // 2))
        return slice(a, min(shape[axis], a + crop))

    arr = volume.array(0)
    index = _lead_index(volume)
    if len(spatial) == 2:
        index[spatial[0]], index[spatial[1]] = window(0), window(1)
        return np.asarray(arr[tuple(index)], np.float32), None
    xy = list(index)
    xy[spatial[0]], xy[spatial[1]], xy[spatial[2]] = centre[0], window(1), window(2)
    xz = list(index)
    xz[spatial[0]], xz[spatial[1]], xz[spatial[2]] = window(0), centre[1], window(2)
    return np.asarray(arr[tuple(xy)], np.float32), np.asarray(arr[tuple(xz)], np.float32)


#: the histogram of D reads the finest pyramid level of at most this many voxels
HISTOGRAM_VOXELS = 1 << 22


def _disagreement_histogram(fig, column, volume: Volume) -> None:
    """D's histogram over a whole pyramid level (the finest small enough), in the last column."""
    level = next((k for k, lv in enumerate(volume.levels) if int(np.prod(lv.shape)) <= HISTOGRAM_VOXELS),
                 len(volume.levels) - 1)
    d = np.asarray(volume.array(level)[...], np.float32).ravel()
    ax = column[0]
    ax.hist(d[np.isfinite(d)], bins=50, range=(0, 1), color="tab:purple", log=True)
    ax.set_title(f"disagreement D, level {level} ({d.size:,} voxels)", fontsize=9)
    ax.set_xlabel("D (0: members agree, 1: disjoint)", fontsize=8)
    for ax in column[1:]:
        ax.axis("off")


def write_preview(input_url: str, outputs: dict[str, str], png: str | os.PathLike, *, crop: int = 256,
                  kinds: dict[str, str] | None = None, storage_options: dict | None = None) -> Path:
    """Write the before/after PNG of a restore (see the module docstring); returns its path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    source = open_volume(input_url, storage_options=storage_options)
    spatial = _spatial(source)
    point = busiest_point(source, crop)
    centre_um = tuple(p * source.scale[i] for p, i in zip(point, spatial))
    panels = [("input", "intensity", source)] + [(name, (kinds or {}).get(name, "intensity"), open_volume(url))
                                                 for name, url in outputs.items()]
    cut = [(name, kind, vol, *_slices(vol, centre_um, crop)) for name, kind, vol in panels]
    finite = cut[0][3][np.isfinite(cut[0][3])]
    lo, hi = np.percentile(finite, [1, 99.8]) if finite.size else (0.0, 1.0)
    rows = 2 if cut[0][4] is not None else 1
    histogram = "disagreement" in outputs
    fig, axes = plt.subplots(rows, len(cut) + histogram, figsize=(3.2 * (len(cut) + histogram), 3.4 * rows),
                             squeeze=False)
    for j, (name, kind, vol, xy, xz) in enumerate(cut):
        window = (lo, hi) if kind == "intensity" else (0.0, 1.0) if name == "disagreement" else \
            tuple(np.percentile(xy[np.isfinite(xy)], [1, 99.8]))
        # reliability readouts in colour (D on its fixed [0, 1] scale), so they are not read as intensities
        cmap = "magma" if name == "disagreement" else "viridis" if kind == "scale" else "gray"
        image = axes[0, j].imshow(xy, cmap=cmap, vmin=window[0], vmax=window[1], interpolation="nearest")
        if cmap != "gray":
            fig.colorbar(image, ax=axes[0, j], fraction=0.046, pad=0.02)
        axes[0, j].set_title(f"{name}: XY" + (f" (z = {centre_um[0]:.1f})" if xz is not None else ""), fontsize=9)
        if xz is not None:
            s = [vol.scale[i] for i in _spatial(vol)]
            axes[1, j].imshow(xz, cmap=cmap, vmin=window[0], vmax=window[1], interpolation="nearest",
                              aspect=s[0] / s[2])
            axes[1, j].set_title(f"{name}: XZ (y = {centre_um[1]:.1f})", fontsize=9)
    for ax in axes[:, :len(cut)].ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if histogram:
        _disagreement_histogram(fig, axes[:, -1], open_volume(outputs["disagreement"], storage_options=storage_options))
    fig.suptitle(f"{Path(input_url).name}: crop of {crop} voxels around {tuple(point)}, one window for intensities",
                 fontsize=9)
    fig.tight_layout()
    path = Path(png)
    partial = path.with_suffix(".partial.png")
    fig.savefig(partial, dpi=110)
    plt.close(fig)
    os.replace(partial, path)
    return path
