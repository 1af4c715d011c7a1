"""Per-pixel losses for CARE training."""

from __future__ import annotations

import torch

from bigcare.errors import ConfigError

__all__ = ["LOSSES", "get_loss"]


def mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error (CARE's default)."""
    return (pred - target).abs().mean()


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error."""
    return ((pred - target) ** 2).mean()


LOSSES = {"mae": mae, "mse": mse}


def get_loss(name: str):
    """The loss function called ``name`` ("mae" or "mse")."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(f"loss must be one of {sorted(LOSSES)}, got {name!r}") from None
