"""Sub-diffraction ground truth (CARE Fig. 4): tubular networks and granules, blockwise.

Both are drawn from the seeded space of :mod:`bigcare.synth.space`: each cell of the volume
draws its own objects, so ``render(shape, region=block)`` equals ``render(shape)[block]`` for
any block. Parameters are physical (the unit of ``voxel_size``, e.g. micrometres).

Tubules (microtubule-like): worm-like chains. A chain starts at a uniform point of its cell
with a uniform direction and advances in steps ``ds`` (half the smallest voxel); each step the
tangent ``t`` turns by a Gaussian kick perpendicular to it, of variance ``2 ds / (d - 1) /
persistence`` per perpendicular direction, so ``<t(s) . t(0)> = exp(-s / persistence)``. It is
rendered as a line of constant density convolved with a Gaussian whose FWHM is ``width`` (the
cross-section of a tubule is that Gaussian, peak = the chain's brightness)::

    chain points (every ds) --linear splat--> line density --gaussian_filter(sigma)--> tubes

Granules: points of random size (FWHM in ``size``) and brightness, rendered as voxel-averaged
Gaussians (difference of erf per axis), peak = brightness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, special

from bigcare.errors import ConfigError
from bigcare.synth.space import as_region, cell_rng, cells_near, check_positive, check_range, grow

__all__ = ["Tubules", "Granules", "FWHM_PER_SIGMA"]

FWHM_PER_SIGMA = 2 * math.sqrt(2 * math.log(2))  # 2.3548...
_CELL = 64  # voxels per cell side (the unit of randomness; fixed so every block sees the same cells)
_TRUNCATE = 4.0


def _voxel(voxel_size, ndim: int) -> np.ndarray:
    v = np.broadcast_to(np.asarray(voxel_size, dtype=float), (ndim,)) if np.ndim(voxel_size) == 0 \
        else np.asarray(voxel_size, dtype=float)
    if v.shape != (ndim,) or not np.all(v > 0):
        raise ConfigError(f"voxel_size must be {ndim} positive numbers (one per axis), got {voxel_size!r}")
    return v


def _shape(shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ConfigError(f"shape must be 2 or 3 positive sizes (YX or ZYX), got {shape}")
    return shape


@dataclass(frozen=True)
class Tubules:
    """Microtubule-like worm-like chains; lengths in the unit of the voxel size.

    Parameters
    ----------
    density : float
        Chains started per unit area (2D) or volume (3D).
    length : (float, float)
        Range of chain lengths (uniform).
    persistence : float
        Persistence length: the tangent correlation decays as ``exp(-s / persistence)``.
    width : float
        FWHM of a tubule's cross-section (widths under ~1.2 voxels come out wider: sampling).
    brightness : (float, float)
        Range of peak intensities (uniform), one per chain.
    """

    density: float = 0.02
    length: tuple[float, float] = (4.0, 12.0)
    persistence: float = 8.0
    width: float = 0.1
    brightness: tuple[float, float] = (0.5, 1.0)

    def __post_init__(self):
        check_positive(self.density, "tubules density")
        object.__setattr__(self, "length", check_range(self.length, "tubules length"))
        check_positive(self.persistence, "tubules persistence")
        check_positive(self.width, "tubules width")
        object.__setattr__(self, "brightness", check_range(self.brightness, "tubules brightness"))

    def _sigma(self, voxel: np.ndarray) -> np.ndarray:
        return self.width / FWHM_PER_SIGMA / voxel  # per axis, voxels

    def paths(self, shape: Sequence[int], voxel_size, *, seed: int = 0, region=None) -> list[tuple[np.ndarray, float]]:
        """The chains that can touch ``region``: ``(points (N, ndim) in voxels, brightness)`` each.

        Points are ``ds`` = half the smallest voxel apart (physical), in the volume's voxel
        coordinates; chains of cells within reach of ``region`` are all returned, in cell order.
        """
        shape = _shape(shape)
        voxel = _voxel(voxel_size, len(shape))
        region = as_region(region, shape)
        render = np.ceil(_TRUNCATE * self._sigma(voxel)).astype(int) + 2
        reach = np.ceil(self.length[1] / voxel).astype(int) + render
        ndim, ds = len(shape), 0.5 * float(voxel.min())
        kick = math.sqrt(2 * ds / (ndim - 1) / self.persistence)
        cell_volume = math.prod(_CELL * v for v in voxel)
        out = []
        for index in cells_near(region, reach, _CELL, shape):
            rng = cell_rng(seed, 1, index)
            n = rng.poisson(self.density * cell_volume)
            if n == 0:
                continue
            start = (np.asarray(index) + rng.random((n, ndim))) * _CELL * voxel  # physical
            lengths = rng.uniform(*self.length, n)
            bright = rng.uniform(*self.brightness, n)
            steps = int(math.ceil(self.length[1] / ds))
            tangents = _chain_tangents(rng, n, ndim, steps, kick)  # (n, steps, ndim)
            points = start[:, None, :] + ds * np.cumsum(tangents, axis=1)
            points = np.concatenate([start[:, None, :], points], axis=1) / voxel
            for k in range(n):
                out.append((points[k, : int(lengths[k] / ds) + 1], float(bright[k])))
        return out

    def render(self, shape: Sequence[int], voxel_size, *, seed: int = 0, region=None) -> np.ndarray:
        """Clean tubules on ``region`` of a volume of ``shape`` (default: all of it), float32.

        Raises
        ------
        ConfigError
            For a bad shape, voxel size or region.
        """
        shape = _shape(shape)
        voxel = _voxel(voxel_size, len(shape))
        region = as_region(region, shape)
        sigma = self._sigma(voxel)
        margin = [int(_TRUNCATE * s + 0.5) + 2 for s in sigma]
        box = grow(region, margin)
        size = tuple(b - a for a, b in box)
        origin = np.array([a for a, _ in box], float)
        ndim, ds = len(shape), 0.5 * float(voxel.min())
        # line density per voxel so that the cross-section peak after the blur is the brightness
        per_length = ds * (math.sqrt(2 * math.pi) * self.width / FWHM_PER_SIGMA) ** (ndim - 1) / math.prod(voxel)
        points, weights = [], []
        for path, bright in self.paths(shape, voxel, seed=seed, region=region):
            p = path - origin
            keep = np.all((p >= -1) & (p < np.array(size)), axis=1)
            points.append(p[keep])
            weights.append(np.full(int(keep.sum()), bright * per_length))
        density = _splat(np.concatenate(points) if points else np.zeros((0, ndim)),
                         np.concatenate(weights) if weights else np.zeros(0), size)
        # the linear splat adds a triangle (variance 1/6 voxel^2 per axis): take it from the Gaussian
        blur = np.sqrt(np.maximum(sigma**2 - 1 / 6, sigma**2 / 4))
        out = ndimage.gaussian_filter(density, blur, mode="constant", truncate=_TRUNCATE)
        crop = tuple(slice(m, m + (b - a)) for m, (a, b) in zip(margin, region))
        return out[crop].astype(np.float32)


def _chain_tangents(rng: np.random.Generator, n: int, ndim: int, steps: int, kick: float) -> np.ndarray:
    """Unit tangents of ``n`` worm-like chains for ``steps`` steps, ``(n, steps, ndim)``."""
    if ndim == 2:  # a 2D tangent is an angle: kicks add up
        theta = rng.uniform(0, 2 * np.pi, (n, 1)) + np.cumsum(rng.normal(0, kick, (n, steps)), axis=1)
        return np.stack([np.sin(theta), np.cos(theta)], axis=-1)  # (y, x)
    t = rng.standard_normal((n, 3))
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    out = np.empty((n, steps, 3))
    for i in range(steps):  # a kick perpendicular to t, then back to unit length
        e = rng.normal(0, kick, (n, 3))
        e -= np.sum(e * t, axis=1, keepdims=True) * t
        t = t + e
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        out[:, i] = t
    return out


def _splat(points: np.ndarray, weights: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Linear (bilinear/trilinear) splat of weighted points onto a grid of ``size``."""
    out = np.zeros(math.prod(size), np.float64)
    if len(points) == 0:
        return out.reshape(size)
    base = np.floor(points).astype(np.int64)
    frac = points - base
    for corner in np.ndindex(*(2,) * len(size)):  # corner-major: the same order in every block
        idx = base + np.array(corner)
        w = weights * np.prod(np.where(np.array(corner), frac, 1 - frac), axis=1)
        ok = np.all((idx >= 0) & (idx < np.array(size)), axis=1)
        flat = np.ravel_multi_index(tuple(idx[ok].T), size)
        out += np.bincount(flat, weights=w[ok], minlength=out.size)
    return out.reshape(size)


@dataclass(frozen=True)
class Granules:
    """Point-like granules of random size and brightness; lengths in the unit of the voxel size.

    Parameters
    ----------
    density : float
        Granules per unit area (2D) or volume (3D).
    size : (float, float)
        Range of FWHMs (uniform).
    brightness : (float, float)
        Range of peak intensities (uniform).
    """

    density: float = 0.05
    size: tuple[float, float] = (0.08, 0.2)
    brightness: tuple[float, float] = (0.3, 1.0)

    def __post_init__(self):
        check_positive(self.density, "granules density")
        object.__setattr__(self, "size", check_range(self.size, "granules size"))
        object.__setattr__(self, "brightness", check_range(self.brightness, "granules brightness"))

    def points(self, shape: Sequence[int], voxel_size, *, seed: int = 0, region=None) -> np.ndarray:
        """Granules within reach of ``region``: rows ``(*centre in voxels, fwhm, brightness)``."""
        shape = _shape(shape)
        voxel = _voxel(voxel_size, len(shape))
        region = as_region(region, shape)
        reach = np.ceil(_TRUNCATE * self.size[1] / FWHM_PER_SIGMA / voxel).astype(int) + 2
        cell_volume = math.prod(_CELL * v for v in voxel)
        rows = []
        for index in cells_near(region, reach, _CELL, shape):
            rng = cell_rng(seed, 2, index)
            n = rng.poisson(self.density * cell_volume)
            centre = (np.asarray(index) + rng.random((n, len(shape)))) * _CELL
            rows.append(np.column_stack([centre, rng.uniform(*self.size, n), rng.uniform(*self.brightness, n)]))
        return np.concatenate(rows) if rows else np.zeros((0, len(shape) + 2))

    def render(self, shape: Sequence[int], voxel_size, *, seed: int = 0, region=None) -> np.ndarray:
        """Clean granules on ``region`` of a volume of ``shape`` (default: all of it), float32."""
        shape = _shape(shape)
        voxel = _voxel(voxel_size, len(shape))
        region = as_region(region, shape)
        out = np.zeros(tuple(b - a for a, b in region), np.float64)
        ndim = len(shape)
        for row in self.points(shape, voxel, seed=seed, region=region):
            centre, sigma = row[:ndim], row[ndim] / FWHM_PER_SIGMA / voxel
            lo = np.maximum(np.floor(centre - _TRUNCATE * sigma).astype(int), [a for a, _ in region])
            hi = np.minimum(np.ceil(centre + _TRUNCATE * sigma).astype(int) + 1, [b for _, b in region])
            if np.any(hi <= lo):
                continue
            value = np.asarray(row[ndim + 1])
            for ax in range(ndim):  # separable voxel average of a Gaussian with peak 1
                x = np.arange(lo[ax], hi[ax]) - centre[ax]
                s = math.sqrt(2) * sigma[ax]
                g = sigma[ax] * math.sqrt(math.pi / 2) * (special.erf((x + 0.5) / s) - special.erf((x - 0.5) / s))
                value = np.multiply.outer(value, g)
            box = tuple(slice(a - r0, b - r0) for a, b, (r0, _) in zip(lo, hi, region))
            out[box] += value
        return out.astype(np.float32)


Structure = Tubules | Granules
