"""Measuring resolution: FWHM by Gaussian fits, and Fourier ring / shell correlation.

- :func:`fit_gaussian` fits ``offset + amplitude * exp(-sum_i (x_i - c_i)^2 / (2 s_i^2))`` to a
  line profile or a small patch (scipy's ``curve_fit``); FWHM = 2 sqrt(2 ln 2) s.
- :func:`tubule_fwhm` fits the profiles across tubules (2D) at points along known paths (e.g.
  from :meth:`bigcare.synth.Tubules.paths`), skipping points near other tubules; :func:`granule_fwhm`
  fits isolated granules or beads around known centres.
- :func:`frc` correlates two independent noisy images of the same sample ring by ring (2D) or
  shell by shell (3D) of spatial frequency; :func:`frc_resolution` is ``1 / frequency`` where the
  curve first falls below 1/7 (Nieuwenhuizen et al., Nat. Methods 2013).

Lengths are physical (the unit of ``voxel_size``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import ndimage, optimize, spatial

from bigcare.errors import ConfigError, InputError

__all__ = ["fit_gaussian", "tubule_fwhm", "granule_fwhm", "frc", "frc_resolution", "FWHM_PER_SIGMA"]

FWHM_PER_SIGMA = 2 * math.sqrt(2 * math.log(2))


def _voxel(voxel_size, ndim: int) -> np.ndarray:
    v = np.full(ndim, float(voxel_size)) if np.ndim(voxel_size) == 0 else np.asarray(voxel_size, float)
    if v.shape != (ndim,) or not np.all(v > 0):
        raise ConfigError(f"voxel_size must be {ndim} positive numbers, got {voxel_size!r}")
    return v


def fit_gaussian(data: np.ndarray, voxel_size=1.0) -> dict | None:
    """Least-squares Gaussian plus constant fit of a 1D profile or a 2D/3D patch.

    Parameters
    ----------
    data : numpy.ndarray
        The profile or patch, the peak roughly in the middle.
    voxel_size : float or sequence of float
        Sample spacing per axis.

    Returns
    -------
    dict or None
        ``amplitude``, ``offset``, ``centre`` and ``sigma`` (tuples per axis, physical, centre
        relative to the middle sample) and ``fwhm`` (tuple); None when the fit fails or gives no
        peak (amplitude below half the data's range, a width outside (a quarter sample, the
        data's extent), the centre outside the data).
    """
    y = np.asarray(data, float)
    if y.size < 3 * y.ndim + 2 or not np.all(np.isfinite(y)):
        return None
    voxel = _voxel(voxel_size, y.ndim)
    coords = [(np.arange(n) - (n - 1) / 2) * d for n, d in zip(y.shape, voxel)]
    grids = np.meshgrid(*coords, indexing="ij")
    flat = [g.ravel() for g in grids]
    nd = y.ndim

    def model(_, amp, off, *cs):
        c, s = cs[:nd], cs[nd:]
        return off + amp * np.exp(-sum((x - ci) ** 2 / (2 * si**2) for x, ci, si in zip(flat, c, s)))

    peak = np.unravel_index(np.argmax(y), y.shape)
    off0 = float(np.percentile(y, 10))
    p0 = [float(y.max() - off0), off0, *(float(c[i]) for c, i in zip(coords, peak)),
          *(float(n * d / 6) for n, d in zip(y.shape, voxel))]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p, _ = optimize.curve_fit(model, None, y.ravel(), p0=p0, maxfev=2000)
    except (RuntimeError, ValueError, optimize.OptimizeWarning):
        return None
    amp, off, c, s = p[0], p[1], p[2:2 + nd], np.abs(p[2 + nd:])
    extent = np.array(y.shape) * voxel
    # a peak: at least half the data's range high, wider than a quarter sample, inside the data
    if not (amp > 0.5 * np.ptp(y) and np.all(s > voxel / 4) and np.all(s < extent) and np.all(np.abs(c) < extent / 2)):
        return None
    return {"amplitude": float(amp), "offset": float(off), "centre": tuple(map(float, c)),
            "sigma": tuple(map(float, s)), "fwhm": tuple(float(FWHM_PER_SIGMA * v) for v in s)}


def tubule_fwhm(image: np.ndarray, paths: Sequence[np.ndarray], voxel_size, *, every: float = 0.5,
                half_length: float | None = None, isolation: float | None = None, max_offset: float = 1.0) -> np.ndarray:
    """FWHMs of Gaussian fits to profiles across tubules of a 2D image.

    Parameters
    ----------
    image : numpy.ndarray
        2D image (YX).
    paths : sequence of (N, 2) arrays
        Tubule centre lines in voxel coordinates of ``image`` (e.g. ``Tubules.paths``).
    voxel_size : float or (float, float)
        Pixel size.
    every : float
        Spacing of the profiles along each path (physical).
    half_length : float, optional
        Profile half length (physical); default 8 pixels.
    isolation : float, optional
        Skip profiles with another path's centre line closer than this (physical); default
        ``1.5 * half_length``.
    max_offset : float
        Reject fits whose centre is further than this many pixels from the path.

    Returns
    -------
    numpy.ndarray
        One FWHM (physical) per accepted profile (possibly empty).

    Raises
    ------
    InputError
        If ``image`` is not 2D.
    """
    img = np.asarray(image, float)
    if img.ndim != 2:
        raise InputError(f"tubule_fwhm measures 2D images, got shape {img.shape}")
    px = float(np.min(_voxel(voxel_size, 2)))
    half = half_length if half_length is not None else 8 * px
    isolation = isolation if isolation is not None else 1.5 * half
    n_half = int(round(half / px))
    offsets = np.arange(-n_half, n_half + 1)
    tagged = [(p, np.full(len(p), k)) for k, p in enumerate(paths) if len(p) > 2]
    if not tagged:
        return np.zeros(0)
    all_points = np.concatenate([p for p, _ in tagged])
    owner = np.concatenate([t for _, t in tagged])
    tree = spatial.cKDTree(all_points)
    out = []
    for k, p in enumerate(paths):
        if len(p) < 3:
            continue
        step = max(1, int(round(every / (np.linalg.norm(p[1] - p[0]) * px + 1e-12))))
        for i in range(step, len(p) - step, step):
            centre = p[i]
            if np.any(centre < n_half) or np.any(centre > np.array(img.shape) - 1 - n_half):
                continue
            near = tree.query_ball_point(centre, isolation / px)
            if np.any(owner[near] != k):
                continue
            tangent = p[min(i + 2, len(p) - 1)] - p[max(i - 2, 0)]
            normal = np.array([-tangent[1], tangent[0]]) / (np.linalg.norm(tangent) + 1e-12)
            coords = centre[:, None] + normal[:, None] * offsets[None, :]
            profile = ndimage.map_coordinates(img, coords, order=3)  # cubic: linear interpolation widens
            fit = fit_gaussian(profile, px)
            if fit is not None and abs(fit["centre"][0]) <= max_offset * px:
                out.append(fit["fwhm"][0])
    return np.asarray(out)


def granule_fwhm(image: np.ndarray, centres: np.ndarray, voxel_size, *, radius: int = 6,
                 isolation: float | None = None, max_offset: float = 1.0) -> np.ndarray:
    """Per-axis FWHMs of Gaussian fits to isolated granules (or beads) around known centres.

    Parameters
    ----------
    image : numpy.ndarray
        2D or 3D image.
    centres : (N, ndim) array
        Centres in voxel coordinates.
    voxel_size : float or sequence of float
    radius : int
        Half size of the fitted patch in voxels.
    isolation : float, optional
        Skip granules with another centre closer than this many voxels; default ``2 * radius``.
    max_offset : float
        Reject fits whose centre moved more than this many voxels.

    Returns
    -------
    numpy.ndarray
        ``(M, ndim)`` FWHMs (physical) of the accepted fits.
    """
    img = np.asarray(image, float)
    centres = np.asarray(centres, float).reshape(-1, img.ndim)
    voxel = _voxel(voxel_size, img.ndim)
    isolation = isolation if isolation is not None else 2 * radius
    tree = spatial.cKDTree(centres) if len(centres) else None
    out = []
    for c in centres:
        if tree is not None and len(tree.query_ball_point(c, isolation)) > 1:
            continue
        lo = np.round(c).astype(int) - radius
        hi = lo + 2 * radius + 1
        if np.any(lo < 0) or np.any(hi > np.array(img.shape)):
            continue
        fit = fit_gaussian(img[tuple(slice(a, b) for a, b in zip(lo, hi))], voxel)
        if fit is None:
            continue
        shift = (np.array(fit["centre"]) / voxel) - (c - np.round(c))
        if np.all(np.abs(shift) <= max_offset):
            out.append(fit["fwhm"])
    return np.asarray(out).reshape(-1, img.ndim)


def frc(a: np.ndarray, b: np.ndarray, voxel_size=1.0, *, bins: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fourier ring (2D) / shell (3D) correlation of two images of the same sample.

    ``FRC(q) = sum_ring A B* / sqrt(sum_ring |A|^2 sum_ring |B|^2)``, after subtracting each
    image's mean and applying a Hann window (against the edges' cross).

    Parameters
    ----------
    a, b : numpy.ndarray
        Two images with independent noise, same shape (2D or 3D).
    voxel_size : float or sequence of float
    bins : int, optional
        Number of frequency rings up to the Nyquist frequency of the coarsest axis; default
        half the smallest size.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Ring centre frequencies (cycles per unit length) and the correlation per ring.

    Raises
    ------
    InputError
        If the shapes differ or are not 2D/3D of at least 8 per axis.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim not in (2, 3) or min(a.shape) < 8:
        raise InputError(f"frc needs two 2D or 3D images of the same shape, >= 8 per axis; got {a.shape} and {b.shape}")
    voxel = _voxel(voxel_size, a.ndim)
    window = np.ones(())
    for n in a.shape:
        window = np.multiply.outer(window, np.hanning(n))
    fa, fb = (np.fft.fftn((x - x.mean()) * window) for x in (a, b))
    freqs = np.meshgrid(*(np.fft.fftfreq(n, d) for n, d in zip(a.shape, voxel)), indexing="ij")
    q = np.sqrt(sum(f**2 for f in freqs))
    nyquist = float(np.min(0.5 / voxel))
    bins = bins or min(a.shape) // 2
    edges = np.linspace(0, nyquist, bins + 1)
    index = np.digitize(q.ravel(), edges) - 1
    ok = (index >= 0) & (index < bins)
    cross = np.bincount(index[ok], weights=(fa * np.conj(fb)).real.ravel()[ok], minlength=bins)
    pa = np.bincount(index[ok], weights=(np.abs(fa) ** 2).ravel()[ok], minlength=bins)
    pb = np.bincount(index[ok], weights=(np.abs(fb) ** 2).ravel()[ok], minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = cross / np.sqrt(pa * pb)
    return (edges[:-1] + edges[1:]) / 2, curve


def frc_resolution(a: np.ndarray, b: np.ndarray, voxel_size=1.0, *, threshold: float = 1 / 7,
                   bins: int | None = None) -> float:
    """Resolution (physical length) where the FRC/FSC of ``a`` and ``b`` first drops below ``threshold``.

    Interpolates linearly between the rings around the crossing (skipping the first, DC ring);
    returns ``1 / nyquist`` (twice the pixel size) if it never drops below it.
    """
    f, c = frc(a, b, voxel_size, bins=bins)
    c = np.nan_to_num(c, nan=0.0)
    below = np.nonzero(c[1:] < threshold)[0]
    if below.size == 0:
        return float(1 / (2 * f[-1] - f[-2]))
    i = below[0] + 1
    f0, f1, c0, c1 = f[i - 1], f[i], c[i - 1], c[i]
    crossing = f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0) if c0 != c1 else f1
    return float(1 / crossing)
