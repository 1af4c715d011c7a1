"""bigcare's exceptions: one small hierarchy so callers can catch bigcare's errors.

Every error names the problem (path, axis, shape, dtype, model mismatch), the bad value and
what was expected. Errors raised before compute starts guarantee nothing was written.
"""

from __future__ import annotations

__all__ = [
    "BigcareError",
    "InputError",
    "ModelError",
    "ModelMismatchError",
    "OutputError",
    "ConfigError",
    "BlockError",
]


class BigcareError(Exception):
    """Base class of every error bigcare raises on purpose."""


class InputError(BigcareError, ValueError):
    """The input volume is missing, unreadable, or unusable (e.g. all NaN)."""


class ModelError(BigcareError, ValueError):
    """A model folder is missing, corrupt, or its config is invalid."""


class ModelMismatchError(ModelError):
    """The model does not fit the input (axes, dimensionality, channels)."""


class OutputError(BigcareError, ValueError):
    """The output location cannot be used (exists and is not ours, layout mismatch)."""


class ConfigError(BigcareError, ValueError):
    """A configuration value is invalid (unknown key, wrong type, out of range)."""


class BlockError(BigcareError, RuntimeError):
    """One or more blocks failed; the message lists which and why."""
