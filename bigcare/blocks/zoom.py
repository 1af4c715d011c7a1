"""Upsampling along one axis by a (possibly non-integer) factor, the same way everywhere.

Isotropic restoration puts the anisotropic volume on a finer Z grid before the network sees it.
The map between the grids is *node-aligned*: output voxel ``k`` sits at input coordinate
``k / factor``, so the first output voxel is the first input voxel, the output keeps the input's
origin (OME-Zarr translation), its voxel size is ``size / factor`` and it never extrapolates::

    input  z:  0         1         2            (n input voxels)
    output k:  0   1   2   3   4   5            factor 2.5: k / 2.5 = 0, 0.4, 0.8, 1.2, 1.6, 2.0
    output length: floor((n - 1) * factor) + 1

Values are linear interpolations between the two neighbouring input voxels. The weights are
computed from the *global* output index, so a block's upsampled region is bitwise equal to the
same rows of the upsampled whole volume (blockwise == whole volume). The training degradation
(:mod:`bigcare.training.isotropic`) upsamples its subsampled lateral patches with the same
function, so the network is trained on exactly the interpolation it will see.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from bigcare.blocks.layout import AxisLayout
    from bigcare.predictors.base import Predictor

__all__ = ["zoom_length", "source_range", "upsample_rows", "interpolate_rows", "volume_zoom", "zoom_region"]


def zoom_length(n: int, factor: float) -> int:
    """Length of the upsampled axis: ``floor((n - 1) * factor) + 1`` (node-aligned grids)."""
    if n < 1:
        raise ValueError(f"axis length must be >= 1, got {n}")
    return math.floor((n - 1) * factor + 1e-9) + 1


def _weights(o0: int, o1: int, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Global lower neighbour index and weight of the upper one, for output rows o0..o1-1."""
    t = np.arange(o0, o1, dtype=np.float64) / float(factor)
    j = np.floor(t + 1e-9).astype(np.int64)  # + 1e-9: k / factor that should be whole stays whole
    frac = np.clip(t - j, 0.0, 1.0)
    frac[np.abs(frac) < 1e-9] = 0.0
    return j, frac


def source_range(o0: int, o1: int, factor: float, n_in: int) -> tuple[int, int]:
    """Input rows ``[i0, i1)`` needed to interpolate output rows ``[o0, o1)``."""
    j, frac = _weights(o0, o1, factor)
    return int(j[0]), int(min(n_in, j[-1] + (2 if frac[-1] > 0 else 1)))


def interpolate_rows(x: np.ndarray, axis: int, j: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """Rows ``(1 - frac) * x[j] + frac * x[j + 1]`` along ``axis`` (float32; ``j + 1`` clipped).

    Parameters
    ----------
    x : numpy.ndarray
        Samples.
    axis : int
        The axis interpolated along.
    j : numpy.ndarray of int
        Index of the lower neighbour (local to ``x``) of each output row.
    frac : numpy.ndarray of float
        Weight of the upper neighbour, in [0, 1].
    """
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[axis]
    lo = np.take(x, np.clip(j, 0, n - 1), axis=axis)
    hi = np.take(x, np.clip(j + 1, 0, n - 1), axis=axis)
    shape = [1] * x.ndim
    shape[axis] = len(frac)
    w = frac.astype(np.float32).reshape(shape)
    return lo * (np.float32(1) - w) + hi * w


def upsample_rows(x: np.ndarray, axis: int, factor: float, i0: int, o0: int, o1: int) -> np.ndarray:
    """Output rows ``[o0, o1)`` of the node-aligned linear upsampling of a volume along ``axis``.

    Parameters
    ----------
    x : numpy.ndarray
        A region of the input volume whose row 0 along ``axis`` is input row ``i0``; it must
        hold the rows :func:`source_range` names for ``[o0, o1)``.
    axis : int
        The axis to upsample.
    factor : float
        Output voxels per input voxel (> 0; e.g. 2.5).
    i0 : int
        Global index of ``x``'s first row.
    o0, o1 : int
        Global output rows wanted.

    Returns
    -------
    numpy.ndarray
        float32, ``x``'s shape with ``o1 - o0`` rows along ``axis``.
    """
    j, frac = _weights(o0, o1, factor)
    local = j - i0
    n = x.shape[axis]
    if local[0] < 0 or local[-1] >= n or (local[-1] + 1 >= n and frac[-1] > 0):
        raise ValueError(f"region rows {i0}..{i0 + n} do not cover output rows {o0}..{o1} at factor {factor}")
    return interpolate_rows(x, axis, local, frac)


def volume_zoom(predictor: Predictor, layout: AxisLayout) -> tuple[float, ...] | None:
    """The predictor's zoom per axis of the volume (None when it keeps the grid)."""
    zoom = predictor.zoom
    if zoom is None or all(f == 1.0 for f in zoom):
        return None
    by_axis = dict(zip(layout.spatial, zoom))
    return tuple(float(by_axis.get(a, 1.0)) for a in layout.in_axes)


def zoom_region(region: np.ndarray, zoom: tuple[float, ...] | None, read=None, window=None) -> np.ndarray:
    """Upsample a read region (or the whole volume) onto the output grid along zoomed axes.

    ``read`` and ``window`` are the block's input and output regions (global coordinates);
    omitted, the region is the whole volume and the window is the whole output grid.
    """
    if zoom is None:
        return region
    for axis, f in enumerate(zoom):
        if f == 1.0:
            continue
        i0 = 0 if read is None else read[axis][0]
        o0, o1 = (0, zoom_length(region.shape[axis], f)) if window is None else window[axis]
        region = upsample_rows(region, axis, f, i0, o0, o1)
    return region
