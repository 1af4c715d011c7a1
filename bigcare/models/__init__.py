"""Networks and the model folder format.

- ``architecture.py``: :class:`UNetConfig` and :class:`Head` (the one schema of the network) and
  its receptive field (:func:`divisor`, :func:`receptive_radius`, :func:`halo`); no torch.
- ``unet.py``: the CARE U-Net in PyTorch (:class:`UNet`).
- ``folder.py``: a model is a folder, ``config.json`` (:class:`ModelConfig`) +
  ``model.safetensors``; :func:`save_model`, :func:`load_model`, :func:`model_hash`.
- ``ensemble.py``: an ensemble folder, ``ensemble.json`` listing member model folders.

Names are imported on first use, so configs and hashes need no torch.
"""

from __future__ import annotations

from bigcare.lazy import lazy_attributes

_LAZY = {
    "Head": "bigcare.models.architecture",
    "UNetConfig": "bigcare.models.architecture",
    "divisor": "bigcare.models.architecture",
    "receptive_extents": "bigcare.models.architecture",
    "receptive_radius": "bigcare.models.architecture",
    "halo": "bigcare.models.architecture",
    "UNet": "bigcare.models.unet",
    "Normalization": "bigcare.models.folder",
    "IsotropicConfig": "bigcare.models.folder",
    "ModelConfig": "bigcare.models.folder",
    "save_model": "bigcare.models.folder",
    "load_config": "bigcare.models.folder",
    "load_model": "bigcare.models.folder",
    "model_hash": "bigcare.models.folder",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
