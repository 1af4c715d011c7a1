"""``bigcare info``: what an image is, and for bigcare's own outputs, how far its run got.

For any OME-Zarr image: axes, dtype, and per level the shape, chunks (and shards), voxel size and
offset (:func:`bigcare.store.convert.describe`). For an image bigcare wrote, also its state
(complete, or how many blocks of the run are done: an output whose run failed or was cut short
must not look like a normal image), the model and the bigcare version that made it, and for a
conversion its source. For the root of a multi-output run (``mean`` and ``scale`` images in one
group: a bioformats2raw-layout root whose series 0, 1, ... its ``bigcare.images`` attribute
names), the same for each image. Reads metadata and the listing of the done markers only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from bigcare.errors import InputError
from bigcare.store.arrays import written_chunks
from bigcare.store.convert import describe
from bigcare.store.urls import normalize_url, store_kwargs
from bigcare.store.volume import open_volume
from bigcare.tasks.block import MARKER

__all__ = ["run_state", "info"]


def run_state(url: str, attrs: dict, storage_options: dict | None = None) -> list[str]:
    """Lines on the bigcare run or conversion recorded in ``attrs`` (empty when there is none)."""
    ours = attrs.get("bigcare")
    if not isinstance(ours, dict):
        return []
    lines = []
    if "convert" in ours:
        lines.append(f"made by:  bigcare convert of {ours['convert'].get('source', '?')}")
    if "run_key" in ours:
        lines.append(f"made by:  bigcare {ours.get('version', '?')} restore with model {ours.get('model', '?')} "
                     f"(hash {str(ours.get('model_hash', '?'))[:12]}) from {ours.get('input', '?')}")
        if "nan_fill" in ours:
            lines.append(f"nan fill: NaN/inf input voxels were read as {ours['nan_fill']}")
    if ours.get("complete") is True:
        lines.insert(0, "state:    complete")
        return lines
    if ours.get("complete") is False:
        if "convert" in ours:
            state = f"its conversion from {ours['convert'].get('source', 'a TIFF')} did not finish"
        else:
            try:
                done = written_chunks(zarr.open_array(path=MARKER, mode="r", **store_kwargs(url, storage_options)))
                state = (f"{int(np.count_nonzero(done))} of {done.size} blocks done (run the same restore again to "
                         "finish it)")
            except Exception:  # noqa: BLE001 - killed before the done markers were made
                state = "no block is done yet"
        lines.insert(0, f"state:    INCOMPLETE: {state}")
    return lines


def _with_state(volume) -> str:
    text = describe(volume)
    extra = run_state(volume.url, volume.attrs, volume.storage_options)
    if not extra:
        return text
    head, rest = text.split("\n", 1)
    return "\n".join([head, *extra, rest])


def info(url: str, storage_options: dict | None = None) -> str:
    """The ``bigcare info`` text of an image, or of each image of a multi-output run's group.

    Raises
    ------
    InputError
        If ``url`` is neither an OME-Zarr image nor a bigcare output group.
    """
    try:
        return _with_state(open_volume(url, storage_options=storage_options))
    except InputError as exc:
        if "multiscales" not in str(exc):
            raise
        error = exc
    url = normalize_url(url)
    group = zarr.open_group(mode="r", **store_kwargs(url, storage_options))
    attrs: dict[str, Any] = dict(group.attrs)
    ours = attrs.get("bigcare")
    names = [str(n) for n in ours.get("outputs") or []] if isinstance(ours, dict) else []
    # name -> path: a bioformats2raw-layout root keeps its images as series 0, 1, ... (older outputs: by name)
    paths = dict(ours.get("images") or {}) if isinstance(ours, dict) else {}
    if not names:  # another tool's bioformats2raw root: its series, by path
        layout = attrs.get("ome", attrs)
        names = [str(p) for p in layout.get("series") or []] if layout.get("bioformats2raw.layout") == 3 else []
    if not names:
        raise error
    parts = [f"url:      {url}", *run_state(url, attrs, storage_options),
             f"images:   {', '.join(n if paths.get(n, n) == n else f'{n} ({paths[n]})' for n in names)}"]
    for name in names:
        try:
            volume = open_volume(f"{url.rstrip('/')}/{paths.get(name, name)}", storage_options=storage_options)
            parts.append(f"\n{name}:\n" + _with_state(volume) if paths.get(name, name) != name else "\n" + _with_state(volume))
        except InputError as exc:
            parts.append(f"\n{name}: {exc}")
    return "\n".join(parts)
