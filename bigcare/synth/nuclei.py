"""Synthetic fluorescence volumes for demos and tests: a clean phantom and its degradation.

``phantom`` draws nuclei-like smooth blobs (ellipsoids of varying size, orientation-free,
brightness and soft edge, with a faint low-frequency texture) plus membrane-like thin shells
around some of them. ``degrade`` imitates a camera: optional Gaussian blur (a PSF), Poisson
shot noise at ``photons`` per unit intensity on the signal plus background, and Gaussian read
noise. Both are seeded and pure numpy/scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from bigcare.errors import ConfigError, InputError

__all__ = ["phantom", "degrade", "write_pair"]


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise ConfigError(f"shape must be a sequence of 2 or 3 ints, got {shape!r}") from None
    if len(shape) not in (2, 3) or any(s < 1 for s in shape):
        raise ConfigError(f"shape must be 2 or 3 positive ints (YX or ZYX), got {shape}")
    return shape


def phantom(
    shape: Sequence[int],
    *,
    n_nuclei: int | None = None,
    shells: bool = True,
    seed: int = 0,
) -> np.ndarray:
    """Clean synthetic fluorescence image: nuclei-like blobs and membrane-like shells.

    Parameters
    ----------
    shape : sequence of int
        ``(Y, X)`` or ``(Z, Y, X)``.
    n_nuclei : int, optional
        Number of nuclei. Default: enough to cover about 15% of the image.
    shells : bool
        Add a thin membrane-like shell around about half of the nuclei. Default True.
    seed : int
        Random seed; the same arguments give the same image.

    Returns
    -------
    numpy.ndarray
        float32 array of ``shape`` with values in [0, 1] (background 0).

    Raises
    ------
    ConfigError
        If ``shape`` is not 2 or 3 positive sizes, or ``n_nuclei`` is negative.
    """
    shape = _check_shape(shape)
    ndim = len(shape)
    rng = np.random.default_rng(seed)
    r_max = max(1.5, min(10.0, min(shape) / 4))
    r_min = max(1.0, r_max / 3)
    if n_nuclei is None:
        mean_vol = (math.pi if ndim == 2 else 4 / 3 * math.pi) * ((r_min + r_max) / 2) ** ndim
        n_nuclei = max(1, int(0.15 * math.prod(shape) / mean_vol))
    if n_nuclei < 0:
        raise ConfigError(f"n_nuclei must be >= 0, got {n_nuclei}")

    out = np.zeros(shape, np.float32)
    # faint low-frequency texture shared by all nuclei (chromatin-like modulation)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0)
    texture /= max(float(np.abs(texture).max()), 1e-6)

    for _ in range(n_nuclei):
        center = rng.uniform(0, shape)
        radii = rng.uniform(r_min, r_max) * rng.uniform(0.75, 1.25, ndim)
        brightness = rng.uniform(0.3, 1.0)
        edge = rng.uniform(0.5, 1.5)  # edge softness in voxels
        shell = shells and rng.random() < 0.5
        outer = radii * (rng.uniform(1.4, 1.9) if shell else 1.0) + 2 * edge + 2
        lo = np.maximum(np.floor(center - outer).astype(int), 0)
        hi = np.minimum(np.ceil(center + outer).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grids = np.ogrid[box]
        rho = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii)))
        scale = float(np.mean(radii))
        # smooth ellipsoid: sigmoid of the signed distance to the surface (in voxels)
        blob = brightness / (1 + np.exp(np.clip((rho - 1) * scale / edge, -50, 50)))
        blob = blob * (1 + 0.2 * texture[box])
        if shell:
            r_shell = rng.uniform(1.4, 1.7)
            width = rng.uniform(0.6, 1.2)  # voxels
            blob = np.maximum(
                blob,
                rng.uniform(0.4, 0.9) * np.exp(-(((rho - r_shell) * scale / width) ** 2)),
            )
        np.maximum(out[box], blob.astype(np.float32), out=out[box])
    return np.clip(out, 0.0, 1.0)


def degrade(
    clean: np.ndarray,
    *,
    photons: float | np.ndarray = 10.0,
    background: float = 0.1,
    read_noise: float = 0.03,
    blur_sigma: float | Sequence[float] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Simulate a low-SNR acquisition of ``clean``: blur, shot noise, read noise.

    ``y = Poisson(photons * (blur(clean) + background)) / photons + N(0, read_noise**2)``,
    so ``E[y] = blur(clean) + background`` (the background stays in the result, as it does in
    a real image) and the shot-noise variance is ``(blur(clean) + background) / photons``.

    Parameters
    ----------
    clean : numpy.ndarray
        Clean image, intensities >= 0 (e.g. from :func:`phantom`).
    photons : float or numpy.ndarray
        Detected photons per unit intensity; lower is noisier. Default 10. An array broadcastable
        to ``clean`` gives a photon budget that varies across the image (light-sheet attenuation
        with depth, vignetting), so one image holds easy and hard regions.
    background : float
        Constant background added before shot noise, in intensity units. Default 0.1.
    read_noise : float
        Standard deviation of the Gaussian camera noise, in intensity units. Default 0.03.
    blur_sigma : float or sequence of float, optional
        Gaussian blur sigma in voxels (one per axis, or one for all) applied before noise.
        Default: no blur.
    seed : int
        Random seed; the same arguments give the same image.

    Returns
    -------
    numpy.ndarray
        float32 array of the same shape, in intensity units.

    Raises
    ------
    ConfigError
        If ``photons <= 0`` anywhere or does not broadcast to the image, ``background < 0``, ``read_noise < 0`` or a ``blur_sigma`` < 0.
    InputError
        If ``clean`` is empty or not finite.
    """
    photon_map = np.asarray(photons, dtype=np.float64)
    if photon_map.size == 0 or not np.all(photon_map > 0):  # also refuses NaN
        shown = photons if photon_map.ndim == 0 else f"an array of shape {photon_map.shape} with a value <= 0 or NaN"
        raise ConfigError(f"photons must be > 0 everywhere, got {shown}")
    if not background >= 0:
        raise ConfigError(f"background must be >= 0, got {background}")
    if not read_noise >= 0:
        raise ConfigError(f"read_noise must be >= 0, got {read_noise}")
    x = np.asarray(clean, dtype=np.float32)
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise InputError(f"clean image must be non-empty and finite, got shape {x.shape}")
    if blur_sigma is not None:
        if np.any(np.asarray(blur_sigma, dtype=float) < 0):
            raise ConfigError(f"blur_sigma must be >= 0, got {blur_sigma}")
        x = ndimage.gaussian_filter(x, blur_sigma, mode="reflect")
    try:
        fits = np.broadcast_shapes(photon_map.shape, x.shape) == x.shape
    except ValueError:
        fits = False
    if not fits:
        raise ConfigError(f"photons of shape {photon_map.shape} does not broadcast to the image's shape {x.shape}")
    rng = np.random.default_rng(seed)
    lam = np.clip((x.astype(np.float64) + background) * photon_map, 0, None)
    y = rng.poisson(lam) / photon_map
    if read_noise > 0:
        y = y + rng.normal(0.0, read_noise, size=x.shape)
    return y.astype(np.float32)


def write_pair(
    input_url,
    target_url,
    shape: Sequence[int],
    *,
    chunks: Sequence[int] | None = None,
    voxel_size: Sequence[float] | None = None,
    n_nuclei: int | None = None,
    photons: float = 10.0,
    background: float = 0.1,
    read_noise: float = 0.03,
    blur_sigma: float | Sequence[float] | None = None,
    seed: int = 0,
    ngff_version: str = "0.5",
):
    """Write a synthetic (noisy input, clean target) pair as two aligned OME-Zarr images.

    The target is :func:`phantom`, the input :func:`degrade` of it; both float32 with axes
    ZYX (or YX for a 2D shape), micrometer units. Held in memory while written: for test and
    example sizes (benchmarks write large volumes slab by slab).

    Returns
    -------
    (Volume, Volume)
        The input and target images.
    """
    from bigcare.store.axes import Axis
    from bigcare.store.write import write_array

    shape = _check_shape(shape)
    clean = phantom(shape, n_nuclei=n_nuclei, seed=seed)
    noisy = degrade(clean, photons=photons, background=background, read_noise=read_noise,
                    blur_sigma=blur_sigma, seed=seed + 1)
    axes = [Axis.named(a, "micrometer") for a in "zyx"[-len(shape):]]
    scale = tuple(voxel_size or (1.0,) * len(shape))
    chunks = tuple(chunks or [min(n, 64) for n in shape])
    written = [write_array(url, data, chunks=chunks, scale=scale, axes=axes, ngff_version=ngff_version)
               for url, data in ((input_url, noisy), (target_url, clean))]
    return written[0], written[1]
