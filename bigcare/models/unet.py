"""CARE U-Net (CSBDeep's ``unet_block`` + ``common_unet``) in PyTorch, and its receptive field.

The network, for ``depth=2`` (``F = n_filter_base``, ``n = n_conv_per_depth``; each ``up``
feeds the ``cat`` one level above, the skip connection feeds it from the left)::

    level 0  x - n conv F ------------------------------> cat - (n-1) conv F, conv F - heads
                  |                                         ^
    level 1       pool - n conv 2F ----> cat - (n-1) conv 2F, conv F - up
                          |               ^
    level 2               pool - (n-1) conv 4F, conv 2F - up

Every conv is ``kernel_size`` wide with 'same' zero padding and ReLU; pooling is max pooling by
``pool``; upsampling is nearest-neighbour by ``pool``. Each head is a 1x1 conv to
``n_channel_out`` channels; with ``residual`` the input is added to the first head's linear
output before its activation (as in CSBDeep's ``custom_unet``).

The receptive field is derived analytically from these layers (:func:`receptive_extents`) so
that block-wise prediction with a :func:`halo` equals whole-volume prediction.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import pydantic
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from bigcare.errors import ModelMismatchError

__all__ = [
    "Head",
    "UNetConfig",
    "UNet",
    "divisor",
    "receptive_extents",
    "receptive_radius",
    "halo",
]

_HEAD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Head(pydantic.BaseModel, extra="forbid"):
    """One output of the network: a 1x1 convolution followed by an activation."""

    name: str = Field(description="Identifier of the output, e.g. 'restored', 'mean', 'scale'.")
    activation: Literal["linear", "softplus", "sigmoid", "relu"] = Field(
        "linear", description="Activation applied after the head's 1x1 convolution."
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


class UNetConfig(pydantic.BaseModel, extra="forbid"):
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
        names = [h.name for h in self.heads]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"head names must be unique, got duplicates {dupes} in {names}")
        return self


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
    ``m*pool .. m*pool + pool - 1``; nearest upsampling maps level-``l`` position ``x`` to
    level-``l+1`` position ``x // pool``; a concatenation takes the union of both branches.

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
    r = (config.kernel_size - 1) // 2
    w = n * r  # widening of n convs

    def level_input(level: int, a: int, b: int) -> tuple[int, int]:
        # level-`level` input positions that level-`level` block outputs a..b depend on
        if level == depth:  # bottom: (n - 1) + 1 convs
            return a - w, b + w
        a, b = a - w, b + w  # up convs, back to the concatenation
        lo, hi = a - w, b + w  # skip branch: down convs
        c, d = level_input(level + 1, a // p, b // p)  # deep branch: upsampling
        lo = min(lo, c * p - w)  # ... pooling, then down convs
        hi = max(hi, d * p + p - 1 + w)
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


_ACTIVATIONS = {
    "linear": lambda t: t,
    "softplus": F.softplus,
    "sigmoid": torch.sigmoid,
    "relu": F.relu,
}


def _convs(ndim: int, channels: list[int], kernel_size: int) -> torch.nn.Sequential:
    conv = torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d
    layers: list[torch.nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        # in-place ReLU: one full-resolution tensor less alive per layer (no parameters change)
        layers += [conv(c_in, c_out, kernel_size, padding=kernel_size // 2), torch.nn.ReLU(inplace=True)]
    return torch.nn.Sequential(*layers)


class UNet(torch.nn.Module):
    """CARE U-Net with one or more heads.

    Parameters
    ----------
    config : UNetConfig
        The architecture.

    Notes
    -----
    Filter counts follow CSBDeep's ``unet_block`` exactly: level ``l`` down convs have
    ``F * 2**l`` filters; the bottom has ``n - 1`` convs of ``F * 2**depth`` then one of
    ``F * 2**(depth - 1)``; level ``l`` up convs have ``n - 1`` convs of ``F * 2**l`` then one of
    ``F * 2**max(0, l - 1)``.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        nf, n, k = c.n_filter_base, c.n_conv_per_depth, c.kernel_size
        self.down = torch.nn.ModuleList()
        ch = c.n_channel_in
        for level in range(c.depth):
            self.down.append(_convs(c.ndim, [ch] + [nf * 2**level] * n, k))
            ch = nf * 2**level
        self.middle = _convs(
            c.ndim, [ch] + [nf * 2**c.depth] * (n - 1) + [nf * 2 ** max(0, c.depth - 1)], k
        )
        ch = nf * 2 ** max(0, c.depth - 1)
        up = []
        for level in reversed(range(c.depth)):
            ch_in = ch + nf * 2**level  # upsampled + skip
            ch = nf * 2 ** max(0, level - 1)
            up.append(_convs(c.ndim, [ch_in] + [nf * 2**level] * (n - 1) + [ch], k))
        self.up = torch.nn.ModuleList(reversed(up))  # self.up[level]
        conv = torch.nn.Conv2d if c.ndim == 2 else torch.nn.Conv3d
        self.heads = torch.nn.ModuleDict({h.name: conv(ch, c.n_channel_out, 1) for h in c.heads})
        self._pool = F.max_pool2d if c.ndim == 2 else F.max_pool3d

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Run the network.

        Parameters
        ----------
        x : Tensor
            ``(N, n_channel_in, *spatial)`` with every spatial size divisible by
            :func:`divisor`.

        Returns
        -------
        dict of str to Tensor
            ``{head.name: (N, n_channel_out, *spatial)}`` in the order of ``config.heads``.

        Raises
        ------
        ModelMismatchError
            If ``x`` has the wrong number of dimensions or channels, or a spatial size not
            divisible by :func:`divisor`.
        """
        c = self.config
        if x.ndim != c.ndim + 2:
            raise ModelMismatchError(
                f"UNet input must have shape (N, C, {', '.join('ZYX'[3 - c.ndim:])}) "
                f"({c.ndim + 2} dimensions) for a {c.ndim}D network, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != c.n_channel_in:
            raise ModelMismatchError(
                f"UNet input has {x.shape[1]} channel(s) (shape {tuple(x.shape)}), the network "
                f"expects n_channel_in={c.n_channel_in}"
            )
        d = divisor(c)
        if any(s % d for s in x.shape[2:]):
            raise ModelMismatchError(
                f"UNet input spatial shape {tuple(x.shape[2:])} must be divisible by "
                f"pool**depth = {c.pool}**{c.depth} = {d} along every axis"
            )
        skips = []
        h = x
        for level in range(c.depth):
            h = self.down[level](h)
            skips.append(h)
            h = self._pool(h, c.pool)
        h = self.middle(h)
        for level in reversed(range(c.depth)):
            # the skip leaves the list and the upsampled tensor is not kept: only the
            # concatenation is alive while the level's convolutions run (peak memory)
            h = torch.cat([F.interpolate(h, scale_factor=c.pool, mode="nearest"), skips.pop()], dim=1)
            h = self.up[level](h)
        out = {}
        for i, head in enumerate(c.heads):
            y = self.heads[head.name](h)
            if i == 0 and c.residual:
                y = y + x
            out[head.name] = _ACTIVATIONS[head.activation](y)
        return out
