"""Training sources: which images, which channels, and how a patch sits in them.

A :class:`Source` names an (input, target) pair of aligned OME-Zarr images, or one image whose
channels hold both; it is the one schema of a source, for the YAML config and for Python.
:func:`resolve` opens it (metadata only), checks it against the patch shape and returns what
the sampler needs:

- the non-channel axes and the patch *footprint* along them: ``patch_shape`` sits on the last
  ``len(patch_shape)`` spatial axes; every other axis (Z for 2D patches, time) has extent 1;
- the *zone unit* that sizes the train/validation zones: one patch length along patch axes,
  the same physical length along other spatial axes, one time point;
- whether the lateral (Y, X) voxels are square, which 90-degree rotations need.

Percentiles of a source's images come from :func:`bigcare.normalization.percentile_table`, the
sampler restoration uses too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from bigcare.errors import ConfigError, InputError
from bigcare.schema import Schema

if TYPE_CHECKING:
    from bigcare.store.volume import Volume

__all__ = ["Source", "resolve"]


class _PathsFirst(type(Schema)):  # type: ignore[misc]  # Schema's metaclass, extended
    """``Source(input, target, **fields)``: the two paths may be given positionally.

    On the constructor only (not an ``__init__``: pydantic would then build nested sources
    through it and lose their error locations).
    """

    def __call__(cls, *paths, **fields):
        if len(paths) > 2:
            raise TypeError(f"{cls.__name__} takes at most 2 positional arguments (input, target), got {len(paths)}")
        for name, value in zip(("input", "target"), paths):
            if name in fields:
                raise TypeError(f"{cls.__name__} got {name!r} both positionally and as a keyword")
            fields[name] = value
        return super().__call__(**fields)


class Source(Schema, frozen=True, metaclass=_PathsFirst):
    """One training source: a pair of aligned OME-Zarr images, or one image with input and target channels.

    The one schema of a source, for YAML (``data.sources``) and Python (:class:`PatchSampler`)
    alike. Besides its fields, a source validates from an image path (one image holding input
    and target as two channels) or an ``(input, target)`` pair of paths. ``Source(input, target,
    **fields)`` takes the two paths positionally too. A bad value raises one
    :class:`~bigcare.errors.ConfigError` naming the field (``Source: input_channel: ...``;
    ``sources.0.input_channel: ...`` from the sampler, ``data.sources.0.input_channel: ...``
    from a config).

    Attributes
    ----------
    input : str
        OME-Zarr image path or fsspec URL of the low-SNR input.
    target : str or None
        Image of the high-SNR target, aligned voxel for voxel with ``input``. None: ``input``
        holds both, as channels ``input_channel`` and ``target_channel`` (default 0 and 1 when
        it has exactly two).
    input_channel, target_channel : int or None
        Channel (>= 0) to read from an image with a channel axis; may be left out when that
        image has a single channel.
    storage_options : dict or None
        fsspec options for both images (credentials, endpoint); never dumped, shown or recorded
        in provenance.
    """

    input: str = Field(description="OME-Zarr image (path or fsspec URL) with the low-SNR input.")
    target: str | None = Field(None, description="OME-Zarr image with the high-SNR target; "
                               "omit when the input image holds both as channels.")
    input_channel: int | None = Field(None, ge=0, description="Channel of the input in a multi-channel image.")
    target_channel: int | None = Field(None, ge=0, description="Channel of the target in a multi-channel image.")
    storage_options: dict[str, Any] | None = Field(None, exclude=True, repr=False,
                                                   description="fsspec options (e.g. S3 endpoint, credentials); "
                                                   "never recorded.")

    @model_validator(mode="before")
    @classmethod
    def _from_path_or_pair(cls, value):
        if isinstance(value, (cls, Mapping)):
            return value
        if isinstance(value, (str, os.PathLike)):
            return {"input": value}
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return {"input": value[0], "target": value[1]}
        raise ValueError("expected a Source, an image path (two channels), an (input, target) pair of "
                         "paths or a mapping of Source fields")

    @field_validator("input", "target", mode="before")
    @classmethod
    def _path(cls, value):
        return os.fspath(value) if isinstance(value, os.PathLike) else value


def _pick_channel(volume: Volume, channel, what: str, index: int) -> int | None:
    ca = volume.channel_axis
    if ca is None:
        if channel not in (None, 0):
            raise ConfigError(
                f"sources.{index}.{what}={channel!r}: {volume.url} has no channel axis (axes {volume.axis_names!r})"
            )
        return None
    size = volume.shape[ca]
    if channel is None:
        if size == 1:
            return 0
        raise ConfigError(f"sources.{index}.{what}: {volume.url} has {size} channels; name the one to use (0..{size - 1})")
    if not isinstance(channel, (int, np.integer)) or isinstance(channel, bool) or not 0 <= channel < size:
        raise ConfigError(
            f"sources.{index}.{what}={channel!r} is out of range: {volume.url} has {size} channel(s), expected 0..{size - 1}"
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
    zone_unit: tuple[int, ...]
    square_voxels: bool            # lateral voxel sizes equal (input and target)


def resolve(src: Source, index: int, patch_shape: tuple[int, ...]) -> Resolved:
    """Open source number ``index`` (metadata only) and check it against ``patch_shape``.

    Raises
    ------
    ConfigError
        A channel out of range or missing, a patch larger than the image or with more axes.
    InputError
        An image is missing or unreadable, or input and target are not aligned.
    """
    from bigcare.store.volume import check_finished, open_volume  # zarr: imported when a source is opened

    so = src.storage_options
    inp = open_volume(src.input, storage_options=so)
    check_finished(inp)
    if src.target is None:
        ca = inp.channel_axis
        if ca is None or inp.shape[ca] < 2:
            raise ConfigError(
                f"sources.{index}: {inp.url} alone must hold input and target as two channels, but its axes "
                f"{inp.axis_names!r} have shape {inp.shape}; give a target image or a two-channel image"
            )
        tgt = inp
        ic, tc = src.input_channel, src.target_channel
        if ic is None and tc is None and inp.shape[ca] == 2:
            ic, tc = 0, 1
        ic = _pick_channel(inp, ic, "input_channel", index)
        tc = _pick_channel(inp, tc, "target_channel", index)
        if ic == tc:
            raise ConfigError(f"sources.{index}: input_channel and target_channel are both {ic}; expected two different channels")
    else:
        tgt = open_volume(src.target, storage_options=so)
        check_finished(tgt)
        ic = _pick_channel(inp, src.input_channel, "input_channel", index)
        tc = _pick_channel(tgt, src.target_channel, "target_channel", index)
    axes_in = [i for i in range(inp.ndim) if i != inp.channel_axis]
    axes_tg = [i for i in range(tgt.ndim) if i != tgt.channel_axis]
    names = "".join(inp.axes[i].name for i in axes_in)
    shape = tuple(inp.shape[i] for i in axes_in)
    if names != "".join(tgt.axes[i].name for i in axes_tg) or shape != tuple(tgt.shape[i] for i in axes_tg):
        raise InputError(
            f"sources.{index}: input {inp.url} (axes {names!r}, shape {shape}) and target {tgt.url} (axes "
            f"{''.join(tgt.axes[i].name for i in axes_tg)!r}, shape {tuple(tgt.shape[i] for i in axes_tg)}) "
            "do not match; expected aligned images of the same shape"
        )
    spatial = tuple(inp.axes[i].kind == "space" for i in axes_in)
    space = [k for k, s in enumerate(spatial) if s]
    if len(space) < len(patch_shape):
        raise ConfigError(
            f"patch_shape {patch_shape} has {len(patch_shape)} axes but sources.{index} ({inp.url}) has only the "
            f"spatial axes {''.join(names[k] for k in space)!r}"
        )
    patch_axes = space[len(space) - len(patch_shape):]
    footprint = [1] * len(axes_in)
    for k, p in zip(patch_axes, patch_shape):
        if p > shape[k]:
            raise ConfigError(
                f"patch_shape {patch_shape} is larger than sources.{index} ({inp.url}, axes {names!r}, shape "
                f"{shape}) along axis {names[k]!r}: {p} > {shape[k]}"
            )
        footprint[k] = p
    lateral = patch_axes[-2:] if len(patch_axes) >= 2 else patch_axes

    def scale(volume: Volume, k: int) -> float:  # voxel size along the k-th non-channel axis
        return volume.scale[[i for i in range(volume.ndim) if i != volume.channel_axis][k]]

    ref_size = patch_shape[-1] * scale(inp, patch_axes[-1])
    zone_unit = tuple(
        footprint[k] if k in patch_axes else
        (max(1, round(ref_size / scale(inp, k))) if spatial[k] and scale(inp, k) > 0 else 1)
        for k in range(len(axes_in))
    )
    square = len(lateral) == 2 and all(math.isclose(scale(v, lateral[0]), scale(v, lateral[1]), rel_tol=1e-3)
                                       for v in (inp, tgt))
    return Resolved(src, inp, tgt, ic, tc, tuple(axes_in), names, tuple(footprint), spatial, zone_unit, square)
