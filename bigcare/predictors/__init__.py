"""What runs on one block: predictors that turn an input region into named outputs.

A *predictor* maps a raw input region (C, *spatial) to a dict of named outputs in intensity
units, each (C_out, *spatial) with the same spatial shape. It declares the halo it needs, the
alignment of its input grid and any zoom, so the engine can plan blocks whose predictions equal
the whole-volume prediction.

- ``base.py``: the :class:`Predictor` protocol, :func:`load_predictor` (a model folder, once per
  process), :func:`predict_region` (the one place a predictor meets a region);
- ``care.py`` (CARE U-Nets, 2D/3D), ``isotropic.py`` (2D net over XZ and YZ slices),
  ``identity.py`` (output = input: checks a cluster without a network);
- ``ensemble.py`` (M probabilistic members in one pass) and ``mixture.py`` (their Laplace
  mixture's mean, interval and disagreement, in torch);
- ``fastpath.py``: the fastest correct execution per device and precision;
- ``shipping.py``: a model's bytes sent to every worker once (no shared storage needed).

Importing this package does not import torch; the modules that need it do.
"""

from bigcare.predictors.base import Predictor, load_predictor, predict_region

__all__ = ["Predictor", "load_predictor", "predict_region"]
