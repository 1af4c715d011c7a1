"""Convert TIFF stacks to OME-Zarr by streaming slabs of pages, and describe volumes.

The TIFF is never read whole. Its pages are grouped into *slabs*: the planes of one chunk row
along t, c and z (all of y and x), which is exactly one row of level-0 chunks::

    pages  0  1  2 ... 63 | 64 ... 127 | 128 ...      (z, chunk depth 64)
           \\_____________/  \\________/
            slab 0            slab 1       read the pages, write the chunks, drop the slab

so memory is one slab whatever the stack size, and every chunk is written once, whole.
Contiguous uncompressed files whose pages are not all indexed (ImageJ files over 4 GB) are
memory-mapped and sliced the same way.
"""

from __future__ import annotations

import math
import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import tifffile

from bigcare.errors import InputError
from bigcare.store.axes import Axis, default_axis_type
from bigcare.store.pyramid import write_pyramid
from bigcare.store.volume import Volume, open_volume
from bigcare.store.write import create_volume, update_attrs
from bigcare.types import NgffVersion, PathLike, Shape

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["tiff_to_ome_zarr", "describe"]

_AXIS_MAP = {"T": "t", "C": "c", "S": "c", "Z": "z", "Q": "z", "I": "z", "Y": "y", "X": "x"}
_ORDER = "tczyx"
_UNITS = {"micron": "micrometer", "microns": "micrometer", "um": "micrometer", "µm": "micrometer",
          "μm": "micrometer", "\\u00b5m": "micrometer", "micrometer": "micrometer",
          "nm": "nanometer", "nanometer": "nanometer", "mm": "millimeter", "millimeter": "millimeter",
          "cm": "centimeter", "m": "meter", "meter": "meter"}
_IN_MICROMETER = {"nanometer": 1e-3, "micrometer": 1.0, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6}


@dataclass(frozen=True)
class _Layout:
    """How the TIFF series maps onto NGFF axes and pages."""

    path: str
    names: str                   # NGFF axis name of each series axis, series order, e.g. "zcyx"
    shape: tuple[int, ...]       # series shape
    n_lead: int                  # leading series axes that index pages; the rest lie in a page
    out: str                     # NGFF order, e.g. "czyx"

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[self.names.index(a)] for a in self.out)


def _layout(path: str, series) -> _Layout:
    axes, shape = series.axes.upper(), tuple(int(s) for s in series.shape)
    bad = sorted(set(axes) - set(_AXIS_MAP))
    if bad:
        raise InputError(f"{path}: unsupported TIFF axes {bad} in {axes!r}; supported: T, C, S, Z (Q, I), Y, X")
    names = "".join(_AXIS_MAP[a] for a in axes)
    if len(set(names)) != len(names) or "y" not in names or "x" not in names:
        raise InputError(f"{path}: TIFF axes {axes!r} map to {names!r}; expected at most one each of t, c, z and both y, x")
    page_size = math.prod(series.keyframe.shape)
    n_lead = next(j for j in range(len(shape) + 1) if math.prod(shape[j:]) == page_size)
    return _Layout(path, names, shape, n_lead, "".join(a for a in _ORDER if a in names))


def _read_slab(tif: tifffile.TiffFile, layout: _Layout, region: dict[str, slice], pages, mapped) -> np.ndarray:
    """Read the planes of ``region`` (a slice per NGFF axis name), returned in NGFF order.

    Only the pages that hold those planes are decoded; the result is one slab, never the stack.
    """
    sl = [region.get(n, slice(None)) for n in layout.names]
    if mapped is not None:
        block = np.asarray(mapped[tuple(sl)])
    else:
        lead, inner = sl[:layout.n_lead], tuple(sl[layout.n_lead:])
        ranges = [range(*s.indices(n)) for s, n in zip(lead, layout.shape)]
        inner_shape = layout.shape[layout.n_lead:]
        block = None
        for pos in np.ndindex(*[len(r) for r in ranges]):
            index = tuple(r[p] for r, p in zip(ranges, pos))
            number = int(np.ravel_multi_index(index, layout.shape[:layout.n_lead])) if index else 0
            plane = pages[number].asarray().reshape(inner_shape)[inner]
            if block is None:
                block = np.empty(tuple(len(r) for r in ranges) + plane.shape, plane.dtype)
            block[pos] = plane
    assert block is not None  # every slab holds at least one plane
    return block.transpose([layout.names.index(a) for a in layout.out])


def _unit(value) -> str | None:
    return _UNITS.get(str(value).strip().lower()) if value else None


def _metadata_voxel_size(tif: tifffile.TiffFile, spatial: str) -> tuple[dict[str, float], str | None]:
    """Voxel sizes per spatial axis (and their unit) from ImageJ or OME metadata, or from
    centimetre-based resolution tags."""
    page = tif.pages[0]
    if tif.is_ome and tif.ome_metadata:
        try:
            root = ET.fromstring(tif.ome_metadata)
        except ET.ParseError:
            root = None
        pixels = None if root is None else next((e for e in root.iter() if e.tag.endswith("Pixels")), None)
        if pixels is not None:
            sizes = {a: float(v) for a in spatial if (v := pixels.get(f"PhysicalSize{a.upper()}"))}
            found = {a: _unit(pixels.get(f"PhysicalSize{a.upper()}Unit", "µm")) for a in sizes}
            units = {a: u for a, u in found.items() if u is not None}
            if sizes and len(units) == len(found):
                if len(set(units.values())) == 1:
                    return sizes, units.popitem()[1]
                return {a: v * _IN_MICROMETER[units[a]] for a, v in sizes.items()}, "micrometer"
    if tif.is_imagej:
        ij = tif.imagej_metadata or {}
        unit = _unit(ij.get("unit"))
        if unit:
            sizes = {}
            if page.resolution and all(page.resolution):
                sizes.update(x=1.0 / page.resolution[0], y=1.0 / page.resolution[1])
            if ij.get("spacing"):
                sizes["z"] = float(ij["spacing"])
            return {a: v for a, v in sizes.items() if a in spatial}, unit
    if page.resolutionunit == tifffile.RESUNIT.CENTIMETER and page.resolution and all(page.resolution):
        return {"x": 1e4 / page.resolution[0], "y": 1e4 / page.resolution[1]}, "micrometer"
    return {}, None


def tiff_to_ome_zarr(tiff_path: PathLike, out_url: PathLike, *, voxel_size: Sequence[float] | None = None,
                     unit: str = "micrometer", chunks: Shape | None = None, ngff_version: NgffVersion = "0.5",
                     storage_options: dict | None = None, overwrite: bool = False, client: Client | None = None) -> Volume:
    """Convert a TIFF stack to an OME-Zarr image with a pyramid, streaming slab by slab.

    Parameters
    ----------
    tiff_path : str or os.PathLike
        TIFF file; its first series is converted. Axes ZYX, YX, CZYX, ZCYX, TZYX, TZCYX, with
        ImageJ ``Q``/``I`` read as Z and RGB samples ``S`` as channels.
    out_url : str or os.PathLike
        Local path or fsspec URL of the new image.
    voxel_size : sequence of float, optional
        Voxel size per spatial axis (e.g. z, y, x), in ``unit``. Default: from the ImageJ or
        OME metadata, else 1.0 with a warning.
    unit : str
        Unit of ``voxel_size`` (and of the fallback 1.0).
    chunks : sequence of int, optional
        Chunk shape in output axis order; default 1 for t and c, 64 for z, 256 for y and x
        (1024 for y and x of 2D images), clipped to the shape.
    ngff_version : {"0.5", "0.4"}
        Output NGFF version.
    storage_options : dict, optional
        fsspec options for ``out_url``.
    overwrite : bool
        Replace an existing zarr store at ``out_url``.
    client : distributed.Client, optional
        Builds the pyramid on the cluster (the TIFF itself is read here).

    Returns
    -------
    Volume
        The written image.

    Raises
    ------
    InputError
        If the TIFF is missing or unreadable, has unsupported axes, or ``voxel_size`` or
        ``chunks`` have the wrong length (the message names the axes expected).
    """
    path = os.path.abspath(os.fspath(tiff_path))
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such TIFF file")
    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct errors, ...
        raise InputError(f"{path}: not a readable TIFF file ({type(exc).__name__}: {exc})") from None
    with tif:
        if not tif.series:
            raise InputError(f"{path}: TIFF file holds no image series")
        series = tif.series[0]
        layout = _layout(path, series)
        spatial = "".join(a for a in layout.out if default_axis_type(a) == "space")

        if voxel_size is not None:
            if len(voxel_size) != len(spatial) or not all(math.isfinite(float(v)) and float(v) > 0 for v in voxel_size):
                raise InputError(f"voxel_size: expected {len(spatial)} positive values for axes {spatial!r}, got {tuple(voxel_size)}")
            sizes, size_unit = dict(zip(spatial, map(float, voxel_size))), unit
        else:
            sizes, found_unit = _metadata_voxel_size(tif, spatial)
            size_unit = found_unit or unit
            missing = [a for a in spatial if a not in sizes]
            if missing:
                warnings.warn(f"{path}: no voxel size for axes {''.join(missing)!r} in the TIFF metadata; "
                              f"using 1.0 {size_unit}. Pass voxel_size to set it.", UserWarning, stacklevel=2)
        scale = tuple(sizes.get(a, 1.0) if a in spatial else 1.0 for a in layout.out)
        axes = [Axis(a, default_axis_type(a), size_unit if a in spatial else None) for a in layout.out]

        shape = layout.out_shape
        if chunks is None:
            lateral = 256 if "z" in layout.out else 1024
            chunks = tuple(min(n, {"z": 64, "y": lateral, "x": lateral}.get(a, 1)) for a, n in zip(layout.out, shape))
        if len(chunks) != len(shape):
            raise InputError(f"chunks: expected {len(shape)} values for axes {layout.out!r}, got {tuple(chunks)}")

        volume = create_volume(out_url, shape=shape, dtype=series.dtype, chunks=chunks, axes=axes, scale=scale,
                              ngff_version=ngff_version, storage_options=storage_options,
                              name=os.path.splitext(os.path.basename(path))[0], overwrite=overwrite,
                              attrs={"bigcare": {"convert": {"source": path}, "complete": False}})
        pages = series.pages
        mapped = None
        if len(pages) < math.prod(layout.shape[:layout.n_lead]):
            if series.dataoffset is None:
                raise InputError(f"{path}: TIFF series indexes {len(pages)} pages but its shape "
                                 f"{layout.shape} needs {math.prod(layout.shape[:layout.n_lead])}")
            mapped = tifffile.memmap(path, series=0, mode="r").reshape(layout.shape)
        target = volume.array(0, mode="r+")
        slab_axes = [a for a in layout.out if a not in "yx"]
        slab_chunks = [chunks[layout.out.index(a)] for a in slab_axes]
        slab_shape = [shape[layout.out.index(a)] for a in slab_axes]
        for start in np.ndindex(*[-(-n // c) for n, c in zip(slab_shape, slab_chunks)]):
            region = {a: slice(i * c, min((i + 1) * c, n)) for a, i, c, n in zip(slab_axes, start, slab_chunks, slab_shape)}
            try:
                slab = _read_slab(tif, layout, region, pages, mapped)
            except Exception as exc:  # noqa: BLE001 - truncated or corrupt: tifffile raises many kinds
                planes = ", ".join(f"{a} {r.start}-{r.stop - 1}" for a, r in region.items()) or "the image"
                raise InputError(f"{path}: cannot read {planes} ({type(exc).__name__}: {exc}); the TIFF is truncated "
                                 f"or corrupt. {volume.url} is left marked incomplete, and restore and training "
                                 "refuse it") from None
            target[tuple(region.get(a, slice(None)) for a in layout.out)] = slab
            del slab
    write_pyramid(volume, client=client)
    # only now: a conversion cut short (truncated TIFF, kill) stays marked incomplete, and
    # restore and training refuse it instead of reading its unwritten zeros
    update_attrs(volume.url, {"bigcare": {"convert": {"source": path}, "complete": True}},
                 storage_options=storage_options)
    return open_volume(volume.url, storage_options=storage_options)


def _inner_chunks(volume: Volume, index: int, level) -> tuple[int, ...]:
    """The chunk shape inside a shard (``level.chunks`` is the shard shape of sharded arrays)."""
    try:
        return tuple(volume.array(index).chunks)
    except Exception:  # noqa: BLE001 - unreadable array metadata: what the multiscales say
        return tuple(level.chunks)


def describe(volume: Volume) -> str:
    """Human-readable summary for ``bigcare info PATH``.

    Parameters
    ----------
    volume : Volume
        An opened image.

    Returns
    -------
    str
        Lines with the url, NGFF version, name, axes (name, type, unit), dtype, and one line
        per level with its path, shape, chunks (and shards, when sharded), scale and offset
        (when not zero). :func:`bigcare.runs.info.info` adds what bigcare knows of its own images.
    """
    def fmt(values) -> str:
        return "(" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) + ")"

    lines = [
        f"url:      {volume.url}",
        f"format:   OME-NGFF {volume.ngff_version} (zarr v{volume.zarr_format})",
        f"name:     {volume.name or '-'}",
        "axes:     " + ", ".join(f"{a.name} ({a.type or '?'}{', ' + a.unit if a.unit else ''})" for a in volume.axes),
        f"dtype:    {volume.dtype}",
        f"levels:   {len(volume.levels)}",
    ]
    for i, lv in enumerate(volume.levels):
        inner = _inner_chunks(volume, i, lv)  # opens the array's metadata once
        line = f"  {lv.path:>4}  shape {fmt(lv.shape):<22} chunks {fmt(inner):<20} scale {fmt(lv.scale)}"
        if lv.chunks != inner:
            line += f"  shards {fmt(lv.chunks)}"
        if any(lv.translation):
            line += f"  offset {fmt(lv.translation)}"
        lines.append(line)
    return "\n".join(lines)
