"""Surface projection and upsampling CARE on one region (CSBDeep's ProjectionCARE, UpsamplingCARE).

Projection: a block spans the whole Z extent of the stack and tiles Y and X with the lateral
halo of both sub-networks (:func:`bigcare.models.projection_arch.projection_halo`); the output
has no Z axis::

    volume z ───────────────────────────── whole Z, never tiled (halo 0, alignment 1)
           y ├── halo ┤ write region ├ halo ┤ aligned on lcm of both pooling divisors
    block (C, Z, Y', X') ──normalize, pad Y', X' by reflection──► net ──► (C_out, Y', X') crop

The projection sub-network never pools Z, so no plane is padded: the Z-softmax sees the real
planes only, and a block's read region along Y and X is aligned like a CARE block's, so blockwise
equals whole-volume prediction. A stack deeper than one network call can hold (the smallest
lateral window, ``align + 2 * halo`` squared, times the depth over the device's
:data:`~bigcare.blocks.sizing.CALL_VOXELS`) is refused before anything is written
(:meth:`ProjectionPredictor.check_volume`); Z-tiling would not be exact (the softmax is over all
planes) and is not attempted.

Upsampling: the engine upsamples the region's Z by ``factor`` with the node-aligned linear zoom
the isotropic path uses (:mod:`bigcare.blocks.zoom`), then a 3D CARE network restores it; the
model was trained on targets subsampled along Z and upsampled back the same way
(:mod:`bigcare.training.projection`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import numpy as np

from bigcare.blocks.sizing import CALL_VOXELS
from bigcare.errors import InputError, ModelMismatchError
from bigcare.models.folder import ModelConfig
from bigcare.models.projection_arch import projection_align, projection_halo
from bigcare.normalization import Normalizer
from bigcare.predictors.base import WrappingPredictor
from bigcare.predictors.care import CAREPredictor
from bigcare.types import Precision

if TYPE_CHECKING:
    from bigcare.models.projection import ProjectionCARENet

__all__ = ["ProjectionPredictor", "UpsamplingPredictor"]


class ProjectionPredictor(CAREPredictor):
    """Projects a stack (C, Z, Y, X) to a restored 2D image (C_out, Y, X) with a projection model."""

    drop_axes = "z"
    channels_last = False  # 3D projection layers and 2D CARE layers in one module

    def __init__(self, model, config: ModelConfig, *, device: str = "cpu", precision: Precision = "fp32"):
        if config.projection is None:
            raise ModelMismatchError("a projection predictor needs a model of kind 'projection'")
        super().__init__(model, config, device=device, precision=precision)
        a = projection_align(config.projection.network, config.architecture)
        h = projection_halo(config.projection.network, config.architecture)
        self.spatial_axes = "zyx"
        self.halo = (0, h, h)  # Z: a block reads every plane
        self.align = (1, a, a)

    def max_depth(self, device: str | None = None) -> int:
        """The deepest stack one network call holds on ``device`` (default this predictor's)."""
        kind = "cuda" if str(device or self.device).startswith("cuda") else "cpu"
        return max(1, CALL_VOXELS[kind] // (self.align[1] + 2 * self.halo[1]) ** 2)

    def check_volume(self, sizes: dict[str, int], device: str, name: str) -> None:
        """InputError when ``name``'s Z (``sizes["z"]``) is deeper than :meth:`max_depth` allows."""
        depth, limit = int(sizes.get("z", 1)), self.max_depth(device)
        if depth > limit:
            raise InputError(
                f"{name} has {depth} Z planes, but a projection block spans the whole Z and one call on {device} "
                f"holds at most {limit} planes (the smallest lateral window, {self.align[1] + 2 * self.halo[1]}^2 "
                f"voxels, times the depth within {CALL_VOXELS['cuda' if str(device).startswith('cuda') else 'cpu']} "
                "voxels); restore on a GPU, or crop the stack along Z around the surface; nothing was written")

    def weights(self, x: np.ndarray, normalizer: Normalizer) -> np.ndarray:
        """The projection weights (Z, Y, X) of a stack ``x`` (C, Z, Y, X) in raw intensities (sum 1 over Z)."""
        import torch

        xn = normalizer.normalize(x)[None]
        pads = [(0, 0), (0, 0), (0, 0)] + [(0, -n % self.align[1]) for n in xn.shape[3:]]
        xp = np.pad(xn, pads, mode="reflect") if any(p for _, p in pads) else xn
        with torch.inference_mode():
            net = cast("ProjectionCARENet", self.model)
            w = net.weights(torch.from_numpy(np.ascontiguousarray(xp, np.float32)).to(self.device))
        return w[0, 0, :, :x.shape[2], :x.shape[3]].float().cpu().numpy()  # type: ignore[no-any-return]


class UpsamplingPredictor(WrappingPredictor):
    """Restores a Z-upsampled 3D region with the 3D network of an upsampling model.

    Parameters
    ----------
    net : CAREPredictor
        The 3D network (config kind ``"upsampling"``).
    """

    def __init__(self, net: CAREPredictor):
        up = net.config.upsampling
        if up is None or net.spatial_axes != "zyx":
            raise ModelMismatchError("an upsampling predictor needs a 3D model of kind 'upsampling'")
        self.net, self.config, self.kinds = net, net.config, net.kinds
        # the volume's own voxel sizes need not match the training factor (targets may be anisotropic too)
        self.adopt(net, zoom=(float(up.factor), 1.0, 1.0), factor=None)

    def predict(self, x: np.ndarray, normalizer: Normalizer) -> dict[str, np.ndarray]:
        """Restore region ``x`` (C, Z', Y, X) of the Z-upsampled volume, in raw intensities."""
        return self.net.predict(x, normalizer)
