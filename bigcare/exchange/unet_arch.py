"""The CARE U-Net as one self-contained file (torch only): the architecture source of exported packages.

A bioimage.io package's ``pytorch_state_dict`` weights name a Python file and a callable that
builds the network; consumers (bioimageio.core, other tools) import this file without bigcare.
So it depends on torch alone, and takes plain JSON keyword arguments. Its state-dict keys and
its output are those of :class:`bigcare.models.unet.UNet` (``tests/test_exchange_bioimageio.py``
checks both), but it returns the heads as a tuple of tensors in the package's output order, and
it is TorchScript-able (``torch.jit.script``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BigcareUNet"]

_ACTIVATION_CODES = {"linear": 0, "softplus": 1, "softplus_eps": 2, "sigmoid": 3, "relu": 4}


def _convs(ndim: int, channels: list[int], kernel_size: int) -> torch.nn.Sequential:
    conv = torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d
    layers: list[torch.nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [conv(c_in, c_out, kernel_size, padding=kernel_size // 2), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


class BigcareUNet(torch.nn.Module):
    """CSBDeep's CARE U-Net (max pooling, nearest upsampling, 'same' convs + ReLU, 1x1 heads).

    Parameters
    ----------
    ndim : int
        2 or 3 spatial dimensions.
    depth, n_filter_base, kernel_size, n_conv_per_depth, pool, n_channel_in, n_channel_out : int
        As :class:`bigcare.models.architecture.UNetConfig`.
    residual : bool
        Add the input to the first head before its activation.
    heads : list of [str, str]
        ``[name, activation]`` per output; activation one of linear, softplus, softplus_eps
        (softplus + 1e-3), sigmoid, relu.
    """

    def __init__(self, ndim: int, depth: int, n_filter_base: int, kernel_size: int, n_conv_per_depth: int,
                 pool: int, n_channel_in: int, n_channel_out: int, residual: bool, heads: list[list[str]]):
        super().__init__()
        nf, n, k = n_filter_base, n_conv_per_depth, kernel_size
        self.ndim, self.depth, self.pool, self.residual = ndim, depth, pool, residual
        self.down = torch.nn.ModuleList()
        ch = n_channel_in
        for level in range(depth):
            self.down.append(_convs(ndim, [ch] + [nf * 2**level] * n, k))
            ch = nf * 2**level
        self.middle = _convs(ndim, [ch] + [nf * 2**depth] * (n - 1) + [nf * 2 ** max(0, depth - 1)], k)
        ch = nf * 2 ** max(0, depth - 1)
        # keys "1", "0": bigcare's state-dict keys (up.<level>), held deepest first, the order they run in
        # (TorchScript iterates a ModuleDict but cannot index a ModuleList with a variable)
        self.up = torch.nn.ModuleDict()
        for level in reversed(range(depth)):
            ch_in = ch + nf * 2**level
            ch = nf * 2 ** max(0, level - 1)
            self.up[str(level)] = _convs(ndim, [ch_in] + [nf * 2**level] * (n - 1) + [ch], k)
        conv = torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d
        # a ModuleDict keeps bigcare's state-dict keys (heads.<name>.weight); the order is the heads'
        self.heads = torch.nn.ModuleDict({name: conv(ch, n_channel_out, 1) for name, _ in heads})
        self.codes = [_ACTIVATION_CODES[activation] for _, activation in heads]

    def _pool(self, h: Tensor) -> Tensor:
        if self.ndim == 2:
            return F.max_pool2d(h, self.pool)
        return F.max_pool3d(h, self.pool)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(N, n_channel_in, *spatial)`` -> one ``(N, n_channel_out, *spatial)`` tensor per head."""
        skips: list[Tensor] = []
        h = x
        for block in self.down:
            h = block(h)
            skips.append(h)
            h = self._pool(h)
        h = self.middle(h)
        for i, block in enumerate(self.up.values()):
            skip = skips[self.depth - 1 - i]
            h = block(torch.cat([F.interpolate(h, scale_factor=float(self.pool), mode="nearest"), skip], dim=1))
        out: list[Tensor] = []
        for i, head in enumerate(self.heads.values()):
            y = head(h)
            if i == 0 and self.residual:
                y = y + x
            code = self.codes[i]
            if code == 1:
                y = F.softplus(y)
            elif code == 2:
                y = F.softplus(y) + 1e-3
            elif code == 3:
                y = torch.sigmoid(y)
            elif code == 4:
                y = F.relu(y)
            out.append(y)
        return out
