"""The outputs of a volume run, and what is known of its input: written before any block.

- :func:`check_writable`: a local output location can be made (writes nothing);
- :class:`OutputGeometry` / :func:`output_geometry`: axes, shape, chunks, voxel size and offset
  of every output image (the input's, zoomed axes rescaled);
- :func:`create_outputs`: the images (metadata first, a display window from the percentiles for
  intensity outputs) and the done-marker array;
- :func:`input_fingerprint` / :func:`same_input`: a resume refuses an input replaced in place.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import zarr

from bigcare.errors import OutputError
from bigcare.store.axes import Axis
from bigcare.store.urls import is_url, store_kwargs
from bigcare.store.write import create_volume, downsample_factors
from bigcare.tasks.block import MARKER

if TYPE_CHECKING:
    from bigcare.runs.volume import VolumeRun
    from bigcare.store.volume import Volume

__all__ = ["check_writable", "OutputGeometry", "output_geometry", "create_outputs", "FINGERPRINT_REGIONS",
           "FINGERPRINT_EXTENT", "input_fingerprint", "same_input"]


def check_writable(output: str) -> None:
    """OutputError when a local output cannot be made: its nearest existing folder is not a
    writable folder (read-only file system, no permission). Writes nothing; remote stores are
    found out when the outputs are created (still before any block runs)."""
    if is_url(output):
        return
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"cannot write the output {output}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write the output {output}: {parent} is not writable (read-only or no permission)")
    try:
        if os.statvfs(parent).f_flag & os.ST_RDONLY:
            raise OutputError(f"cannot write the output {output}: {parent} is on a read-only file system")
    except (AttributeError, OSError):  # no statvfs: creating the outputs will tell
        pass


@dataclass(frozen=True)
class OutputGeometry:
    """Axes, shape, chunks, voxel size and offset of every output image of a run."""

    axes: list[Axis]
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    scale: list[float]
    translation: list[float]

    @property
    def levels(self) -> int:
        """Pyramid levels a run with a pyramid writes (level 0 included)."""
        return 1 + len(downsample_factors(self.shape, self.axes, self.scale))


def output_geometry(run: VolumeRun) -> OutputGeometry:
    """The geometry of a run's outputs (input axes, units and offsets; zoomed axes rescaled)."""
    volume, layout = run.volume, run.layout
    in_chunks = dict(zip(volume.axis_names, run.chunks))
    in_chunks["c"] = layout.n_channel_out
    axes_by_name = {a.name: a for a in volume.axes}
    scale_by_name = dict(zip(volume.axis_names, volume.scale))
    trans_by_name = dict(zip(volume.axis_names, volume.levels[0].translation))
    zoom = dict(zip(volume.axis_names, run.plan.zoom or (1.0,) * len(volume.axis_names)))
    return OutputGeometry(
        axes=[axes_by_name.get(a, Axis("c", "channel", None)) for a in layout.out_axes],
        shape=tuple(layout.out_shape(run.plan.shape)),
        chunks=tuple(in_chunks[a] for a in layout.out_axes),
        scale=[scale_by_name.get(a, 1.0) / zoom.get(a, 1.0) for a in layout.out_axes],
        translation=[trans_by_name.get(a, 0.0) for a in layout.out_axes],
    )


def _windows(run: VolumeRun) -> list[tuple[float, float]] | None:
    """Display window per output channel of an intensity output: the input's percentiles (the
    output is in the input's units), as :meth:`Normalizer.denormalize` maps channels."""
    if run.normalizer is None:
        return None
    lo, hi, n = run.normalizer.lo, run.normalizer.hi, run.layout.n_channel_out
    if len(lo) != n:
        lo, hi = (float(np.mean(lo)),) * n, (float(np.mean(hi)),) * n
    return [(float(a), float(b)) for a, b in zip(lo, hi)]


def create_outputs(run: VolumeRun) -> None:
    """The output images (metadata first) and the done-marker array of a fresh run."""
    volume, options = run.volume, run.output_options
    geometry = output_geometry(run)
    images = run.images
    single = len(images) == 1
    if not single:
        root = zarr.open_group(mode="w", zarr_format=3 if run.ngff_version == "0.5" else 2,
                               attributes={**run.attrs, **series_attrs(images, run.ngff_version)},
                               **store_kwargs(run.output, options))
        write_ome_xml(root, run.output, options, images, geometry, run.output_dtype)
    kinds = getattr(run.model.predictor, "kinds", {})
    for name, url in images.items():
        create_volume(
            url, shape=geometry.shape, dtype=run.output_dtype, chunks=geometry.chunks, axes=geometry.axes,
            scale=geometry.scale, translation=geometry.translation, ngff_version=run.ngff_version,
            storage_options=options, name=f"{volume.name or 'volume'} ({name})", attrs=run.attrs if single else None,
            levels=None if run.pyramid else 1,  # declare only the levels that will be written
            windows=_windows(run) if kinds.get(name, "intensity") == "intensity" else None,
        )
    root = zarr.open_group(mode="r+", **store_kwargs(run.output, options))
    grid = run.plan.grid
    # named dimensions (zarr v3) so generic tools (xarray) take the output group with the marker in it
    names = [f"{a}_block" for a in run.volume.axis_names] if run.ngff_version == "0.5" else None
    root.create_array(MARKER, shape=grid, chunks=(1,) * len(grid), dtype="uint8", fill_value=0, dimension_names=names)


def series_attrs(images: dict[str, str], ngff_version: str) -> dict:
    """The root attributes that list a multi-output run's images: NGFF's bioformats2raw layout 3.

    The images are the series ``0, 1, ...`` (the layout numbers them; ``bigcare.images`` maps
    the names); ``series`` lists their paths. ome-zarr-models validates the root as a
    ``BioFormats2Raw`` group and lists its images; ome-zarr-py's ``find_multiscales`` lists them
    with their names from ``OME/METADATA.ome.xml`` (:func:`write_ome_xml`).
    """
    layout = {"bioformats2raw.layout": 3, "series": [u.rsplit("/", 1)[1] for u in images.values()]}
    return {"ome": {"version": "0.5", **layout}} if ngff_version == "0.5" else layout


def write_ome_xml(root, url: str, options: dict | None, images: dict[str, str], geometry: OutputGeometry,
                  dtype: str) -> None:
    """``OME/METADATA.ome.xml`` of a bioformats2raw-layout root: one Image per series, named by its output."""
    from xml.sax.saxutils import quoteattr

    sizes = {a.name: n for a, n in zip(geometry.axes, geometry.shape)}
    kind = {"f": "float", "u": "uint", "i": "int"}[np.dtype(dtype).kind]
    pixel_type = "float" if kind == "float" and np.dtype(dtype).itemsize == 4 else \
        "double" if kind == "float" else f"{kind}{8 * np.dtype(dtype).itemsize}"
    body = "".join(
        f'<Image ID="Image:{i}" Name={quoteattr(name)}><Pixels ID="Pixels:{i}" DimensionOrder="XYZCT" '
        f'Type="{pixel_type}" SizeX="{sizes.get("x", 1)}" SizeY="{sizes.get("y", 1)}" SizeZ="{sizes.get("z", 1)}" '
        f'SizeC="{sizes.get("c", 1)}" SizeT="{sizes.get("t", 1)}"><MetadataOnly/></Pixels></Image>'
        for i, name in enumerate(images))
    xml = ('<?xml version="1.0" encoding="UTF-8"?>\n<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
           f'Creator="bigcare">{body}</OME>\n')
    root.create_group("OME", attributes={"series": [u.rsplit("/", 1)[1] for u in images.values()]})
    fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    fs.pipe(f"{path.rstrip('/')}/OME/METADATA.ome.xml", xml.encode())


#: Regions hashed for an input's fingerprint, and their largest extent per axis.
FINGERPRINT_REGIONS = 8
FINGERPRINT_EXTENT = 64


def input_fingerprint(volume: Volume) -> dict:
    """Hashes of the input's layout and of a few seeded small regions of its voxels.

    Stored with a run's outputs so that a resume refuses an input replaced in place by another
    of the same shape and type. It reads at most ``FINGERPRINT_REGIONS`` regions of at most
    ``FINGERPRINT_EXTENT`` voxels per axis, one inside each of as many seeded chunks. A region
    that cannot be read now (a corrupt chunk: its blocks will fail by name) is None and is not
    compared.
    """
    lv = volume.levels[0]
    grid = [-(-n // c) for n, c in zip(lv.shape, lv.chunks)]
    rng = np.random.default_rng(0)
    picks = sorted({tuple(int(rng.integers(0, g)) for g in grid) for _ in range(FINGERPRINT_REGIONS)})
    arr = volume.array(0)
    regions: list[str | None] = []
    for index in picks:
        region = tuple(slice(i * c, min(i * c + min(c, FINGERPRINT_EXTENT), n))
                       for i, c, n in zip(index, lv.chunks, lv.shape))
        try:
            regions.append(hashlib.sha256(np.ascontiguousarray(arr[region]).tobytes()).hexdigest())
        except Exception:  # noqa: BLE001 - unreadable now; the blocks that need it report it
            regions.append(None)
    layout = hashlib.sha256(json.dumps([list(lv.shape), lv.dtype.str, list(lv.chunks)]).encode()).hexdigest()
    return {"layout": layout, "regions": regions}


def same_input(stored: dict | None, now: dict) -> bool:
    """Whether two fingerprints can be of the same input (unreadable regions are not compared)."""
    if not isinstance(stored, dict):  # outputs of older versions carry none
        return True
    pairs = zip(stored.get("regions", []), now["regions"])
    return stored.get("layout") == now["layout"] and all(a == b for a, b in pairs if a is not None and b is not None)
