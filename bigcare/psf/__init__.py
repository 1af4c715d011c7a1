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

from bigcare.psf.kernels import fwhm, isotropic_kernels, lateral_kernel, rotate_psf, second_moment_sigma, split_psf
from bigcare.psf.measured import load_psf
from bigcare.psf.models import confocal_psf, gaussian_psf, lightsheet_psf, widefield_psf

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
