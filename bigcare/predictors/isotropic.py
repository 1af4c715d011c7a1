"""Isotropic restoration of one region: a 2D network over its XZ and YZ slices (IsoNet).

The engine hands the predictor a region of the *Z-upsampled* volume (see
:mod:`bigcare.blocks.zoom`; the plan's zoom is ``(factor, 1, 1)``). The 2D network, trained on
lateral slices degraded like axial ones (:mod:`bigcare.training.isotropic`), restores every XZ
slice (Z down the rows, X along the columns) and every YZ slice (Z down, Y along); the two
results are combined voxel by voxel::

    region (C, Z', Y, X) ──normalize──► XZ slices: batch Y, image (Z', X) ──► net ─┐
                                         YZ slices: batch X, image (Z', Y) ──► net ─┴─► mean ──► denormalize

Both passes pad at the high end by reflection to the pooling grid, exactly as a CARE predictor
does, so a block's window (aligned on the pooling grid in all three axes) predicts what the
whole volume predicts there.
"""

from __future__ import annotations

import numpy as np

from bigcare.errors import ModelMismatchError
from bigcare.normalization import Normalizer
from bigcare.predictors.base import WrappingPredictor
from bigcare.predictors.care import CAREPredictor

__all__ = ["IsotropicPredictor"]

#: input voxels per network call (a batch of slices), per device type; bounds activation memory
SLICE_BATCH_VOXELS = {"cpu": 2**21, "cuda": 2**24}


class IsotropicPredictor(WrappingPredictor):
    """Restores a Z-upsampled 3D region with a 2D isotropic-restoration network.

    Parameters
    ----------
    net : CAREPredictor
        The 2D network (config kind ``"isotropic"``).
    """

    def __init__(self, net: CAREPredictor):
        iso = net.config.isotropic
        if iso is None or net.spatial_axes != "yx":
            raise ModelMismatchError("an isotropic predictor needs a 2D model of kind 'isotropic'")
        self.net, self.config, self.combine = net, net.config, iso.combine
        factor = float(iso.factor)
        # the network slides along Z' and X (XZ pass) and Z' and Y (YZ pass)
        self.adopt(net, spatial_axes="zyx", zoom=(factor, 1.0, 1.0), factor=factor,
                   halo=(net.halo[0],) * 3, align=(net.align[0],) * 3)

    def predict(self, x: np.ndarray, normalizer: Normalizer) -> dict[str, np.ndarray]:
        """Restore region ``x`` (C, Z', Y, X) of the Z-upsampled volume, in raw intensities.

        Intensity heads combine the XZ and YZ passes by ``combine`` (mean or geometric mean); a
        probabilistic model's scale head takes the larger of the two scales, voxel by voxel. That
        is conservative: each pass saw the volume along a different axial orientation, the two
        are not independent measurements whose uncertainty would shrink when combined, and the
        interval must cover the worse of the two views. CSBDeep's probabilistic isotropic
        prediction does the same (``np.maximum`` of the rotated scales).

        Returns
        -------
        dict of str to numpy.ndarray
            One float32 array (C_out, Z', Y, X) per head, in intensity units.
        """
        if x.ndim != 4:
            raise ModelMismatchError(f"isotropic prediction needs a (C, Z, Y, X) region, got shape {x.shape}")
        xn = normalizer.normalize(x)
        batch = SLICE_BATCH_VOXELS.get(self.net.device.type, SLICE_BATCH_VOXELS["cpu"])
        xz = self.net.forward_normalized(xn.transpose(2, 0, 1, 3), batch)  # (Y, C, Z', X)
        yz = self.net.forward_normalized(xn.transpose(3, 0, 1, 2), batch)  # (X, C, Z', Y)
        out = {}
        for name in self.outputs:
            a = xz[name].transpose(1, 2, 0, 3)
            b = yz[name].transpose(1, 2, 3, 0)
            if self.net.kinds[name] == "scale":  # probabilistic: the larger of the two scales
                y = np.maximum(a, b)
            elif self.combine == "geometric" and self.net.kinds[name] == "intensity":
                y = np.sqrt(np.maximum(a, 0) * np.maximum(b, 0))
            else:
                y = (a + b) * np.float32(0.5)
            out[name] = self.net.denormalize(name, np.ascontiguousarray(y), normalizer)
        return out
