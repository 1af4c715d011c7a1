"""Networks and the model folder format.

- ``unet.py``: the CARE U-Net (:class:`UNet`, :class:`UNetConfig`, :class:`Head`) and its
  receptive field (:func:`divisor`, :func:`receptive_radius`, :func:`halo`).
- ``store.py``: a model is a folder, ``config.json`` (:class:`ModelConfig`) +
  ``model.safetensors``; :func:`save_model`, :func:`load_model`, :func:`model_hash`.
"""

from bigcare.models.folder import IsotropicConfig, ModelConfig, Normalization, load_config, load_model, model_hash, save_model
from bigcare.models.unet import Head, UNet, UNetConfig, divisor, halo, receptive_extents, receptive_radius

__all__ = [
    "Head",
    "UNetConfig",
    "UNet",
    "divisor",
    "receptive_extents",
    "receptive_radius",
    "halo",
    "Normalization",
    "IsotropicConfig",
    "ModelConfig",
    "save_model",
    "load_config",
    "load_model",
    "model_hash",
]
