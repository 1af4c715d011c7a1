"""CARE U-Net (CSBDeep's ``unet_block`` + ``common_unet``) in PyTorch, and its receptive field.

The network, for ``depth=2`` (``F = n_filter_base``, ``n = n_conv_per_depth``; each ``up``
feeds the ``cat`` one level above, the skip connection feeds it from the left)::

    level 0  x - n conv F ------------------------------> cat - (n-1) conv F, conv F - heads
                  |                                         ^
    level 1       pool - n conv 2F ----> cat - (n-1) conv 2F, conv F - up
                          |               ^
    level 2               pool - (n-1) conv 4F, conv 2F - up

Every conv is ``kernel_size`` wide with 'same' zero padding and ReLU; pooling is max pooling by
``pool`` (or N2V2's max-blur pooling, ``pooling="maxblur"``); upsampling is nearest-neighbour by
``pool``. N2V2 also drops the level-0 skip connection (``top_skip=False``). The GAN generator of
Wang et al. 2019 (:func:`bigcare.training.gan.generator_config`) uses average pooling, LeakyReLU(0.1)
and residual down blocks (``pooling="avg"``, ``activation="leaky_relu"``, ``block_residual=True``). Each head is a 1x1 conv to
``n_channel_out`` channels; with ``residual`` the input is added to the first head's linear
output before its activation (as in CSBDeep's ``custom_unet``).

The architecture (:class:`~bigcare.models.architecture.UNetConfig`) and the receptive field
derived analytically from these layers live in :mod:`bigcare.models.architecture`, which needs
no torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bigcare.errors import ModelMismatchError
from bigcare.models.architecture import UNetConfig, divisor

__all__ = ["UNet"]

_ACTIVATIONS = {
    "linear": lambda t: t,
    "softplus": F.softplus,
    "softplus_eps": lambda t: F.softplus(t) + 1e-3,  # CSBDeep's scale head: softplus + eps_scale
    "sigmoid": torch.sigmoid,
    "relu": F.relu,
}

def _max_blur_pool(x: Tensor) -> Tensor:
    """N2V2's pooling (Hoeck et al. 2022, after Zhang 2019): a stride-1 max over each pair of
    neighbours along every axis, then a separable [1, 2, 1] / 4 blur, zero-padded, with stride 2.

    Output ``m`` depends on inputs ``2m - 1 .. 2m + 2`` along each axis (the receptive field of
    :mod:`bigcare.models.architecture`); even sizes halve exactly.
    """
    ndim = x.ndim - 2
    pooled = (F.max_pool2d if ndim == 2 else F.max_pool3d)(x, kernel_size=2, stride=1)  # n -> n - 1
    one = torch.tensor([0.25, 0.5, 0.25], dtype=x.dtype, device=x.device)
    kernel = one
    for _ in range(ndim - 1):
        kernel = kernel[..., None] * one
    kernel = kernel.expand(x.shape[1], 1, *(3,) * ndim).contiguous()
    conv = F.conv2d if ndim == 2 else F.conv3d
    # n - 1 voxels, padded by one zero on both sides, width 3, stride 2: n / 2 outputs for even n
    return conv(pooled, kernel, padding=1, stride=2, groups=x.shape[1])


def _convs(ndim: int, channels: list[int], kernel_size: int, activation: str = "relu") -> torch.nn.Sequential:
    conv = torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d
    layers: list[torch.nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        # in-place activation: one full-resolution tensor less alive per layer (no parameters change)
        act = torch.nn.LeakyReLU(0.1, inplace=True) if activation == "leaky_relu" else torch.nn.ReLU(inplace=True)
        layers += [conv(c_in, c_out, kernel_size, padding=kernel_size // 2), act]
    return torch.nn.Sequential(*layers)


def _padded(x: Tensor, channels: int) -> Tensor:
    """``x`` with zero channels appended up to ``channels`` (a residual across a widening block)."""
    if x.shape[1] >= channels:
        return x[:, :channels]
    return F.pad(x, (0, 0) * (x.ndim - 2) + (0, channels - x.shape[1]))


class UNet(torch.nn.Module):
    """CARE U-Net with one or more heads.

    Parameters
    ----------
    config : UNetConfig
        The architecture.

    Notes
    -----
    Filter counts follow CSBDeep's ``unet_block`` exactly: level ``l`` down convs have
    ``F * 2**l`` filters; the bottom has ``n - 1`` convs of ``F * 2**depth`` then one of
    ``F * 2**(depth - 1)``; level ``l`` up convs have ``n - 1`` convs of ``F * 2**l`` then one of
    ``F * 2**max(0, l - 1)``.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        nf, n, k = c.n_filter_base, c.n_conv_per_depth, c.kernel
        self.down = torch.nn.ModuleList()
        ch = c.n_channel_in
        for level in range(c.depth):
            self.down.append(_convs(c.ndim, [ch] + [nf * 2**level] * n, k, c.activation))
            ch = nf * 2**level
        self.middle = _convs(
            c.ndim, [ch] + [nf * 2**c.depth] * (n - 1) + [nf * 2 ** max(0, c.depth - 1)], k, c.activation
        )
        ch = nf * 2 ** max(0, c.depth - 1)
        up = []
        for level in reversed(range(c.depth)):
            ch_in = ch + (nf * 2**level if level > 0 or c.top_skip else 0)  # upsampled + skip
            ch = nf * 2 ** max(0, level - 1)
            up.append(_convs(c.ndim, [ch_in] + [nf * 2**level] * (n - 1) + [ch], k, c.activation))
        self.up = torch.nn.ModuleList(reversed(up))  # self.up[level]
        conv = torch.nn.Conv2d if c.ndim == 2 else torch.nn.Conv3d
        self.heads = torch.nn.ModuleDict({h.name: conv(ch, c.n_channel_out, 1) for h in c.heads})
        #: heads that read the features without passing a gradient back into the network (training
        #: only; see bigcare.training.trainer.fit's ``laplace_detach_scale``)
        self.detach_heads: frozenset[str] = frozenset()
        max_pool = F.max_pool2d if c.ndim == 2 else F.max_pool3d
        avg_pool = F.avg_pool2d if c.ndim == 2 else F.avg_pool3d
        self._pool = (_max_blur_pool if c.pooling == "maxblur" else (lambda t: avg_pool(t, c.pool))
                      if c.pooling == "avg" else (lambda t: max_pool(t, c.pool)))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Run the network.

        Parameters
        ----------
        x : Tensor
            ``(N, n_channel_in, *spatial)`` with every spatial size divisible by
            :func:`divisor`.

        Returns
        -------
        dict of str to Tensor
            ``{head.name: (N, n_channel_out, *spatial)}`` in the order of ``config.heads``.

        Raises
        ------
        ModelMismatchError
            If ``x`` has the wrong number of dimensions or channels, or a spatial size not
            divisible by :func:`divisor`.
        """
        c = self.config
        if x.ndim != c.ndim + 2:
            raise ModelMismatchError(
                f"UNet input must have shape (N, C, {', '.join('ZYX'[3 - c.ndim:])}) "
                f"({c.ndim + 2} dimensions) for a {c.ndim}D network, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != c.n_channel_in:
            raise ModelMismatchError(
                f"UNet input has {x.shape[1]} channel(s) (shape {tuple(x.shape)}), the network "
                f"expects n_channel_in={c.n_channel_in}"
            )
        d = divisor(c)
        if any(s % d for s in x.shape[2:]):
            raise ModelMismatchError(
                f"UNet input spatial shape {tuple(x.shape[2:])} must be divisible by "
                f"pool**depth = {c.pool}**{c.depth} = {d} along every axis"
            )
        skips = []
        h = x
        for level in range(c.depth):
            # Wang et al.'s residual block: the block's input, zero-padded to its channels, is added
            h = self.down[level](h) + _padded(h, c.n_filter_base * 2**level) if c.block_residual else self.down[level](h)
            skips.append(h)
            h = self._pool(h)
        h = self.middle(h)
        for level in reversed(range(c.depth)):
            # the skip leaves the list and the upsampled tensor is not kept: only the
            # concatenation is alive while the level's convolutions run (peak memory)
            h = F.interpolate(h, scale_factor=c.pool, mode="nearest")
            skip = skips.pop()
            if level > 0 or c.top_skip:
                h = torch.cat([h, skip], dim=1)
            del skip
            h = self.up[level](h)
        out = {}
        for i, head in enumerate(c.heads):
            y = self.heads[head.name](h.detach() if head.name in self.detach_heads else h)
            if i == 0 and c.residual:
                y = y + x
            out[head.name] = _ACTIVATIONS[head.activation](y)
        return out
