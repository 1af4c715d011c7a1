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
    "format_validation_error",
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
    """One or more blocks failed; the message lists which and why.

    Attributes
    ----------
    results : list
        The :class:`~bigcare.runs.results.RunResult` of every run of the call (failed blocks included).
    """

    def __init__(self, message: str, results: list | None = None):
        super().__init__(message)
        self.results = list(results or [])


def format_validation_error(err) -> str:
    """One line naming every bad key of a pydantic ``ValidationError`` (``a.b: message (got x)``)."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not allowed)"
        if e["type"] == "missing":
            parts.append(f"{loc}: required key missing")
        elif loc and isinstance(e.get("input"), dict):  # a cross-field rule of a section
            parts.append(f"{loc}: {msg}")
        elif loc:
            got = repr(e.get("input"))
            got = got if len(got) <= 80 else got[:77] + "..."
            parts.append(f"{loc}: {msg} (got {got})")
        else:
            parts.append(msg)
    return "; ".join(parts)
