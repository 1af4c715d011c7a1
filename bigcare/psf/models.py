"""PSF models: Gaussian, widefield (Born & Wolf, paraxial), confocal and light sheet."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import sparse, special

from bigcare.errors import ConfigError
from bigcare.psf.common import number, odd_shape, optics, unit_sum, vector

_SUB = 3  # sub-positions per voxel and axis of the widefield model


def _gauss1d(n: int, d: float, sigma: float) -> np.ndarray:
    """Gaussian of std ``sigma`` integrated over ``n`` centred voxels of width ``d``."""
    if sigma == 0:
        return (np.arange(n) == n // 2).astype(np.float64)
    c, s = (np.arange(n) - n // 2) * d, math.sqrt(2) * sigma
    return 0.5 * (special.erf((c + d / 2) / s) - special.erf((c - d / 2) / s))


def gaussian_psf(sigma: float | Sequence[float], voxel_size: float | Sequence[float], shape: Sequence[int] | None = None) -> np.ndarray:
    """Gaussian PSF integrated over each voxel.

    Parameters
    ----------
    sigma : sequence of float
        Standard deviations ``(z, y, x)`` or ``(y, x)``, physical units; 0 gives a delta.
    voxel_size : sequence of float
        Voxel size per axis, as many entries as ``sigma``.
    shape : sequence of int, optional
        Odd size per axis. Default: +-4 sigma per axis (at least 1 voxel).

    Returns
    -------
    numpy.ndarray
        float64 PSF summing to 1.

    Raises
    ------
    ConfigError
        If ``sigma`` is negative, ``voxel_size`` not positive, their lengths differ, or
        ``shape`` is not odd.
    """
    sigma = vector(sigma, "sigma", (2, 3), strict=False)
    voxel = vector(voxel_size, "voxel_size", (len(sigma),))
    if shape is None:
        shape = tuple(2 * math.ceil(4 * s / d - 1e-9) + 1 for s, d in zip(sigma, voxel))
    out = np.ones(())
    for n, d, s in zip(odd_shape(shape, len(sigma)), voxel, sigma):
        out = np.multiply.outer(out, _gauss1d(n, d, s))
    return unit_sum(out)


def _widefield(na: float, wavelength: float, n: float, voxel, shape) -> np.ndarray:
    """Paraxial Born & Wolf intensity, averaged over _SUB**3 sub-positions per voxel."""
    k = 2 * np.pi / wavelength
    sub = (np.arange(_SUB) + 0.5) / _SUB - 0.5  # sub-positions within a voxel, in voxels
    z, y, x = ((((np.arange(m) - m // 2)[:, None] + sub) * d).ravel() for m, d in zip(shape, voxel))
    r = np.hypot(y[:, None], x[None, :])  # (ny*_SUB, nx*_SUB); evaluate each radius once
    r_unique, inverse = np.unique(np.round(r / min(voxel[1:]), 9), return_inverse=True)
    r_unique = r_unique * min(voxel[1:])
    # Gauss-Legendre on rho in [0, 1]; enough nodes for the fastest oscillation in the box
    v_max, phase_max = k * na * r_unique[-1], k * na**2 * np.abs(z).max() / (2 * n)
    nodes, weights = np.polynomial.legendre.leggauss(int(max(200, 2 * (v_max + phase_max))))
    rho, w = (nodes + 1) / 2, weights / 2
    bessel = special.j0(k * na * r_unique[:, None] * rho[None, :]) * (w * rho)  # (nr, Q)
    defocus = np.exp(-1j * k * na**2 / (2 * n) * rho[:, None] ** 2 * z[None, :])  # (Q, nz*_SUB)
    amp = bessel @ defocus
    intensity = (amp.real**2 + amp.imag**2).reshape(len(r_unique), shape[0], _SUB).mean(-1)
    # average the lateral sub-positions of each voxel: sparse (voxel x unique radius) weights
    ny, nx = shape[1], shape[2]
    vox = np.arange(ny)[:, None, None, None] * nx + np.arange(nx)[None, None, :, None]
    vox = np.broadcast_to(vox, (ny, _SUB, nx, _SUB)).ravel()
    avg = sparse.csr_matrix((np.full(vox.size, 1.0 / _SUB**2), (vox, inverse.ravel())),
                            shape=(ny * nx, len(r_unique)))
    return np.moveaxis((avg @ intensity).reshape(ny, nx, shape[0]), -1, 0)


def widefield_psf(na: float, wavelength: float, refractive_index: float, voxel_size: float | Sequence[float],
                  shape: Sequence[int]) -> np.ndarray:
    """Scalar paraxial widefield PSF (Born & Wolf).

    ``h(r, z) = |int_0^1 J0(k NA r rho) exp(-i k z NA^2 rho^2 / (2 n)) rho drho|^2``,
    ``k = 2 pi / wavelength``, by Gauss-Legendre quadrature (>= 200 nodes), averaged over
    3 x 3 x 3 sub-positions per voxel. FWHM: lateral ~0.51 wavelength/NA, axial
    ~1.77 n wavelength/NA^2 (paraxial; the exact high-NA PSF is somewhat shorter).

    Parameters
    ----------
    na, wavelength, refractive_index : float
        Numerical aperture (``<= refractive_index``), emission wavelength (in the unit of
        ``voxel_size``) and refractive index of the immersion medium.
    voxel_size, shape : sequence
        ``(z, y, x)`` voxel size and odd ``(Z, Y, X)`` size.

    Returns
    -------
    numpy.ndarray
        float64 PSF of ``shape`` summing to 1.

    Raises
    ------
    ConfigError
        If a parameter is not positive, ``na > refractive_index``, or ``shape`` is not odd.
    """
    na, wavelength, n, voxel, shape = optics(na, wavelength, refractive_index, voxel_size, shape)
    return unit_sum(_widefield(na, wavelength, n, voxel, shape))


def confocal_psf(na: float, excitation_wavelength: float, emission_wavelength: float, refractive_index: float,
                 voxel_size: float | Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """Confocal PSF, infinitely small pinhole: excitation times emission widefield PSF.

    Parameters
    ----------
    na, excitation_wavelength, emission_wavelength, refractive_index : float
        As :func:`widefield_psf`, with one wavelength per pass.
    voxel_size, shape : sequence
        ``(z, y, x)`` voxel size and odd ``(Z, Y, X)`` size.

    Returns
    -------
    numpy.ndarray
        float64 PSF of ``shape`` summing to 1 (~1/sqrt(2) as wide as widefield).

    Raises
    ------
    ConfigError
        As :func:`widefield_psf`.
    """
    na, ex, n, voxel, shape = optics(na, excitation_wavelength, refractive_index, voxel_size, shape)
    em = number(emission_wavelength, "emission_wavelength")
    return unit_sum(_widefield(na, ex, n, voxel, shape) * _widefield(na, em, n, voxel, shape))


def lightsheet_psf(na: float, wavelength: float, refractive_index: float, voxel_size: float | Sequence[float],
                   shape: Sequence[int], sheet_na: float | None = None, sheet_sigma: float | None = None) -> np.ndarray:
    """Light-sheet PSF: detection widefield PSF times the sheet's Gaussian profile along Z.

    The sheet's intensity is ``exp(-z^2 / (2 s^2))`` (averaged over each voxel), with
    ``s = sheet_sigma`` or ``s = w0 / 2`` from the Gaussian beam waist (1/e^2 intensity radius)
    ``w0 = wavelength / (pi sheet_na)``; the sheet uses ``wavelength`` too.

    Parameters
    ----------
    na, wavelength, refractive_index, voxel_size, shape
        Detection optics and sampling, as :func:`widefield_psf`.
    sheet_na, sheet_sigma : float, optional
        Numerical aperture of the illumination sheet, or the standard deviation of its
        intensity profile along Z (physical units); exactly one.

    Returns
    -------
    numpy.ndarray
        float64 PSF of ``shape`` summing to 1.

    Raises
    ------
    ConfigError
        As :func:`widefield_psf`, or unless exactly one valid sheet parameter is given.
    """
    na, wavelength, n, voxel, shape = optics(na, wavelength, refractive_index, voxel_size, shape)
    if (sheet_na is None) == (sheet_sigma is None):
        raise ConfigError("give exactly one of sheet_na and sheet_sigma, got "
                          f"sheet_na={sheet_na!r}, sheet_sigma={sheet_sigma!r}")
    if sheet_sigma is not None:
        s = number(sheet_sigma, "sheet_sigma")
    else:
        sheet_na = number(sheet_na, "sheet_na")
        if sheet_na > n:
            raise ConfigError(f"sheet_na must not exceed refractive_index={n}, got sheet_na={sheet_na}")
        s = wavelength / (np.pi * sheet_na) / 2
    sheet = _gauss1d(shape[0], voxel[0], s)[:, None, None]
    return unit_sum(_widefield(na, wavelength, n, voxel, shape) * sheet)
