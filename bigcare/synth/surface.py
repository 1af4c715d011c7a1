"""Synthetic surfaces for projection CARE (CARE Fig. 2): a textured curved sheet inside a stack.

::

    texture t(y, x)     2D nuclei/membranes (bigcare.synth.phantom)        = the ground truth
    height  h(y, x)     smooth: a few seeded low-frequency waves, inside Z
    sheet   t(y, x) * exp(-(z - h)^2 / (2 thickness^2))
    + distractors       dimmer 3D blobs (the 3D phantom) at least ``gap`` planes off the sheet,
                        so a maximum projection picks up out-of-surface light
    ──► :func:`bigcare.synth.acquire` (PSF from bigcare.psf, Perlin background, Poisson +
        Gaussian camera noise) ──► the noisy stack

:class:`Surface` is a structure like :class:`~bigcare.synth.Tubules` (``render``), so ``clean``
and ``acquire`` take it; like :class:`~bigcare.synth.Nuclei` it renders the whole volume and
crops (test and benchmark sizes). :func:`surface_sample` returns one seeded sample: noisy stack,
high-SNR stack, texture and height field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bigcare.errors import ConfigError
from bigcare.synth.acquire import Background, Microscope, acquire, clean
from bigcare.synth.nuclei import phantom
from bigcare.synth.space import as_region

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["Surface", "surface_sample", "write_surface"]


@dataclass(frozen=True)
class Surface:
    """A curved sheet carrying a 2D texture in a ZYX volume, with dimmer blobs above and below.

    Parameters
    ----------
    amplitude : float
        Peak-to-peak height variation as a fraction of the usable depth (0: a flat sheet).
    period : float
        Typical lateral wavelength of the height field, in voxels.
    thickness : float
        Standard deviation of the sheet's Gaussian profile along Z, in voxels.
    distractors : float
        Peak intensity of the out-of-surface blobs, relative to the texture's (0: none).
    gap : float
        The blobs stay this many planes away from the sheet.
    level : float, optional
        Flat sheet position (fraction of Z) when ``amplitude`` is 0; default the middle.
    density : float
        Distractor blobs per lateral pixel (default one per 800: a few percent of the view).
    """

    amplitude: float = 0.5
    period: float = 48.0
    thickness: float = 1.0
    distractors: float = 0.6
    gap: float = 3.0
    level: float | None = None
    density: float = 1 / 800

    def __post_init__(self):
        if not (0 <= self.amplitude <= 1 and self.period > 0 and self.thickness > 0 and self.distractors >= 0
                and self.gap >= 0):
            raise ConfigError(f"Surface: expected 0 <= amplitude <= 1, period > 0, thickness > 0, distractors >= 0, "
                              f"gap >= 0, got {self}")

    def height(self, shape: Sequence[int], seed: int = 0) -> np.ndarray:
        """The sheet's Z position per pixel (float, in planes), shape ``shape[1:]``."""
        nz, ny, nx = (int(s) for s in shape)
        rng = np.random.default_rng([seed, 17])
        y, x = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        wave = np.zeros((ny, nx))
        for _ in range(3):  # three waves of random direction, period and phase
            angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
            period = self.period * rng.uniform(0.7, 1.4)
            wave += np.cos(2 * np.pi * (y * np.sin(angle) + x * np.cos(angle)) / period + phase)
        span = np.ptp(wave)
        wave = (wave - wave.min()) / span - 0.5 if span > 0 else wave * 0
        margin = 2 * self.thickness + 1
        usable = max(0.0, nz - 1 - 2 * margin)
        centre = (nz - 1) * (0.5 if self.level is None else self.level)
        return np.clip(centre + self.amplitude * usable * wave, margin, nz - 1 - margin)

    def texture(self, shape: Sequence[int], seed: int = 0) -> np.ndarray:
        """The 2D texture (Y, X) in [0, 1]: nuclei and membranes (the ground truth of a projection)."""
        return phantom(tuple(int(s) for s in shape[-2:]), shells=True, seed=seed)

    def render(self, shape: Sequence[int], voxel_size=None, *, seed: int = 0, region=None) -> np.ndarray:
        """The clean stack (float32) on ``region`` of a ``shape`` (Z, Y, X) volume; zero outside it."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3:
            raise ConfigError(f"a surface lives in a ZYX volume, got shape {shape}")
        region = as_region(region, shape)
        h = self.height(shape, seed)
        z = np.arange(shape[0], dtype=np.float64)[:, None, None]
        whole = (self.texture(shape, seed)[None] * np.exp(-0.5 * ((z - h[None]) / self.thickness) ** 2))
        if self.distractors > 0:
            blobs = phantom(shape, shells=False, seed=seed + 1, n_nuclei=max(1, round(self.density * shape[1] * shape[2])))
            whole = whole + self.distractors * blobs * (np.abs(z - h[None]) > self.gap)
        out = np.zeros(tuple(b - a for a, b in region), np.float32)
        src = tuple(slice(max(a, 0), min(b, n)) for (a, b), n in zip(region, shape))
        if all(s.stop > s.start for s in src):
            out[tuple(slice(s.start - a, s.stop - a) for s, (a, _) in zip(src, region))] = whole[src]
        return out


def surface_sample(shape: Sequence[int], *, seed: int = 0, surface: Surface | None = None, photons: float = 20.0,
                   psf_sigma: Sequence[float] = (1.5, 0.8, 0.8), background: float = 0.1,
                   read_noise: float = 0.02) -> dict[str, np.ndarray]:
    """One seeded synthetic surface sample.

    Parameters
    ----------
    shape : sequence of int
        ``(Z, Y, X)``.
    seed : int
        Seeds the height field, texture, blobs, background and noise.
    surface : Surface, optional
        The sheet (default :class:`Surface`()).
    photons : float
        Detected photons per unit intensity of the noisy stack (the high-SNR stack gets 100x).
    psf_sigma : sequence of float
        Gaussian PSF standard deviations (z, y, x) in voxels.
    background, read_noise : float
        Perlin background amplitude and Gaussian camera noise (intensity units).

    Returns
    -------
    dict of str to numpy.ndarray
        ``noisy`` and ``high_snr`` (Z, Y, X) float32 stacks, ``texture`` (Y, X) float32 (the
        ground truth), ``height`` (Y, X) float64 (the sheet's Z per pixel).
    """
    from bigcare.psf import gaussian_psf

    surface = surface or Surface()
    shape = tuple(int(s) for s in shape)
    psf = gaussian_psf(tuple(psf_sigma), (1.0, 1.0, 1.0))
    bg = Background(amplitude=background, scale=16.0) if background > 0 else None
    structures = [surface]
    stacks = {name: acquire(structures, shape, (1.0, 1.0, 1.0),  # type: ignore[arg-type]
                            Microscope(psf=psf, photons=p, background=bg, read_noise=r), seed=seed)
              for name, p, r in (("noisy", photons, read_noise), ("high_snr", 100 * photons, read_noise / 10))}
    return {**stacks, "texture": surface.texture(shape, seed), "height": surface.height(shape, seed),
            "clean": clean(structures, shape, (1.0, 1.0, 1.0), seed=seed)}  # type: ignore[arg-type]


def write_surface(folder, shape: Sequence[int], *, seed: int = 0, chunks: Sequence[int] | None = None,
                  voxel_size: Sequence[float] = (1.0, 0.5, 0.5), ngff_version: str = "0.5", overwrite: bool = False,
                  **sample) -> dict[str, str]:
    """Write one :func:`surface_sample` as OME-Zarr images in ``folder``; return their paths.

    ``noisy.ome.zarr`` and ``high_snr.ome.zarr`` (ZYX stacks, uint16 after scaling by 1000),
    ``texture.ome.zarr`` (YX, the ground truth, float32) and ``height.npy``. ``sample`` goes to
    :func:`surface_sample`.
    """
    import pathlib

    from bigcare.store.axes import Axis
    from bigcare.store.write import write_array

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    s = surface_sample(shape, seed=seed, **sample)
    axes = tuple(Axis.named(a, "micrometer") for a in "zyx")
    chunks = tuple(min(int(c), int(n)) for c, n in zip(chunks or shape, shape))
    paths = {}
    for name in ("noisy", "high_snr"):
        data = np.clip(np.rint(s[name] * 1000 + 100), 0, 65535).astype(np.uint16)
        paths[name] = str(folder / f"{name}.ome.zarr")
        write_array(paths[name], data, chunks=chunks, scale=tuple(voxel_size), axes=axes, ngff_version=ngff_version,
                    overwrite=overwrite)
    paths["texture"] = str(folder / "texture.ome.zarr")
    write_array(paths["texture"], s["texture"], chunks=chunks[1:], scale=tuple(voxel_size)[1:], axes=axes[1:],
                ngff_version=ngff_version, overwrite=overwrite)
    np.save(folder / "height.npy", s["height"])
    return paths
