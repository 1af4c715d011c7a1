"""Per-pixel losses for CARE training, optionally over a mask (self-supervised training)."""

from __future__ import annotations

import torch

from bigcare.errors import ConfigError

__all__ = ["LOSSES", "get_loss"]


def _mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    # Noise2Void: only the hidden voxels carry a loss; the others must not pull on the weights
    return (values * mask).sum() / mask.sum().clamp_min(1)


def mae(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error (CARE's default), over the voxels where ``mask`` is 1 when given."""
    return _mean((pred - target).abs(), mask)


def mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error (Noise2Void's: its minimiser is the mean of the noisy values, the
    clean signal for zero-mean noise), over the voxels where ``mask`` is 1 when given."""
    return _mean((pred - target) ** 2, mask)


LOSSES = {"mae": mae, "mse": mse}


def get_loss(name: str):
    """The loss function called ``name`` ("mae" or "mse"): ``loss(pred, target, mask=None)``."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(f"loss must be one of {sorted(LOSSES)}, got {name!r}") from None
