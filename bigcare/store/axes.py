"""The axis table: NGFF axis types and the type each conventional axis name carries.

This is the one place that knows ``x``/``y``/``z`` are space, ``t`` is time and ``c`` is
channel; readers, writers, the TIFF converter and in-memory prediction all ask it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Axis", "AxisType", "AXIS_TYPES", "default_axis_type", "as_axes"]

#: An NGFF axis type.
AxisType = Literal["space", "time", "channel"]
AXIS_TYPES: tuple[str, ...] = ("space", "time", "channel")
_BY_NAME: dict[str, str] = {"x": "space", "y": "space", "z": "space", "t": "time", "c": "channel"}


def default_axis_type(name: str) -> str | None:
    """The NGFF type of a conventional axis name (``"z"`` -> ``"space"``), None if unknown."""
    return _BY_NAME.get(name.lower())


@dataclass(frozen=True)
class Axis:
    """One named axis of an image, as NGFF describes it.

    Attributes
    ----------
    name : str
        Lower-case axis name, e.g. ``"z"``.
    type : str or None
        ``"space"``, ``"time"``, ``"channel"`` or None when unknown.
    unit : str or None
        Physical unit of the axis, e.g. ``"micrometer"``; None when absent.
    """

    name: str
    type: str | None = None
    unit: str | None = None

    @property
    def kind(self) -> str | None:
        """The axis type, or the table's type for its name when the metadata gave none."""
        return self.type or default_axis_type(self.name)

    @classmethod
    def named(cls, name: str, unit: str | None = None) -> Axis:
        """An axis typed from its name by the table (``Axis.named("z", "micrometer")``)."""
        return cls(name.lower(), default_axis_type(name), None if default_axis_type(name) != "space" else unit)


def as_axes(axes: Sequence[Axis | str]) -> tuple[Axis, ...]:
    """Axes from :class:`Axis` objects or bare names (typed by the table, no unit).

    Raises
    ------
    ConfigError
        For an entry that is neither.
    """
    from bigcare.errors import ConfigError

    out = []
    for a in axes:
        if isinstance(a, str):
            a = Axis(a.lower(), default_axis_type(a))
        if not isinstance(a, Axis):
            raise ConfigError(f"axes: expected Axis objects or axis names, got {a!r}")
        out.append(a)
    return tuple(out)
