"""Point spread functions for isotropic restoration (IsoNet, Weigert et al. MICCAI 2017, 2.1).

Conventions
-----------
* Arrays are ``(Z, Y, X)`` (or ``(Y, X)``); voxel sizes are ``(z, y, x)`` in physical units
  (micrometres); wavelengths and widths use the same unit as the voxel sizes.
* Every PSF returned is float64, non-negative, sums to 1 and has an odd size per axis with its
  centre on the central voxel ``shape // 2`` (model PSFs are symmetric about it).
* Model PSFs are voxel averages, not point samples: Gaussians are integrated over each voxel
  (difference of erf); the widefield model is averaged over 3 x 3 x 3 sub-positions per voxel.
* A bad parameter raises :class:`~bigcare.errors.ConfigError` naming it and its value; a missing
  or unreadable PSF file raises :class:`~bigcare.errors.InputError` naming the path.

Isotropic restoration blurs lateral slices with the PSF as a lateral slice would see it with
the optical axis rotated into the lateral plane::

    PSF (Z,Y,X) --rotate_psf--> (Y,Z,X), isotropic grid --sum over Y--> full    (Z, X)
    PSF (Z,Y,X) --lateral_kernel: sum over Z------------------------> lateral (Y, X)
    full ~ lateral * split          (split_psf, regularised non-negative deconvolution)

Lateral slices already carry the blur ``lateral``, so blurring them with ``split`` gives
``full`` overall.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage, sparse, special

from bigcare.errors import ConfigError, InputError

__all__ = [
    "gaussian_psf",
    "widefield_psf",
    "confocal_psf",
    "lightsheet_psf",
    "load_psf",
    "rotate_psf",
    "lateral_kernel",
    "isotropic_kernels",
    "split_psf",
    "fwhm",
    "second_moment_sigma",
]

_SUB = 3  # sub-positions per voxel and axis of the widefield model
_AXES = {"y": 1, "x": 2}
_FISTA_ITER = 200  # at most; split_psf stops earlier once the kernel no longer changes


# ---------------------------------------------------------------------------- validation
def _number(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _vector(value, name: str, ndims: Sequence[int], *, strict: bool = True) -> tuple[float, ...]:
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


def _odd_shape(shape, ndim: int) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ConfigError(f"shape must be {ndim} odd positive ints, got {shape!r}") from None
    if len(out) != ndim or any(s < 1 or s % 2 == 0 for s in out):
        raise ConfigError(f"shape must be {ndim} odd positive ints (one per axis), got {shape!r}")
    return out


def _optics(na, wavelength, refractive_index, voxel_size, shape):
    na, wavelength = _number(na, "na"), _number(wavelength, "wavelength")
    n = _number(refractive_index, "refractive_index")
    if na > n:
        raise ConfigError(f"na must not exceed refractive_index={n}, got na={na}")
    return na, wavelength, n, _vector(voxel_size, "voxel_size", (3,)), _odd_shape(shape, 3)


def _as_psf(psf, name: str = "psf", ndims: Sequence[int] = (2, 3), odd: bool = True) -> np.ndarray:
    arr = np.asarray(psf, dtype=np.float64)
    if arr.ndim not in ndims:
        raise ConfigError(f"{name} must be {' or '.join(map(str, ndims))}D, got ndim={arr.ndim} "
                          f"(shape {arr.shape})")
    if odd and any(s % 2 == 0 for s in arr.shape):
        raise ConfigError(f"{name} must have an odd size per axis, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or arr.sum() <= 0:
        raise ConfigError(f"{name} must be finite with a positive sum, got sum {arr.sum()!r}")
    return arr


def _normalise(arr: np.ndarray) -> np.ndarray:
    arr = np.clip(arr, 0.0, None)
    return np.ascontiguousarray(arr / arr.sum())


# ---------------------------------------------------------------------------- models
def _gauss1d(n: int, d: float, sigma: float) -> np.ndarray:
    """Gaussian of std ``sigma`` integrated over ``n`` centred voxels of width ``d``."""
    if sigma == 0:
        return (np.arange(n) == n // 2).astype(np.float64)
    c, s = (np.arange(n) - n // 2) * d, math.sqrt(2) * sigma
    return 0.5 * (special.erf((c + d / 2) / s) - special.erf((c - d / 2) / s))


def gaussian_psf(sigma, voxel_size, shape=None) -> np.ndarray:
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
    sigma = _vector(sigma, "sigma", (2, 3), strict=False)
    voxel = _vector(voxel_size, "voxel_size", (len(sigma),))
    if shape is None:
        shape = tuple(2 * math.ceil(4 * s / d - 1e-9) + 1 for s, d in zip(sigma, voxel))
    out = np.ones(())
    for n, d, s in zip(_odd_shape(shape, len(sigma)), voxel, sigma):
        out = np.multiply.outer(out, _gauss1d(n, d, s))
    return _normalise(out)


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


def widefield_psf(na, wavelength, refractive_index, voxel_size, shape) -> np.ndarray:
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
    na, wavelength, n, voxel, shape = _optics(na, wavelength, refractive_index, voxel_size, shape)
    return _normalise(_widefield(na, wavelength, n, voxel, shape))


def confocal_psf(na, excitation_wavelength, emission_wavelength, refractive_index, voxel_size,
                 shape) -> np.ndarray:
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
    na, ex, n, voxel, shape = _optics(na, excitation_wavelength, refractive_index, voxel_size, shape)
    em = _number(emission_wavelength, "emission_wavelength")
    return _normalise(_widefield(na, ex, n, voxel, shape) * _widefield(na, em, n, voxel, shape))


def lightsheet_psf(na, wavelength, refractive_index, voxel_size, shape, sheet_na=None,
                   sheet_sigma=None) -> np.ndarray:
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
    na, wavelength, n, voxel, shape = _optics(na, wavelength, refractive_index, voxel_size, shape)
    if (sheet_na is None) == (sheet_sigma is None):
        raise ConfigError("give exactly one of sheet_na and sheet_sigma, got "
                          f"sheet_na={sheet_na!r}, sheet_sigma={sheet_sigma!r}")
    if sheet_sigma is not None:
        s = _number(sheet_sigma, "sheet_sigma")
    else:
        sheet_na = _number(sheet_na, "sheet_na")
        if sheet_na > n:
            raise ConfigError(f"sheet_na must not exceed refractive_index={n}, got sheet_na={sheet_na}")
        s = wavelength / (np.pi * sheet_na) / 2
    sheet = _gauss1d(shape[0], voxel[0], s)[:, None, None]
    return _normalise(_widefield(na, wavelength, n, voxel, shape) * sheet)


# ---------------------------------------------------------------------------- measured PSFs
def _resample(psf: np.ndarray, voxel, target) -> np.ndarray:
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


def _crop_pad(arr: np.ndarray, centre, shape) -> np.ndarray:
    """The ``shape`` box centred on voxel ``centre`` of ``arr``, zero where it leaves ``arr``."""
    out = np.zeros(shape)
    src, dst = [], []
    for n, c, s in zip(arr.shape, centre, shape):
        lo, hi = c - s // 2, c + s // 2 + 1
        src.append(slice(max(lo, 0), min(hi, n)))
        dst.append(slice(max(lo, 0) - lo, s - (hi - min(hi, n))))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def _shell(shape) -> np.ndarray:
    """Mask of the outermost voxels of an array of ``shape``."""
    shell = np.ones(shape, bool)
    shell[tuple(slice(1, -1) for _ in shape)] = False
    return shell


def load_psf(path, voxel_size, target_voxel_size=None, background="auto", shape=None) -> np.ndarray:
    """Read a measured (bead) PSF, remove its background, centre, resample and normalise it.

    Reads a TIFF or a ``.npy`` file (no pickles); subtracts the background and clips negatives;
    zeroes the noise floor outside the bead (the connected region, around the peak, of a
    sigma-1 smoothed copy above 3 robust standard deviations of that copy's outer shell);
    centres on the bead's intensity centre of mass (over the region above 5% of the smoothed
    peak), rounded to a voxel; keeps the largest odd box around it that fits; resamples
    linearly about the centre to ``target_voxel_size`` (Gaussian prefilter where coarser);
    crops or zero-pads to ``shape``; normalises.

    Parameters
    ----------
    path : str or path-like
        TIFF or ``.npy`` file, axes ``(Z, Y, X)`` or ``(Y, X)``.
    voxel_size : sequence of float
        Voxel size of the file, one entry per axis.
    target_voxel_size : sequence of float, optional
        Voxel size of the result. Default: ``voxel_size``.
    background : "auto", float or None
        ``"auto"``: the median of the outer shell of voxels; a number: that; None: none
        (and no noise-floor removal).
    shape : sequence of int, optional
        Odd size of the result (after resampling). Default: the largest centred box.

    Returns
    -------
    numpy.ndarray
        float64 PSF summing to 1, odd size, bead centre on the central voxel.

    Raises
    ------
    InputError
        If the file is missing, unreadable, not finite, or has no signal above background.
    ConfigError
        If the voxel sizes do not match the data or are not positive, ``background`` is not
        "auto"/a number/None, or ``shape`` is not odd.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"PSF file not found: {str(path)!r}")
    try:
        data = np.load(path, allow_pickle=False) if path.suffix.lower() == ".npy" else tifffile.imread(path)
        data = np.asarray(data, dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - any reader failure means an unreadable file
        raise InputError(f"cannot read PSF file {str(path)!r}: {type(e).__name__}: {e}") from None
    voxel = _vector(voxel_size, "voxel_size", (2, 3))
    while data.ndim > len(voxel) and data.shape[0] == 1:
        data = data[0]
    if data.ndim != len(voxel):
        raise ConfigError(f"voxel_size has {len(voxel)} entries but the PSF in {str(path)!r} has "
                          f"shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise InputError(f"PSF file {str(path)!r} contains NaN or infinite values")
    target = voxel if target_voxel_size is None else _vector(target_voxel_size, "target_voxel_size",
                                                             (data.ndim,))
    if isinstance(background, str) and background == "auto":
        bg = float(np.median(data[_shell(data.shape)]))
    elif background is None:
        bg = 0.0
    elif isinstance(background, (int, float, np.number)) and not isinstance(background, bool):
        bg = float(background)
    else:
        raise ConfigError(f"background must be 'auto', a number or None, got {background!r}")
    smooth = ndimage.gaussian_filter(data - bg, 1.0)
    data = np.clip(data - bg, 0.0, None)
    peak = np.unravel_index(np.argmax(smooth), data.shape)
    if data.max() <= 0 or smooth[peak] <= 0:
        raise InputError(f"PSF file {str(path)!r} has no signal above the background {bg}")
    if background is not None:  # zero the noise floor: keep the bead's connected support
        shell_s = smooth[_shell(data.shape)]
        noise = 1.4826 * float(np.median(np.abs(shell_s - np.median(shell_s))))
        if smooth[peak] <= 3 * noise:
            raise InputError(f"PSF file {str(path)!r} has no bead above the noise (smoothed peak "
                             f"{smooth[peak]:.4g}, noise {noise:.4g})")
        labels, _ = ndimage.label(smooth > 3 * noise)
        data = np.where(labels == labels[peak], data, 0.0)
    labels, _ = ndimage.label(smooth > 0.05 * smooth[peak])
    centre = tuple(int(round(c)) for c in ndimage.center_of_mass(data, labels, labels[peak]))
    box = tuple(2 * min(c, n - 1 - c) + 1 for c, n in zip(centre, data.shape))
    psf = _resample(_crop_pad(data, centre, box), voxel, target)
    if shape is not None:
        psf = _crop_pad(psf, tuple(s // 2 for s in psf.shape), _odd_shape(shape, data.ndim))
    if psf.sum() <= 0:
        raise InputError(f"PSF file {str(path)!r} has no signal left in the box {psf.shape}")
    return _normalise(psf)


# ---------------------------------------------------------------------------- isotropic kernels
def rotate_psf(psf, voxel_size, axis="y") -> tuple[np.ndarray, float]:
    """Rotate a 3D PSF by 90 degrees so its optical (Z) axis lies along lateral ``axis``.

    The normalised PSF is resampled linearly about its central voxel onto an isotropic grid at
    the lateral voxel size, then transposed: ``axis="y"`` swaps axes 0 and 1
    (``new[z, y, x] = old[y, z, x]``), ``axis="x"`` swaps axes 0 and 2. With isotropic
    ``voxel_size`` nothing is resampled: the result is exactly the transpose.

    Parameters
    ----------
    psf : array_like
        3D ``(Z, Y, X)`` PSF with odd sizes.
    voxel_size : sequence of float
        ``(z, y, x)`` voxel size with ``y == x``.
    axis : {"y", "x"}
        Lateral axis the optical axis is rotated into.

    Returns
    -------
    psf : numpy.ndarray
        Rotated float64 PSF on the isotropic grid, odd size, summing to 1.
    voxel : float
        The isotropic (lateral) voxel size.

    Raises
    ------
    ConfigError
        If ``psf`` is not 3D with odd sizes, ``voxel_size`` is not 3 positive numbers with
        ``y == x``, or ``axis`` is not "y" or "x".
    """
    arr = _as_psf(psf, ndims=(3,))
    voxel = _vector(voxel_size, "voxel_size", (3,))
    if not math.isclose(voxel[1], voxel[2], rel_tol=1e-9):
        raise ConfigError(f"rotate_psf needs equal lateral voxel sizes, got voxel_size "
                          f"y={voxel[1]}, x={voxel[2]}")
    if axis not in _AXES:
        raise ConfigError(f"axis must be 'y' or 'x', got {axis!r}")
    arr, iso = np.clip(arr, 0.0, None), voxel[1]
    arr = arr / arr.sum()
    if not math.isclose(voxel[0], iso, rel_tol=1e-9):
        arr = _normalise(_resample(arr, voxel, (iso, iso, iso)))
    return np.ascontiguousarray(np.swapaxes(arr, 0, _AXES[axis])), iso


def lateral_kernel(psf, axis=0) -> np.ndarray:
    """The 2D kernel of a slice perpendicular to ``axis``: the 3D PSF summed over ``axis``.

    Parameters
    ----------
    psf : array_like
        3D PSF.
    axis : int
        Axis perpendicular to the slice (0 = Z: a lateral slice of a ``(Z, Y, X)`` PSF).

    Returns
    -------
    numpy.ndarray
        2D float64 kernel summing to 1.

    Raises
    ------
    ConfigError
        If ``psf`` is not 3D with a positive sum or ``axis`` is not 0, 1 or 2.
    """
    arr = _as_psf(psf, ndims=(3,), odd=False)
    if isinstance(axis, bool) or axis not in (0, 1, 2, -1, -2, -3):
        raise ConfigError(f"axis must be 0, 1 or 2, got {axis!r}")
    return _normalise(arr.sum(axis=axis))


def isotropic_kernels(psf, voxel_size, split=True, eps=1e-3) -> dict:
    """The 2D kernels isotropic-restoration training needs, all at the lateral voxel size.

    Parameters
    ----------
    psf : array_like
        3D ``(Z, Y, X)`` PSF with odd sizes.
    voxel_size : sequence of float
        ``(z, y, x)`` voxel size with ``y == x``.
    split : bool
        Also compute the split kernel (:func:`split_psf`).
    eps : float
        Regularisation of the split kernel.

    Returns
    -------
    dict
        ``"full"``: the rotated PSF as a lateral slice sees it, axis 0 = the original Z (the
        degradation direction), axis 1 = X; ``"lateral"``: the ``(Y, X)`` kernel of the
        unrotated PSF (sum over Z); ``"split"``: ``h`` with ``full ~ lateral * h``, or None;
        ``"voxel"``: the lateral voxel size.

    Raises
    ------
    ConfigError
        As :func:`rotate_psf`, or if ``eps`` is not positive.
    """
    rotated, voxel = rotate_psf(psf, voxel_size, axis="y")  # (Y, Z, X) on the isotropic grid
    full, lateral = lateral_kernel(rotated, axis=0), lateral_kernel(psf, axis=0)
    return {"full": full, "lateral": lateral,
            "split": split_psf(full, lateral, eps=eps) if split else None, "voxel": voxel}


def split_psf(full, iso, eps=1e-3) -> np.ndarray:
    """The non-negative kernel ``h`` with ``full ~ iso * h`` (convolution).

    Both kernels are zero padded to a common odd size (twice the larger, plus one). The
    Wiener-regularised division ``H = F_full conj(F_iso) / (|F_iso|^2 + eps max|F_iso|^2)`` is
    the unconstrained minimiser of ``|iso * h - full|^2 + eps max|F_iso|^2 |h|^2``. Its real
    part, clipped at 0 (clipping alone keeps the positive ringing lobes and widens ``h``),
    starts an accelerated projected-gradient solve (FISTA, <= 200 steps) of the same objective
    under ``h >= 0`` with ``h`` inside the box of ``full``; the result is cropped to that box
    and normalised.

    Parameters
    ----------
    full, iso : array_like
        2D or 3D kernels of the same dimension with odd sizes.
    eps : float
        Regularisation relative to the peak power of ``iso``; larger is smoother.

    Returns
    -------
    numpy.ndarray
        float64 kernel of ``full``'s shape summing to 1.

    Raises
    ------
    ConfigError
        If the kernels are not 2D/3D with odd sizes, differ in dimension, or ``eps <= 0``.
    """
    full = _as_psf(full, "full")
    iso = _as_psf(iso, "iso", ndims=(full.ndim,))
    eps = _number(eps, "eps")
    size = tuple(2 * max(a, b) + 1 for a, b in zip(full.shape, iso.shape))

    def padded(a):  # zero padded to ``size``, centre moved to index 0
        return np.fft.ifftshift(_crop_pad(a / a.sum(), [s // 2 for s in a.shape], size))

    axes = tuple(range(full.ndim))
    f_full, f_iso = np.fft.rfftn(padded(full)), np.fft.rfftn(padded(iso))
    power = np.abs(f_iso) ** 2
    normal = power + eps * power.max()
    rhs = np.fft.irfftn(np.conj(f_iso) * f_full, size, axes)
    inside = padded(np.ones(full.shape)) > 0
    h = np.where(inside, np.fft.irfftn(f_full * np.conj(f_iso) / normal, size, axes), 0.0).clip(0)
    y, t, step = h, 1.0, 1.0 / normal.max()
    for _ in range(_FISTA_ITER):
        grad = np.fft.irfftn(normal * np.fft.rfftn(y), size, axes) - rhs
        h_new = np.where(inside, y - step * grad, 0.0).clip(0)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = h_new + (t - 1) / t_new * (h_new - h)
        change = np.abs(h_new - h).sum() / max(h_new.sum(), 1e-300)
        h, t = h_new, t_new
        if change < 1e-6:
            break
    return _normalise(_crop_pad(np.fft.fftshift(h), [s // 2 for s in size], full.shape))


# ---------------------------------------------------------------------------- measurements
def fwhm(psf, voxel_size) -> tuple[float, ...]:
    """Full width at half maximum per axis, on the line profiles through the maximum.

    Parameters
    ----------
    psf, voxel_size : array_like, sequence of float
        2D or 3D PSF and its voxel size per axis.

    Returns
    -------
    tuple of float
        FWHM per axis in physical units, interpolating linearly between samples; NaN where the
        profile does not fall below half the maximum on both sides.

    Raises
    ------
    ConfigError
        If ``psf`` is not 2D/3D with a positive sum or ``voxel_size`` does not match it.
    """
    arr = _as_psf(psf, odd=False)
    voxel = _vector(voxel_size, "voxel_size", (arr.ndim,))
    peak = np.unravel_index(np.argmax(arr), arr.shape)
    half, out = arr[peak] / 2, []
    for ax, d in enumerate(voxel):
        line, p = arr[peak[:ax] + (slice(None),) + peak[ax + 1:]], peak[ax]
        left, right = np.nonzero(line[:p] < half)[0], np.nonzero(line[p + 1:] < half)[0]
        if left.size == 0 or right.size == 0:
            out.append(float("nan"))
            continue
        i, j = left[-1], p + 1 + right[0]  # last sample below half on each side
        x_left = i + (half - line[i]) / (line[i + 1] - line[i])
        x_right = j - 1 + (line[j - 1] - half) / (line[j - 1] - line[j])
        out.append(float((x_right - x_left) * d))
    return tuple(out)


def second_moment_sigma(psf, voxel_size) -> tuple[float, ...]:
    """Standard deviation per axis about the centre of mass, in physical units.

    Parameters
    ----------
    psf, voxel_size : array_like, sequence of float
        2D or 3D non-negative PSF and its voxel size per axis.

    Returns
    -------
    tuple of float
        ``sqrt(sum_i m_i (i - com)^2 / sum_i m_i) * voxel`` of the marginal ``m`` per axis.

    Raises
    ------
    ConfigError
        If ``psf`` is not 2D/3D with a positive sum or ``voxel_size`` does not match it.
    """
    arr = _as_psf(psf, odd=False)
    voxel = _vector(voxel_size, "voxel_size", (arr.ndim,))
    out = []
    for ax, d in enumerate(voxel):
        m = arr.sum(axis=tuple(a for a in range(arr.ndim) if a != ax))
        i = np.arange(m.size)
        com = (m * i).sum() / m.sum()
        out.append(float(math.sqrt((m * (i - com) ** 2).sum() / m.sum()) * d))
    return tuple(out)
