"""The base of every validated bigcare object: unknown keys are errors, every error is a ConfigError."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from bigcare.errors import ConfigError, format_validation_error

__all__ = ["Schema"]


if TYPE_CHECKING:  # the checker needs the class itself; at run time it is taken from BaseModel
    from pydantic._internal._model_construction import ModelMetaclass as _PydanticMeta
else:
    _PydanticMeta = type(BaseModel)


class _RaisingMeta(_PydanticMeta):
    """Direct construction (``Cls(...)``) turns pydantic's ValidationError into a ConfigError.

    Only the metaclass call is wrapped: nested models and ``model_validate`` are built by
    pydantic-core without it, so their errors keep pydantic's locations (``architecture.depth``).
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as err:
            raise ConfigError(f"{cls.__name__}: {format_validation_error(err)}") from None


class Schema(BaseModel, metaclass=_RaisingMeta, extra="forbid"):
    """A pydantic model whose constructor raises :class:`~bigcare.errors.ConfigError`.

    ``UNetConfig(depth=9)`` from Python fails with the same one-line message (``depth: Input should
    be less than or equal to 6 (got 9)``) that the same value gets from a YAML file or a model's
    ``config.json``. ``model_validate`` keeps pydantic's ``ValidationError`` so the readers of
    files can name the file in their own error.
    """
