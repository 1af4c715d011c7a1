"""Surface projection CARE in PyTorch: a 3D projection net, Z-softmax weights, a 2D CARE U-Net.

The architecture and its receptive field are in :mod:`bigcare.models.projection_arch` (no
torch); the layers follow CSBDeep's ``ProjectionCARE._build``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bigcare.errors import ModelMismatchError
from bigcare.models.architecture import UNetConfig
from bigcare.models.projection_arch import ProjectionNetConfig, projection_align
from bigcare.models.unet import UNet, _convs

__all__ = ["SurfaceProjection", "ProjectionCARENet"]


class SurfaceProjection(torch.nn.Module):
    """The 3D -> weights sub-network: ``(N, C, Z, Y, X)`` -> weights ``(N, 1, Z, Y, X)``, summing to 1 along Z."""

    def __init__(self, config: ProjectionNetConfig, n_channel_in: int = 1):
        super().__init__()
        c, f, k = config, config.n_filter_base, config.kernel_size
        self.config = config
        self.down = torch.nn.ModuleList(
            _convs(3, [n_channel_in if level == 0 else f] + [f] * c.n_conv_per_depth, k) for level in range(c.depth))
        self.middle = _convs(3, [n_channel_in if c.depth == 0 else f] + [f] * c.n_conv_per_depth, k)
        self.up = torch.nn.ModuleList(_convs(3, [f] * (c.n_conv_per_depth + 1), k) for _ in range(c.depth))
        self.last = torch.nn.Conv3d(f, 1, k, padding=k // 2)

    def logits(self, x: Tensor) -> Tensor:
        """Per-voxel surface logits ``(N, 1, Z, Y, X)`` (before the softmax along Z)."""
        p = self.config.pool
        h = x
        for block in self.down:
            h = F.max_pool3d(block(h), (1, p, p))
        h = self.middle(h)
        for block in self.up:
            h = block(F.interpolate(h, scale_factor=(1, p, p), mode="nearest"))
        return self.last(h)

    def forward(self, x: Tensor) -> Tensor:
        """Weights ``(N, 1, Z, Y, X)``: the softmax of :meth:`logits` along Z (in float32)."""
        return torch.softmax(self.logits(x).float(), dim=2)


class ProjectionCARENet(torch.nn.Module):
    """Surface projection CARE: :class:`SurfaceProjection`, the weighted sum over Z, a 2D :class:`UNet`.

    Parameters
    ----------
    config : UNetConfig
        The 2D CARE sub-network (``ndim`` 2); as ``config`` it is what the model folder stores
        as ``architecture``.
    projection : ProjectionNetConfig
        The projection sub-network.
    """

    def __init__(self, config: UNetConfig, projection: ProjectionNetConfig):
        super().__init__()
        if config.ndim != 2:
            raise ModelMismatchError(f"the CARE sub-network of a projection model is 2D, got ndim={config.ndim}")
        self.config = config
        self.projection = projection
        self.project = SurfaceProjection(projection, config.n_channel_in)
        self.care = UNet(config)

    def weights(self, x: Tensor) -> Tensor:
        """The projection weights ``(N, 1, Z, Y, X)`` of a stack ``x`` (N, C, Z, Y, X)."""
        if x.ndim != 5 or x.shape[1] != self.config.n_channel_in:
            raise ModelMismatchError(f"a projection model takes (N, {self.config.n_channel_in}, Z, Y, X) stacks, "
                                     f"got shape {tuple(x.shape)}")
        a = projection_align(self.projection, self.config)
        if x.shape[3] % a or x.shape[4] % a:
            raise ModelMismatchError(f"projection input Y, X sizes {tuple(x.shape[3:])} must be multiples of {a}")
        return self.project(x)

    def project_stack(self, x: Tensor) -> Tensor:
        """The learned projection ``sum_z w * x`` (N, C, Y, X), before the CARE sub-network."""
        return (self.weights(x) * x.float()).sum(dim=2).to(x.dtype)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """The CARE sub-network's heads on the learned projection of ``x``, each (N, C_out, Y, X)."""
        return self.care(self.project_stack(x))
