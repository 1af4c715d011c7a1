"""Image-quality metrics with the CARE paper's normalization (Weigert et al. 2018).

Every metric compares a prediction to a ground truth after the same two steps:

1. the ground truth is normalized to its (0.1, 99.9) percentiles:
   ``gt_n = (gt - p0.1) / (p99.9 - p0.1)``;
2. the prediction is mapped onto it with the affine ``alpha * pred + beta`` that minimises
   ``||alpha * pred + beta - gt_n||^2`` (closed form, :func:`fit_affine`).

So the metrics are invariant to the prediction's offset and (positive or negative) scale, and
measure errors in units of the ground truth's robust intensity range.
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import structural_similarity

from bigcare.errors import ConfigError, InputError
from bigcare.normalization import EPS, normalize

__all__ = ["normalize_percentile", "fit_affine", "nrmse", "ssim", "psnr", "spectral_isotropy", "line_power"]

GT_PERCENTILES = (0.1, 99.9)


def normalize_percentile(
    x: np.ndarray, pmin: float = 0.1, pmax: float = 99.9, eps: float = EPS
) -> np.ndarray:
    """Map the ``pmin`` percentile of ``x`` to 0 and the ``pmax`` percentile to 1 (no clipping).

    ``(x - P_pmin) / (P_pmax - P_pmin + eps)``, as CSBDeep's ``normalize``.

    Parameters
    ----------
    x : numpy.ndarray
        Image of any shape.
    pmin, pmax : float
        Percentiles, ``0 <= pmin < pmax <= 100``. Defaults 0.1 and 99.9.
    eps : float
        Added to the denominator to avoid division by zero on constant images.

    Returns
    -------
    numpy.ndarray
        float32 array of ``x``'s shape.

    Raises
    ------
    ConfigError
        If the percentiles are out of order or outside [0, 100].
    InputError
        If ``x`` is empty.
    """
    if not 0 <= pmin < pmax <= 100:
        raise ConfigError(f"percentiles must satisfy 0 <= pmin < pmax <= 100, got {pmin}, {pmax}")
    x = np.asarray(x)
    if x.size == 0:
        raise InputError(f"cannot normalize an empty array (shape {x.shape})")
    return _percentile_normalized(x, pmin, pmax, eps).astype(np.float32)


def _percentile_normalized(x: np.ndarray, pmin: float, pmax: float, eps: float = EPS) -> np.ndarray:
    """:func:`bigcare.normalization.normalize` at ``x``'s own percentiles, in float64 (metrics)."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = np.percentile(x, (pmin, pmax))
    return normalize(x, lo, hi, eps=eps, dtype=np.float64)


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise InputError(f"pred and gt must have the same shape, got {pred.shape} and {gt.shape}")
    if pred.size == 0:
        raise InputError(f"pred and gt are empty (shape {pred.shape})")
    return pred.astype(np.float64), gt.astype(np.float64)


def fit_affine(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Closed-form ``alpha, beta`` minimising ``||alpha * pred + beta - target||^2``.

    ``alpha = cov(pred, target) / var(pred)``, ``beta = mean(target) - alpha * mean(pred)``;
    for a constant ``pred``, ``alpha = 0`` and ``beta = mean(target)``.

    Parameters
    ----------
    pred, target : numpy.ndarray
        Arrays of the same shape.

    Returns
    -------
    (float, float)
        ``alpha``, ``beta``.

    Raises
    ------
    InputError
        If the shapes differ or the arrays are empty.
    """
    p, t = _pair(pred, target)
    pm, tm = p.mean(), t.mean()
    dp = p - pm
    var = float(np.mean(dp * dp))
    if var <= 0:
        return 0.0, float(tm)
    alpha = float(np.mean(dp * (t - tm))) / var
    return alpha, float(tm - alpha * pm)


def _normalized(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = _pair(pred, gt)
    g = _percentile_normalized(g, *GT_PERCENTILES)
    alpha, beta = fit_affine(p, g)
    return alpha * p + beta, g


def nrmse(pred: np.ndarray, gt: np.ndarray) -> float:
    """Normalized root-mean-square error (CARE convention); 0 is perfect.

    ``sqrt(mean((alpha * pred + beta - gt_n)**2))`` with ``gt_n`` the ground truth
    normalized to its (0.1, 99.9) percentiles and ``alpha, beta`` from :func:`fit_affine`.
    Because ``gt_n``'s percentile range is 1, this is the RMSE divided by that range, i.e.
    in units of the ground truth's robust intensity range.

    Parameters
    ----------
    pred, gt : numpy.ndarray
        Prediction and ground truth of the same shape (any dimensionality).

    Returns
    -------
    float
        The NRMSE.

    Raises
    ------
    InputError
        If the shapes differ or the arrays are empty.
    """
    p, g = _normalized(pred, gt)
    return float(np.sqrt(np.mean((p - g) ** 2)))


def ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    """Structural similarity (CARE convention); 1 is perfect.

    ``skimage.metrics.structural_similarity(gt_n, alpha * pred + beta)`` with the
    normalization of :func:`nrmse`, ``data_range = max(gt_n) - min(gt_n)`` and the default
    7-voxel window (smaller, odd, when an axis is shorter than 7). Works in 2D and 3D.

    Parameters
    ----------
    pred, gt : numpy.ndarray
        Prediction and ground truth of the same shape, 2D or 3D.

    Returns
    -------
    float
        The mean SSIM.

    Raises
    ------
    InputError
        If the shapes differ, the arrays are not 2D/3D, or an axis is shorter than 3.
    """
    p, g = _normalized(pred, gt)
    if g.ndim not in (2, 3):
        raise InputError(f"ssim needs 2D or 3D images, got shape {g.shape}")
    win = min(7, min(g.shape))
    win -= 1 - win % 2  # largest odd size <= the shortest axis
    if win < 3:
        raise InputError(f"ssim needs every axis >= 3 voxels, got shape {g.shape}")
    data_range = float(g.max() - g.min())
    if data_range <= 0:
        raise InputError("ssim is undefined for a constant ground truth")
    return float(structural_similarity(g, p, win_size=win, data_range=data_range))


def psnr(pred: np.ndarray, gt: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB (CARE convention); higher is better.

    ``10 * log10(data_range**2 / mean((alpha * pred + beta - gt_n)**2))`` with the
    normalization of :func:`nrmse` and ``data_range = max(gt_n) - min(gt_n)`` (as
    :func:`ssim`). ``inf`` for a perfect prediction.

    Parameters
    ----------
    pred, gt : numpy.ndarray
        Prediction and ground truth of the same shape (any dimensionality).

    Returns
    -------
    float
        The PSNR in dB.

    Raises
    ------
    InputError
        If the shapes differ or the arrays are empty.
    """
    p, g = _normalized(pred, gt)
    mse = float(np.mean((p - g) ** 2))
    data_range = float(g.max() - g.min())
    if mse == 0:
        return math.inf
    return float(10 * np.log10(data_range**2 / mse))


def line_power(v: np.ndarray, axis: int, n: int) -> np.ndarray:
    """Mean power spectrum of the Hann-windowed, mean-free segments of length ``n`` along ``axis``."""
    lines = np.moveaxis(v, axis, -1)
    k = lines.shape[-1] // n
    seg = lines[..., :k * n].reshape(-1, n)
    seg = (seg - seg.mean(axis=1, keepdims=True)) * np.hanning(n)
    return (np.abs(np.fft.rfft(seg, axis=1)) ** 2).mean(axis=0)


def spectral_isotropy(volume: np.ndarray, cutoff: float = 0.1) -> float:
    """Axial over lateral high-frequency energy of a (Z, Y, X) volume on an isotropic grid.

    1D power spectra of line segments of one common length (the Z extent, at most 128 voxels)
    along Z and along X, Hann-windowed so both axes are measured with the same resolution and
    leakage; the energy beyond ``cutoff`` cycles/voxel along Z divided by that along X (as
    CARE's evaluation compares axial and lateral spectra). About 1 for an isotropic volume;
    an anisotropic one, blurred and upsampled along Z, gives much less.
    """
    v = np.asarray(volume, dtype=np.float64)
    if v.ndim != 3 or min(v.shape[0], v.shape[2]) < 8:
        raise InputError(f"spectral_isotropy needs a (Z, Y, X) volume at least 8 voxels along Z and X, "
                         f"got shape {v.shape}")
    n = min(v.shape[0], v.shape[2], 128)
    f = np.fft.rfftfreq(n)
    axial, lateral = (float(line_power(v, axis, n)[f > cutoff].sum()) for axis in (0, 2))
    return axial / lateral if lateral > 0 else float("nan")
