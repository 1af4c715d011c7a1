"""TIFF in and out of a restore, for the microscopist who has a stack and wants a stack back.

::

    stack.tif ──convert (streamed, a slab of chunk rows at a time)──► out.input.ome.zarr ─┐
                                                                                          ▼
    out.tif   ◄──planes streamed from level 0── out.ome.zarr ◄── restore (the one data path)

A TIFF input is converted once into an OME-Zarr image beside the output (``<output
stem>.input.ome.zarr``; a rerun reuses it while the TIFF is unchanged: same size and modification
time), because the blocks of a cluster run read their regions concurrently and a TIFF's pages
are not chunks. A TIFF output is written from the restored OME-Zarr (kept: it holds the pyramid
and the run's done markers, so a rerun resumes), one plane at a time, as an OME-TIFF with the
voxel sizes; volumes over ``TIFF_OUTPUT_LIMIT`` are refused before the run starts.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

from bigcare.errors import ConfigError, InputError
from bigcare.store.urls import is_url

if TYPE_CHECKING:
    from collections.abc import Iterator

    from bigcare.store.volume import Volume

__all__ = ["TIFF_SUFFIXES", "TIFF_OUTPUT_LIMIT", "is_tiff", "staged_paths", "stage_tiff_input",
           "check_tiff_output", "write_tiff"]

TIFF_SUFFIXES = (".tif", ".tiff")
#: Largest TIFF output (bytes of level 0): a TIFF is one file that viewers read whole.
TIFF_OUTPUT_LIMIT = 8 * 2**30


def is_tiff(path) -> bool:
    """Whether ``path`` names a TIFF file (by its suffix; OME-TIFF included)."""
    return str(path).lower().endswith(TIFF_SUFFIXES)


def _stem(path: str) -> str:
    low = path.lower()
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".ome.zarr", ".zarr"):
        if low.endswith(suffix):
            return path[: -len(suffix)]
    return path


def staged_paths(input: str, output: str) -> tuple[str, str]:
    """The OME-Zarr paths a restore of ``input`` into ``output`` reads and writes when either
    is a TIFF: (converted input or ``input``, restored image or ``output``)."""
    zarr_out = _stem(output) + ".ome.zarr" if is_tiff(output) else output
    zarr_in = _stem(zarr_out) + ".input.ome.zarr" if is_tiff(input) else input
    return zarr_in, zarr_out


def stage_tiff_input(tiff: str, staged: str, *, progress: bool = True) -> str:
    """Convert ``tiff`` into the OME-Zarr ``staged`` (or reuse it: same source, size, mtime).

    Raises
    ------
    InputError
        If the TIFF is missing or unreadable (see :func:`bigcare.store.convert.tiff_to_ome_zarr`).
    """
    import sys

    from bigcare.store.convert import tiff_to_ome_zarr
    from bigcare.store.volume import open_volume, unfinished
    from bigcare.store.write import update_attrs

    if is_url(tiff):
        raise InputError(f"{tiff}: TIFF inputs are read from local files; convert it first with bigcare convert")
    path = os.path.abspath(tiff)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such TIFF file")
    st = os.stat(path)
    source = {"source": path, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    if os.path.exists(staged):
        try:
            old = open_volume(staged)
            same = old.attrs.get("bigcare", {}).get("staged_from") == source and unfinished(old) is None
        except InputError:
            same = False
        if same:
            return staged
    if progress:
        print(f"bigcare: converting {path} to {staged} (streamed; kept for reruns)", file=sys.stderr, flush=True)
    tiff_to_ome_zarr(path, staged, overwrite=_ours(staged))
    update_attrs(staged, {"bigcare": {"convert": {"source": path}, "complete": True, "staged_from": source}})
    return staged


def _ours(url: str) -> bool:
    """Whether ``url`` may be replaced: absent, or an image a conversion of bigcare wrote."""
    from bigcare.errors import OutputError
    from bigcare.store.volume import open_volume

    if not os.path.exists(url):
        return False
    try:
        ours = "convert" in open_volume(url).attrs.get("bigcare", {})
    except InputError:
        ours = False
    if not ours:
        raise OutputError(f"{url} exists and is not a conversion bigcare made; move it, or convert the TIFF "
                          "yourself (bigcare convert) and restore the OME-Zarr")
    return True


def check_tiff_output(shape, dtype, outputs: int) -> None:
    """ConfigError when a TIFF output would exceed ``TIFF_OUTPUT_LIMIT``."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes > TIFF_OUTPUT_LIMIT:
        raise ConfigError(
            f"a TIFF output of shape {tuple(shape)} ({np.dtype(dtype)}) is {nbytes / 2**30:.1f} GiB per output "
            f"({outputs} output(s)), over the {TIFF_OUTPUT_LIMIT / 2**30:.0f} GiB bigcare writes as TIFF (one file, "
            "read whole by most viewers); restore to OME-Zarr (an output path ending in .ome.zarr) instead"
        )


def _planes(volume: Volume) -> Iterator[np.ndarray]:
    """Level-0 planes of ``volume`` (every axis but the last two), one chunk row read at a time."""
    arr = volume.array(0)
    lead = arr.shape[:-2]
    if not lead:
        yield np.asarray(arr[...])
        return
    depth = arr.chunks[len(lead) - 1]
    for outer in np.ndindex(*lead[:-1]):
        for z0 in range(0, lead[-1], depth):
            slab = np.asarray(arr[outer + (slice(z0, min(lead[-1], z0 + depth)),)])
            yield from slab


def write_tiff(image_url: str, tiff_path: str) -> str:
    """Write level 0 of an OME-Zarr image as an OME-TIFF (BigTIFF), streaming its planes.

    The axes and voxel sizes (``PhysicalSize*`` in the image's spatial unit) follow the image.
    The file is written under a temporary name and renamed when complete.
    """
    import tifffile

    from bigcare.store.volume import open_volume

    volume = open_volume(image_url)
    axes = volume.axis_names.upper()
    meta: dict = {"axes": axes}
    for a, s in zip(volume.axes, volume.scale):
        if a.type == "space" and a.name in "zyx":
            meta[f"PhysicalSize{a.name.upper()}"] = float(s)
            if a.unit == "micrometer":
                meta[f"PhysicalSize{a.name.upper()}Unit"] = "µm"
    partial = tiff_path + ".partial"
    with tifffile.TiffWriter(partial, bigtiff=True, ome=True) as tw:
        tw.write(_planes(volume), shape=volume.shape, dtype=volume.dtype, metadata=meta, photometric="minisblack")
    os.replace(partial, tiff_path)
    return tiff_path
