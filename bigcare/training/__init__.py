"""Training CARE networks: patch sources, losses and the trainer."""

from .trainer import TrainResult, fit
from .patches import ArrayPairSampler

__all__ = ["fit", "TrainResult", "ArrayPairSampler"]
