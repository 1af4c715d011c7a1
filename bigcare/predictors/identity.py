"""The identity predictor: output = input, no halo. Checks a cluster and its storage end to
end (and measures the engine's own overhead) without a network."""

from __future__ import annotations

import numpy as np

from bigcare.normalization import Normalizer

__all__ = ["IdentityPredictor"]


class IdentityPredictor:
    """A :class:`~bigcare.predictors.Predictor` that returns its input (as float32).

    Pass an instance as ``model`` to :func:`bigcare.restore`; it travels to the workers with
    the run spec (it holds no weights).
    """

    outputs = ("restored",)
    pmin, pmax = 1.0, 99.8
    fingerprint = "identity-v1"
    zoom = None
    factor = None

    def __init__(self, spatial_axes: str = "zyx", channels: int = 1):
        self.spatial_axes = spatial_axes.lower()
        self.n_channel_in = self.n_channel_out = channels
        self.halo = (0,) * len(self.spatial_axes)
        self.align = (1,) * len(self.spatial_axes)

    def predict(self, x: np.ndarray, normalizer: Normalizer) -> dict[str, np.ndarray]:
        return {"restored": x.astype(np.float32, copy=False)}
