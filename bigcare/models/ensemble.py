"""The ensemble folder: M probabilistic model folders and an ``ensemble.json`` that lists them.

``bigcare train`` with ``training: {ensemble: M}`` writes::

    model_dir/
      ensemble.json      EnsembleConfig: members (paths relative to this folder), the scale
                         factor of a recalibration, the limits of the readouts, provenance
      member_0/          a full training folder (best/, last/, history.jsonl, loss_curves.png)
      ...
      member_{M-1}/

``bigcare restore IN OUT --model model_dir`` (or ``--model m1 m2 ...``) restores with all members.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Literal

from pydantic import Field, ValidationError

from bigcare.errors import ModelError, format_validation_error
from bigcare.schema import Schema

__all__ = ["ENSEMBLE_NAME", "LIMITS", "EnsembleConfig", "is_ensemble", "load_ensemble", "save_ensemble",
           "ensemble_members", "ensemble_hash"]

ENSEMBLE_NAME = "ensemble.json"

#: What the reliability readouts are not, said in every probabilistic model and ensemble folder.
LIMITS = ("The scale, interval and disagreement readouts say how far the network's own prediction can be trusted; "
          "they are not for intensity quantification (fluorophore counting), and they are only as good as the "
          "calibration data: check them with `bigcare calibrate` on held-out pairs like the data you restore.")


class EnsembleConfig(Schema):
    """An ensemble of probabilistic (Laplace) models, stored as ``ensemble.json``."""

    format: Literal["bigcare-ensemble"] = Field("bigcare-ensemble", description="Marks the folder as an ensemble.")
    format_version: Literal[1] = Field(1, description="Version of this file format.")
    members: list[str] = Field(min_length=2, description="Model folders of the members, relative to the ensemble "
                               "folder (or absolute).")
    scale_factor: float = Field(1.0, gt=0, description="Recalibration: every member's scale is multiplied by it "
                                "(fitted by `bigcare calibrate --recalibrate`).")
    limits: str = Field(LIMITS, description="What the readouts cannot tell.")
    provenance: dict[str, Any] = Field(default_factory=dict, description="How the members were made (free form).")


def is_ensemble(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding an ``ensemble.json``."""
    return (pathlib.Path(path) / ENSEMBLE_NAME).is_file()


def load_ensemble(path: str | os.PathLike) -> EnsembleConfig:
    """Read and validate ``path/ensemble.json``.

    Raises
    ------
    ModelError
        If the file is missing, not JSON, or fails the schema (naming the key).
    """
    file = pathlib.Path(path) / ENSEMBLE_NAME
    if not file.is_file():
        raise ModelError(f"{path} is not an ensemble folder: it has no {ENSEMBLE_NAME}")
    try:
        return EnsembleConfig.model_validate(json.loads(file.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{file} is not valid JSON: {e}") from None
    except ValidationError as e:
        raise ModelError(f"{file} is not a valid ensemble description: {format_validation_error(e)}") from None


def save_ensemble(path: str | os.PathLike, config: EnsembleConfig) -> pathlib.Path:
    """Write ``path/ensemble.json`` (atomically); returns the file."""
    file = pathlib.Path(path) / ENSEMBLE_NAME
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    os.replace(tmp, file)
    return file


def ensemble_members(path: str | os.PathLike, config: EnsembleConfig | None = None) -> list[str]:
    """The member model folders of an ensemble folder, as paths."""
    config = config or load_ensemble(path)
    return [str(pathlib.Path(path) / m) if not os.path.isabs(m) else m for m in config.members]


def ensemble_hash(member_hashes: list[str], scale_factor: float, interval: float) -> str:
    """Identity of an ensemble restore: its members' hashes in order, the scale factor, the interval level."""
    ident = json.dumps({"members": list(member_hashes), "scale_factor": scale_factor, "interval": interval})
    return hashlib.sha256(b"bigcare-ensemble\0" + ident.encode()).hexdigest()
