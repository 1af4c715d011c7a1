"""bigcare: CARE restoration of huge microscopy volumes, block by block on Dask.

The public API::

    import bigcare
    vol = bigcare.open_volume("scan.ome.zarr")          # lazy: vol.to_dask(), vol.to_xarray()
    bigcare.restore("scan.ome.zarr", "restored.ome.zarr", model="my_model/")
    bigcare.train("train.yaml")                          # lazy patches from OME-Zarr pairs
"""

__version__ = "0.1.0"

from .engine import RunResult, predict, restore  # noqa: E402
from .errors import (  # noqa: E402
    BigcareError,
    BlockError,
    ConfigError,
    InputError,
    ModelError,
    ModelMismatchError,
    OutputError,
)
from .training import train  # noqa: E402
from .volume import Volume, open_volume  # noqa: E402

__all__ = [
    "__version__",
    "restore",
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
