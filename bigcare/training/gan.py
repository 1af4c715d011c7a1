"""The cross-modality super-resolution GAN of Wang et al. (Nature Methods 2019).

::

    x (low-res, on the target grid) --G--> G(x) --D--> D(G(x)) in (0, 1)
                                       y   --D--> D(y)

    G: a residual U-Net (:func:`generator_config`): 4 down blocks of 3 convs + LeakyReLU(0.1)
       with a residual add, average pooling, 4 up blocks; an ordinary bigcare U-Net, so the
       generator is saved as a model folder and restored blockwise like any CARE model.
    D: conv blocks (conv + LeakyReLU, strided conv + LeakyReLU, channels doubling), global
       average pooling, two dense layers, sigmoid (:class:`Discriminator`).

    loss_G = -log D(G(x)) + lambda * MSE(G(x), y) - nu * log((1 + SSIM(G(x), y)) / 2)
    loss_D = -log D(y) - log(1 - D(G(x)))

Adam at 1e-4 (G) and 1e-5 (D), one G and one D step per iteration (:func:`fit_gan`).
SSIM is the Gaussian-window SSIM (sigma 1.5, data range 1: the batches are normalised).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from bigcare.models.architecture import UNetConfig
from bigcare.models.folder import ModelConfig, save_model
from bigcare.models.unet import UNet
from bigcare.training.trainer import close_stream

__all__ = ["generator_config", "Discriminator", "ssim", "generator_loss", "discriminator_loss", "fit_gan"]

_EPS = 1e-7


def generator_config(ndim: int = 2, n_filter_base: int = 32, depth: int = 4) -> UNetConfig:
    """The generator's architecture: a residual U-Net with Wang et al.'s blocks (kernel 3)."""
    return UNetConfig(ndim=ndim, depth=depth, n_filter_base=n_filter_base, kernel_size=3, n_conv_per_depth=3,
                      pooling="avg", activation="leaky_relu", block_residual=True, residual=True)


class Discriminator(torch.nn.Module):
    """Conv blocks, global average pooling, two dense layers and a sigmoid: P(the image is real).

    Parameters
    ----------
    ndim : int
        2 or 3 spatial dimensions.
    n_filter_base : int
        Channels of the first block, doubled by each further block.
    n_blocks : int
        Blocks of (conv + LeakyReLU(0.1), stride-2 conv + LeakyReLU(0.1)).
    """

    def __init__(self, ndim: int = 2, n_filter_base: int = 32, n_blocks: int = 4):
        super().__init__()
        conv = torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d
        layers: list[torch.nn.Module] = []
        ch = 1
        for b in range(n_blocks):
            out = n_filter_base * 2**b
            layers += [conv(ch, out, 3, padding=1), torch.nn.LeakyReLU(0.1),
                       conv(out, out, 3, stride=2, padding=1), torch.nn.LeakyReLU(0.1)]
            ch = out
        self.features = torch.nn.Sequential(*layers)
        self.dense = torch.nn.Sequential(torch.nn.Linear(ch, ch), torch.nn.LeakyReLU(0.1), torch.nn.Linear(ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        """``(N, 1, *spatial)`` -> ``(N,)`` probabilities."""
        h = self.features(x)
        return torch.sigmoid(self.dense(h.mean(dim=tuple(range(2, h.ndim))))).squeeze(1)


def _gaussian_window(ndim: int, sigma: float = 1.5, radius: int = 5, dtype=torch.float32, device=None) -> Tensor:
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    w = g
    for _ in range(ndim - 1):
        w = w[..., None] * g
    return w[None, None]


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """Mean Gaussian-window SSIM (sigma 1.5, radius 5, valid region) of ``(N, 1, *spatial)`` tensors.

    Equals ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range)`` up to its border handling.
    """
    ndim = a.ndim - 2
    w = _gaussian_window(ndim, dtype=a.dtype, device=a.device)
    conv = F.conv2d if ndim == 2 else F.conv3d
    mu_a, mu_b = conv(a, w), conv(b, w)
    var_a = conv(a * a, w) - mu_a**2
    var_b = conv(b * b, w) - mu_b**2
    cov = conv(a * b, w) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean()


def generator_loss(d_fake: Tensor, pred: Tensor, target: Tensor, lam: float, nu: float) -> Tensor:
    """``mean(-log D(G(x))) + lam * MSE(G(x), y) - nu * log((1 + SSIM(G(x), y)) / 2)``."""
    adversarial = -torch.log(d_fake.clamp_min(_EPS)).mean()
    structural = -torch.log(((1 + ssim(pred, target)) / 2).clamp_min(_EPS))
    return adversarial + lam * F.mse_loss(pred, target) + nu * structural


def discriminator_loss(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """``mean(-log D(y)) + mean(-log(1 - D(G(x))))`` (binary cross-entropy, real = 1)."""
    return -torch.log(d_real.clamp_min(_EPS)).mean() - torch.log((1 - d_fake).clamp_min(_EPS)).mean()


def fit_gan(generator: UNet, discriminator: Discriminator, config: ModelConfig,
            batches: Iterator[tuple[np.ndarray, ...]], *, steps: int, lam: float = 1.0, nu: float = 1.0,
            lr_generator: float = 1e-4, lr_discriminator: float = 1e-5, validation: Iterable | None = None,
            every: int = 100, device: str = "cpu", model_dir: str | Path | None = None, seed: int = 0) -> dict:
    """Train the GAN: per iteration one generator and one discriminator Adam step.

    Parameters
    ----------
    generator : UNet
        E.g. ``UNet(generator_config(2))``; modified in place.
    discriminator : Discriminator
    config : ModelConfig
        The generator's model config, saved with it.
    batches : iterator of (x, y)
        Normalised float32 ``(N, 1, *spatial)`` pairs (e.g. ``PatchSampler.batches("train")``).
    steps : int
        Iterations.
    lam, nu : float
        Weights of the MSE and of the SSIM term of the generator loss.
    lr_generator, lr_discriminator : float
        Adam learning rates (Wang et al.: 1e-4 and 1e-5).
    validation : iterable of (x, y), optional
        Fixed batches; every ``every`` steps their MSE picks ``model_dir/best``.
    device : str
    model_dir : path, optional
        ``best/`` and ``last/`` generator model folders (config.json + safetensors, restored by
        ``bigcare restore``), ``last/discriminator.safetensors``, ``history.jsonl``.
    seed : int

    Returns
    -------
    dict
        ``generator_loss``, ``discriminator_loss`` (per step), ``val_mse`` (per check), ``seconds``.
    """
    torch.manual_seed(seed)
    generator.to(device)
    discriminator.to(device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr_generator)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr_discriminator)
    first = config.architecture.heads[0].name
    val = [tuple(torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(device) for a in b) for b in (validation or [])]
    out = Path(model_dir) if model_dir else None
    history: dict = {"generator_loss": [], "discriminator_loss": [], "val_mse": []}
    best, t0 = math.inf, time.perf_counter()
    for step in range(steps):
        x, y = (torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(device) for a in next(batches)[:2])
        generator.train()
        fake = generator(x)[first]
        opt_g.zero_grad(set_to_none=True)
        loss_g = generator_loss(discriminator(fake), fake, y, lam, nu)
        loss_g.backward()
        opt_g.step()
        opt_d.zero_grad(set_to_none=True)
        loss_d = discriminator_loss(discriminator(y), discriminator(fake.detach()))
        loss_d.backward()
        opt_d.step()
        history["generator_loss"].append(loss_g.item())
        history["discriminator_loss"].append(loss_d.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            generator.eval()
            with torch.inference_mode():
                mse = float(np.mean([F.mse_loss(generator(vx)[first], vy).item() for vx, vy in val])) if val else math.nan
            history["val_mse"].append(mse)
            if out is not None:
                record = {"step": step + 1, "generator_loss": loss_g.item(), "discriminator_loss": loss_d.item(),
                          "val_mse": mse, "seconds": time.perf_counter() - t0}
                provenance = dict(config.provenance, training={"method": "gan", "lambda": lam, "nu": nu, **record})
                cfg = config.model_copy(update={"provenance": provenance})
                save_model(out / "last", generator, cfg, overwrite=True)
                save_file({k: v.detach().cpu().contiguous() for k, v in discriminator.state_dict().items()},
                          str(out / "last" / "discriminator.safetensors"))
                if not mse >= best:  # also when there is no validation (NaN): best = last
                    best = mse if not math.isnan(mse) else best
                    save_model(out / "best", generator, cfg, overwrite=True)
                with open(out / "history.jsonl", "a") as log:
                    log.write(json.dumps(record) + "\n")
    close_stream(batches)
    generator.eval()
    history["seconds"] = time.perf_counter() - t0
    return history
