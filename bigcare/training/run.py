"""``bigcare.train(config)``: sample patches lazily, build the CARE U-Net, train, checkpoint."""

from __future__ import annotations

import contextlib
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bigcare.errors import ConfigError
from bigcare.models import UNet
from bigcare.models.folder import ModelConfig, Normalization, UpsamplingConfig
from bigcare.training.config import TrainConfig, load_train_config
from bigcare.training.isotropic import degrade_batches, isotropic_setup
from bigcare.training.sources import Source
from bigcare.training.trainer import TrainResult, fit
from bigcare.types import PathLike, device_problem
from bigcare.version import __version__

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["train"]


def train(config: TrainConfig | dict | PathLike, *, client: Client | None = None, progress: bool = True) -> TrainResult:
    """Train a CARE network as a config describes (see :mod:`bigcare.training.config`).

    With an ``isotropic`` section, a 2D isotropic-restoration network is trained on the lateral
    slices of the source volume, degraded by the PSF (:mod:`bigcare.training.isotropic`). With a
    ``self_supervised`` section, a denoising network is trained on the noisy sources alone, with
    blind-spot masking (:mod:`bigcare.training.blindspot`: Noise2Void, N2V2, structN2V). With
    ``training.method: gan``, Wang et al.'s GAN (:mod:`bigcare.training.gan`) on the pairs.

    Parameters
    ----------
    config : TrainConfig, dict or path
        The configuration (a YAML path is read and validated).
    client : distributed.Client, optional
        Cluster for the patch reads; default: ``config.cluster`` (an existing scheduler, or a
        LocalCluster started and closed here).
    progress : bool
        Progress bars and per-epoch lines.

    Returns
    -------
    TrainResult
        Losses per epoch; ``model_dir/best`` is the model to restore with.

    Raises
    ------
    ConfigError
        For an invalid config (every bad key named), before any data is read.
    """
    cfg: TrainConfig = load_train_config(config)
    _check_model_dir_apart(cfg)
    from bigcare.training.sampling import PatchSampler  # imported late: heavy and only needed here

    device = cfg.training.device or ("cuda" if torch.cuda.is_available() else "cpu")
    why = device_problem(device)  # the network trains in this process
    if why is not None:
        raise ConfigError(f"training.device {device!r} is not usable on this machine ({why}); set training.device: cpu "
                          "or train on a machine with a GPU; nothing was written")
    precision = cfg.training.precision or ("bf16" if device.startswith("cuda") else "fp32")
    if cfg.training.method == "gan":  # fit_gan runs without autocast; the provenance says so
        precision = "fp32"
    data, arch, opt = cfg.data, cfg.network, cfg.training  # arch: the model's own UNetConfig
    ndim = arch.ndim
    if cfg.projection is not None:  # (stack, 2D image) pairs: its own patches and network
        from bigcare.training.projection import train_projection

        return train_projection(cfg, device, precision, progress, _provenance)
    sources = list(data.sources)
    degradation, iso = None, None
    iso_provenance: dict = {}
    if cfg.isotropic is not None:
        degradation, iso, iso_provenance = isotropic_setup(cfg.isotropic, sources, data.patch_shape)
        sources = _self_pairs(sources)
    blindspot, method = None, cfg.self_supervised and cfg.self_supervised.method
    if cfg.self_supervised is not None:  # the noisy patch is its own target, at the hidden voxels
        blindspot = cfg.self_supervised.blindspot(ndim)
        sources = _self_pairs(sources)
    zsub = None
    if cfg.upsampling is not None:  # inputs made from the sources: every factor-th plane, upsampled back
        from bigcare.training.projection import ZSubsampling, upsampling_factor

        zsub, sources = ZSubsampling(upsampling_factor(cfg, sources[0])), _self_pairs(sources)
    read_shape = degradation.read_shape(tuple(data.patch_shape)) if degradation else \
        zsub.read_shape(tuple(data.patch_shape)) if zsub else tuple(data.patch_shape)
    settings = cfg.sampling(sources=sources, patch_shape=list(read_shape))

    context: contextlib.AbstractContextManager
    if client is None:
        from bigcare.tasks.cluster import cluster_client

        context = cluster_client(cfg.cluster.scheduler, workers=cfg.cluster.workers, quiet=not progress)
    else:
        context = contextlib.nullcontext(client)
    with context as c:
        sampler = PatchSampler(client=c, **dict(settings))
        stream = sampler.write_patch_store(data.patch_store, overwrite=True) if data.patch_store else sampler

        def train_batches(order_seed: int):
            batches = stream.batches("train", order_seed=order_seed)
            if degradation is not None:
                batches = degrade_batches(batches, degradation, opt.seed)
            if zsub is not None:
                batches = zsub.batches(batches, data.patch_shape[0])
            if blindspot is not None:
                from bigcare.training.blindspot import blindspot_batches

                batches = blindspot_batches(batches, blindspot, opt.seed)  # type: ignore[assignment]
            return batches

        val_batches = sampler.batches("val", epochs=1)
        if degradation is not None:
            val_batches = degrade_batches(val_batches, degradation, opt.seed + 1)
        if zsub is not None:
            val_batches = zsub.batches(val_batches, data.patch_shape[0])
        if blindspot is not None:
            from bigcare.training.blindspot import blindspot_batches

            val_batches = blindspot_batches(val_batches, blindspot, opt.seed + 1)  # type: ignore[assignment]
        validation = list(val_batches)  # masked once (self-supervised): the same hidden voxels every epoch
        provenance = _provenance(cfg, sampler.provenance, device, precision)
        if iso_provenance:  # e.g. the axial sigma estimated from the volume (psf.sigma_z: auto)
            provenance["isotropic"] = iso_provenance
        # prediction normalizes with the middle of the per-sample percentile ranges used in training
        normalization = Normalization(pmin=sum(data.pmin_range) / 2, pmax=sum(data.pmax_range) / 2)
        if opt.loss == "laplace":  # said where users read it: the model folder's config
            from bigcare.models.ensemble import LIMITS

            provenance["limits"] = LIMITS
        kind = {} if iso is None else {"kind": "isotropic", "isotropic": iso}
        if zsub is not None:
            kind = {"kind": "upsampling", "upsampling": UpsamplingConfig(factor=zsub.factor)}
        model_config = ModelConfig(axes="ZYX"[-ndim:], architecture=arch, normalization=normalization,
                                   provenance=provenance, **kind)
        torch.manual_seed(opt.seed)
        model = UNet(arch)
        if opt.method == "gan":
            return _train_gan(cfg, model, model_config, train_batches(opt.seed), validation, device, progress)
        if opt.ensemble > 1:
            return _train_ensemble(cfg, model_config, train_batches, validation, device, precision, progress)
        if progress:
            if iso_provenance.get("sigma_z"):
                est = iso_provenance["sigma_z"]
                print(f"isotropic.psf.sigma_z: auto -> {est['auto']:.3g} (axial_blur_match on planes, rows, columns "
                      f"{est['region_zyx']} of {est['source']})", flush=True)
            what = (f"isotropic (factor {iso.factor:g}) 2D" if iso else
                    f"{ndim}D {str(method).upper().replace('STRUCTN2V', 'structN2V')}" if method else
                    f"{ndim}D CARE")
            print(f"training a {what} U-Net ({sum(p.numel() for p in model.parameters()):,} parameters) on "
                  f"{len(sampler.train_positions)} training / {len(sampler.val_positions)} validation patches, "
                  f"{device} {precision}", flush=True)
        return fit(model, model_config, train_batches(opt.seed), validation=validation, epochs=opt.epochs,
                   steps_per_epoch=opt.steps_per_epoch, lr=opt.lr, lr_schedule=opt.lr_schedule, loss=opt.loss,
                   laplace_beta=opt.laplace_beta,
                   laplace_detach_scale=opt.laplace_detach_scale, device=device,
                   precision=precision, model_dir=cfg.model_dir, resume=opt.resume,
                   tensorboard=opt.tensorboard, seed=opt.seed, progress=progress)


def _self_pairs(sources: list[Source]) -> list[Source]:
    """Each source read as the (image, image) pair of its input (its own target)."""
    return [Source(input=s.input, target=s.input, input_channel=s.input_channel, target_channel=s.input_channel,
                   storage_options=s.storage_options) for s in sources]


def _provenance(cfg: TrainConfig, data: dict, device: str, precision: str) -> dict:
    """The provenance a trained model's config records: data, config, versions, device, date."""
    return {
        "data": data,
        "config": cfg.model_dump(mode="json"),
        "trained_with": {"bigcare": __version__, "torch": torch.__version__, "python": platform.python_version(),
                         "device": device, "precision": precision},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _train_gan(cfg: TrainConfig, generator: UNet, model_config: ModelConfig, batches, validation, device: str,
               progress: bool) -> TrainResult:
    """Wang et al.'s GAN on the sampler's batches (:func:`~bigcare.training.gan.fit_gan`), fp32.

    An "epoch" is ``steps_per_epoch`` iterations, after which the validation MSE picks
    ``model_dir/best``. The GAN starts afresh (``training.resume`` is not read).
    """
    from bigcare.training.gan import Discriminator, fit_gan

    opt, arch = cfg.training, cfg.network
    discriminator = Discriminator(arch.ndim, n_filter_base=arch.n_filter_base)
    if progress:
        print(f"training a {arch.ndim}D GAN (generator {sum(p.numel() for p in generator.parameters()):,}, "
              f"discriminator {sum(p.numel() for p in discriminator.parameters()):,} parameters; lambda "
              f"{opt.lambda_:g}, nu {opt.nu:g}), {device} fp32", flush=True)
    steps = opt.epochs * opt.steps_per_epoch
    history = fit_gan(generator, discriminator, model_config, batches, steps=steps, lam=opt.lambda_, nu=opt.nu,
                      lr_generator=opt.lr, lr_discriminator=opt.lr_discriminator, validation=validation,
                      every=opt.steps_per_epoch, device=device, model_dir=cfg.model_dir, seed=opt.seed)
    per_epoch = [history["generator_loss"][e * opt.steps_per_epoch:(e + 1) * opt.steps_per_epoch]
                 for e in range(opt.epochs)]
    val = history["val_mse"]
    if progress:
        print(f"GAN done: validation MSE {val[0]:.4g} -> {val[-1]:.4g} (best {min(val):.4g}), "
              f"{history['seconds']:.0f} s", flush=True)
    return TrainResult(train_loss=[sum(v) / len(v) for v in per_epoch], val_loss=val, lr=[opt.lr] * opt.epochs,
                       best_epoch=min(range(len(val)), key=val.__getitem__), seconds=history["seconds"],
                       model_dir=Path(cfg.model_dir))


def _train_ensemble(cfg: TrainConfig, model_config: ModelConfig, train_batches, validation, device: str,
                    precision: str, progress: bool) -> TrainResult:
    """Members 0 .. M-1 into ``model_dir/member_k`` (seed and batch order ``seed + k``), then ensemble.json.

    Member 0 is the model a plain training with this config would give. The patch positions and
    the train/validation split are the same for every member (drawn once, from ``seed``).
    """
    from pathlib import Path

    from bigcare.models.ensemble import EnsembleConfig, save_ensemble

    opt, root = cfg.training, Path(cfg.model_dir)
    results = []
    for k in range(opt.ensemble):
        seed = opt.seed + k
        torch.manual_seed(seed)
        model = UNet(cfg.network)
        if progress:
            print(f"ensemble member {k + 1}/{opt.ensemble} (seed {seed})", flush=True)
        results.append(fit(model, model_config, train_batches(seed), validation=validation, epochs=opt.epochs,
                           steps_per_epoch=opt.steps_per_epoch, lr=opt.lr, lr_schedule=opt.lr_schedule, loss=opt.loss,
                           laplace_beta=opt.laplace_beta, laplace_detach_scale=opt.laplace_detach_scale,
                           device=device,
                           precision=precision, model_dir=root / f"member_{k}", resume=opt.resume,
                           tensorboard=opt.tensorboard, seed=seed, progress=progress))
    save_ensemble(root, EnsembleConfig(members=[f"member_{k}/best" for k in range(opt.ensemble)],
                                       provenance={"seeds": [opt.seed + k for k in range(opt.ensemble)],
                                                   "best_val_loss": [min(r.val_loss) for r in results]}))
    result = TrainResult(train_loss=[float(sum(v) / len(v)) for v in zip(*(r.train_loss for r in results))],
                         val_loss=[float(sum(v) / len(v)) for v in zip(*(r.val_loss for r in results))],
                         lr=results[0].lr, best_epoch=results[0].best_epoch, start_epoch=results[0].start_epoch,
                         seconds=sum(r.seconds for r in results), model_dir=root)
    result.members = results
    return result


def _check_model_dir_apart(cfg: TrainConfig) -> None:
    """OutputError when model_dir is, lies inside or contains a source image (before reading anything)."""
    from bigcare.errors import OutputError
    from bigcare.store.urls import overlap

    for src in cfg.data.sources:
        for image in (src.input, src.target):
            how = image and overlap(cfg.model_dir, image)
            if how:
                raise OutputError(f"model_dir {cfg.model_dir} {how} the training image {image}; choose a "
                                  "model_dir outside every source")
