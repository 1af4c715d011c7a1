"""Training CARE networks: patch sources, losses, the trainer and its config.

- ``sampling.py`` (+ ``positions.py``, ``regions.py``, ``patchstore.py``): lazy, seeded,
  foreground-aware patches from OME-Zarr images of any size (:class:`PatchSampler`);
- ``patches.py``: the small in-memory equivalent (:class:`ArrayPairSampler`);
- ``trainer.py``: :func:`fit` (Adam, reduce-on-plateau, best/last checkpoints, resume);
- ``config.py``: the validated YAML schema of ``bigcare train``; ``run.py``: :func:`train`.
"""

from bigcare.training.config import TrainConfig, describe_schema, load_train_config
from bigcare.training.patches import ArrayPairSampler
from bigcare.training.run import train
from bigcare.training.sampling import PatchSampler, Source
from bigcare.training.trainer import TrainResult, fit

__all__ = ["train", "fit", "TrainResult", "TrainConfig", "load_train_config", "describe_schema",
           "PatchSampler", "Source", "ArrayPairSampler"]
