"""The model a run uses: its client-side predictor, identity, and how workers get it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from bigcare.errors import ConfigError
from bigcare.predictors.base import Predictor, check_predictor, load_predictor

if TYPE_CHECKING:
    from bigcare.predictors.ensemble import EnsembleSpec
    from bigcare.predictors.shipping import ModelPayload

__all__ = ["ModelRef", "resolve_model"]


@dataclass
class ModelRef:
    """A model as a run uses it: the client-side predictor (metadata) and how workers get it.

    Attributes
    ----------
    predictor : Predictor
        Client-side instance: halo, axes, channels, percentiles.
    hash : str
        Model identity (part of the run key).
    path : str or None
        Model folder the workers read (shared storage); None when the model is sent.
    payload : ModelPayload or None
        The model's bytes, sent once to every worker by a worker plugin.
    obj : object or None
        A picklable predictor object (e.g. IdentityPredictor) sent with the run spec.
    ensemble : EnsembleSpec or None
        An ensemble (:mod:`bigcare.predictors.ensemble`): how workers build its members;
        ``members`` holds their bytes when they are sent.
    """

    predictor: Predictor
    hash: str
    path: str | None = None
    payload: ModelPayload | None = None
    obj: Predictor | None = None
    ensemble: EnsembleSpec | None = None
    members: tuple = ()
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.path or (self.payload.source if self.payload is not None else "") or self.hash

    @property
    def payloads(self) -> list:
        """The model bytes a run sends to its workers (one model's, or every member's)."""
        return list(self.members) if self.ensemble is not None else [self.payload] if self.payload is not None else []


def resolve_model(model, ship_model: bool = True, interval: float = 0.9) -> ModelRef:
    """Turn ``model`` into a :class:`ModelRef`: client-side predictor, hash, how workers get it.

    Parameters
    ----------
    model : str, os.PathLike, list of them, ModelPayload or predictor object
        A model folder, an ensemble (an ensemble folder, or a list of two or more model folders:
        :mod:`bigcare.predictors.ensemble`), a model's bytes, or a picklable predictor (sent with
        the run spec).
    ship_model : bool
        For a folder: send its bytes to the workers (True) or let them read the path (False).
    interval : float
        An ensemble's central interval level (its ``lower`` / ``upper`` outputs).

    Returns
    -------
    ModelRef

    Raises
    ------
    ModelError
        If the folder is missing or invalid, or a payload's bytes do not match its hash.
    """
    from bigcare.models.folder import model_hash
    from bigcare.predictors.ensemble import ensemble_paths, resolve_ensemble
    from bigcare.predictors.shipping import ModelPayload

    if len(ensemble_paths(model) or ()) > 1:
        ens = resolve_ensemble(model, ship_model=ship_model, interval=interval)
        return ModelRef(ens.predictor, ens.hash, ensemble=ens.spec, members=tuple(ens.payloads), name=ens.label)
    if isinstance(model, (list, tuple)):
        model = model[0]  # one model given as a list of one
    if isinstance(model, ModelPayload):
        model.verify()
        return ModelRef(model.build("cpu"), model.hash, payload=model)
    from bigcare.exchange.zoo import ZooPredictor, is_zoo_package

    if is_zoo_package(model):  # a bioimage.io package: a predictor object the workers load from its path
        model = ZooPredictor(model)
    if hasattr(model, "predict"):  # a predictor object: sent with the spec
        obj = check_predictor(model)
        return ModelRef(obj, obj.fingerprint or type(obj).__name__, obj=obj)
    mhash = model_hash(model)
    predictor = load_predictor(str(model), device="cpu")
    if ship_model:
        payload = ModelPayload.from_folder(model)
        if payload.hash != mhash:
            raise ConfigError(f"model folder {model} changed while it was being read; try again")
        return ModelRef(predictor, mhash, path=str(model), payload=payload)
    return ModelRef(predictor, mhash, path=str(model))
