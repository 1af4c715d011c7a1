"""Surface projection CARE's architecture and receptive field: pure data and arithmetic, no torch.

A projection model (CARE Fig. 2; CSBDeep's ``ProjectionCARE``) has two sub-networks trained
jointly::

    stack x (C, Z, Y, X) ──► projection net (3D, pools Y and X only) ──► logits (1, Z, Y, X)
        ──► softmax along Z = weights w (sum 1 over Z per pixel)
        ──► p = sum_z w * x  (C, Y, X)  ──► 2D CARE U-Net (UNetConfig, ndim 2) ──► heads (C_out, Y, X)

The projection net is CSBDeep's: ``depth`` levels of ``n_conv_per_depth`` convs of
``n_filter_base`` filters (no skip connections), max pooling by ``pool`` along Y and X only, a
middle block, nearest upsampling back with the same convs, and a last conv to one channel. Z is
never pooled, so a stack of any depth passes whole (no Z padding). Its lateral receptive field
(:func:`projection_extents`) is derived like the U-Net's
(:func:`bigcare.models.architecture.receptive_extents`); the whole model's lateral halo is the sum
of both radii, rounded up to the alignment (the lcm of both pooling divisors):
:func:`projection_halo`.
"""

from __future__ import annotations

import math

from pydantic import Field, field_validator

from bigcare.models.architecture import UNetConfig, divisor, receptive_radius
from bigcare.schema import Schema

__all__ = ["ProjectionNetConfig", "projection_extents", "projection_align", "projection_halo"]


class ProjectionNetConfig(Schema):
    """The 3D -> 2D projection sub-network (CSBDeep's ``proj_*`` parameters and defaults)."""

    depth: int = Field(4, ge=0, le=6, description="Lateral pooling levels (CSBDeep proj_n_depth).")
    n_filter_base: int = Field(8, ge=1, le=256, description="Filters of every conv (CSBDeep proj_n_filt).")
    n_conv_per_depth: int = Field(1, ge=1, le=4, description="Convs per level (CSBDeep proj_n_conv_per_depth).")
    kernel_size: int = Field(3, ge=1, le=9, description="Conv size along Z, Y and X (odd; CSBDeep proj_kern).")
    pool: int = Field(2, ge=2, le=4, description="Lateral max-pooling factor per level (Z is not pooled).")

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {v}")
        return v


def projection_extents(config: ProjectionNetConfig) -> list[tuple[int, int]]:
    """Exact lateral input extent (left, right) of one projection-weight pixel, per pooling phase.

    Pixel ``o`` with ``o % pool**depth == phase`` of the weights depends on input columns
    ``o - left .. o + right`` (every plane). Derivation as in
    :func:`bigcare.models.architecture.receptive_extents`, without skip connections.
    """
    r = (config.kernel_size - 1) // 2
    w, p, depth = config.n_conv_per_depth * r, config.pool, config.depth

    def level_input(level: int, a: int, b: int) -> tuple[int, int]:
        if level == depth:  # the middle convs
            return a - w, b + w
        a, b = a - w, b + w  # up convs of this level
        c, d = level_input(level + 1, a // p, b // p)  # nearest upsampling from the level below
        return c * p - w, d * p + p - 1 + w  # max pooling, then the down convs
    extents = []
    for phase in range(p**depth):
        lo, hi = level_input(0, phase - r, phase + r)  # the last conv first
        extents.append((phase - lo, hi - phase))
    return extents


def projection_align(projection: ProjectionNetConfig, care: UNetConfig) -> int:
    """Lateral sizes and block starts are multiples of this: lcm of both pooling divisors."""
    return math.lcm(projection.pool**projection.depth, divisor(care))


def projection_halo(projection: ProjectionNetConfig, care: UNetConfig) -> int:
    """Lateral halo of the whole model: both receptive radii, rounded up to :func:`projection_align`.

    A 2D output pixel depends on projected pixels within the CARE net's radius, each of which
    depends on input columns within the projection net's radius, so the sum bounds it exactly.
    """
    radius = max(max(e) for e in projection_extents(projection)) + receptive_radius(care)
    a = projection_align(projection, care)
    return math.ceil(radius / a) * a
