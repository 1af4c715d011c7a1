"""Training sources: which images, which channels, and how a patch sits in them.

A :class:`Source` names an (input, target) pair of aligned OME-Zarr images, or one image whose
channels hold both. :func:`resolve` opens it (metadata only), checks it against the patch
shape and returns what the sampler needs:

- the non-channel axes and the patch *footprint* along them: ``patch_shape`` sits on the last
  ``len(patch_shape)`` spatial axes; every other axis (Z for 2D patches, time) has extent 1;
- the *tile unit* that sizes the train/validation tiles: one patch length along patch axes,
  the same physical length along other spatial axes, one time point;
- whether the lateral (Y, X) voxels are square, which 90-degree rotations need.

Percentiles of a source's images come from :func:`bigcare.normalization.percentile_table`, the
sampler restoration uses too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np

from bigcare.errors import ConfigError, InputError
from bigcare.store.volume import Volume, open_volume

__all__ = ["Source", "resolve"]

@dataclass(frozen=True)
class Source:
    """One training source: a pair of aligned OME-Zarr images, or one image with input and target channels.

    Attributes
    ----------
    input : str
        OME-Zarr image path or fsspec URL of the low-SNR input.
    target : str or None
        Image of the high-SNR target, aligned voxel for voxel with ``input``. None: ``input``
        holds both, as channels ``input_channel`` and ``target_channel`` (default 0 and 1 when
        it has exactly two).
    input_channel, target_channel : int or None
        Channel to read from an image with a channel axis; may be left out when that image has
        a single channel.
    storage_options : dict or None
        fsspec options for both images (credentials, endpoint); never recorded in provenance.
    """

    input: str
    target: str | None = None
    input_channel: int | None = None
    target_channel: int | None = None
    storage_options: dict | None = None


def _as_source(item, index: int) -> Source:
    if isinstance(item, Source):
        return item
    if isinstance(item, (str, os.PathLike)):
        return Source(input=os.fspath(item))
    if isinstance(item, Mapping):
        known = {f.name for f in fields(Source)}
        unknown = sorted(set(item) - known)
        if unknown:
            raise ConfigError(f"sources[{index}]: unknown key(s) {unknown}; expected some of {sorted(known)}")
        if "input" not in item:
            raise ConfigError(f"sources[{index}]: missing key 'input'")
        return Source(**item)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return Source(input=os.fspath(item[0]), target=os.fspath(item[1]))
    raise ConfigError(
        f"sources[{index}]: expected a Source, an image path (two channels), an (input, target) pair of "
        f"paths or a mapping of Source fields, got {item!r:.200}"
    )


def _channel_axis(volume: Volume) -> int | None:
    found = [i for i, a in enumerate(volume.axes) if a.type == "channel" or (a.type is None and a.name == "c")]
    return found[0] if found else None


def _pick_channel(volume: Volume, channel, what: str, index: int) -> int | None:
    ca = _channel_axis(volume)
    if ca is None:
        if channel not in (None, 0):
            raise ConfigError(
                f"sources[{index}].{what}={channel!r}: {volume.url} has no channel axis (axes {volume.axis_names!r})"
            )
        return None
    size = volume.shape[ca]
    if channel is None:
        if size == 1:
            return 0
        raise ConfigError(f"sources[{index}].{what}: {volume.url} has {size} channels; name the one to use (0..{size - 1})")
    if not isinstance(channel, (int, np.integer)) or isinstance(channel, bool) or not 0 <= channel < size:
        raise ConfigError(
            f"sources[{index}].{what}={channel!r} is out of range: {volume.url} has {size} channel(s), expected 0..{size - 1}"
        )
    return int(channel)


@dataclass(frozen=True)
class Resolved:
    """An opened, checked source."""

    source: Source
    input: Volume
    target: Volume
    input_channel: int | None
    target_channel: int | None
    axes: tuple[int, ...]          # array positions of the non-channel axes
    names: str                     # their names
    footprint: tuple[int, ...]
    spatial: tuple[bool, ...]
    tile_unit: tuple[int, ...]
    square_voxels: bool            # lateral voxel sizes equal (input and target)


def resolve(item, index: int, patch_shape: tuple[int, ...]) -> Resolved:
    src = _as_source(item, index)
    so = src.storage_options
    inp = open_volume(src.input, storage_options=so)
    if src.target is None:
        if _channel_axis(inp) is None or inp.shape[_channel_axis(inp)] < 2:
            raise ConfigError(
                f"sources[{index}]: {inp.url} alone must hold input and target as two channels, but its axes "
                f"{inp.axis_names!r} have shape {inp.shape}; give a target image or a two-channel image"
            )
        tgt = inp
        ic, tc = src.input_channel, src.target_channel
        if ic is None and tc is None and inp.shape[_channel_axis(inp)] == 2:
            ic, tc = 0, 1
        ic = _pick_channel(inp, ic, "input_channel", index)
        tc = _pick_channel(inp, tc, "target_channel", index)
        if ic == tc:
            raise ConfigError(f"sources[{index}]: input_channel and target_channel are both {ic}; expected two different channels")
    else:
        tgt = open_volume(src.target, storage_options=so)
        ic = _pick_channel(inp, src.input_channel, "input_channel", index)
        tc = _pick_channel(tgt, src.target_channel, "target_channel", index)
    axes_in = [i for i in range(inp.ndim) if i != _channel_axis(inp)]
    axes_tg = [i for i in range(tgt.ndim) if i != _channel_axis(tgt)]
    names = "".join(inp.axes[i].name for i in axes_in)
    shape = tuple(inp.shape[i] for i in axes_in)
    if names != "".join(tgt.axes[i].name for i in axes_tg) or shape != tuple(tgt.shape[i] for i in axes_tg):
        raise InputError(
            f"sources[{index}]: input {inp.url} (axes {names!r}, shape {shape}) and target {tgt.url} (axes "
            f"{''.join(tgt.axes[i].name for i in axes_tg)!r}, shape {tuple(tgt.shape[i] for i in axes_tg)}) "
            "do not match; expected aligned images of the same shape"
        )
    spatial = tuple(inp.axes[i].type == "space" for i in axes_in)
    space = [k for k, s in enumerate(spatial) if s]
    if len(space) < len(patch_shape):
        raise ConfigError(
            f"patch_shape {patch_shape} has {len(patch_shape)} axes but sources[{index}] ({inp.url}) has only the "
            f"spatial axes {''.join(names[k] for k in space)!r}"
        )
    patch_axes = space[len(space) - len(patch_shape):]
    footprint = [1] * len(axes_in)
    for k, p in zip(patch_axes, patch_shape):
        if p > shape[k]:
            raise ConfigError(
                f"patch_shape {patch_shape} is larger than sources[{index}] ({inp.url}, axes {names!r}, shape "
                f"{shape}) along axis {names[k]!r}: {p} > {shape[k]}"
            )
        footprint[k] = p
    lateral = patch_axes[-2:] if len(patch_axes) >= 2 else patch_axes

    def scale(volume: Volume, k: int) -> float:  # voxel size along the k-th non-channel axis
        return volume.scale[[i for i in range(volume.ndim) if i != _channel_axis(volume)][k]]

    ref_size = patch_shape[-1] * scale(inp, patch_axes[-1])
    tile_unit = tuple(
        footprint[k] if k in patch_axes else
        (max(1, round(ref_size / scale(inp, k))) if spatial[k] and scale(inp, k) > 0 else 1)
        for k in range(len(axes_in))
    )
    square = len(lateral) == 2 and all(math.isclose(scale(v, lateral[0]), scale(v, lateral[1]), rel_tol=1e-3)
                                       for v in (inp, tgt))
    return Resolved(src, inp, tgt, ic, tc, tuple(axes_in), names, tuple(footprint), spatial, tile_unit, square)
