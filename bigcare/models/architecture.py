"""The CARE U-Net's architecture and its receptive field: pure data and arithmetic, no torch.

:class:`UNetConfig` is the one schema of the network: the model folder's ``config.json``, the
training YAML's ``network:`` section and :class:`bigcare.models.unet.UNet` all use it. The
receptive field (:func:`receptive_extents`) is derived analytically from the layers
:mod:`bigcare.models.unet` builds, so block-wise prediction with a :func:`halo` equals
whole-volume prediction.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import pydantic
from pydantic import Field

from bigcare.schema import Schema

__all__ = ["Head", "UNetConfig", "divisor", "receptive_extents", "receptive_radius", "halo"]

_HEAD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Head(Schema):
    """One output of the network: a 1x1 convolution followed by an activation."""

    name: str = Field(description="Identifier of the output, e.g. 'restored', 'mean', 'scale'.")
    activation: Literal["linear", "softplus", "softplus_eps", "sigmoid", "relu"] = Field(
        "linear", description="Activation applied after the head's 1x1 convolution; 'softplus_eps' is "
        "softplus + 1e-3, CSBDeep's probabilistic scale (its eps_scale keeps the scale above 0)."
    )

    @pydantic.field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _HEAD_NAME.match(v):
            raise ValueError(
                f"head name {v!r} must be an identifier (letters, digits, '_', not starting "
                "with a digit)"
            )
        return v


class UNetConfig(Schema):
    """Architecture of a CARE U-Net; the single source of truth for building and loading it."""

    ndim: Literal[2, 3] = Field(description="Number of spatial dimensions (2 or 3).")
    depth: int = Field(2, ge=1, le=6, description="Number of pooling levels of the U-Net.")
    n_filter_base: int = Field(
        32, ge=1, le=1024, description="Filters of the first level; doubled at each level down."
    )
    kernel_size: int | None = Field(
        None,
        ge=1,
        le=15,
        description="Convolution kernel size (odd), the same along every spatial axis. "
        "Default: 3 for 3D, 5 for 2D (CSBDeep's defaults).",
    )
    n_conv_per_depth: int = Field(2, ge=1, le=8, description="Convolutions per level and block.")
    pool: int = Field(2, ge=2, le=4, description="Max-pooling / upsampling factor per level.")
    pooling: Literal["max", "maxblur", "avg"] = Field(
        "max",
        description="Downsampling: 'max' pooling (CARE), 'maxblur' (N2V2: a stride-1 max over "
        "2 voxels, then a [1, 2, 1] blur with stride 2, against checkerboard artefacts; pool 2 only), "
        "or 'avg' pooling (the GAN generator of Wang et al. 2019).",
    )
    activation: Literal["relu", "leaky_relu"] = Field(
        "relu", description="Activation after every convolution: ReLU (CARE) or LeakyReLU with slope 0.1 "
        "(the GAN generator of Wang et al. 2019).")
    block_residual: bool = Field(
        False, description="Each down block adds its input, zero-padded to the block's channels, to its "
        "output (the residual blocks of Wang et al. 2019's generator); the receptive field is unchanged.")
    top_skip: bool = Field(
        True,
        description="Skip connection at full resolution; N2V2 drops it (false), so the output cannot "
        "copy the input's pixel pattern.",
    )
    n_channel_in: int = Field(1, ge=1, le=64, description="Input channels.")
    n_channel_out: int = Field(1, ge=1, le=64, description="Output channels of every head.")
    residual: bool = Field(
        True,
        description="Add the input to the first head (before its activation); needs "
        "n_channel_in == n_channel_out.",
    )
    heads: list[Head] = Field(
        default_factory=lambda: [Head(name="restored")],
        min_length=1,
        description="Outputs of the network (unique names); the residual goes to the first.",
    )

    @pydantic.model_validator(mode="after")
    def _check(self) -> UNetConfig:
        if self.kernel_size is None:
            self.kernel_size = 3 if self.ndim == 3 else 5
        if self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        if self.residual and self.n_channel_in != self.n_channel_out:
            raise ValueError(
                f"residual=True needs n_channel_in == n_channel_out, got n_channel_in="
                f"{self.n_channel_in}, n_channel_out={self.n_channel_out}"
            )
        if self.pooling == "maxblur" and self.pool != 2:
            raise ValueError(f"pooling 'maxblur' downsamples by 2: it needs pool 2, got pool {self.pool}")
        names = [h.name for h in self.heads]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"head names must be unique, got duplicates {dupes} in {names}")
        return self

    @property
    def kernel(self) -> int:
        """The convolution size in use (``kernel_size``, resolved to its default at validation)."""
        return self.kernel_size if self.kernel_size is not None else (3 if self.ndim == 3 else 5)


def divisor(config: UNetConfig) -> int:
    """Number every spatial size must be divisible by: ``pool ** depth``.

    Parameters
    ----------
    config : UNetConfig
        The architecture.

    Returns
    -------
    int
        ``config.pool ** config.depth``.
    """
    return config.pool**config.depth


def receptive_extents(config: UNetConfig) -> list[tuple[int, int]]:
    """Exact input extent (left, right) influencing one output voxel, per pooling-grid phase.

    Along one axis, output position ``o`` with ``o % divisor(config) == phase`` depends on input
    positions ``o - left .. o + right`` (and on no others), for every set of weights; for generic
    weights every position of that range does influence it. Spatial axes are independent, so the
    same numbers hold along each axis.

    Derivation: a 'same' conv of radius ``r = (kernel_size - 1) // 2`` widens an interval by
    ``r`` on each side; max pooling maps level-``l+1`` position ``m`` to level-``l`` positions
    ``m*pool .. m*pool + pool - 1``; max-blur pooling (a stride-1 max over positions ``i, i+1``,
    then a width-3 blur with stride 2) to ``2m - 1 .. 2m + 2``; nearest upsampling maps level-``l``
    position ``x`` to level-``l+1`` position ``x // pool``; a concatenation takes the union of both
    branches (without ``top_skip``, level 0's has only the deep branch).

    Parameters
    ----------
    config : UNetConfig
        The architecture.

    Returns
    -------
    list of (int, int)
        ``extents[phase] = (left, right)`` for ``phase`` in ``range(divisor(config))``.
    """
    n, p, depth = config.n_conv_per_depth, config.pool, config.depth
    r = (config.kernel - 1) // 2
    w = n * r  # widening of n convs
    # level-l positions one level-(l+1) position m pools: m*p + first .. m*p + last
    first, last = (-1, 2) if config.pooling == "maxblur" else (0, p - 1)

    def level_input(level: int, a: int, b: int) -> tuple[int, int]:
        # level-`level` input positions that level-`level` block outputs a..b depend on
        if level == depth:  # bottom: (n - 1) + 1 convs
            return a - w, b + w
        a, b = a - w, b + w  # up convs, back to the concatenation
        c, d = level_input(level + 1, a // p, b // p)  # deep branch: upsampling
        lo, hi = c * p + first - w, d * p + last + w  # ... pooling, then down convs
        if level > 0 or config.top_skip:  # skip branch: down convs
            lo, hi = min(lo, a - w), max(hi, b + w)
        return lo, hi

    extents = []
    for phase in range(divisor(config)):
        lo, hi = level_input(0, phase, phase)
        extents.append((phase - lo, hi - phase))
    return extents


def receptive_radius(config: UNetConfig) -> int:
    """Largest number of input voxels, on either side, that can influence one output voxel.

    The maximum of :func:`receptive_extents` over pooling-grid phases and both sides.

    Parameters
    ----------
    config : UNetConfig
        The architecture.

    Returns
    -------
    int
        The receptive radius in input voxels (the same along every spatial axis).
    """
    return max(max(e) for e in receptive_extents(config))


def halo(config: UNetConfig) -> int:
    """Halo for block-wise prediction: :func:`receptive_radius` rounded up to :func:`divisor`.

    A block read with this halo on each side, with its start a multiple of :func:`divisor`
    (so the pooling grid is the whole volume's), gives exactly the whole-volume result on the
    block's write region.

    Parameters
    ----------
    config : UNetConfig
        The architecture.

    Returns
    -------
    int
        The halo in voxels, a multiple of ``divisor(config)``.
    """
    d = divisor(config)
    return math.ceil(receptive_radius(config) / d) * d
