"""What runs on one block: predictors that turn an input region into named outputs.

A *predictor* maps a raw input region (C, *spatial) to a dict of named outputs in intensity
units, each (C_out, *spatial) with the same spatial shape. It declares the halo it needs and
the alignment of its input grid, so the engine can plan blocks whose predictions equal the
whole-volume prediction. ``load_predictor`` builds the right predictor from a model folder.
"""

from .base import Predictor, load_predictor

__all__ = ["Predictor", "load_predictor"]
