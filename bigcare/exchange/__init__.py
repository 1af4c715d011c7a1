"""Model exchange: models trained elsewhere restore terabyte volumes, and bigcare's models travel.

- ``csbdeep.py``: a CSBDeep (Keras) CARE model folder -> a bigcare model folder
  (:func:`import_csbdeep`; ``bigcare import-model csbdeep PATH OUT``).

Names are imported on first use (h5py, torch and bioimageio load only when needed).
"""

from __future__ import annotations

from bigcare.lazy import lazy_attributes

_LAZY = {
    "import_csbdeep": "bigcare.exchange.csbdeep",
    "read_csbdeep_config": "bigcare.exchange.csbdeep",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
