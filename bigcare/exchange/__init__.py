"""Model exchange: models trained elsewhere restore terabyte volumes, and bigcare's models travel.

::

    CSBDeep folder ──import_csbdeep──► bigcare model folder ──export_bioimageio──► bioimage.io .zip
    (config.json + weights_best.h5)    (config.json + safetensors)                      │
                                                                                        ▼
                                            restore --model PACKAGE  ◄── ZooPredictor (any 0.5 package)

- ``csbdeep.py``: a CSBDeep (Keras) CARE model folder -> a bigcare model folder
  (:func:`import_csbdeep`; ``bigcare import-model csbdeep PATH OUT``).
- ``bioimageio.py``: a bigcare model folder -> a bioimage.io 0.5 package
  (:func:`export_bioimageio`; ``bigcare export MODEL OUT.zip``).
- ``unet_arch.py``: the U-Net as one torch-only file, the packages' architecture source.
- ``zoo.py``: a bioimage.io package as a predictor (:class:`ZooPredictor`; ``restore --model X.zip``).
- ``openvino.py``: a model folder whose network runs in OpenVINO on CPU (:class:`OpenVINOPredictor`;
  ``restore --backend openvino``).

Names are imported on first use (h5py, torch and bioimageio load only when needed).
"""

from __future__ import annotations

from bigcare.lazy import lazy_attributes

_LAZY = {
    "import_csbdeep": "bigcare.exchange.csbdeep",
    "read_csbdeep_config": "bigcare.exchange.csbdeep",
    "export_bioimageio": "bigcare.exchange.bioimageio",
    "check_package": "bigcare.exchange.bioimageio",
    "ZooPredictor": "bigcare.exchange.zoo",
    "is_zoo_package": "bigcare.exchange.zoo",
    "OpenVINOPredictor": "bigcare.exchange.openvino",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
