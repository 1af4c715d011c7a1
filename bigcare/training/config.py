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
      # sigma_z: auto   estimated from the volume itself (axial_blur_match), recorded in provenance
      # factor: 2.5   default: Z voxel size / X voxel size of the first source

A self-supervised denoising model (Noise2Void and its variants) trains on noisy volumes alone:
give them as sources without targets and a ``self_supervised`` section::

    model_dir: models/llsm_n2v
    data:
      sources: [noisy1.ome.zarr, noisy2.ome.zarr]
      patch_shape: [16, 64, 64]
    self_supervised: {method: n2v2}        # n2v | n2v2 | structn2v (+ struct_axis: x)

The super-resolution GAN of Wang et al. 2019 trains on the same input/target pairs as CARE, with
``training.method: gan``; the generator (a residual U-Net, :func:`~bigcare.training.gan.generator_config`)
is an ordinary model folder that ``bigcare restore`` applies::

    training: {method: gan, lambda: 1.0, nu: 1.0, epochs: 100, steps_per_epoch: 100}

One schema per object: ``data.sources[]`` is :class:`~bigcare.training.sources.Source`; the
sampling keys of ``data:`` and ``training:`` are :class:`SamplingConfig`'s, the keyword arguments
of :class:`~bigcare.training.sampling.PatchSampler`; ``network:`` is the model's own
:class:`~bigcare.models.architecture.UNetConfig`. YAML and Python thus accept the same values
with the same limits and report a bad one in the same words, YAML's with its section in front
(``data.sources.0.input_channel: ...`` here, ``sources.0.input_channel: ...`` from the sampler).
Unknown keys and wrong types are errors that name the key (``training.epoch: unknown key``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from bigcare.errors import ConfigError, format_validation_error
from bigcare.models.architecture import UNetConfig, divisor
from bigcare.training.method_config import (
    IsotropicTrainConfig,
    ProjectionTrainConfig,
    PSFConfig,
    SelfSupervisedConfig,
    UpsamplingTrainConfig,
    _Strict,
)
from bigcare.training.sources import Source

__all__ = ["TrainConfig", "DataConfig", "SamplingConfig", "TrainingConfig", "ClusterConfig",
           "IsotropicTrainConfig", "PSFConfig", "SelfSupervisedConfig", "load_train_config", "describe_schema", "validated"]




def validated(schema: type[BaseModel], values, *, where: str | None = None):
    """``schema.model_validate(values)``, a bad value raising one :class:`ConfigError`.

    The message names every bad key (:func:`bigcare.errors.format_validation_error`), after
    ``where + ": "`` when given; YAML and Python thus report a value in the same words.
    """
    try:
        return schema.model_validate(values)
    except ValidationError as e:
        message = format_validation_error(e)
        raise ConfigError(f"{where}: {message}" if where else message) from None


class _PatchDraw(_Strict):
    """Where patches come from and how they are drawn (``data:`` and the sampler alike)."""

    sources: list[Source] = Field(min_length=1, description="Training sources.")
    patch_shape: list[int] = Field(description="Patch shape, 2 (YX) or 3 (ZYX) sizes, each a "
                                   "multiple of network.pool**network.depth.")
    n_patches: int = Field(2000, ge=1, description="Patches drawn in all (training + validation); "
                           "at least one must be left for training.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, validate_default=True,
                                       description="Share of patches kept for validation (at least "
                                       "one when > 0), from regions disjoint from training patches; "
                                       "training needs > 0.")
    foreground_threshold: float = Field(0.4, ge=0, le=1, description="CSBDeep's patch filter: a "
                                        "patch is foreground if its target maximum exceeds this "
                                        "fraction of the target's foreground_percentile; 0 samples "
                                        "uniformly.")
    foreground_percentile: float = Field(99.9, gt=0, le=100, description="See foreground_threshold.")
    coarse_level: int | None = Field(None, ge=0, description="Pyramid level of the targets used to "
                                     "find foreground; default the coarsest with cells of at most "
                                     "half a patch.")
    pmin_range: tuple[float, float] = Field((1.0, 3.0), description="Per-patch random low percentile "
                                            "range (0 <= low <= high <= 100).")
    pmax_range: tuple[float, float] = Field((99.5, 99.9), validate_default=True,
                                            description="Per-patch random high percentile range, "
                                            "above pmin_range.")
    augment: bool = Field(True, description="Random lateral flips, and 90-degree rotations when the "
                          "lateral voxels and the patch are square.")

    @field_validator("patch_shape")
    @classmethod
    def _check_patch(cls, v):
        if len(v) not in (2, 3) or any(s < 1 for s in v):
            raise ValueError("expected 2 or 3 positive integers (YX or ZYX)")
        return v

    @field_validator("validation_fraction")
    @classmethod
    def _leaves_training(cls, v, info: ValidationInfo):
        n = info.data.get("n_patches")
        if n is not None and v > 0 and n - max(1, round(n * v)) < 1:
            raise ValueError(f"leaves no training patch of n_patches={n}")
        return v

    @field_validator("pmin_range", "pmax_range")
    @classmethod
    def _check_range(cls, v, info: ValidationInfo):
        if not 0 <= v[0] <= v[1] <= 100:
            raise ValueError("expected two percentiles with 0 <= low <= high <= 100")
        low = info.data.get("pmin_range")
        if info.field_name == "pmax_range" and low is not None and not low[1] < v[0]:
            raise ValueError(f"expected percentiles above pmin_range {low}")
        return v


class _BatchDraw(_Strict):
    """How patches are batched (``training:`` and the sampler alike)."""

    seed: int = Field(0, ge=0, description="Seed of the patch draw, the initial weights and the batch order.")
    batch_size: int = Field(16, ge=1, description="Patches per batch.")
    read_ahead: int = Field(4, ge=0, description="Batches read ahead while the trainer works on the current one.")


class SamplingConfig(_BatchDraw, _PatchDraw):
    """The parameters of :class:`bigcare.training.sampling.PatchSampler`, one schema with YAML's.

    ``data:`` holds the same fields but ``seed``, ``batch_size`` and ``read_ahead``, which
    ``training:`` holds; limits, defaults and messages are this model's. Limits:
    ``n_patches >= 1`` with one patch left for training; ``0 <= validation_fraction < 1`` (0:
    no validation patches, for sampling; training needs validation, see :class:`TrainConfig`);
    ``0 <= foreground_threshold <= 1``; ``0 < foreground_percentile <= 100``; percentile
    ranges ``0 <= low <= high <= 100`` with ``pmin_range`` below ``pmax_range``;
    ``seed >= 0``; ``batch_size >= 1``; ``read_ahead >= 0``; ``coarse_level >= 0``.
    """


class DataConfig(_PatchDraw):
    """Where patches come from and how they are drawn (the sampler's fields, see :class:`SamplingConfig`)."""

    patch_store: str | None = Field(None, description="If set, sampled patches are written once to "
                                    "this zarr store and training streams from it.")


#: ``network:`` keys that follow from the data: their value (the default, and what a given one must equal).
_FROM_DATA = {"ndim": "len(data.patch_shape)", "n_channel_in": "1 (one input channel per source)",
              "n_channel_out": "1 (one target channel per source)"}


class TrainingConfig(_BatchDraw, serialize_by_alias=True):
    """The optimisation (CARE: Adam at 4e-4, MAE, halve the rate after 10 stalled epochs).

    ``seed``, ``batch_size`` and ``read_ahead`` are the sampler's (see :class:`SamplingConfig`).
    ``method: gan`` trains Wang et al.'s GAN instead (:func:`~bigcare.training.gan.fit_gan`):
    ``epochs * steps_per_epoch`` generator + discriminator steps, the validation MSE checked
    after each epoch; ``lr`` is the generator's (default 1e-4 there), ``lr_discriminator`` the
    discriminator's, ``lambda`` and ``nu`` weigh the MSE and SSIM terms of the generator loss.
    """

    method: Literal["care", "gan"] = Field("care", description="care (a per-pixel loss) or gan (Wang et al. "
                                           "2019: adversarial + lambda * MSE + nu * SSIM loss).")
    lambda_: float = Field(1.0, alias="lambda", ge=0, description="gan: weight of the MSE term of the generator loss.")
    nu: float = Field(1.0, ge=0, description="gan: weight of the -log((1 + SSIM) / 2) term of the generator loss.")
    lr_discriminator: float = Field(1e-5, gt=0, description="gan: the discriminator's Adam learning rate.")
    epochs: int = Field(100, ge=1, description="Epochs.")
    steps_per_epoch: int = Field(100, ge=1, description="Batches per epoch.")
    lr: float = Field(4e-4, gt=0, description="Adam learning rate.")
    lr_schedule: Literal["plateau", "cosine"] = Field("plateau", description="plateau: halve the learning rate "
                                                      "after 10 epochs without a better validation loss; cosine: "
                                                      "anneal it per step to lr / 100 over the run.")
    loss: Literal["mae", "mse", "laplace"] = Field("mae", description="Per-pixel loss; laplace: probabilistic CARE "
                                                   "(heads mean and scale, trained by the Laplace negative "
                                                   "log-likelihood).")
    laplace_beta: float = Field(1.0, ge=0, le=1, description="loss laplace: the mean's gradient in training is "
                                "sign(mu - y) * scale ** (laplace_beta - 1): 1 is exactly plain CARE's MAE "
                                "gradient, 0 the plain NLL's (divided by the scale). The loss's value, the "
                                "scale's gradient and the minimisers are the NLL's either way.")
    laplace_detach_scale: bool = Field(True, description="loss laplace: the scale head reads the network's "
                                       "features detached, so only the mean's loss trains the network and "
                                       "the scale's trains its head, at 10x the lr (Stirn et al. 2023); with laplace_beta 1 "
                                       "the network learns exactly as plain CARE.")
    ensemble: int = Field(1, ge=1, le=32, description="Members to train (model_dir/member_0 ...), differing only in "
                          "the torch seed and the batch order (seed + member); restore the ensemble folder for a "
                          "mixture mean, interval and disagreement (needs loss laplace when > 1).")
    device: str | None = Field(None, description="cpu, cuda or cuda:N; default cuda when available.")
    precision: Literal["fp32", "bf16", "fp16"] | None = Field(None, description="Autocast precision; "
                                                              "default bf16 on GPU, fp32 on CPU.")
    resume: bool = Field(True, description="Continue from model_dir/last when it exists.")
    tensorboard: bool = Field(False, description="Also log to model_dir/tensorboard (needs the tensorboard package).")


class ClusterConfig(_Strict):
    """Where patch reads run."""

    scheduler: str | None = Field(None, description="Address of an existing dask scheduler.")
    workers: int | None = Field(None, ge=1, description="Local worker processes when no scheduler is given.")


#: ``network.heads`` of ``loss: laplace`` unless given: the mean gets the residual; the scale is
#: softplus + 1e-3 (CSBDeep's eps_scale: a floor that keeps log(b) and |y - mu| / b finite).
LAPLACE_HEADS = ({"name": "mean", "activation": "linear"}, {"name": "scale", "activation": "softplus_eps"})

#: ``network:`` values self-supervised training sets unless given (and then requires).
_SELF_SUPERVISED_NETWORK = {"residual": False}
_N2V2_NETWORK = {"pooling": "maxblur", "top_skip": False}

#: ``network:`` of ``training.method: gan``: Wang et al.'s generator blocks (required) and its
#: size (defaults, see :func:`~bigcare.training.gan.generator_config`).
_GAN_NETWORK = {"pooling": "avg", "activation": "leaky_relu", "block_residual": True}
_GAN_NETWORK_DEFAULTS = {"depth": 4, "kernel_size": 3, "n_conv_per_depth": 3}
#: ``training:`` keys that only ``method: gan`` reads.
_GAN_ONLY = ("lambda", "nu", "lr_discriminator")
_GAN_ONLY_DEFAULT = {f.alias or k: f.default for k, f in TrainingConfig.model_fields.items() if (f.alias or k) in _GAN_ONLY}


class TrainConfig(_Strict):
    """Everything ``bigcare train`` needs.

    ``network`` is the model's own :class:`bigcare.models.architecture.UNetConfig` (its limits
    and messages): ``ndim`` comes from ``len(data.patch_shape)``, ``n_channel_in`` and
    ``n_channel_out`` are 1; given anyway, they must equal these. Cross-section rules: ``data.patch_shape`` is a multiple of
    ``network.pool**network.depth``; training needs ``data.validation_fraction > 0`` (the best
    model is chosen by validation loss) and one network head.
    """

    model_dir: str = Field(description="Output folder: best/ and last/ model folders, history.jsonl.")
    data: DataConfig
    network: UNetConfig = Field(description="The CARE U-Net (bigcare.models.UNetConfig); "
                                "default CSBDeep's, for len(data.patch_shape) dimensions.")
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    isotropic: IsotropicTrainConfig | None = Field(None, description="Isotropic restoration (see above).")
    self_supervised: SelfSupervisedConfig | None = Field(None, description="Noise2Void-style denoising from "
                                                         "noisy volumes alone (see above).")
    projection: ProjectionTrainConfig | None = Field(None, description="Surface projection CARE: ZYX stacks "
                                                     "to 2D targets (bigcare.training.projection).")
    upsampling: UpsamplingTrainConfig | None = Field(None, description="Upsampling CARE: Z-subsampled "
                                                     "sources as inputs (bigcare.training.projection).")

    @model_validator(mode="before")
    @classmethod
    def _network_from_data(cls, values):
        if not isinstance(values, dict):
            return values
        network = values.get("network", {})
        if isinstance(network, dict) and "ndim" not in network:
            data = values.get("data")
            shape = data.patch_shape if isinstance(data, DataConfig) else \
                data.get("patch_shape") if isinstance(data, dict) else None
            # a bad or missing patch_shape is reported under data; 3 only lets network validate
            ndim = len(shape) if isinstance(shape, (list, tuple)) and len(shape) in (2, 3) else 3
            values = {**values, "network": {"ndim": ndim, **network}}
        return cls._gan_defaults(cls._probabilistic_defaults(cls._self_supervised_defaults(values)))

    @classmethod
    def _gan_defaults(cls, values: dict) -> dict:
        """The generator network and learning rate of ``training.method: gan``, where left out."""
        training, network = values.get("training"), values.get("network")
        if not isinstance(training, dict) or not isinstance(network, dict):
            return values
        if training.get("method") != "gan":
            # a default value is let through: a dumped config (provenance) reads back
            given = [k for k in _GAN_ONLY if k in training and training[k] != _GAN_ONLY_DEFAULT[k]]
            if given:
                raise ValueError(f"training.{given[0]}: is read by training.method gan only "
                                 f"(method is {training.get('method', 'care')!r})")
            return values
        for key, value in _GAN_NETWORK.items():
            if key in network and network[key] != value:
                raise ValueError(f"network.{key}: training.method gan trains Wang et al.'s generator, which needs "
                                 f"{value!r}; leave it out")
        if training.get("lr_schedule", "plateau") != "plateau":
            raise ValueError("training.lr_schedule: training.method gan keeps Wang et al.'s constant learning rates; "
                             "leave it out")
        training = {"lr": 1e-4, "loss": "mse", **training}
        return {**values, "network": {**_GAN_NETWORK_DEFAULTS, **_GAN_NETWORK, **network}, "training": training}

    @classmethod
    def _probabilistic_defaults(cls, values: dict) -> dict:
        """The mean and scale heads of a Laplace model, where ``network.heads`` is left out."""
        training, network = values.get("training"), values.get("network")
        loss = training.loss if isinstance(training, TrainingConfig) else \
            training.get("loss") if isinstance(training, dict) else None
        if loss != "laplace" or not isinstance(network, dict) or "heads" in network:
            return values
        return {**values, "network": {**network, "heads": [dict(h) for h in LAPLACE_HEADS]}}

    @classmethod
    def _self_supervised_defaults(cls, values: dict) -> dict:
        """The network and loss self-supervised training needs, where the config leaves them out."""
        section = values.get("self_supervised")
        method = section.method if isinstance(section, SelfSupervisedConfig) else \
            section.get("method") if isinstance(section, dict) else None
        network, training = values.get("network"), values.get("training", {})
        if method is None or not isinstance(network, dict):
            return values
        needed = {**_SELF_SUPERVISED_NETWORK, **(_N2V2_NETWORK if method == "n2v2" else {})}
        for key, value in needed.items():
            if key in network and network[key] != value:
                why = ("the network would add the hidden voxel's own noisy value back" if key == "residual"
                       else "N2V2 is defined by it")
                raise ValueError(f"network.{key}: self_supervised method {method} needs {value!r} ({why}); "
                                 "leave it out")
        values = {**values, "network": {**needed, **network}}
        if isinstance(training, dict) and "loss" not in training:
            values["training"] = {**training, "loss": "mse"}
        return values

    @model_validator(mode="after")
    def _sections_agree(self):
        data, net = self.data, self.network
        if net.ndim != len(data.patch_shape):
            raise ValueError(f"network.ndim: {net.ndim} does not match data.patch_shape {data.patch_shape}; "
                             f"leave it out, it is {_FROM_DATA['ndim']}")
        for key in ("n_channel_in", "n_channel_out"):
            if getattr(net, key) != 1:
                raise ValueError(f"network.{key}: expected {_FROM_DATA[key]}, got {getattr(net, key)}")
        if self.training.loss == "laplace":
            acts = [h.activation for h in net.heads]
            if len(acts) != 2 or acts[0] != "linear" or acts[1] not in ("softplus", "softplus_eps"):
                raise ValueError(f"network.heads: loss laplace trains a linear mean head and a softplus scale head, "
                                 f"got {[(h.name, h.activation) for h in net.heads]}; leave network.heads out for "
                                 f"{LAPLACE_HEADS}")
        elif len(net.heads) != 1:
            raise ValueError(f"network.heads: training fits one head, got {len(net.heads)}")
        if self.training.ensemble > 1 and self.training.loss != "laplace":
            raise ValueError(f"training.ensemble: {self.training.ensemble} members need loss laplace (an ensemble's "
                             "interval and disagreement are built from each member's Laplace scale)")
        if self.training.method == "gan":
            other = "self_supervised" if self.self_supervised else "isotropic" if self.isotropic else None
            if other:
                raise ValueError(f"training.method gan and {other} are different methods: give one of them")
            if self.training.loss != "mse" or self.training.ensemble > 1:
                raise ValueError("training.method gan: its generator loss is fixed (adversarial + lambda * MSE + "
                                 "nu * SSIM): leave training.loss and training.ensemble out")
            if any(s.target is None and s.target_channel is None for s in data.sources):
                raise ValueError("training.method gan learns from input/target pairs: give every data.sources "
                                 "entry a 'target' (or 'target_channel')")
        if self.self_supervised is not None:
            if self.isotropic is not None:
                raise ValueError("self_supervised and isotropic are different methods: give one of them")
            if any(s.target is not None or s.target_channel is not None for s in data.sources):
                raise ValueError("self-supervised training learns from the noisy volumes alone: give data.sources "
                                 "without 'target' or 'target_channel' (or train CARE without the "
                                 "self_supervised section)")
            axis = self.self_supervised.struct_axis
            if axis is not None and axis not in "zyx"[-len(data.patch_shape):]:
                raise ValueError(f"self_supervised.struct_axis: {axis!r} is not an axis of the "
                                 f"{len(data.patch_shape)}D patches {data.patch_shape}")
        if self.isotropic is not None:
            if len(data.patch_shape) != 2:
                raise ValueError(f"isotropic training needs 2D patches (YX), got data.patch_shape "
                                 f"{data.patch_shape}")
            if any(s.target is not None for s in data.sources):
                raise ValueError("isotropic training learns from the volume itself: give data.sources "
                                 "without 'target'")
        if self.projection is not None or self.upsampling is not None:
            from bigcare.training.projection import check_method_config

            check_method_config(self)
        div = divisor(net)
        if any(s % div for s in data.patch_shape):
            raise ValueError(f"data.patch_shape {data.patch_shape} must be multiples of "
                             f"network.pool**network.depth = {net.pool}**{net.depth} = {div}")
        if data.validation_fraction == 0:
            raise ValueError("data.validation_fraction: training chooses model_dir/best by validation loss, "
                             "so it needs validation patches: expected a fraction in (0, 1), got 0")
        return self

    def sampling(self, **override) -> SamplingConfig:
        """The :class:`SamplingConfig` of this config (``data:`` and ``training:``), with overrides.

        Raises
        ------
        ConfigError
            If an override is invalid.
        """
        values = {name: getattr(self.data if name in DataConfig.model_fields else self.training, name)
                  for name in SamplingConfig.model_fields}
        return validated(SamplingConfig, {**values, **override})


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
    return validated(TrainConfig, config, where=where)


def describe_schema() -> str:
    """Every key of the training config with its type, default and meaning (for --help)."""
    lines = []

    def section(field) -> tuple[type[BaseModel] | None, bool]:  # (model of a section or list item, a list)
        ann = field.annotation
        options = [a for a in (getattr(ann, "__args__", None) or (ann,)) if a is not type(None)]
        one = options[0] if len(options) == 1 else None
        model = one if isinstance(one, type) and issubclass(one, BaseModel) else None
        return model, model is not None and getattr(ann, "__origin__", None) is list

    def walk(model, prefix):
        for key, field in model.model_fields.items():
            name = field.alias or key  # training.lambda, not lambda_
            ann = field.annotation
            sub, listed = section(field)
            default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
            if listed:
                extra = ("; a source may also be an image path or an [input, target] pair" if sub is Source
                         else "; training fits one" if prefix == "network." else "")
                lines.append(f"  {prefix}{name}: list of {sub.__name__} ({default}{extra})")
                walk(sub, f"{prefix}{name}[].")
                continue
            if sub is not None:
                if ann is not sub:
                    lines.append(f"  {prefix}{name}: optional section ({field.description or ''})")
                walk(sub, f"{prefix}{name}.")
                continue
            description = field.description or ""
            if prefix == "network." and name in _FROM_DATA:
                default = f"default {_FROM_DATA[name]}"
                description = description.rstrip(".") + "; if given, must equal the default."
            type_name = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
            lines.append(f"  {prefix}{name} ({type_name}, {default}): {description}")

    walk(TrainConfig, "")
    return "\n".join(lines)
