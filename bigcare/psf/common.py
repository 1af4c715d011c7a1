"""Argument checks, normalization and resampling shared by the PSF modules."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from bigcare.errors import ConfigError

LATERAL_AXES = {"y": 1, "x": 2}


def number(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def vector(value, name: str, ndims: Sequence[int], *, strict: bool = True) -> tuple[float, ...]:
    what = " or ".join(str(n) for n in ndims)
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {what} numbers (z, y, x), got {value!r}") from None
    if len(vals) not in ndims:
        raise ConfigError(f"{name} must have {what} entries (z, y, x), got {len(vals)}: {value!r}")
    if not all(math.isfinite(v) and (v > 0 if strict else v >= 0) for v in vals):
        raise ConfigError(f"{name} must be {'positive' if strict else 'non-negative'} finite "
                          f"numbers, got {value!r}")
    return vals


def odd_shape(shape, ndim: int) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ConfigError(f"shape must be {ndim} odd positive ints, got {shape!r}") from None
    if len(out) != ndim or any(s < 1 or s % 2 == 0 for s in out):
        raise ConfigError(f"shape must be {ndim} odd positive ints (one per axis), got {shape!r}")
    return out


def optics(na, wavelength, refractive_index, voxel_size, shape):
    na, wavelength = number(na, "na"), number(wavelength, "wavelength")
    n = number(refractive_index, "refractive_index")
    if na > n:
        raise ConfigError(f"na must not exceed refractive_index={n}, got na={na}")
    return na, wavelength, n, vector(voxel_size, "voxel_size", (3,)), odd_shape(shape, 3)


def as_psf(psf, name: str = "psf", ndims: Sequence[int] = (2, 3), odd: bool = True) -> np.ndarray:
    arr = np.asarray(psf, dtype=np.float64)
    if arr.ndim not in ndims:
        raise ConfigError(f"{name} must be {' or '.join(map(str, ndims))}D, got ndim={arr.ndim} "
                          f"(shape {arr.shape})")
    if odd and any(s % 2 == 0 for s in arr.shape):
        raise ConfigError(f"{name} must have an odd size per axis, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or arr.sum() <= 0:
        raise ConfigError(f"{name} must be finite with a positive sum, got sum {arr.sum()!r}")
    return arr


def unit_sum(arr: np.ndarray) -> np.ndarray:
    """Negative values clipped, then scaled to sum to one (a PSF conserves energy)."""
    arr = np.clip(arr, 0.0, None)
    return np.ascontiguousarray(arr / arr.sum())


def resample(psf: np.ndarray, voxel, target) -> np.ndarray:
    """Linear resampling from ``voxel`` to ``target`` spacing about the central voxel.

    Like ``scipy.ndimage.zoom(order=1)``, but with exactly the target spacing and the centre
    kept on the (odd) central voxel. Where the target is coarser, a Gaussian prefilter of
    variance ``(target^2 - voxel^2) / 12`` first imitates integration over the larger voxel.
    """
    pre = [math.sqrt(max(t * t - v * v, 0.0) / 12) / v for v, t in zip(voxel, target)]
    if any(p > 0 for p in pre):
        psf = ndimage.gaussian_filter(psf, pre, mode="constant")
    coords = []
    for n, v, t in zip(psf.shape, voxel, target):
        half = int(math.floor((n // 2) * v / t + 1e-9))
        coords.append(n // 2 + (np.arange(2 * half + 1) - half) * (t / v))
    grid = np.meshgrid(*coords, indexing="ij")
    return ndimage.map_coordinates(psf, grid, order=1, mode="constant", cval=0.0)


def crop_pad(arr: np.ndarray, centre, shape) -> np.ndarray:
    """The ``shape`` box centred on voxel ``centre`` of ``arr``, zero where it leaves ``arr``."""
    out = np.zeros(shape)
    src, dst = [], []
    for n, c, s in zip(arr.shape, centre, shape):
        lo, hi = c - s // 2, c + s // 2 + 1
        src.append(slice(max(lo, 0), min(hi, n)))
        dst.append(slice(max(lo, 0) - lo, s - (hi - min(hi, n))))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def shell(shape) -> np.ndarray:
    """Mask of the outermost voxels of an array of ``shape``."""
    shell = np.ones(shape, bool)
    shell[tuple(slice(1, -1) for _ in shape)] = False
    return shell
