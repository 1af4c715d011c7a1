"""Isotropic-restoration kernels (rotation, lateral projection, split PSF) and PSF widths."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from bigcare.errors import ConfigError
from bigcare.psf.common import LATERAL_AXES, as_psf, crop_pad, number, resample, unit_sum, vector

_FISTA_ITER = 200  # at most; split_psf stops earlier once the kernel no longer changes


def rotate_psf(psf: np.ndarray, voxel_size: float | Sequence[float], axis: str = "y") -> tuple[np.ndarray, float]:
    """Rotate a 3D PSF by 90 degrees so its optical (Z) axis lies along lateral ``axis``.

    The normalized PSF is resampled linearly about its central voxel onto an isotropic grid at
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
    arr = as_psf(psf, ndims=(3,))
    voxel = vector(voxel_size, "voxel_size", (3,))
    if not math.isclose(voxel[1], voxel[2], rel_tol=1e-9):
        raise ConfigError(f"rotate_psf needs equal lateral voxel sizes, got voxel_size "
                          f"y={voxel[1]}, x={voxel[2]}")
    if axis not in LATERAL_AXES:
        raise ConfigError(f"axis must be 'y' or 'x', got {axis!r}")
    arr, iso = np.clip(arr, 0.0, None), voxel[1]
    arr = arr / arr.sum()
    if not math.isclose(voxel[0], iso, rel_tol=1e-9):
        arr = unit_sum(resample(arr, voxel, (iso, iso, iso)))
    return np.ascontiguousarray(np.swapaxes(arr, 0, LATERAL_AXES[axis])), iso


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
    arr = as_psf(psf, ndims=(3,), odd=False)
    if isinstance(axis, bool) or axis not in (0, 1, 2, -1, -2, -3):
        raise ConfigError(f"axis must be 0, 1 or 2, got {axis!r}")
    return unit_sum(arr.sum(axis=axis))


def isotropic_kernels(psf: np.ndarray, voxel_size: float | Sequence[float], split: bool = True, eps: float = 1e-3) -> dict:
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


def split_psf(full: np.ndarray, iso: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """The non-negative kernel ``h`` with ``full ~ iso * h`` (convolution).

    Both kernels are zero padded to a common odd size (twice the larger, plus one). The
    Wiener-regularised division ``H = F_full conj(F_iso) / (|F_iso|^2 + eps max|F_iso|^2)`` is
    the unconstrained minimiser of ``|iso * h - full|^2 + eps max|F_iso|^2 |h|^2``. Its real
    part, clipped at 0 (clipping alone keeps the positive ringing lobes and widens ``h``),
    starts an accelerated projected-gradient solve (FISTA, <= 200 steps) of the same objective
    under ``h >= 0`` with ``h`` inside the box of ``full``; the result is cropped to that box
    and normalized.

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
    full = as_psf(full, "full")
    iso = as_psf(iso, "iso", ndims=(full.ndim,))
    eps = number(eps, "eps")
    size = tuple(2 * max(a, b) + 1 for a, b in zip(full.shape, iso.shape))

    def padded(a):  # zero padded to ``size``, centre moved to index 0
        return np.fft.ifftshift(crop_pad(a / a.sum(), [s // 2 for s in a.shape], size))

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
    return unit_sum(crop_pad(np.fft.fftshift(h), [s // 2 for s in size], full.shape))


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
    arr = as_psf(psf, odd=False)
    voxel = vector(voxel_size, "voxel_size", (arr.ndim,))
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
    arr = as_psf(psf, odd=False)
    voxel = vector(voxel_size, "voxel_size", (arr.ndim,))
    out = []
    for ax, d in enumerate(voxel):
        m = arr.sum(axis=tuple(a for a in range(arr.ndim) if a != ax))
        i = np.arange(m.size)
        com = (m * i).sum() / m.sum()
        out.append(float(math.sqrt((m * (i - com) ** 2).sum() / m.sum()) * d))
    return tuple(out)
