"""Per-pixel losses for CARE training, optionally over a mask (self-supervised training).

``laplace`` is the probabilistic CARE loss (CARE Fig. 5, CSBDeep's ``loss_laplace``): the network
predicts a Laplace distribution per voxel, mean ``mu`` (its first head) and scale ``b`` (its
``scale`` head), and the loss is the negative log-likelihood of the target under it.

Training can change the mean's gradient, not the loss's value or minimisers (``beta``): the
plain NLL divides the mean's gradient by ``b``, so the voxels the network is already sure of (a
dark, noise-free background) pull hardest and the bright structures, where the errors are,
least; the mean then ends worse than a plain MAE CARE (measured +12.6% NRMSE, issue 12). With
``beta = 1`` the mean's gradient is ``sign(mu - y)``, exactly the MAE's; the scale's is always the
NLL's, ``(1 - |y - mu| / b) / b``. (Seitzer et al., ICLR 2022, beta-NLL, weight both terms by
``b ** beta`` for the same reason; here only the mean's gradient changes, the scale's is the NLL's.)
"""

from __future__ import annotations

import math

import torch

from bigcare.errors import ConfigError

__all__ = ["LOSSES", "PROBABILISTIC", "get_loss", "laplace"]


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


def laplace(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, *,
            scale: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """Laplace negative log-likelihood ``|y - mu| / b + log(b) + log 2``, over ``mask`` when given.

    ``pred`` is the mean ``mu``, ``scale`` the scale ``b > 0`` (the network's softplus head plus
    CSBDeep's floor 1e-3, so the log and the division stay finite). Minimised over ``b`` at
    ``b = |y - mu|``: the scale learns the expected absolute error, and the mean the median.
    ``beta`` changes only the mean's gradient, to ``sign(mu - y) * b ** (beta - 1)`` (see the
    module docstring): 0 (the default) is the plain NLL's, 1 the MAE's. The value is the NLL's
    whatever ``beta`` says, as are the scale's gradient and the minimisers.
    """
    error = (pred - target).abs()
    if not beta:
        return _mean(error / scale + torch.log(scale) + math.log(2.0), mask)
    mean_term = error * scale.detach() ** (beta - 1.0)  # the mean's gradient, no value
    nll = error.detach() / scale + torch.log(scale) + math.log(2.0) + mean_term - mean_term.detach()
    return _mean(nll, mask)


LOSSES = {"mae": mae, "mse": mse, "laplace": laplace}

#: losses that also need the network's ``scale`` head (passed as ``scale=``)
PROBABILISTIC = frozenset({"laplace"})


def get_loss(name: str):
    """The loss function called ``name`` ("mae", "mse" or "laplace"): ``loss(pred, target, mask=None)``
    (``laplace`` also takes ``scale=``, see :data:`PROBABILISTIC`)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(f"loss must be one of {sorted(LOSSES)}, got {name!r}") from None
