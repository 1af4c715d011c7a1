"""A simulated acquisition of synthetic structures, blockwise (CARE Fig. 4's training inputs).

::

    structures (truth)  + Perlin-like background      on region * downsample + PSF margin
        --convolve with the PSF ('valid': the margin is used up)--> region * downsample
        --mean over downsample^d bins----------------------------> region (camera grid)
        --Poisson(photons * x) / photons + N(0, read_noise^2)---> the noisy input

Everything is a function of the seed and global positions (:mod:`bigcare.synth.space`): the
background is value noise on seeded lattices, the noise comes from per-cell generators drawn
for whole cells (Poisson by the inverse CDF of a per-voxel uniform), so ``acquire(region=b)``
equals ``acquire()[b]`` (to float rounding of the FFT convolution, ~1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import signal, stats

from bigcare.errors import ConfigError
from bigcare.synth.space import as_region, cell_rng, cells_near, check_positive, grow, hash_uniform
from bigcare.synth.structures import Granules, Tubules

__all__ = ["Background", "Microscope", "clean", "acquire", "make_psf"]

_NOISE_CELL = 32


@dataclass(frozen=True)
class Background:
    """Low-frequency, Perlin-like autofluorescence: fractal value noise in [0, amplitude].

    Parameters
    ----------
    amplitude : float
        Largest background intensity.
    scale : float
        Lattice spacing of the coarsest octave (physical units): the size of its blobs.
    octaves : int
        Octaves of halving spacing and weight.
    """

    amplitude: float = 0.2
    scale: float = 4.0
    octaves: int = 3

    def __post_init__(self):
        check_positive(self.amplitude, "background amplitude")
        check_positive(self.scale, "background scale")
        if not 1 <= int(self.octaves) <= 8:
            raise ConfigError(f"background octaves must be 1..8, got {self.octaves!r}")

    def render(self, region, voxel_size, *, seed: int = 0) -> np.ndarray:
        """The background on ``region`` (global voxel coordinates), float64."""
        voxel = np.asarray(voxel_size, float)
        total, weight = 0.0, 1.0
        out = np.zeros(tuple(b - a for a, b in region))
        for octave in range(int(self.octaves)):
            spacing = self.scale / 2**octave
            u = [(np.arange(a, b) + 0.5) * d / spacing for (a, b), d in zip(region, voxel)]
            base = [np.floor(x).astype(np.int64) for x in u]
            fade = [_quintic(x - i) for x, i in zip(u, base)]
            grids = np.ix_(*base)
            for corner in np.ndindex(*(2,) * len(region)):
                w = np.ones(())
                for ax, c in enumerate(corner):
                    f = fade[ax] if c else 1 - fade[ax]
                    w = np.multiply.outer(w, f)
                out += weight * w * hash_uniform(seed, 100 + octave, *(g + c for g, c in zip(grids, corner)))
            total += weight
            weight /= 2
        return self.amplitude * out / total


def _quintic(t: np.ndarray) -> np.ndarray:
    """Perlin's fade 6t^5 - 15t^4 + 10t^3: smooth (C2) interpolation between lattice values."""
    return t * t * t * (t * (6 * t - 15) + 10)


@dataclass(frozen=True)
class Microscope:
    """How the structures are imaged.

    Parameters
    ----------
    psf : numpy.ndarray, optional
        PSF on the structures' voxel grid (odd size, as many axes as the image); None: no blur.
    photons : float
        Detected photons per unit intensity (lower: noisier).
    background : Background, optional
        Perlin-like background added to the structures before the blur.
    offset : float
        Constant background (intensity units) before the noise.
    read_noise : float
        Standard deviation of the Gaussian camera noise (intensity units).
    downsample : int
        Camera pixels are ``downsample`` structure voxels wide per axis (mean over bins).
    """

    psf: np.ndarray | None = None
    photons: float = 50.0
    background: Background | None = None
    offset: float = 0.0
    read_noise: float = 0.01
    downsample: int = 1

    def __post_init__(self):
        check_positive(self.photons, "photons")
        if not (self.offset >= 0 and self.read_noise >= 0):
            raise ConfigError(f"offset and read_noise must be >= 0, got offset={self.offset!r}, "
                              f"read_noise={self.read_noise!r}")
        if int(self.downsample) != self.downsample or self.downsample < 1:
            raise ConfigError(f"downsample must be a whole number >= 1, got {self.downsample!r}")
        if self.psf is not None:
            psf = np.asarray(self.psf, float)
            if any(n % 2 == 0 for n in psf.shape) or not np.all(np.isfinite(psf)) or psf.sum() <= 0:
                raise ConfigError(f"psf must be finite, with a positive sum and an odd size per axis, got shape "
                                  f"{psf.shape}")
            object.__setattr__(self, "psf", psf / psf.sum())


def clean(structures: Sequence[Tubules | Granules], shape: Sequence[int], voxel_size, *, seed: int = 0,
          region=None) -> np.ndarray:
    """The ground truth: the sum of every structure's rendering on ``region``, float32.

    Each structure draws from its own stream of the seed (``seed + 1000 * i`` for the i-th).
    """
    region = as_region(region, shape)
    out = np.zeros(tuple(b - a for a, b in region), np.float32)
    for i, s in enumerate(structures):
        out += s.render(shape, voxel_size, seed=seed + 1000 * i, region=region)
    return out


def acquire(structures: Sequence[Tubules | Granules], shape: Sequence[int], voxel_size, microscope: Microscope, *,
            seed: int = 0, region=None) -> np.ndarray:
    """The noisy image of ``structures`` through ``microscope`` on ``region`` of the camera grid.

    Parameters
    ----------
    structures : sequence of Tubules or Granules
        The ground truth's parts.
    shape : sequence of int
        The structures' volume (``YX`` or ``ZYX``); the camera grid is ``shape // downsample``.
    voxel_size : sequence of float
        The structures' voxel size (the camera's is ``downsample`` times larger).
    microscope : Microscope
        PSF, background, downsampling and noise.
    seed : int
        The same seed, structures and region give the same image; blocks agree with the whole.
    region : pairs or slices, optional
        Part of the camera grid; default all of it.

    Returns
    -------
    numpy.ndarray
        float32, in intensity units (background and offset included, as a camera records them).
    """
    f = int(microscope.downsample)
    camera = tuple(int(n) // f for n in shape)
    if min(camera) < 1:
        raise ConfigError(f"shape {tuple(shape)} is smaller than downsample {f}")
    region = as_region(region, camera)
    fine = tuple((a * f, b * f) for a, b in region)
    psf = microscope.psf
    if psf is not None and psf.ndim != len(shape):
        raise ConfigError(f"psf has {psf.ndim} axes, the image {len(shape)} ({tuple(shape)})")
    half = [n // 2 for n in psf.shape] if psf is not None else [0] * len(shape)
    box = grow(fine, half)
    x = clean(structures, shape, voxel_size, seed=seed, region=box).astype(np.float64)
    if microscope.background is not None:
        x += microscope.background.render(box, voxel_size, seed=seed + 7)
    if psf is not None:
        x = signal.fftconvolve(x, psf, mode="valid")
    if f > 1:
        x = x.reshape([n for a, b in fine for n in ((b - a) // f, f)]).mean(axis=tuple(range(1, 2 * len(shape), 2)))
    lam = np.clip((x + microscope.offset) * microscope.photons, 0, None)
    u, g = _cell_noise(region, camera, seed + 11)
    y = stats.poisson.ppf(np.clip(u, 1e-12, 1 - 1e-12), lam) / microscope.photons
    return (y + microscope.read_noise * g).astype(np.float32)


def _cell_noise(region, shape, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel uniforms and standard normals on ``region``, drawn cell by cell (blockwise)."""
    size = tuple(b - a for a, b in region)
    u, g = np.empty(size), np.empty(size)
    for index in cells_near(region, [0] * len(size), _NOISE_CELL, shape):
        rng = cell_rng(seed, 3, index)
        cu, cg = rng.random((_NOISE_CELL,) * len(size)), rng.standard_normal((_NOISE_CELL,) * len(size))
        lo = [max(a, i * _NOISE_CELL) for (a, _), i in zip(region, index)]
        hi = [min(b, (i + 1) * _NOISE_CELL) for (_, b), i in zip(region, index)]
        if any(h <= lo_ for lo_, h in zip(lo, hi)):
            continue
        dst = tuple(slice(a - r0, b - r0) for a, b, (r0, _) in zip(lo, hi, region))
        src = tuple(slice(a - i * _NOISE_CELL, b - i * _NOISE_CELL) for a, b, i in zip(lo, hi, index))
        u[dst], g[dst] = cu[src], cg[src]
    return u, g


def make_psf(spec: dict, voxel_size: Sequence[float], ndim: int) -> np.ndarray:
    """A PSF from :mod:`bigcare.psf` for a ``ndim``-D image on ``voxel_size``.

    ``spec`` holds ``kind`` and its parameters: ``gaussian`` (``fwhm``: lateral, and axial in
    3D), ``widefield`` (``na``, ``wavelength``, ``refractive_index``), ``confocal`` (+
    ``excitation_wavelength``), ``file`` (``path``, ``voxel_size`` of the file, ZYX). A 2D image
    gets the in-focus plane of the 3D PSF (a thin sample). Sizes: +-2 wavelength/NA laterally,
    +-2 axial FWHMs (1.77 n wavelength / NA^2) axially.

    Raises
    ------
    ConfigError
        For an unknown kind or a missing or bad parameter (named).
    """
    from bigcare import psf as psfs

    voxel = [float(v) for v in voxel_size]
    if len(voxel) != ndim:
        raise ConfigError(f"voxel_size {voxel_size!r} must have {ndim} entries")
    kind = spec.get("kind")
    params = {k: v for k, v in spec.items() if k != "kind"}
    try:
        if kind == "gaussian":
            fwhm = params.pop("fwhm")
            fwhm = [fwhm] * ndim if np.ndim(fwhm) == 0 else list(fwhm)
            out = psfs.gaussian_psf([w / 2.3548200450309493 for w in fwhm], voxel)
        elif kind in ("widefield", "confocal"):
            na, lam, n = params.pop("na"), params.pop("wavelength"), params.pop("refractive_index", 1.0)
            xy = min(voxel[-2:])
            r = 2 * math.ceil(2 * lam / na / xy) + 1
            z = 1 if ndim == 2 else 2 * math.ceil(2 * 1.77 * n * lam / na**2 / voxel[0]) + 1
            vox3 = [xy / 4] + voxel[-2:] if ndim == 2 else voxel
            if kind == "widefield":
                out = psfs.widefield_psf(na, lam, n, vox3, (z, r, r))
            else:
                out = psfs.confocal_psf(na, params.pop("excitation_wavelength"), lam, n, vox3, (z, r, r))
            out = out[0] if ndim == 2 else out
        elif kind == "file":
            out = psfs.load_psf(params.pop("path"), params.pop("voxel_size"), [voxel[0]] * (3 - ndim) + voxel)
            out = out[out.shape[0] // 2] if ndim == 2 and out.ndim == 3 else out
        else:
            raise ConfigError(f"psf kind must be gaussian, widefield, confocal or file, got {kind!r}")
    except KeyError as e:
        raise ConfigError(f"psf kind {kind!r} needs the parameter {e.args[0]!r}") from None
    except TypeError as e:
        raise ConfigError(f"psf kind {kind!r}: bad parameters {spec!r} ({e})") from None
    if params:
        raise ConfigError(f"psf kind {kind!r}: unknown parameter(s) {sorted(params)}")
    return np.asarray(out, float) / float(np.sum(out))
