"""The training configuration: one validated schema, read from YAML by ``bigcare train CONFIG``.

Example (every key but ``model_dir`` and ``data.sources`` has a default)::

    model_dir: models/nuclei_care
    data:
      sources:
        - {input: low/vol1.ome.zarr, target: high/vol1.ome.zarr}
        - {input: pairs/vol2.ome.zarr, input_channel: 0, target_channel: 1}
      patch_shape: [16, 64, 64]
      n_patches: 4000
    network: {depth: 2, n_filter_base: 32}
    training: {epochs: 100, steps_per_epoch: 100, batch_size: 16, loss: mae}

An isotropic-restoration model trains on the lateral slices of the volume it will restore (no
target image): give the volume as the only source, 2D patches and an ``isotropic`` section::

    model_dir: models/brain_iso
    data:
      sources: [{input: brain.ome.zarr}]
      patch_shape: [64, 64]
    isotropic:
      psf: {kind: gaussian, sigma_xy: 2.0, sigma_z: 5.0}   # physical units of the volume
      # factor: 2.5   default: Z voxel size / X voxel size of the first source

Unknown keys and wrong types are errors that name the key (``training.epoch: unknown key``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from bigcare.errors import ConfigError, format_validation_error

__all__ = ["TrainConfig", "DataConfig", "NetworkConfig", "TrainingConfig", "ClusterConfig",
           "IsotropicTrainConfig", "PSFConfig", "load_train_config", "describe_schema"]


class _Strict(BaseModel, extra="forbid", validate_assignment=True):
    pass


class SourceConfig(_Strict):
    """One training source: an (input, target) pair of OME-Zarr images, or one image whose
    channels ``input_channel`` and ``target_channel`` hold input and target."""

    input: str = Field(description="OME-Zarr image (path or fsspec URL) with the low-SNR input.")
    target: str | None = Field(None, description="OME-Zarr image with the high-SNR target; "
                               "omit when the input image holds both as channels.")
    input_channel: int | None = Field(None, ge=0, description="Channel of the input in a two-channel image.")
    target_channel: int | None = Field(None, ge=0, description="Channel of the target in a two-channel image.")
    storage_options: dict[str, Any] | None = Field(None, description="fsspec options (e.g. S3 endpoint).")


class DataConfig(_Strict):
    """Where patches come from and how they are drawn."""

    sources: list[SourceConfig] = Field(min_length=1, description="Training sources.")
    patch_shape: list[int] = Field(description="Patch shape, 2 (YX) or 3 (ZYX) sizes, each a "
                                   "multiple of 2**network.depth.")
    n_patches: int = Field(2000, ge=2, description="Patches drawn in all (training + validation).")
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="Share of patches kept for "
                                       "validation, from regions disjoint from training patches.")
    foreground_threshold: float = Field(0.4, ge=0, le=1, description="CSBDeep's patch filter: a "
                                        "patch is foreground if its target maximum exceeds this "
                                        "fraction of the target's foreground_percentile.")
    foreground_percentile: float = Field(99.9, gt=0, le=100, description="See foreground_threshold.")
    pmin_range: tuple[float, float] = Field((1.0, 3.0), description="Per-patch random low percentile range.")
    pmax_range: tuple[float, float] = Field((99.5, 99.9), description="Per-patch random high percentile range.")
    augment: bool = Field(True, description="Random lateral flips and 90-degree rotations.")
    patch_store: str | None = Field(None, description="If set, sampled patches are written once to "
                                    "this zarr store and training streams from it.")

    @field_validator("patch_shape")
    @classmethod
    def _check_patch(cls, v):
        if len(v) not in (2, 3) or any(s < 1 for s in v):
            raise ValueError(f"must have 2 (YX) or 3 (ZYX) positive sizes, got {v}")
        return v


class NetworkConfig(_Strict):
    """The CARE U-Net (CSBDeep's defaults)."""

    depth: int = Field(2, ge=1, le=5, description="Pooling levels.")
    n_filter_base: int = Field(32, ge=1, le=512, description="Filters of the first level (doubling per level).")
    kernel_size: int | None = Field(None, ge=1, description="Convolution size; default 3 in 3D, 5 in 2D.")
    n_conv_per_depth: int = Field(2, ge=1, le=4, description="Convolutions per level.")
    residual: bool = Field(True, description="Predict the residual to the input.")


class TrainingConfig(_Strict):
    """The optimisation (CARE: Adam at 4e-4, MAE, halve the rate after 10 stalled epochs)."""

    epochs: int = Field(100, ge=1, description="Epochs.")
    steps_per_epoch: int = Field(100, ge=1, description="Batches per epoch.")
    batch_size: int = Field(16, ge=1, description="Patches per batch.")
    lr: float = Field(4e-4, gt=0, description="Adam learning rate.")
    loss: Literal["mae", "mse"] = Field("mae", description="Per-pixel loss.")
    seed: int = Field(0, description="Seed of the patch draw, the initial weights and the batch order.")
    device: str | None = Field(None, description="cpu, cuda or cuda:N; default cuda when available.")
    precision: Literal["fp32", "bf16", "fp16"] | None = Field(None, description="Autocast precision; "
                                                              "default bf16 on GPU, fp32 on CPU.")
    resume: bool = Field(True, description="Continue from model_dir/last when it exists.")
    tensorboard: bool = Field(False, description="Also log to model_dir/tensorboard (needs the tensorboard package).")


class ClusterConfig(_Strict):
    """Where patch reads run."""

    scheduler: str | None = Field(None, description="Address of an existing dask scheduler.")
    workers: int | None = Field(None, ge=1, description="Local worker processes when no scheduler is given.")


class PSFConfig(_Strict):
    """The microscope's PSF, in the volume's physical units (e.g. micrometres)."""

    kind: Literal["gaussian", "widefield", "confocal", "lightsheet", "file"] = Field(
        description="gaussian (sigma_xy, sigma_z), widefield (na, wavelength, refractive_index), confocal "
        "(+ excitation_wavelength), lightsheet (+ sheet_na or sheet_sigma), file (path, voxel_size).")
    sigma_xy: float | None = Field(None, gt=0, description="Gaussian: lateral standard deviation.")
    sigma_z: float | None = Field(None, gt=0, description="Gaussian: axial standard deviation.")
    na: float | None = Field(None, gt=0, description="Detection numerical aperture.")
    wavelength: float | None = Field(None, gt=0, description="Emission wavelength.")
    excitation_wavelength: float | None = Field(None, gt=0, description="Confocal: excitation wavelength.")
    refractive_index: float | None = Field(None, gt=0, description="Immersion refractive index.")
    sheet_na: float | None = Field(None, gt=0, description="Light sheet: illumination NA.")
    sheet_sigma: float | None = Field(None, gt=0, description="Light sheet: sheet profile standard deviation.")
    path: str | None = Field(None, description="File: measured PSF (TIFF or .npy, ZYX).")
    voxel_size: list[float] | None = Field(None, description="File: the PSF's voxel size [z, y, x].")


class IsotropicTrainConfig(_Strict):
    """Isotropic restoration: train a 2D network on the volume's own lateral slices."""

    psf: PSFConfig = Field(description="The PSF whose axial blur the lateral slices are given.")
    factor: float | None = Field(None, gt=1, description="Axial subsampling factor; default the first "
                                 "source's Z voxel size / X voxel size.")
    split: bool = Field(True, description="Blur with the split PSF (the axial blur beyond the lateral one "
                        "the slices already carry) rather than the full rotated PSF.")
    combine: Literal["mean", "geometric"] = Field("mean", description="How prediction combines its XZ "
                                                  "and YZ passes.")


class TrainConfig(_Strict):
    """Everything ``bigcare train`` needs."""

    model_dir: str = Field(description="Output folder: best/ and last/ model folders, history.jsonl.")
    data: DataConfig
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    isotropic: IsotropicTrainConfig | None = Field(None, description="Isotropic restoration (see above).")

    @model_validator(mode="after")
    def _patch_fits_network(self):
        if self.isotropic is not None:
            if len(self.data.patch_shape) != 2:
                raise ValueError(f"isotropic training needs 2D patches (YX), got data.patch_shape "
                                 f"{self.data.patch_shape}")
            if any(s.target is not None for s in self.data.sources):
                raise ValueError("isotropic training learns from the volume itself: give data.sources "
                                 "without 'target'")
        div = 2 ** self.network.depth
        if any(s % div for s in self.data.patch_shape):
            raise ValueError(f"data.patch_shape {self.data.patch_shape} must be multiples of "
                             f"2**network.depth = {div}")
        return self


def load_train_config(config) -> TrainConfig:
    """Read and validate a training config from a YAML path, a dict, or a TrainConfig.

    Raises
    ------
    ConfigError
        Naming every bad key: unknown keys, wrong types, out-of-range values, unreadable YAML.
    """
    if isinstance(config, TrainConfig):
        return config
    where = "config"
    if isinstance(config, (str, Path)):
        where = str(config)
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"training config {path} does not exist")
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {type(config).__name__}")
    try:
        return TrainConfig.model_validate(config)
    except ValidationError as e:
        raise ConfigError(f"{where}: {format_validation_error(e)}") from None


def describe_schema() -> str:
    """Every key of the training config with its type, default and meaning (for --help)."""
    lines = []

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            ann = field.annotation
            options = [a for a in (getattr(ann, "__args__", None) or (ann,)) if a is not type(None)]
            sub = options[0] if len(options) == 1 and isinstance(options[0], type) and \
                issubclass(options[0], BaseModel) else None
            if sub is not None and ann is not sub:
                lines.append(f"  {prefix}{name}: optional section ({field.description or ''})")
            if sub is None and name == "sources":
                sub = SourceConfig
                lines.append(f"  {prefix}{name}: list of sources (required)")
                walk(sub, f"{prefix}{name}[].")
                continue
            if sub is not None:
                walk(sub, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
            type_name = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
            lines.append(f"  {prefix}{name} ({type_name}, {default}): {field.description or ''}")

    walk(TrainConfig, "")
    return "\n".join(lines)
