"""Training data for isotropic restoration, made from the anisotropic volume itself (IsoNet).

Lateral (XY) slices are sharp in both directions; axial slices are blurred by the elongated PSF
and sampled ``factor`` times more coarsely along Z. So a lateral patch, degraded the way the
microscope degrades Z, is an input whose target is the patch itself::

    lateral patch y (read lazily, with a margin) ──► convolve with the kernel of the PSF rotated
        into the lateral plane (axis 0 = the rotated optical axis; the "split" kernel by default:
        the extra blur on top of the lateral PSF the patch already carries)
      ──► sample rows at phase + j * factor (cubic spline; phase uniform in [0, factor) per
          patch, so a non-integer factor such as 2.5 is sampled at every sub-voxel offset)
      ──► add back, at each sample, the noise the blur averaged away (``noise``, the default:
          an axial slice's rows are single planes with their full noise; measured on the patch)
      ──► back to the patch's rows with :func:`bigcare.blocks.zoom.interpolate_rows`, the linear
          interpolation prediction uses to upsample Z ──► crop the margin ──► input x

Prediction then sees XZ and YZ slices whose rows were made exactly the way training inputs were:
coarse Z samples, linearly interpolated. The sampler's lateral flips and 90-degree rotations
act on ``y`` before the degradation, so both lateral directions serve as "axial" rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage, signal

from bigcare.blocks.zoom import interpolate_rows
from bigcare.errors import ConfigError, InputError

__all__ = ["LateralDegradation", "degrade_batches", "psf_kernels", "axial_blur_match", "isotropic_setup",
           "AXIAL_SIGMA_CANDIDATES"]

#: axial sigmas tried by ``sigma_z: auto``, in multiples of the lateral sigma
AXIAL_SIGMA_CANDIDATES = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)
#: at most this many planes x rows x columns, from the middle of the first source, are read to estimate sigma_z
ESTIMATE_CROP = (64, 256, 256)


@dataclass(frozen=True)
class LateralDegradation:
    """Turns lateral patches into isotropic-restoration training pairs.

    Attributes
    ----------
    kernel : numpy.ndarray
        2D blur kernel, axis 0 along the degraded (rotated optical) direction, sampled at the
        lateral voxel size, summing to 1.
    factor : float
        Axial subsampling factor (Z voxel size / lateral voxel size), > 1.
    margin : int
        Voxels cut from every side of a read patch after degrading (blur and interpolation
        edges); read patches are ``patch + 2 * margin`` wide.
    phase : {"continuous", "grid"}
        Where the coarse rows fall: at a phase uniform in [0, factor) (sub-voxel positions), or
        at a whole-voxel phase, so their offsets from the patch's rows follow ``j * factor``
        exactly as the planes of a volume fall on the Z-upsampled grid prediction sees.
    noise : bool
        Give the coarse samples back the noise the blur removed: the blur averages a patch's
        own noise away (its variance falls by ``sum(kernel**2)``), while an axial slice's rows
        are single planes carrying the full noise. The local noise variance is measured on the
        patch (second differences along the unblurred axis) and Gaussian noise of
        ``variance * (1 - sum(kernel**2))`` is added to each sample before interpolation.
    """

    kernel: np.ndarray
    factor: float
    margin: int
    phase: str = "continuous"
    noise: bool = False

    @classmethod
    def build(cls, kernel: np.ndarray, factor: float, *, phase: str = "continuous",
              noise: bool = False) -> LateralDegradation:
        """A degradation whose margin covers the kernel's radius plus one coarse row."""
        if phase not in ("continuous", "grid"):
            raise ConfigError(f"phase must be 'continuous' or 'grid', got {phase!r}")
        kernel = np.asarray(kernel, np.float64)
        if kernel.ndim != 2 or not np.isfinite(kernel).all() or kernel.sum() <= 0:
            raise ConfigError(f"kernel must be a finite 2D array with a positive sum, got shape {kernel.shape}")
        if not factor > 1:
            raise ConfigError(f"factor must be > 1 (Z voxel size / lateral voxel size), got {factor}")
        margin = max(kernel.shape) // 2 + math.ceil(factor) + 1
        return cls(kernel / kernel.sum(), float(factor), int(margin), phase, bool(noise))

    def read_shape(self, patch_shape: tuple[int, ...]) -> tuple[int, int]:
        """Shape of the lateral patches to read for final patches of ``patch_shape``."""
        return (patch_shape[0] + 2 * self.margin, patch_shape[1] + 2 * self.margin)

    def __call__(self, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Degrade a batch of read patches ``y`` (B, C, H, W); returns cropped ``(x, y)``, float32."""
        y = np.asarray(y, np.float32)
        h = y.shape[-2]
        blurred = signal.fftconvolve(y, self.kernel[None, None].astype(np.float32), mode="same", axes=(-2, -1))
        x = np.empty_like(y)
        rows = np.arange(h, dtype=np.float64)
        keep = 1.0 - float((self.kernel**2).sum())  # share of the noise variance the blur removed
        for b in range(y.shape[0]):
            phase = float(rng.integers(0, math.ceil(self.factor))) if self.phase == "grid" else \
                rng.uniform(0.0, self.factor)
            coarse_rows = phase + self.factor * np.arange(int((h - 1 - phase) // self.factor) + 1)
            for c in range(y.shape[1]):
                img = blurred[b, c]
                coords = np.stack(np.meshgrid(coarse_rows, np.arange(img.shape[1]), indexing="ij"))
                samples = ndimage.map_coordinates(img, coords, order=3, mode="mirror")
                if self.noise:
                    samples = samples + _noise_like(y[b, c], coords, keep, rng)
                t = (rows - phase) / self.factor
                j = np.floor(t).astype(np.int64)
                frac = np.clip(t - j, 0.0, 1.0)
                x[b, c] = interpolate_rows(samples, 0, j, frac)
        m = self.margin
        crop = (Ellipsis, slice(m, h - m), slice(m, y.shape[-1] - m))
        return np.ascontiguousarray(x[crop]), np.ascontiguousarray(y[crop])


def _noise_like(img: np.ndarray, coords: np.ndarray, keep: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise at ``coords`` with ``keep`` times the local noise variance of ``img``.

    White noise of variance v gives second differences ``x - (left + right) / 2`` of variance
    1.5 v; the smooth signal of a lateral slice contributes little to them.
    """
    r = ndimage.convolve1d(img, np.array([-0.5, 1.0, -0.5], np.float32), axis=1, mode="mirror")
    var = ndimage.gaussian_filter(r * r, 3.0, mode="mirror") / 1.5
    v = ndimage.map_coordinates(var, coords, order=1, mode="mirror")
    return (np.sqrt(np.maximum(v, 0) * keep) * rng.standard_normal(v.shape)).astype(np.float32)


def degrade_batches(batches: Iterable[tuple[np.ndarray, np.ndarray]], degradation: LateralDegradation,
                    seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Training pairs from a sampler's batches of lateral patches (their targets are used).

    Batch ``k`` draws its sub-voxel phases from ``default_rng([seed, 13, k])``: reproducible.
    """
    for k, (_, y) in enumerate(batches):
        yield degradation(y, np.random.default_rng([seed, 13, k]))


def psf_kernels(psf: dict, voxel_size: tuple[float, float, float], *, split: bool = True) -> dict:
    """The PSF a config describes, as the 2D kernels a lateral slice is degraded with.

    Parameters
    ----------
    psf : dict
        ``kind`` plus its parameters, in the volume's physical units: ``gaussian`` (sigma_xy,
        sigma_z: standard deviations), ``widefield`` (na, wavelength, refractive_index),
        ``confocal`` (na, excitation_wavelength, wavelength, refractive_index), ``lightsheet``
        (na, wavelength, refractive_index, sheet_na or sheet_sigma), ``file`` (path,
        voxel_size as [z, y, x] of the file).
    voxel_size : (z, y, x)
        The volume's voxel size; kernels are sampled at its lateral size.
    split : bool
        Use the split kernel (the blur the axial direction has beyond the lateral one).

    Returns
    -------
    dict
        ``{"kernel": 2D array used for training, "full": ..., "lateral": ..., "split": ...,
        "voxel": lateral voxel size}`` (see :func:`bigcare.psf.isotropic_kernels`).
    """
    from bigcare import psf as P

    kind = psf.get("kind")
    v = float(voxel_size[-1])
    iso = (v, v, v)
    args = {k: val for k, val in psf.items() if k != "kind" and val is not None}

    def need(*names):
        missing = [n for n in names if n not in args]
        if missing:
            raise ConfigError(f"isotropic.psf: kind {kind!r} needs {', '.join(missing)}")

    def box(lateral_fwhm: float, axial_fwhm: float) -> tuple[int, int, int]:
        a, l_ = math.ceil(2.5 * axial_fwhm / v), math.ceil(2.5 * lateral_fwhm / v)
        return (2 * a + 1, 2 * l_ + 1, 2 * l_ + 1)

    if kind == "gaussian":
        need("sigma_xy", "sigma_z")
        h = P.gaussian_psf((args["sigma_z"], args["sigma_xy"], args["sigma_xy"]), iso)
        sampling = iso
    elif kind in ("widefield", "confocal", "lightsheet"):
        need("na", "wavelength", "refractive_index")
        na, lam, n = args["na"], args["wavelength"], args["refractive_index"]
        shape = box(0.51 * lam / na, 1.78 * n * lam / na**2)
        if kind == "widefield":
            h = P.widefield_psf(na, lam, n, iso, shape)
        elif kind == "confocal":
            need("excitation_wavelength")
            h = P.confocal_psf(na, args["excitation_wavelength"], lam, n, iso, shape)
        else:
            h = P.lightsheet_psf(na, lam, n, iso, shape, sheet_na=args.get("sheet_na"),
                                 sheet_sigma=args.get("sheet_sigma"))
        sampling = iso
    elif kind == "file":
        need("path", "voxel_size")
        h = P.load_psf(args["path"], tuple(args["voxel_size"]), target_voxel_size=iso)
        sampling = iso
    else:
        raise ConfigError(f"isotropic.psf.kind: expected one of gaussian, widefield, confocal, lightsheet, "
                          f"file; got {kind!r}")
    kernels = P.isotropic_kernels(h, sampling, split=split)
    kernels["kernel"] = kernels["split"] if split else kernels["full"]
    return kernels


def axial_blur_match(volume: np.ndarray, factor: float, sigma_xy: float, voxel_xy: float,
                     candidates=(1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0), cutoff: float = 0.1,
                     seed: int = 0) -> dict:
    """Which Gaussian axial blur makes degraded lateral slices look like the volume's axial ones.

    When the PSF is not known: the volume, upsampled along Z, has a measurable
    :func:`~bigcare.metrics.spectral_isotropy` (axial over lateral high-frequency energy); lateral
    slices degraded with a Gaussian PSF of axial sigma ``s`` have a row-over-column energy ratio
    that falls as ``s`` grows. The ``s`` (in the same units as ``sigma_xy``) whose ratio is closest
    to the volume's, interpolated between ``candidates``, is the axial sigma to train with.

    Parameters
    ----------
    volume : numpy.ndarray
        (Z, Y, X) anisotropic volume (or a representative crop), raw intensities.
    factor : float
        Axial subsampling factor.
    sigma_xy, voxel_xy : float
        Lateral PSF sigma and lateral voxel size, physical units.

    Returns
    -------
    dict
        ``{"sigma_z", "target", "ratios": {candidate: ratio}}`` (candidates whose kernel margin
        leaves slices too small to measure are left out).

    Raises
    ------
    InputError
        When fewer than two candidates can be measured on slices this small.
    """
    from bigcare.blocks.zoom import upsample_rows, zoom_length
    from bigcare.metrics import line_power, spectral_isotropy

    v = np.asarray(volume, np.float32)
    target = spectral_isotropy(upsample_rows(v, 0, factor, 0, 0, zoom_length(len(v), factor)), cutoff)
    n = min(64, v.shape[1] // 2, v.shape[2] // 2)
    f = np.fft.rfftfreq(n)
    ratios = {}
    for s in candidates:
        if s < sigma_xy:
            continue
        kernel = psf_kernels({"kind": "gaussian", "sigma_xy": sigma_xy, "sigma_z": s}, (1.0, voxel_xy, voxel_xy),
                             split=True)["kernel"] if s > sigma_xy else np.ones((1, 1))
        x, _ = LateralDegradation.build(kernel, factor)(v[:, None], np.random.default_rng(seed))
        if min(x.shape[-2:]) < n:  # the kernel's margin leaves too little of the slices to measure
            continue
        rows, cols = (float(line_power(x[:, 0], axis, n)[f > cutoff].sum()) for axis in (1, 2))
        ratios[s] = rows / cols
    if len(ratios) < 2:
        raise InputError(f"axial_blur_match: slices of {v.shape[1]} x {v.shape[2]} voxels leave too little to "
                         f"measure after the degradation margin; give a larger crop")
    s_sorted = sorted(ratios)
    r = np.array([ratios[s] for s in s_sorted])
    if target >= r[0]:
        sigma_z = s_sorted[0]
    elif target <= r[-1]:
        sigma_z = s_sorted[-1]
    else:  # ratios fall with sigma: interpolate in log(ratio)
        sigma_z = float(np.interp(-np.log(target), -np.log(r), s_sorted))
    return {"sigma_z": float(sigma_z), "target": float(target), "ratios": ratios}


def _estimate_crop(volume, channel: int | None) -> tuple[np.ndarray, list[list[int]]]:
    """The middle ``ESTIMATE_CROP`` of a volume's Z, Y and X (first time point, ``channel``), float32."""
    index: list[int | slice] = []
    region = []
    for name, n in zip(volume.axis_names, volume.shape):
        if name in "zyx":
            m = min(n, ESTIMATE_CROP["zyx".index(name)])
            a = (n - m) // 2
            index.append(slice(a, a + m))
            region.append([a, a + m])
        else:
            index.append(channel or 0 if volume.axes[len(index)].kind == "channel" else 0)
    return np.asarray(volume.array()[tuple(index)], np.float32), region


def isotropic_setup(section, sources: list, patch_shape) -> tuple[LateralDegradation, Any, dict]:
    """What isotropic training needs from its config section, reading metadata (and, for
    ``psf.sigma_z: auto``, one crop of the first source).

    Parameters
    ----------
    section : bigcare.training.method_config.IsotropicTrainConfig
        The ``isotropic`` section.
    sources : list of Source
        The configured sources (the first one's voxel sizes give the factor; they are read as
        (image, image) pairs).
    patch_shape : (int, int)
        ``data.patch_shape``.

    Returns
    -------
    (degradation, isotropic, provenance)
        The :class:`LateralDegradation`; the model's
        :class:`~bigcare.models.IsotropicConfig` (its ``psf`` records the PSF trained with, with
        ``sigma_z`` resolved); the provenance of an estimated ``sigma_z`` (empty otherwise).

    Raises
    ------
    ConfigError
        For a volume without Z, Y, X axes, a Z that is not coarser than X (without an explicit
        factor), or patches that with the degradation margin do not fit the volume laterally.
    """
    from bigcare.models import IsotropicConfig
    from bigcare.store.volume import open_volume

    first = open_volume(sources[0].input, storage_options=sources[0].storage_options)
    scale = dict(zip(first.axis_names, first.scale))
    if not {"z", "y", "x"} <= set(scale):
        raise ConfigError(f"isotropic training needs a volume with Z, Y and X axes; {first.url} has axes "
                          f"{first.axis_names.upper()!r}")
    factor = section.factor or scale["z"] / scale["x"]
    if not factor > 1:
        raise ConfigError(f"isotropic.factor: {first.url} has voxel sizes z={scale['z']:g}, x={scale['x']:g}, "
                          "so its Z is not coarser than X; give isotropic.factor (> 1) explicitly")
    psf = section.psf.model_dump(exclude_none=True)
    provenance: dict = {}
    if psf.get("sigma_z") == "auto":
        crop, region = _estimate_crop(first, sources[0].input_channel)
        sxy = float(psf["sigma_xy"])
        found = axial_blur_match(crop, factor, sxy, float(scale["x"]),
                                 candidates=tuple(sxy * c for c in AXIAL_SIGMA_CANDIDATES))
        psf["sigma_z"] = found["sigma_z"]
        provenance = {"sigma_z": {"auto": found["sigma_z"], "method": "bigcare.training.isotropic.axial_blur_match",
                                  "source": first.url, "region_zyx": region,
                                  "target_isotropy": found["target"],
                                  "candidate_isotropy": {f"{k:g}": v for k, v in found["ratios"].items()}}}
    kernels = psf_kernels(psf, (scale["z"], scale["y"], scale["x"]), split=section.split)
    degradation = LateralDegradation.build(kernels["kernel"], factor, phase=section.phase, noise=section.noise)
    read = degradation.read_shape(tuple(patch_shape))
    lateral = (first.shape[first.axis_names.index("y")], first.shape[first.axis_names.index("x")])
    if read[0] > lateral[0] or read[1] > lateral[1]:
        fit = [max(0, n - 2 * degradation.margin) for n in lateral]
        raise ConfigError(f"data.patch_shape {list(patch_shape)}: isotropic training reads each patch with a "
                          f"{degradation.margin}-voxel margin for the degradation ({read[0]} x {read[1]}), more "
                          f"than {first.url}'s Y x X {lateral[0]} x {lateral[1]}; use a patch_shape of at most "
                          f"{fit} (rounded down to the network's pooling grid)")
    record = {**psf, "split": section.split, "phase": section.phase, "noise": section.noise,
              "kernel_shape": list(kernels["kernel"].shape),
              "lateral_voxel": float(scale["x"])}
    return degradation, IsotropicConfig(factor=factor, combine=section.combine, psf=record), provenance
