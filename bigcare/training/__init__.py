"""Training CARE networks: patch sources, losses, the trainer and its config.

- ``sources.py``: :class:`Source`, the one schema of a training source (YAML and Python);
- ``sampling.py`` (+ ``positions.py``, ``reads.py``, ``patchstore.py``): lazy, seeded,
  foreground-aware patches from OME-Zarr images of any size (:class:`PatchSampler`);
- ``patches.py``: the small in-memory equivalent (:class:`ArrayPairSampler`);
- ``trainer.py``: :func:`fit` (Adam, reduce-on-plateau, best/last checkpoints, resume);
- ``config.py``: the validated YAML schema of ``bigcare train`` (:class:`TrainConfig`, whose
  sampling fields are :class:`SamplingConfig`'s and whose network is the model's
  :class:`~bigcare.models.UNetConfig`); ``run.py``: :func:`train`.

The names below are imported on first use, so ``bigcare.training.config`` loads neither torch
nor dask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bigcare.lazy import lazy_attributes

if TYPE_CHECKING:
    from bigcare.training.config import SamplingConfig, TrainConfig, describe_schema, load_train_config
    from bigcare.training.patches import ArrayPairSampler
    from bigcare.training.run import train
    from bigcare.training.sampling import PatchSampler
    from bigcare.training.sources import Source
    from bigcare.training.trainer import TrainResult, fit

#: Public names and the modules that define them.
_LAZY = {
    "train": "bigcare.training.run",
    "fit": "bigcare.training.trainer",
    "TrainResult": "bigcare.training.trainer",
    "TrainConfig": "bigcare.training.config",
    "SamplingConfig": "bigcare.training.config",
    "load_train_config": "bigcare.training.config",
    "describe_schema": "bigcare.training.config",
    "PatchSampler": "bigcare.training.sampling",
    "Source": "bigcare.training.sources",
    "ArrayPairSampler": "bigcare.training.patches",
}

__all__ = ["train", "fit", "TrainResult", "TrainConfig", "SamplingConfig", "load_train_config",
           "describe_schema", "PatchSampler", "Source", "ArrayPairSampler"]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
