"""Synthetic training sets of any size, written as OME-Zarr pairs chunk by chunk.

::

    for every chunk of the target (fine grid):  clean(structures, region=chunk)  -> target
    for every chunk of the input (camera grid): acquire(structures, region=chunk) -> input

No chunk needs another, so memory is a few chunks whatever the volume size; then the pyramids.
The target keeps the structures' voxel size, the input has ``downsample`` times larger voxels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass
from dataclasses import fields as dataclass_fields

import numpy as np

from bigcare.errors import ConfigError
from bigcare.synth.acquire import Microscope, acquire, clean
from bigcare.synth.nuclei import phantom
from bigcare.synth.space import as_region
from bigcare.synth.structures import Granules, Tubules

__all__ = ["Nuclei", "write_synthetic", "structures_of", "parse_psf", "write_kind"]


@dataclass(frozen=True)
class Nuclei:
    """The nuclei/membrane phantom of :func:`bigcare.synth.phantom` as a structure.

    Not blockwise-scalable: every region renders the whole phantom and crops it (sizes of
    examples and tests only).
    """

    n_nuclei: int | None = None
    shells: bool = True

    def render(self, shape: Sequence[int], voxel_size, *, seed: int = 0, region=None) -> np.ndarray:
        """The phantom of ``shape`` on ``region`` (zero outside the volume), float32."""
        shape = tuple(int(s) for s in shape)
        region = as_region(region, shape)
        whole = phantom(shape, n_nuclei=self.n_nuclei, shells=self.shells, seed=seed)
        out = np.zeros(tuple(b - a for a, b in region), np.float32)
        src = tuple(slice(max(a, 0), min(b, n)) for (a, b), n in zip(region, shape))
        if all(s.stop > s.start for s in src):
            out[tuple(slice(s.start - a, s.stop - a) for s, (a, _) in zip(src, region))] = whole[src]
        return out


def structures_of(kind: str, **params) -> list:
    """The structure list of a ``--kind``: tubules, granules, tubules+granules or nuclei.

    Raises
    ------
    ConfigError
        For an unknown kind.
    """
    makers: dict[str, list[type]] = {"tubules": [Tubules], "granules": [Granules], "tubules+granules": [Tubules, Granules],
              "nuclei": [Nuclei]}
    if kind not in makers:
        raise ConfigError(f"kind must be one of {sorted(makers)}, got {kind!r}")
    return [m(**{k: v for k, v in params.items() if k in fields}) for m in makers[kind]
            for fields in [{f.name for f in dataclass_fields(m)}]]


def _regions(shape: tuple[int, ...], chunks: tuple[int, ...]):
    for index in np.ndindex(*(math.ceil(n / c) for n, c in zip(shape, chunks))):
        yield tuple((i * c, min((i + 1) * c, n)) for i, c, n in zip(index, chunks, shape))


def _record(structures, microscope: Microscope, seed: int) -> dict:
    return {"seed": seed,
            "structures": [{"type": type(s).__name__, **asdict(s)} for s in structures
                           if is_dataclass(s) and not isinstance(s, type)],
            "microscope": {k: v for k, v in asdict(microscope).items() if k not in ("psf", "background")}
            | {"background": asdict(microscope.background) if microscope.background else None,
               "psf_shape": None if microscope.psf is None else list(microscope.psf.shape)}}


def write_synthetic(input_url, target_url, shape: Sequence[int], structures: Sequence, microscope: Microscope, *,
                    voxel_size: Sequence[float], chunks: Sequence[int] | None = None, seed: int = 0,
                    ngff_version: str = "0.5", overwrite: bool = False):
    """Write (noisy input, clean target) OME-Zarr images of synthetic structures, chunk by chunk.

    Parameters
    ----------
    input_url, target_url : str or path
        The images to create (float32, axes ZYX or YX, micrometres).
    shape : sequence of int
        The target's shape (the structures' grid); the input's is ``shape // downsample``.
    structures : sequence
        :class:`Tubules`, :class:`Granules` or :class:`Nuclei` (see :func:`structures_of`).
    microscope : Microscope
        PSF, background, noise, downsampling.
    voxel_size : sequence of float
        The target's voxel size.
    chunks : sequence of int, optional
        Chunk shape of both images; default 64 per axis (clipped).
    seed : int
    ngff_version : {"0.5", "0.4"}
    overwrite : bool
        Replace existing images.

    Returns
    -------
    (Volume, Volume)
        The input and the target.

    Raises
    ------
    ConfigError
        For bad sizes or parameters; OutputError when a target exists without ``overwrite``.
    """
    from bigcare.store.axes import Axis
    from bigcare.store.pyramid import write_pyramid
    from bigcare.store.write import create_volume, update_attrs

    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ConfigError(f"shape must be 2 or 3 positive sizes (YX or ZYX), got {shape}")
    voxel = tuple(float(v) for v in voxel_size)
    if len(voxel) != len(shape) or min(voxel) <= 0:
        raise ConfigError(f"voxel_size must be {len(shape)} positive numbers, got {tuple(voxel_size)}")
    f = int(microscope.downsample)
    camera = tuple(n // f for n in shape)
    chunks = tuple(int(c) for c in (chunks or [64] * len(shape)))
    axes = [Axis.named(a, "micrometer") for a in "zyx"[-len(shape):]]
    record = {"bigcare": {"synth": _record(structures, microscope, seed), "complete": False}}
    written = []
    for url, grid, scale, role in ((target_url, shape, voxel, "target"),
                                   (input_url, camera, tuple(v * f for v in voxel), "input")):
        vol = create_volume(url, shape=grid, dtype=np.float32, chunks=tuple(min(c, n) for c, n in zip(chunks, grid)),
                            axes=axes, scale=scale, ngff_version=ngff_version,  # type: ignore[arg-type]
                            overwrite=overwrite, attrs={"bigcare": {**record["bigcare"], "role": role}})
        arr = vol.array(0, mode="r+")
        for region in _regions(grid, vol.chunks):
            box = tuple(slice(a, b) for a, b in region)
            if role == "target":
                arr[box] = clean(structures, shape, voxel, seed=seed, region=region)
            else:
                arr[box] = acquire(structures, shape, voxel, microscope, seed=seed, region=region)
        write_pyramid(vol)
        update_attrs(url, {"bigcare": {**record["bigcare"], "role": role, "complete": True}})
        written.append(vol)
    return written[1], written[0]


def parse_psf(text: str | None) -> dict | None:
    """A PSF spec from the command line: ``KIND[:key=value,...]`` (see :func:`make_psf`).

    ``gaussian:fwhm=0.25``, ``widefield:na=0.8,wavelength=0.52``,
    ``file:path=bead.tif,voxel_size=0.2/0.1/0.1`` (several numbers separated by ``/``).

    Raises
    ------
    ConfigError
        If a ``key=value`` item is malformed.
    """
    if text is None:
        return None
    kind, _, rest = text.partition(":")
    spec: dict = {"kind": kind}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--psf {text!r}: expected KIND:key=value,..., got item {item!r}")
        try:
            numbers = [float(v) for v in value.split("/")]
            spec[key] = numbers[0] if len(numbers) == 1 else numbers
        except ValueError:
            spec[key] = value
    return spec


def write_kind(out, kind: str, shape: Sequence[int], *, count: int = 1, psf: dict | None = None,
               voxel_size: Sequence[float] | None = None, photons: float = 20.0, background: float = 0.0,
               read_noise: float = 0.01, downsample: int = 1, chunks: Sequence[int] | None = None, seed: int = 0,
               overwrite: bool = False) -> list:
    """``bigcare synth``: ``count`` pairs ``out/noisy_k.ome.zarr``, ``out/clean_k.ome.zarr`` of a kind.

    Default voxel size 0.04 um (2D) or 0.1 um (3D), so sub-diffraction tubules (FWHM 0.1 um)
    and granules are resolved on the target's grid.

    Returns
    -------
    list of (Volume, Volume)
        The (input, target) pairs written.
    """
    from pathlib import Path

    from bigcare.synth.acquire import Background as _Background
    from bigcare.synth.acquire import make_psf

    shape = tuple(int(s) for s in shape)
    voxel = tuple(voxel_size) if voxel_size else (0.04,) * 2 if len(shape) == 2 else (0.1,) * 3
    if len(voxel) != len(shape):
        raise ConfigError(f"voxel_size {voxel} must have one entry per axis of shape {shape}")
    kernel = make_psf(psf, voxel, len(shape)) if psf else None
    microscope = Microscope(psf=kernel, photons=photons, read_noise=read_noise, downsample=downsample,
                            background=_Background(amplitude=background) if background > 0 else None)
    structures = structures_of(kind)
    pairs = []
    for k in range(count):
        pairs.append(write_synthetic(Path(out) / f"noisy_{k}.ome.zarr", Path(out) / f"clean_{k}.ome.zarr", shape,
                                     structures, microscope, voxel_size=voxel, chunks=chunks, seed=seed + 10 * k,
                                     overwrite=overwrite))
    return pairs
