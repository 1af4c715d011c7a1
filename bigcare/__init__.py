"""bigcare: CARE restoration of huge microscopy volumes, block by block on Dask.

The public API (imported lazily: ``import bigcare`` loads neither torch nor dask)::

    import bigcare
    vol = bigcare.open_volume("scan.ome.zarr")          # lazy: vol.to_dask(), vol.to_xarray()
    bigcare.restore("scan.ome.zarr", "restored.ome.zarr", model="my_model/")
    bigcare.train("train.yaml")                          # lazy patches from OME-Zarr pairs

The package follows the path a volume takes::

    store/       OME-Zarr in and out: axes, URLs, volumes, the chunk reader, writers, pyramid, TIFF
    blocks/      pure geometry: block plans, halos, tiles, the sizing rule, axis layout, zoom
    predictors/  what runs on one block: CARE, isotropic, projection, upsampling, identity; fast path;
                 model shipping
    tasks/       the one task runner (cluster or local pool), the block task, shm slots, clusters
    runs/        a volume run (plan, start, finish), restore / restore_many / predict, results
    models/      networks, receptive fields, the model folder format
    exchange/    CSBDeep import, bioimage.io export, bioimage.io packages as predictors
    training/    config, sources, positions, sampler, patch reads, trainer, losses, isotropic pairs
    psf/ synth.py metrics.py normalization.py   PSFs; synthetic data; the papers' metrics; percentiles

Glossary (one word per concept, used everywhere in code, docs and messages):

- **chunk**: zarr's storage unit; a **shard** when the array is sharded (then the shard is the
  unit of independent writing, and "chunk" in bigcare's geometry means the shard).
- **block**: the unit of work; one task restores one block.
- **write region**: the output voxels a block owns, a whole number of output chunks.
- **halo**: the context a network needs on each side, from its receptive field.
- **read region**: the input voxels a block needs: write region + halo, aligned and clipped.
- **window**: the region of the (possibly upsampled) grid the network sees; equal to the read
  region unless the method zooms.
- **crop**: where the write region sits inside the prediction of the window.
- **tile**: one network call; a block larger than the device allows is predicted in tiles.
- **background block**: a block whose whole read region has no input voxel above the
  ``--skip-background`` threshold; it is **filled** with the model's prediction of a constant
  background instead of being predicted (:mod:`bigcare.runs.background`).
- **zoom**: output voxels per input voxel along an axis (isotropic restoration upsamples Z; so does
  upsampling CARE, a 3D network on the upsampled volume).
- **projection**: a stack (ZYX) mapped to a 2D image of its surface (CARE Fig. 2); the model's
  **weights** are per-pixel softmax weights over Z (summing to 1), the axis it drops is Z
  (``AxisLayout.drop``): its blocks span the whole Z and tile Y and X only.
- **in flight**: tasks submitted and not yet finished (the runner's ``in_flight`` argument bounds
  them).
- **cell**: one voxel of the coarse grid the training sampler finds foreground on; a **zone**
  is a unit of its train/validation split (a few patch lengths; never called a tile).
- **normalize**: percentile normalization ``(x - lo) / (hi - lo + eps)``; **normalizer**: its
  ``lo``/``hi`` per channel.
- **predictor**: what maps one region to named outputs; **model**: a folder (config + weights).
- **ensemble**: M probabilistic (Laplace) models restored as one mixture; its **disagreement** D
  is the members' average KL divergence to the mixture over log M, in [0, 1]; **calibration**: how
  often the ground truth falls inside the predicted intervals (``bigcare calibrate``).
- **volume**: an OME-Zarr image as bigcare opens it (:class:`~bigcare.store.volume.Volume`:
  axes, levels, scale; never its voxels); ``create_volume`` writes one, metadata first.
- **engine**: the restore machinery as a whole (``runs/`` driving ``tasks/`` over ``blocks/`` and
  ``store/``), what a predictor is handed to.
- **run**: restoring one volume into one output; a **batch** is several runs on one queue;
  **resume** a run (or a training) that was cut short.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bigcare.errors import (
    BigcareError,
    BlockError,
    ConfigError,
    InputError,
    ModelError,
    ModelMismatchError,
    OutputError,
)
from bigcare.lazy import lazy_attributes
from bigcare.version import __version__

if TYPE_CHECKING:
    from bigcare.runs.batch import restore_many
    from bigcare.runs.restore import predict, restore
    from bigcare.runs.results import RunResult
    from bigcare.store.volume import Volume, open_volume
    from bigcare.training.run import train

#: Public names loaded on first use (torch, dask and pydantic stay unloaded until needed).
_LAZY = {
    "restore": "bigcare.runs.restore",
    "predict": "bigcare.runs.restore",
    "restore_many": "bigcare.runs.batch",
    "RunResult": "bigcare.runs.results",
    "train": "bigcare.training.run",
    "open_volume": "bigcare.store.volume",
    "Volume": "bigcare.store.volume",
}

__all__ = [
    "__version__",
    "restore",
    "restore_many",
    "predict",
    "train",
    "RunResult",
    "open_volume",
    "Volume",
    "BigcareError",
    "InputError",
    "ModelError",
    "ModelMismatchError",
    "OutputError",
    "ConfigError",
    "BlockError",
]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
