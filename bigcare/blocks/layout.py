"""How a volume's axes map onto a predictor's (batch..., channel, spatial...) order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bigcare.errors import ModelMismatchError

__all__ = ["AxisLayout"]


@dataclass(frozen=True)
class AxisLayout:
    """How the volume's axes map onto the predictor's (batch..., channel, spatial...) order.

    Attributes
    ----------
    in_axes : str
        The input volume's axis names, e.g. ``"tczyx"``.
    spatial : str
        The predictor's spatial axes, e.g. ``"zyx"``.
    n_channel_out : int
        Channels per output.
    drop : str
        Spatial axes the outputs lack (a projection model's ``"z"``); default none.
    """

    in_axes: str
    spatial: str
    n_channel_out: int
    drop: str = ""

    @classmethod
    def build(cls, in_axes: str, axis_types: list, spatial: str, n_in: int, n_out: int,
              shape: tuple, name: str, drop: str = "") -> AxisLayout:
        """Check that a volume fits a predictor and return the layout; raises ModelMismatchError."""
        vol_spatial = "".join(a for a, t in zip(in_axes, axis_types) if t == "space")
        if sorted(vol_spatial) != sorted(spatial):
            raise ModelMismatchError(
                f"the model is {len(spatial)}D with spatial axes {spatial.upper()!r}, but {name} has "
                f"spatial axes {vol_spatial.upper() or 'none'!r} (axes {in_axes.upper()!r}, shape {shape}); "
                f"use a {len(vol_spatial)}D model for this volume"
            )
        c = in_axes.find("c")
        have = shape[c] if c >= 0 else 1
        if have != n_in:
            raise ModelMismatchError(
                f"the model expects {n_in} input channel(s), {name} has {have} "
                f"(axes {in_axes.upper()!r}, shape {shape})"
            )
        return cls(in_axes, spatial, n_out, drop)

    @property
    def batch(self) -> str:
        return "".join(a for a in self.in_axes if a != "c" and a not in self.spatial)

    @property
    def core(self) -> str:
        """Axis order the predictor sees: batch axes, channel, spatial axes."""
        return self.batch + "c" + self.spatial

    @property
    def out_axes(self) -> str:
        kept = "".join(a for a in self.in_axes if a not in self.drop)
        if "c" in kept or self.n_channel_out == 1:
            return kept
        first_spatial = min(kept.index(a) for a in self.spatial if a not in self.drop)
        return kept[:first_spatial] + "c" + kept[first_spatial:]

    def out_shape(self, in_shape: tuple) -> tuple:
        sizes = dict(zip(self.in_axes, in_shape), c=self.n_channel_out)
        return tuple(sizes[a] for a in self.out_axes)

    def to_core(self, region: np.ndarray) -> np.ndarray:
        src = self.in_axes if "c" in self.in_axes else "c" + self.in_axes
        if "c" not in self.in_axes:
            region = region[None]
        return region.transpose([src.index(a) for a in self.core])

    def from_core(self, y: np.ndarray) -> np.ndarray:
        core = "".join(a for a in self.core if a not in self.drop)  # y lacks the dropped axes
        if "c" not in self.out_axes:
            y = y.squeeze(core.index("c"))
            core = core.replace("c", "")
        return y.transpose([core.index(a) for a in self.out_axes])

    def out_slices(self, region: tuple[tuple[int, int], ...]) -> tuple[slice, ...]:
        """Output-array slices of an input-space region (the channel axis is taken whole)."""
        by_axis = {a: slice(s, e) for a, (s, e) in zip(self.in_axes, region)}
        return tuple(slice(None) if a == "c" else by_axis[a] for a in self.out_axes)
