"""A lazily opened OME-Zarr image: axes, pyramid levels and physical scale, no voxels.

A :class:`Volume` is the small, picklable description that every bigcare task carries: where
the image lives (local path or fsspec URL plus storage options) and what each pyramid level
looks like. Voxels are read only through :meth:`Volume.array`, :meth:`Volume.to_dask` or
:meth:`Volume.to_xarray`, straight from the store.

Both OME-NGFF 0.4 (zarr v2, ``attrs["multiscales"]``) and 0.5 (zarr v3,
``attrs["ome"]["multiscales"]``) are read. Physical coordinates follow NGFF: the centre of voxel
``i`` along an axis lies at ``i * scale + translation``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import zarr

from bigcare.errors import InputError
from bigcare.store.axes import Axis, default_axis_type
from bigcare.store.urls import freeze, is_url, normalize_url, store_kwargs, url_exists

__all__ = ["Level", "Volume", "open_volume", "unfinished", "check_finished"]

@dataclass(frozen=True)
class Level:
    """One resolution level of a pyramid.

    Attributes
    ----------
    path : str
        Dataset path inside the image group, e.g. ``"0"``.
    shape : tuple of int
        Array shape.
    chunks : tuple of int
        The unit of independent writing: the shard shape if the array is sharded, else the
        chunk shape.
    dtype : numpy.dtype
        Voxel data type.
    scale : tuple of float
        Physical size of one voxel, one value per axis.
    translation : tuple of float
        Physical position of the centre of voxel 0; zeros when the metadata has none.
    """

    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    scale: tuple[float, ...]
    translation: tuple[float, ...]


@dataclass(frozen=True)
class Volume:
    """An opened OME-Zarr image: metadata only, voxels stay in the store.

    Attributes
    ----------
    url : str
        Absolute local path, or the fsspec URL as given (without a trailing slash).
    storage_options : dict or None
        fsspec storage options used for every access (credentials, endpoint, ...).
    ngff_version : str
        ``"0.4"`` or ``"0.5"``.
    axes : tuple of Axis
        Axes in array order.
    levels : tuple of Level
        Pyramid levels, level 0 at full resolution.
    name : str or None
        The multiscale's name, if any.
    attrs : dict
        The root group's raw attributes.
    """

    url: str
    storage_options: dict | None = field(hash=False)
    ngff_version: str
    axes: tuple[Axis, ...]
    levels: tuple[Level, ...]
    name: str | None
    attrs: dict = field(hash=False, repr=False)

    @property
    def zarr_format(self) -> Literal[2, 3]:
        """Zarr format of the arrays: 2 for NGFF 0.4, 3 for NGFF 0.5."""
        return 2 if self.ngff_version == "0.4" else 3

    @property
    def axis_names(self) -> str:
        """Axis names joined in array order, e.g. ``"czyx"``."""
        return "".join(a.name for a in self.axes)

    @property
    def spatial_axes(self) -> str:
        """Names of the axes of type ``"space"``, in array order, e.g. ``"zyx"``."""
        return "".join(a.name for a in self.axes if a.kind == "space")

    @property
    def channel_axis(self) -> int | None:
        """Position of the channel axis (type ``"channel"``, or an untyped ``c``), None without one."""
        found = [i for i, a in enumerate(self.axes) if a.kind == "channel"]
        return found[0] if found else None

    @property
    def ndim(self) -> int:
        """Number of axes."""
        return len(self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of level 0."""
        return self.levels[0].shape

    @property
    def dtype(self) -> np.dtype:
        """Data type of level 0."""
        return self.levels[0].dtype

    @property
    def chunks(self) -> tuple[int, ...]:
        """Write unit (shard or chunk shape) of level 0."""
        return self.levels[0].chunks

    @property
    def scale(self) -> tuple[float, ...]:
        """Voxel size of level 0, one value per axis."""
        return self.levels[0].scale

    def ref(self, channel: int | None = None, level: int = 0):
        """The :class:`~bigcare.store.chunks.ImageRef` of one level (and channel) that read tasks carry."""
        from bigcare.store.chunks import ImageRef

        return ImageRef(self.url, self.storage_options, self.zarr_format, self._level(level),
                        self.channel_axis, channel)

    def _level(self, level: int) -> Level:
        if not -len(self.levels) <= level < len(self.levels):
            raise InputError(f"{self.url}: level {level} does not exist; expected 0..{len(self.levels) - 1}")
        return self.levels[level]

    def array(self, level: int = 0, mode: str = "r") -> zarr.Array:
        """Open one level's zarr array (v2 or v3).

        Parameters
        ----------
        level : int
            Pyramid level, 0 = full resolution.
        mode : str
            zarr access mode: ``"r"`` to read, ``"r+"`` to write into existing arrays.

        Returns
        -------
        zarr.Array

        Raises
        ------
        InputError
            If the level does not exist.
        """
        lv = self._level(level)
        return zarr.open_array(
            path=lv.path, mode=mode, zarr_format=self.zarr_format,
            **store_kwargs(self.url, self.storage_options),
        )

    def to_dask(self, level: int = 0):
        """Lazy dask array of one level, with one dask chunk per zarr chunk (or shard).

        Parameters
        ----------
        level : int
            Pyramid level, 0 = full resolution.

        Returns
        -------
        dask.array.Array
        """
        import dask.array as da
        from dask.base import tokenize

        lv = self._level(level)
        name = "bigcare-volume-" + tokenize(self.url, lv, freeze(self.storage_options))
        return da.from_zarr(self.array(level), chunks=lv.chunks, name=name)

    def to_xarray(self, level: int = 0):
        """Labelled lazy view of one level.

        Parameters
        ----------
        level : int
            Pyramid level, 0 = full resolution.

        Returns
        -------
        xarray.DataArray
            Dims are the axis names. Space and time axes carry coordinates in physical units
            (``index * scale + translation``) with ``attrs["units"]`` set to the axis unit.
        """
        import xarray as xr

        lv = self._level(level)
        coords = {}
        for i, ax in enumerate(self.axes):
            if ax.kind in ("space", "time"):
                values = np.arange(lv.shape[i]) * lv.scale[i] + lv.translation[i]
                coords[ax.name] = xr.Variable(ax.name, values, attrs={"units": ax.unit} if ax.unit else {})
        return xr.DataArray(
            self.to_dask(level), dims=tuple(a.name for a in self.axes), coords=coords,
            name=self.name, attrs={"url": self.url, "level": lv.path},
        )


def open_volume(url: str | os.PathLike, *, storage_options: dict | None = None) -> Volume:
    """Open an OME-Zarr image (NGFF 0.4 or 0.5) from a local path or any fsspec URL.

    Parameters
    ----------
    url : str or os.PathLike
        Local path, or fsspec URL such as ``file:///data/a.zarr``, ``s3://bucket/a.zarr`` or
        ``memory://a.zarr``.
    storage_options : dict, optional
        fsspec options for URLs (ignored for local paths).

    Returns
    -------
    Volume

    Raises
    ------
    InputError
        If the path does not exist, is not a zarr group, carries no ``multiscales`` metadata,
        or the metadata is malformed (e.g. a scale with the wrong number of values).
    """
    url = normalize_url(url)
    if not is_url(url) and not os.path.exists(url):
        raise InputError(f"{url}: no such file or directory; expected an OME-Zarr image group")
    if not is_url(url) and os.path.isfile(url):
        raise InputError(f"{url}: is a file, not an OME-Zarr image group{_format_hint(url)}")
    try:
        group = zarr.open_group(mode="r", **store_kwargs(url, storage_options))
    except zarr.errors.ContainsArrayError:
        raise InputError(f"{url}: is a zarr array, not a group; expected an OME-Zarr image group") from None
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        if is_url(url) and not url_exists(url, storage_options):
            raise InputError(f"{url}: no such file or directory; expected an OME-Zarr image group") from None
        raise InputError(f"{url}: not a zarr group (no zarr.json or .zgroup found); expected an OME-Zarr image group"
                         f"{_format_hint(url)}") from None
    except Exception as exc:  # garbled metadata, no credentials, unreachable host: one line, not a traceback
        raise InputError(f"{url}: cannot be opened as a zarr group ({type(exc).__name__}: {exc})") from None
    attrs = dict(group.attrs)
    version, ms = _find_multiscales(url, attrs)
    axes = _parse_axes(url, ms)
    levels = _parse_levels(url, group, ms, axes)
    return Volume(
        url=url, storage_options=dict(storage_options) if storage_options else None,
        ngff_version=version, axes=axes, levels=levels, name=ms.get("name"), attrs=attrs,
    )


def _format_hint(url: str) -> str:
    """Which formats bigcare reads, and how to convert the others (for errors)."""
    low = url.lower()
    if low.endswith((".tif", ".tiff")):
        return ("; bigcare restore takes TIFF / OME-TIFF files directly, other commands need "
                f"`bigcare convert {url} OUT.ome.zarr` first")
    return ("; bigcare reads OME-Zarr (NGFF 0.4 / 0.5) and, for restore, TIFF / OME-TIFF. Convert other formats "
            "(CZI, ND2, LIF, IMS, HDF5, ...) with bioformats2raw (`bioformats2raw IN OUT.ome.zarr`), or a TIFF "
            "with `bigcare convert`")


def unfinished(volume: Volume) -> str | None:
    """Why ``volume`` is a bigcare-written image that is not finished, or None.

    ``bigcare convert`` and ``bigcare restore`` write ``bigcare.complete = false`` before the
    first voxel and true after the last: in between (or after a crash) the image looks valid
    but holds fill values where nothing was written yet.
    """
    ours = volume.attrs.get("bigcare")
    if not isinstance(ours, dict) or ours.get("complete") is not False:
        return None
    if "convert" in ours:
        return f"its conversion from {ours['convert'].get('source', 'a TIFF')} did not finish"
    return "its restoration did not finish (run the same restore command again to complete it)"


def check_finished(volume: Volume) -> None:
    """InputError when ``volume`` is an unfinished bigcare-written image (see :func:`unfinished`)."""
    why = unfinished(volume)
    if why is not None:
        raise InputError(f"{volume.url} is incomplete: {why}; its unwritten parts read as zeros, so bigcare "
                         "does not take it as an input")


# --- metadata parsing -----------------------------------------------------------------------


def _find_multiscales(url: str, attrs: dict) -> tuple[str, dict]:
    ome = attrs.get("ome")
    if isinstance(ome, Mapping) and "multiscales" in ome:
        found, version = ome["multiscales"], str(ome.get("version", "0.5"))
    elif "multiscales" in attrs:
        found = attrs["multiscales"]
        version = str(found[0].get("version", "0.4")) if isinstance(found, list) and found and isinstance(found[0], Mapping) else "0.4"
    else:
        raise InputError(
            f"{url}: zarr group has no OME-NGFF 'multiscales' metadata (looked in attrs['ome'] and attrs); "
            f"found attribute keys {sorted(attrs)}"
        )
    if not isinstance(found, list) or not found or not isinstance(found[0], Mapping):
        raise InputError(f"{url}: 'multiscales' must be a non-empty list of objects, got {found!r:.200}")
    if version not in ("0.4", "0.5"):
        # 0.1-0.3 share 0.4's layout closely enough to read (zarr v2, multiscales at the root).
        version = "0.5" if isinstance(ome, Mapping) else "0.4"
    return version, dict(found[0])


def _parse_axes(url: str, ms: dict) -> tuple[Axis, ...]:
    raw = ms.get("axes")
    if raw is None:  # NGFF <= 0.2: always 5D tczyx
        raw = ["t", "c", "z", "y", "x"]
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{url}: multiscales 'axes' must be a non-empty list, got {raw!r:.200}")
    axes = []
    for i, item in enumerate(raw):
        if isinstance(item, str):  # NGFF 0.3: plain names
            item = {"name": item, "type": default_axis_type(item)}
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not item["name"]:
            raise InputError(f"{url}: axis {i} must be an object with a non-empty 'name', got {item!r:.200}")
        axes.append(Axis(name=item["name"].lower(), type=item.get("type"), unit=item.get("unit")))
    names = [a.name for a in axes]
    if len(set(names)) != len(names):
        raise InputError(f"{url}: axis names must be unique, got {names}")
    return tuple(axes)


def _transform(url: str, where: str, transforms: Any, ndim: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    scale, translation = (1.0,) * ndim, (0.0,) * ndim
    if transforms is None:
        return scale, translation
    if not isinstance(transforms, list):
        raise InputError(f"{url}: {where} coordinateTransformations must be a list, got {transforms!r:.200}")
    for t in transforms:
        kind = t.get("type") if isinstance(t, Mapping) else None
        if kind == "identity":
            continue
        if kind not in ("scale", "translation"):
            raise InputError(f"{url}: {where}: unsupported coordinate transformation {t!r:.200}; expected 'scale' or 'translation'")
        values = t.get(kind)
        if values is None:
            raise InputError(f"{url}: {where}: {kind} given by path is not supported; expected inline '{kind}' values")
        if not isinstance(values, list) or len(values) != ndim or not all(isinstance(v, (int, float)) for v in values):
            raise InputError(f"{url}: {where}: {kind} must be {ndim} numbers (one per axis), got {values!r:.200}")
        if kind == "scale":
            scale = tuple(float(v) for v in values)
            if not all(math.isfinite(v) and v > 0 for v in scale):
                raise InputError(f"{url}: {where}: scale must be finite positive voxel sizes, got {list(scale)}")
        else:
            translation = tuple(float(v) for v in values)
    return scale, translation


def _parse_levels(url: str, group: zarr.Group, ms: dict, axes: tuple[Axis, ...]) -> tuple[Level, ...]:
    datasets, ndim = ms.get("datasets"), len(axes)
    if not isinstance(datasets, list) or not datasets:
        raise InputError(f"{url}: multiscales 'datasets' must be a non-empty list, got {datasets!r:.200}")
    top_scale, top_shift = _transform(url, "multiscales", ms.get("coordinateTransformations"), ndim)
    levels = []
    for i, ds in enumerate(datasets):
        path = ds.get("path") if isinstance(ds, Mapping) else None
        if not isinstance(path, str):
            raise InputError(f"{url}: dataset {i} has no 'path', got {ds!r:.200}")
        scale, shift = _transform(url, f"dataset {path!r}", ds.get("coordinateTransformations"), ndim)
        if path.startswith("/") or ".." in path.split("/") or "\\" in path:
            raise InputError(f"{url}: dataset path {path!r} leaves the image group; expected a path inside it")
        try:
            arr = group[path]
        except KeyError:
            raise InputError(f"{url}: dataset {path!r} listed in multiscales does not exist") from None
        except Exception as exc:  # its metadata is garbled
            raise InputError(f"{url}: dataset {path!r} cannot be opened ({type(exc).__name__}: {exc})") from None
        if not isinstance(arr, zarr.Array):
            raise InputError(f"{url}: dataset {path!r} is a group; expected an array")
        if arr.ndim != ndim:
            raise InputError(
                f"{url}: dataset {path!r} has {arr.ndim} dimensions but the axes "
                f"{''.join(a.name for a in axes)!r} name {ndim}"
            )
        shards = getattr(arr, "shards", None)
        levels.append(Level(
            path=path, shape=tuple(int(s) for s in arr.shape),
            chunks=tuple(int(c) for c in (shards or arr.chunks)), dtype=np.dtype(arr.dtype),
            scale=tuple(s * t for s, t in zip(scale, top_scale)),
            translation=tuple(o * t + u for o, t, u in zip(shift, top_scale, top_shift)),
        ))
    return tuple(levels)
