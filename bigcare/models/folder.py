"""The model folder format: ``config.json`` + ``model.safetensors``. Models are data, not code.

::

    my_model/
      config.json         ModelConfig as JSON (format, version, kind, axes, architecture,
                          normalization, provenance)
      model.safetensors   the UNet's state dict, float32, tensor names = state-dict keys

Nothing here ever unpickles: weights are read with ``safetensors`` only, so a pickle (or a
``torch.save`` file) named ``model.safetensors`` is refused as corrupt, never executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from bigcare.errors import ModelError, ModelMismatchError, OutputError, format_validation_error
from bigcare.models.architecture import UNetConfig
from bigcare.models.projection_arch import ProjectionNetConfig
from bigcare.schema import Schema

if TYPE_CHECKING:  # torch is imported where weights are read or written: configs need none
    import torch

    from bigcare.models.unet import UNet

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "Normalization",
    "IsotropicConfig",
    "ProjectionConfig",
    "UpsamplingConfig",
    "Calibration",
    "ModelConfig",
    "save_model",
    "build_network",
    "load_config",
    "load_model",
    "model_hash",
    "check_finite_weights",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class Normalization(Schema):
    """Percentile normalization of the network input (CSBDeep's ``normalize``)."""

    pmin: float = Field(1.0, ge=0, le=100, description="Lower percentile, mapped to 0.")
    pmax: float = Field(99.8, ge=0, le=100, description="Upper percentile, mapped to 1.")

    @model_validator(mode="after")
    def _check_order(self) -> Normalization:
        if not self.pmin < self.pmax:
            raise ValueError(f"pmin must be < pmax, got pmin={self.pmin}, pmax={self.pmax}")
        return self


class IsotropicConfig(Schema):
    """How an isotropic-restoration model (a 2D network) is applied to an anisotropic volume."""

    factor: float = Field(gt=1, le=64, description="Axial subsampling factor sigma: Z voxel size / "
                          "lateral voxel size of the volumes the model restores. Z is upsampled by it.")
    combine: Literal["mean", "geometric"] = Field(
        "mean", description="How the XZ and YZ predictions are combined: arithmetic mean, or "
        "CSBDeep's geometric mean of their positive parts.")
    psf: dict[str, Any] = Field(default_factory=dict, description="The PSF the training data was "
                                "degraded with (for the record).")


class ProjectionConfig(Schema):
    """How a surface-projection model (CARE Fig. 2) maps a stack to a 2D image: its output drops ``axis``."""

    axis: Literal["z"] = Field("z", description="The axis projected away; every block spans it whole.")
    output_axes: Literal["YX"] = Field("YX", description="Spatial axes of the output (the input's minus axis).")
    network: ProjectionNetConfig = Field(default_factory=ProjectionNetConfig,
                                         description="The 3D projection sub-network (Z-softmax weights).")


class UpsamplingConfig(Schema):
    """How an upsampling model (CSBDeep's UpsamplingCARE) is applied: Z upsampled, then the 3D network."""

    factor: float = Field(gt=1, le=64, description="Z is upsampled by it (node-aligned linear, "
                          "bigcare.blocks.zoom) before the network; the output's Z voxel size is the input's / factor.")


class Calibration(Schema):
    """A recalibration of a probabilistic model's scale (``bigcare calibrate --recalibrate``)."""

    scale_factor: float = Field(gt=0, description="Every predicted scale is multiplied by it (in normalized "
                                "units: the closed-form Laplace NLL fit mean(|y - mu| / b) on held-out pairs).")
    pairs: list[list[str]] = Field(default_factory=list, description="The held-out (input, ground truth) pairs "
                                   "it was fitted on (for the record).")


class ModelConfig(Schema):
    """Everything needed to rebuild and use a model, stored as ``config.json``."""

    format: Literal["bigcare-model"] = Field(
        "bigcare-model", description="Marks the folder as a bigcare model."
    )
    format_version: Literal[1] = Field(1, description="Version of this folder format.")
    kind: Literal["care", "isotropic", "projection", "upsampling"] = Field(
        "care", description="The restoration method: 'care' (same grid), 'isotropic' (a 2D "
        "network applied to XZ and YZ slices of a Z-upsampled volume), 'projection' (a ZYX stack to a 2D "
        "YX image: the output drops Z) or 'upsampling' (a 3D network on the Z-upsampled volume).")
    axes: str = Field(
        description="Spatial axes of the network, upper case ('ZYX' or 'YX'); one per "
        "architecture.ndim."
    )
    architecture: UNetConfig = Field(description="The network architecture.")
    normalization: Normalization = Field(
        default_factory=Normalization, description="Input percentile normalization."
    )
    isotropic: IsotropicConfig | None = Field(None, description="Only for kind 'isotropic'.")
    projection: ProjectionConfig | None = Field(None, description="Only for kind 'projection'; "
                                                "architecture is then its 2D CARE sub-network.")
    upsampling: UpsamplingConfig | None = Field(None, description="Only for kind 'upsampling'.")
    calibration: Calibration | None = Field(None, description="Probabilistic models: the recalibration every "
                                            "restore applies to the scale head (none: factor 1).")
    provenance: dict[str, Any] = Field(
        default_factory=dict,
        description="Training data, patch shape, epochs, losses, versions, date (free form).",
    )

    @field_validator("axes")
    @classmethod
    def _check_axes(cls, v: str) -> str:
        axes = v.upper()
        if not axes or any(a not in "ZYX" for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(
                f"axes must be distinct letters from 'ZYX' (e.g. 'ZYX', 'YX'), got {v!r}"
            )
        return axes

    @model_validator(mode="after")
    def _check_ndim(self) -> ModelConfig:
        for kind in ("projection", "upsampling"):
            if (self.kind == kind) != (getattr(self, kind) is not None):
                raise ValueError(f"kind {kind!r} needs a {kind!r} section, and only it may have one")
        if self.kind == "projection":
            if self.axes != "ZYX" or self.architecture.ndim != 2:
                raise ValueError(f"a projection model takes 'ZYX' stacks into a 2D CARE network (architecture.ndim 2), "
                                 f"got axes {self.axes!r}, ndim {self.architecture.ndim}")
            return self
        if len(self.axes) != self.architecture.ndim:
            raise ValueError(
                f"axes {self.axes!r} has {len(self.axes)} axes but architecture.ndim is "
                f"{self.architecture.ndim}"
            )
        if (self.kind == "isotropic") != (self.isotropic is not None):
            raise ValueError("kind 'isotropic' needs an 'isotropic' section, and only it may have one")
        if self.kind == "isotropic" and self.axes != "YX":
            raise ValueError(f"an isotropic model is a 2D network with axes 'YX', got axes {self.axes!r}")
        return self


def canonical_json(config: ModelConfig) -> str:
    # a CARE model's JSON has no "isotropic" key at all, so its hash is what it was before the
    # isotropic kind existed
    # (nor a "calibration" key before one is fitted)
    exclude = {k for k in ("isotropic", "calibration", "projection", "upsampling") if getattr(config, k) is None}
    return json.dumps(config.model_dump(mode="json", exclude=exclude), sort_keys=True, separators=(",", ":"))


def save_model(
    path: str | os.PathLike, model: UNet, config: ModelConfig, *, overwrite: bool = False
) -> pathlib.Path:
    """Write a model folder (``config.json`` + ``model.safetensors``).

    Parameters
    ----------
    path : str or PathLike
        The folder to write; created if missing.
    model : UNet
        The network; its weights are stored as float32 on CPU.
    config : ModelConfig
        The model's config; ``config.architecture`` must equal ``model.config``.
    overwrite : bool
        Replace an existing model in ``path``. Default False.

    Returns
    -------
    pathlib.Path
        The folder.

    Raises
    ------
    ModelMismatchError
        If ``config.architecture`` differs from the model's architecture.
    OutputError
        If ``path`` is a file, or already holds a model and ``overwrite`` is False.
    """
    path = pathlib.Path(path)
    if config.architecture != model.config:
        raise ModelMismatchError(
            f"config.architecture {config.architecture.model_dump()} does not match the "
            f"model's architecture {model.config.model_dump()}"
        )
    if path.exists() and not path.is_dir():
        raise OutputError(f"model path {path} exists and is not a folder")
    existing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if (path / n).exists()]
    if existing and not overwrite:
        raise OutputError(
            f"model folder {path} already holds {', '.join(existing)}; pass overwrite=True "
            "to replace it"
        )
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
    }
    tmp_w = path / (WEIGHTS_NAME + ".tmp")
    tmp_c = path / (CONFIG_NAME + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": "pt", "bigcare_format_version": "1"})
    tmp_c.write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    os.replace(tmp_w, path / WEIGHTS_NAME)
    os.replace(tmp_c, path / CONFIG_NAME)
    return path


def _folder(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.exists():
        raise ModelError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise ModelError(f"model path {path} is not a folder (expected a folder with "
                         f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    return path


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read and validate a model folder's ``config.json``.

    Parameters
    ----------
    path : str or PathLike
        The model folder.

    Returns
    -------
    ModelConfig
        The validated config.

    Raises
    ------
    ModelError
        If the folder or ``config.json`` is missing, the file is not a JSON object, or it
        fails the schema (the message names each offending key).
    """
    cfile = _folder(path) / CONFIG_NAME
    if not cfile.is_file():
        raise ModelError(f"model folder {cfile.parent} has no {CONFIG_NAME}")
    try:
        data = json.loads(cfile.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{cfile} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{cfile} must hold a JSON object, got {type(data).__name__}")
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as e:
        raise ModelError(f"{cfile} is not a valid model config: {format_validation_error(e)}") from None


def check_finite_weights(tensors: dict[str, torch.Tensor], where: str) -> None:
    """ModelError naming the first tensor with a NaN or infinite weight (it would spread to every voxel)."""
    import torch

    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ModelError(f"{where}: tensor {name!r} holds {bad} NaN/inf weight(s); refusing the model")


def _read_weights(wfile: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not wfile.is_file():
        raise ModelError(f"model folder {wfile.parent} has no {WEIGHTS_NAME}")
    try:
        return load_file(str(wfile), device="cpu")  # safetensors only: never unpickles
    except Exception as e:  # safetensors raises its own error type for corrupt files
        raise ModelError(
            f"{wfile} is not a readable safetensors file ({type(e).__name__}: {e}); "
            "bigcare never loads pickled weights"
        ) from None


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[UNet, ModelConfig]:
    """Load a model folder: build the network from its config and fill in the weights.

    Parameters
    ----------
    path : str or PathLike
        The model folder.
    device : str or torch.device
        Where to put the network. Default "cpu".

    Returns
    -------
    model : UNet
        The network, in eval mode on ``device``.
    config : ModelConfig
        Its validated config.

    Raises
    ------
    ModelError
        If the config is missing or invalid (see :func:`load_config`), the weights are
        missing or not a safetensors file, or they do not match the architecture (the
        message names the tensor and both shapes).
    """
    config = load_config(path)
    wfile = pathlib.Path(path) / WEIGHTS_NAME
    tensors = _read_weights(wfile)
    check_finite_weights(tensors, str(wfile))
    model = build_network(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"{wfile} does not match the architecture in {CONFIG_NAME}: missing tensors "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected tensors "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for name, want in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(want.shape):
            raise ModelError(
                f"{wfile}: tensor {name!r} has shape {tuple(got.shape)}, the architecture in "
                f"{CONFIG_NAME} expects {tuple(want.shape)}"
            )
        if not got.is_floating_point():
            raise ModelError(f"{wfile}: tensor {name!r} has dtype {got.dtype}, expected float")
    model.load_state_dict(tensors)
    return model.to(device).eval(), config


def build_network(config: ModelConfig) -> UNet:
    """The untrained network a config describes: a :class:`UNet`, or for kind 'projection' a
    :class:`~bigcare.models.projection.ProjectionCARENet` (whose ``config`` is ``architecture``)."""
    if config.projection is not None:
        from bigcare.models.projection import ProjectionCARENet

        return ProjectionCARENet(config.architecture, config.projection.network)  # type: ignore[return-value]
    from bigcare.models.unet import UNet

    return UNet(config.architecture)


def model_hash(path: str | os.PathLike) -> str:
    """Identity of a model: sha256 over its canonical config JSON and its weights file.

    The config is validated and dumped with sorted keys and no whitespace, so reformatting
    ``config.json`` keeps the hash; any change of a config value or of the weights changes it.

    Parameters
    ----------
    path : str or PathLike
        The model folder.

    Returns
    -------
    str
        64 hex digits.

    Raises
    ------
    ModelError
        If the config is missing or invalid, or the weights file is missing.
    """
    config = load_config(path)
    wfile = pathlib.Path(path) / WEIGHTS_NAME
    if not wfile.is_file():
        raise ModelError(f"model folder {wfile.parent} has no {WEIGHTS_NAME}")
    h = hashlib.sha256()
    cfg = canonical_json(config).encode()
    h.update(b"bigcare-model-config\0%d\0" % len(cfg) + cfg)
    h.update(b"\0bigcare-model-weights\0")
    with open(wfile, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
