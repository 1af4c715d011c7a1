"""Write OME-NGFF images: metadata first, empty arrays, then a blockwise pyramid.

The order matters (ome-zarr-py writes metadata only after the data are computed, so a crash
leaves arrays nobody can interpret): :func:`create_volume` writes the complete multiscales
metadata and then creates every level as an empty array; writers fill level 0 chunk by chunk;
:func:`write_pyramid` fills levels 1..n, one task per output chunk::

    level k-1   +----+----+----+----+        one task = one output chunk of level k:
                | f*C voxels|    |    |      read  the f*C region of level k-1 (edge-padded
                +----+----+----+----+              when the level ends mid-way),
                   \\    /                    reduce by the mean over f x f (x f) voxels,
    level k     +----+----+                  write exactly that chunk of level k.
                | C  |    |
                +----+----+

Physical placement follows the mean: a level-k voxel covers ``F`` level-0 voxels along an axis
(``F`` the cumulative factor), so ``scale_k = F * scale_0`` and
``translation_k = translation_0 + (F - 1) / 2 * scale_0`` (the centre of the averaged voxels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import fsspec
import numcodecs
import numpy as np
import zarr
from numpy.typing import DTypeLike
from zarr.codecs import BloscCodec

from bigcare.errors import ConfigError, OutputError
from bigcare.store.axes import Axis, as_axes
from bigcare.store.pyramid import write_pyramid
from bigcare.store.urls import normalize_url, store_kwargs
from bigcare.store.volume import Volume, open_volume
from bigcare.types import NgffVersion, PathLike, Shape

__all__ = ["create_volume", "downsample_factors", "update_attrs", "write_array"]

#: Spatial axes whose voxel size is within this factor of the reference (finest) are halved.
ISOTROPY_TOLERANCE = 1.5


def _check_lengths(axes: tuple[Axis, ...], **values) -> None:
    names = "".join(a.name for a in axes)
    for what, value in values.items():
        if value is not None and len(value) != len(axes):
            raise ConfigError(f"{what}: expected {len(axes)} values (one per axis {names!r}), got {tuple(value)}")


def downsample_factors(shape: Sequence[int], axes: Sequence[Axis | str], scale: Sequence[float], *,
                       levels: int | None = None, min_size: int = 64) -> list[tuple[int, ...]]:
    """Integer downsampling factor per axis for each pyramid level after level 0.

    Rule (keeps voxels near-isotropic): a level is added while some spatial axis is larger
    than ``min_size``. Its reference voxel size is the finest among those large axes; every
    spatial axis (of more than one voxel) whose voxel size is at most ``ISOTROPY_TOLERANCE``
    (1.5) times the reference is halved, the coarser ones wait until the others catch up.
    Channel, time and untyped axes are never downsampled. With ``levels``, exactly
    ``levels - 1`` factors are returned; once no axis is above ``min_size``, the reference is
    taken over all axes of more than one voxel.

    Examples: 1000^3 voxels of 5 x 2 x 2 um -> (1, 2, 2) to reach 5 x 4 x 4 um, then
    (2, 2, 2) at every level; 11 x 70 x 50 voxels of 2.5 x 0.4 x 0.4 um -> one level (1, 2, 2)
    (x is halved with y although it is already small, so y and x stay equal).

    Parameters
    ----------
    shape : sequence of int
        Level-0 shape.
    axes : sequence of Axis or str
        Axes in array order (names alone are typed x/y/z = space, c = channel, t = time).
    scale : sequence of float
        Level-0 voxel size per axis.
    levels : int, optional
        Total number of levels including level 0.
    min_size : int
        Stop once every spatial axis is at most this many voxels.

    Returns
    -------
    list of tuple of int
        One tuple per level 1..n-1, the factor relative to the previous level.

    Raises
    ------
    ConfigError
        If lengths disagree, values are not positive, or ``levels`` cannot be reached.
    """
    axes = as_axes(axes)
    _check_lengths(axes, shape=shape, scale=scale)
    if levels is not None and (int(levels) != levels or levels < 1):
        raise ConfigError(f"levels: expected a positive integer, got {levels!r}")
    if any(s <= 0 for s in scale):
        raise ConfigError(f"scale: expected positive voxel sizes, got {tuple(scale)}")
    size = [int(s) for s in shape]
    vox = [float(s) for s in scale]
    spatial = [i for i, a in enumerate(axes) if a.kind == "space"]
    out: list[tuple[int, ...]] = []
    while levels is None or len(out) < levels - 1:
        large = [i for i in spatial if size[i] > min_size]
        if not large and levels is not None:
            large = [i for i in spatial if size[i] > 1]
        if not large:
            if levels is None:
                break
            raise ConfigError(
                f"levels: cannot make {levels} levels from shape {tuple(shape)} with spatial axes "
                f"{''.join(axes[i].name for i in spatial)!r}; at most {len(out) + 1} are possible"
            )
        reference = min(vox[i] for i in large)
        f = tuple(2 if i in spatial and size[i] > 1 and vox[i] <= ISOTROPY_TOLERANCE * reference else 1
                  for i in range(len(axes)))
        size = [-(-n // k) for n, k in zip(size, f)]
        vox = [v * k for v, k in zip(vox, f)]
        out.append(f)
    return out


def _compressor(zarr_format: int):
    if zarr_format == 3:
        return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)


def _check_target(url: str, storage_options: dict | None, overwrite: bool) -> None:
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.exists(root):
        return
    if fs.isfile(root):
        raise OutputError(f"{url}: exists and is a file; expected a new or existing OME-Zarr folder")
    if not fs.ls(root, detail=False):
        return  # an empty folder holds nothing to lose
    if not overwrite:
        raise OutputError(f"{url}: already exists; pass overwrite=True to replace it")
    if not any(fs.exists(f"{root.rstrip('/')}/{m}") for m in ("zarr.json", ".zgroup", ".zattrs", ".zarray")):
        raise OutputError(
            f"{url}: exists and is not a zarr store (no zarr.json/.zgroup); "
            "refusing to delete it even with overwrite=True"
        )


def create_volume(url: PathLike, *, shape: Shape, dtype: DTypeLike, chunks: Shape, axes: Sequence[Axis | str],
                  scale: Sequence[float], translation: Sequence[float] | None = None, levels: int | None = None,
                  ngff_version: NgffVersion = "0.5", storage_options: dict | None = None, name: str | None = None,
                  attrs: dict | None = None, overwrite: bool = False, fill_value: float = 0,
                  windows: Sequence[tuple[float, float]] | None = None) -> Volume:
    """Create an empty OME-Zarr image: metadata first, then every pyramid level.

    Parameters
    ----------
    url : str or os.PathLike
        Local path or fsspec URL of the new image group.
    shape, chunks : sequence of int
        Level-0 shape and chunk shape (chunks are clipped to each level's shape).
    dtype : numpy dtype-like
        Voxel type.
    axes : sequence of Axis
        Axes in array order, NGFF order (t, c, then space).
    scale : sequence of float
        Level-0 voxel size per axis (1.0 for channel axes).
    translation : sequence of float, optional
        Position of voxel 0 per axis; zeros by default.
    levels : int, optional
        Number of pyramid levels including level 0; default from :func:`downsample_factors`.
    ngff_version : {"0.5", "0.4"}
        0.5 writes zarr v3 (blosc-zstd), 0.4 writes zarr v2 (blosc-zstd, "/" separator).
    storage_options : dict, optional
        fsspec options for URLs.
    name : str, optional
        Multiscale name.
    attrs : dict, optional
        Extra root attributes (next to ``"ome"`` for 0.5, next to ``"multiscales"`` for 0.4).
    overwrite : bool
        Replace an existing zarr store at ``url``. Never deletes a folder that is not zarr.
    fill_value : scalar
        Value of chunks never written.
    windows : sequence of (float, float), optional
        Display window (start, end) per channel (one for an image without a channel axis),
        written as the ``omero`` rendering settings viewers such as napari open with.

    Returns
    -------
    Volume
        The opened, still empty image.

    Raises
    ------
    ConfigError
        If arguments disagree (lengths, non-positive sizes, unknown version, reserved attrs).
    OutputError
        If ``url`` exists and ``overwrite`` is False, or exists and is not a zarr store.
    """
    if ngff_version not in ("0.4", "0.5"):
        raise ConfigError(f"ngff_version: expected '0.4' or '0.5', got {ngff_version!r}")
    axes = as_axes(axes)
    translation = tuple(float(t) for t in translation) if translation is not None else (0.0,) * len(axes)
    _check_lengths(axes, shape=shape, chunks=chunks, scale=scale, translation=translation)
    if any(int(s) != s or s < 1 for s in shape) or any(int(c) != c or c < 1 for c in chunks):
        raise ConfigError(f"shape and chunks: expected positive integers, got shape={tuple(shape)}, chunks={tuple(chunks)}")
    reserved = {"ome", "multiscales"} & set(attrs or {})
    if reserved:
        raise ConfigError(f"attrs: keys {sorted(reserved)} are reserved for the NGFF metadata")
    dtype = np.dtype(dtype)
    shape, chunks, scale = tuple(map(int, shape)), tuple(map(int, chunks)), tuple(map(float, scale))
    factors = downsample_factors(shape, axes, scale, levels=levels)

    url = normalize_url(url)
    _check_target(url, storage_options, overwrite)
    zarr_format: Literal[2, 3] = 3 if ngff_version == "0.5" else 2

    cumulative, level_shapes, datasets = (1,) * len(axes), [shape], []
    for k in range(len(factors) + 1):
        if k:
            cumulative = tuple(c * f for c, f in zip(cumulative, factors[k - 1]))
            level_shapes.append(tuple(-(-n // f) for n, f in zip(level_shapes[-1], factors[k - 1])))
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [s * c for s, c in zip(scale, cumulative)]},
            {"type": "translation", "translation": [t + (c - 1) / 2 * s for t, c, s in zip(translation, cumulative, scale)]},
        ]})
    ngff_axes = [{k: v for k, v in (("name", a.name), ("type", a.type), ("unit", a.unit)) if v is not None} for a in axes]
    # type and metadata say how the pyramid is made (NGFF: optional; strict readers want them)
    multiscale: dict[str, Any] = {"axes": ngff_axes, "datasets": datasets, "type": "mean",
                                  "metadata": {"method": "bigcare.store.pyramid.mean_reduce",
                                               "description": "block means of integer factors, rounded for integer types"}}
    if name is not None:
        multiscale["name"] = name
    ome: dict[str, Any] = {"multiscales": [multiscale]}
    if windows is not None:
        ome["omero"] = _omero(windows, dtype, axes)
    root_attrs: dict[str, Any]
    if ngff_version == "0.5":
        root_attrs = {"ome": {"version": "0.5", **ome}}
    else:
        root_attrs = {**ome, "multiscales": [{"version": "0.4", **multiscale}]}
    _validate(root_attrs, ngff_version)  # before anything is written: bigcare never writes what readers refuse
    root_attrs.update(attrs or {})

    group = zarr.open_group(mode="w", zarr_format=zarr_format, attributes=root_attrs,
                            **store_kwargs(url, storage_options))
    for k, level_shape in enumerate(level_shapes):
        extra = ({"dimension_names": [a.name for a in axes]} if zarr_format == 3
                 else {"chunk_key_encoding": {"name": "v2", "separator": "/"}})
        group.create_array(
            name=str(k), shape=level_shape, dtype=dtype, fill_value=fill_value,
            chunks=tuple(min(c, n) for c, n in zip(chunks, level_shape)),
            compressors=_compressor(zarr_format), **extra,
        )
    return open_volume(url, storage_options=storage_options)


def update_attrs(url, attrs: dict, *, storage_options=None) -> None:
    """Merge keys into the root group's attributes (top level, next to ``"ome"`` for 0.5).

    Parameters
    ----------
    url : str or os.PathLike
        Local path or fsspec URL of the group.
    attrs : dict
        Keys to set; existing keys not named are kept, named ones are replaced.
    storage_options : dict, optional
        fsspec options for URLs.

    Raises
    ------
    OutputError
        If ``url`` is not an existing zarr group.
    """
    url = normalize_url(url)
    try:
        group = zarr.open_group(mode="r+", **store_kwargs(url, storage_options))
    except (FileNotFoundError, zarr.errors.BaseZarrError) as exc:
        raise OutputError(f"{url}: cannot update attributes, not an existing zarr group ({exc})") from None
    group.update_attributes(dict(attrs))


def _omero(windows: Sequence[tuple[float, float]], dtype: np.dtype, axes: Sequence[Axis]) -> dict[str, Any]:
    """NGFF ``omero`` rendering settings: one grey channel per window (start, end)."""
    channels = []
    for k, (start, end) in enumerate(windows):
        start, end = float(start), float(end)
        if np.issubdtype(dtype, np.integer):
            lo, hi = float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)
        else:  # a float image has no range of its own: room around the window
            span = max(end - start, 1e-6)
            lo, hi = start - span, end + span
        channels.append({"active": True, "color": "FFFFFF", "label": f"channel {k}" if len(windows) > 1 else "intensity",
                         "window": {"start": start, "end": end, "min": min(lo, start), "max": max(hi, end)}})
    return {"channels": channels, "rdefs": {"model": "greyscale"}}


def _validate(root_attrs: dict[str, Any], ngff_version: str) -> None:
    """ome-zarr-models' check of the image attributes (the NGFF JSON schema, as pydantic)."""
    import pydantic
    from ome_zarr_models.common.omero import Omero
    from ome_zarr_models.v04.image import ImageAttrs as ImageAttrs04
    from ome_zarr_models.v05.image import ImageAttrs as ImageAttrs05

    try:
        if ngff_version == "0.5":
            ome = root_attrs["ome"]
            ImageAttrs05.model_validate({k: v for k, v in ome.items() if k != "omero"})
            if "omero" in ome:  # 0.5 carries omero beside multiscales, in "ome"; validated on its own
                Omero.model_validate(ome["omero"])
        else:
            ImageAttrs04.model_validate(root_attrs)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"the image metadata bigcare would write is not valid OME-NGFF {ngff_version}: {exc}") from None


def write_array(url: PathLike, data: np.ndarray, *, chunks: Shape, scale: Sequence[float], axes: Sequence[Axis | str],
                **kwargs: Any) -> Volume:
    """Write an in-memory array as an OME-Zarr image with its pyramid (small data only).

    ``chunks``, ``scale``, ``axes`` and ``kwargs`` are those of :func:`create_volume`.
    """
    volume = create_volume(url, shape=data.shape, dtype=data.dtype, chunks=chunks, axes=axes, scale=scale, **kwargs)
    volume.array(0, mode="r+")[...] = data
    write_pyramid(volume)
    return open_volume(url, storage_options=kwargs.get("storage_options"))
