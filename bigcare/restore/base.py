"""The predictor protocol and the per-process predictor cache."""

from __future__ import annotations

import threading
from typing import Protocol

import numpy as np

from ..normalize import Normalizer

__all__ = ["Predictor", "load_predictor", "build_predictor"]


class Predictor(Protocol):
    """What the block runner needs from a restoration method.

    Attributes
    ----------
    spatial_axes : str
        Lower-case spatial axes the predictor works on, e.g. ``"zyx"``.
    outputs : tuple of str
        Names of the outputs, in order; the first is the primary image.
    n_channel_in, n_channel_out : int
        Channels expected on input and produced per output.
    halo, align : tuple of int
        Context and grid alignment per spatial axis (see :mod:`bigcare.blocks`), in the grid
        the predictor sees.
    zoom : tuple of float, optional
        Output voxels per input voxel per spatial axis, for methods that change the grid
        (isotropic restoration: ``(factor, 1, 1)``). The engine upsamples the input by it
        (:mod:`bigcare.resample`) before :meth:`predict`. Absent means the same grid.
    pmin, pmax : float
        Normalisation percentiles the model was trained with.
    """

    spatial_axes: str
    outputs: tuple[str, ...]
    n_channel_in: int
    n_channel_out: int
    halo: tuple[int, ...]
    align: tuple[int, ...]
    pmin: float
    pmax: float

    def predict(self, x: np.ndarray, normalizer: Normalizer) -> dict[str, np.ndarray]:
        """Restore one region ``x`` (C, *spatial) given in raw intensities."""
        ...


def build_predictor(model, config, *, device: str = "cpu", precision: str = "fp32") -> Predictor:
    """The predictor of a loaded network, chosen by its config's ``kind``."""
    from .care import CAREPredictor

    net = CAREPredictor(model, config, device=device, precision=precision)
    if config.kind == "isotropic":
        from .isotropic import IsotropicPredictor

        return IsotropicPredictor(net)
    return net


_CACHE: dict[tuple, Predictor] = {}
_CACHE_LOCK = threading.Lock()


def load_predictor(model_path: str, *, device: str = "cpu", precision: str = "fp32",
                   expected_hash: str | None = None) -> Predictor:
    """Build (once per process) the predictor a model folder describes.

    Worker processes call this for every block; the model is read from disk and moved to the
    device only the first time for a given (path, hash, device, precision).

    Parameters
    ----------
    model_path : str
        Model folder (config.json + model.safetensors).
    device : str
        ``"cpu"`` or ``"cuda"``/``"cuda:N"``.
    precision : str
        ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (autocast).
    expected_hash : str, optional
        If given, the folder's current hash must match (the model changed under a run
        otherwise) - checked once, on load.

    Returns
    -------
    Predictor
    """
    key = (str(model_path), expected_hash, device, precision)
    with _CACHE_LOCK:
        predictor = _CACHE.get(key)
        if predictor is None:
            from ..errors import ModelMismatchError
            from ..models import load_model, model_hash

            if expected_hash is not None and model_hash(model_path) != expected_hash:
                raise ModelMismatchError(
                    f"model folder {model_path} changed since the run was planned (hash differs); "
                    "re-run the command to plan again"
                )
            model, config = load_model(model_path, device=device)
            predictor = build_predictor(model, config, device=device, precision=precision)
            _CACHE[key] = predictor
    return predictor
