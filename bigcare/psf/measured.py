"""Measured PSFs: load a bead stack, remove its background, centre, resample, normalize."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from bigcare.errors import ConfigError, InputError
from bigcare.psf.common import crop_pad, odd_shape, resample, shell, unit_sum, vector


def load_psf(path: str | os.PathLike, voxel_size: float | Sequence[float], target_voxel_size: float | Sequence[float] | None = None,
             background: str | float = "auto", shape: Sequence[int] | None = None) -> np.ndarray:
    """Read a measured (bead) PSF, remove its background, centre, resample and normalize it.

    Reads a TIFF or a ``.npy`` file (no pickles); subtracts the background and clips negatives;
    zeroes the noise floor outside the bead (the connected region, around the peak, of a
    sigma-1 smoothed copy above 3 robust standard deviations of that copy's outer shell);
    centres on the bead's intensity centre of mass (over the region above 5% of the smoothed
    peak), rounded to a voxel; keeps the largest odd box around it that fits; resamples
    linearly about the centre to ``target_voxel_size`` (Gaussian prefilter where coarser);
    crops or zero-pads to ``shape``; normalizes.

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
    voxel = vector(voxel_size, "voxel_size", (2, 3))
    while data.ndim > len(voxel) and data.shape[0] == 1:
        data = data[0]
    if data.ndim != len(voxel):
        raise ConfigError(f"voxel_size has {len(voxel)} entries but the PSF in {str(path)!r} has "
                          f"shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise InputError(f"PSF file {str(path)!r} contains NaN or infinite values")
    target = voxel if target_voxel_size is None else vector(target_voxel_size, "target_voxel_size",
                                                             (data.ndim,))
    if isinstance(background, str) and background == "auto":
        bg = float(np.median(data[shell(data.shape)]))
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
        shell_s = smooth[shell(data.shape)]
        noise = 1.4826 * float(np.median(np.abs(shell_s - np.median(shell_s))))
        if smooth[peak] <= 3 * noise:
            raise InputError(f"PSF file {str(path)!r} has no bead above the noise (smoothed peak "
                             f"{smooth[peak]:.4g}, noise {noise:.4g})")
        labels, _ = ndimage.label(smooth > 3 * noise)
        data = np.where(labels == labels[peak], data, 0.0)
    labels, _ = ndimage.label(smooth > 0.05 * smooth[peak])
    centre = tuple(int(round(c)) for c in ndimage.center_of_mass(data, labels, labels[peak]))
    box = tuple(2 * min(c, n - 1 - c) + 1 for c, n in zip(centre, data.shape))
    psf = resample(crop_pad(data, centre, box), voxel, target)
    if shape is not None:
        psf = crop_pad(psf, tuple(s // 2 for s in psf.shape), odd_shape(shape, data.ndim))
    if psf.sum() <= 0:
        raise InputError(f"PSF file {str(path)!r} has no signal left in the box {psf.shape}")
    return unit_sum(psf)
