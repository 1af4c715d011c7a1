"""Sending a model to the workers once, instead of asking them to read it from shared storage.

::

    client                                     every worker (also ones that join later)
    ModelPayload.from_folder(path)             ModelPlugin.setup(): check the hash,
      config JSON bytes + safetensors bytes ──►   keep the bytes under the model's hash
      + the model's hash                       run_block(): shipped_predictor(hash) builds the
    client.register_plugin(ModelPlugin)          network once per process (cached by hash,
                                                 device, precision) and reuses it for every
                                                 block and every volume of a run or a batch

The payload is data, not code: the config is JSON validated by :class:`ModelConfig`, the
weights are safetensors bytes read with ``safetensors.torch.load`` (never unpickled). The
hash is the one :func:`bigcare.models.model_hash` gives the folder, recomputed from the bytes
on every worker, so a payload that was altered on the way is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass

from distributed.diagnostics.plugin import WorkerPlugin

from bigcare.errors import ModelError
from bigcare.types import Precision

__all__ = ["ModelPayload", "ModelPlugin", "shipped_predictor", "payload_hash"]

_PAYLOADS: dict[str, ModelPayload] = {}
_LOCK = threading.Lock()
#: how many times this process built a network from a payload (tests read it)
BUILDS = {"count": 0}


def payload_hash(config_json: bytes, weights: bytes) -> str:
    """The model hash of a (canonical config JSON, safetensors bytes) pair.

    Equal to :func:`bigcare.models.model_hash` of the folder the bytes came from.
    """
    h = hashlib.sha256()
    h.update(b"bigcare-model-config\0%d\0" % len(config_json) + config_json)
    h.update(b"\0bigcare-model-weights\0")
    h.update(weights)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelPayload:
    """A model folder as bytes: canonical config JSON, safetensors weights and their hash.

    Attributes
    ----------
    config_json : bytes
        The validated config, canonical JSON (sorted keys, no whitespace).
    weights : bytes
        The ``model.safetensors`` file.
    hash : str
        :func:`bigcare.models.model_hash` of the folder.
    source : str
        Where the model was read from (for messages only).
    """

    config_json: bytes
    weights: bytes
    hash: str
    source: str = ""

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> ModelPayload:
        """Read a model folder (config validated, weights as bytes).

        Raises
        ------
        ModelError
            If the config is invalid or the weights file is missing.
        """
        from bigcare.models.folder import WEIGHTS_NAME, canonical_json, load_config

        config = load_config(path)
        wfile = os.path.join(os.fspath(path), WEIGHTS_NAME)
        if not os.path.isfile(wfile):
            raise ModelError(f"model folder {path} has no {WEIGHTS_NAME}")
        with open(wfile, "rb") as f:
            weights = f.read()
        config_json = canonical_json(config).encode()
        return cls(config_json, weights, payload_hash(config_json, weights), str(path))

    def verify(self) -> None:
        """Raise ModelError unless the bytes still hash to :attr:`hash`."""
        got = payload_hash(self.config_json, self.weights)
        if got != self.hash:
            raise ModelError(
                f"model sent from {self.source or 'the client'} is damaged: its bytes hash to "
                f"{got[:16]}..., expected {self.hash[:16]}..."
            )

    def build(self, device: str = "cpu", precision: Precision = "fp32", backend: str = "torch"):
        """The predictor of this model (:func:`~bigcare.predictors.base.build_predictor`; no pickle)."""
        from pydantic import ValidationError
        from safetensors.torch import load as load_safetensors

        from bigcare.models.folder import ModelConfig, build_network, check_finite_weights
        from bigcare.predictors.base import build_predictor

        self.verify()
        try:
            config = ModelConfig.model_validate(json.loads(self.config_json))
            tensors = load_safetensors(self.weights)
        except (ValidationError, ValueError) as exc:
            raise ModelError(f"model sent from {self.source or 'the client'} is unusable: {exc}") from None
        check_finite_weights(tensors, f"model sent from {self.source or 'the client'}")
        model = build_network(config)
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"model sent from {self.source}: weights do not match its config: {exc}") from None
        BUILDS["count"] += 1
        return build_predictor(model, config, device=device, precision=precision, backend=backend)


class ModelPlugin(WorkerPlugin):
    """Worker plugin that hands a model's bytes to every worker, current and future.

    Registered once per run (or batch) with ``client.register_plugin``; the scheduler keeps it
    and sets it up on workers that join later (e.g. one restarted after a crash).
    """

    def __init__(self, payload: ModelPayload):
        self.payload = payload
        self.name = f"bigcare-model-{payload.hash[:16]}"

    def setup(self, worker=None) -> None:
        self.payload.verify()
        with _LOCK:
            _PAYLOADS[self.payload.hash] = self.payload

    def teardown(self, worker=None) -> None:
        with _LOCK:
            _PAYLOADS.pop(self.payload.hash, None)


def shipped_predictor(model_hash: str, device: str, precision: Precision, backend: str = "torch"):
    """The predictor of a model sent with :class:`ModelPlugin`, built once per process.

    Raises
    ------
    ModelError
        If no payload with that hash reached this worker.
    """
    from bigcare.predictors.base import cached_predictor

    def build():
        with _LOCK:
            payload = _PAYLOADS.get(model_hash)
        if payload is None:
            raise ModelError(
                f"model {model_hash[:16]}... was not sent to this worker (no bigcare model "
                "plugin with that hash is registered); run through bigcare.restore, or pass "
                "ship_model=False with a model path the workers can read"
            )
        return payload.build(device=device, precision=precision, backend=backend)

    return cached_predictor(("shipped", model_hash, device, precision, backend), build)
