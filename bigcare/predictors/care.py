"""CARE restoration of one region with a U-Net (denoising / deconvolution-style restoration)."""

from __future__ import annotations

import threading

import numpy as np
import torch

from bigcare.errors import ModelMismatchError
from bigcare.models.architecture import divisor, halo
from bigcare.models.folder import ModelConfig
from bigcare.models.unet import UNet
from bigcare.normalization import Normalizer
from bigcare.predictors.fastpath import prepare_model, resolve_precision
from bigcare.types import PRECISIONS, Precision, check_choice

__all__ = ["CAREPredictor"]

# One model call at a time per process: torch already uses all the threads it was given, and
# dask threads that are not computing keep reading and writing blocks meanwhile.
_COMPUTE_LOCK = threading.Lock()


class CAREPredictor:
    """Runs a CARE U-Net on a region: normalize, pad to the pooling grid, predict, crop, undo.

    The region is padded at its high end only, by reflection, up to a multiple of the network's
    pooling divisor. Blocks read aligned regions, so interior blocks are never padded and the
    last block along an axis is padded exactly as the whole volume is: blockwise equals
    whole-volume prediction.
    """

    #: Spatial axes the network's outputs lack (a projection model's "z"); none for CARE.
    drop_axes = ""
    #: prepare_model's channels_last (None: its measured default; False for networks mixing 2D and 3D layers).
    channels_last: bool | None = None

    def __init__(self, model: UNet, config: ModelConfig, *, device: str = "cpu", precision: Precision = "fp32"):
        check_choice("precision", precision, PRECISIONS)
        # auto: resolved here, in the process (and on the device) that computes
        precision = resolve_precision(precision, device)  # type: ignore[assignment]
        arch = config.architecture
        self.model = model.to(device).eval()
        # the fastest correct execution measured for this device and precision (channels-last,
        # oneDNN convolutions on CPU, cuDNN autotuning on GPU, autocast): bigcare.predictors.fastpath
        self._run = prepare_model(self.model, device=device, precision=precision, channels_last=self.channels_last)
        self.config = config
        self.device = torch.device(device)
        self.precision = precision
        self.spatial_axes = config.axes.lower()
        self.outputs = tuple(h.name for h in arch.heads)
        self.n_channel_in = arch.n_channel_in
        self.n_channel_out = arch.n_channel_out
        self.halo = (halo(arch),) * arch.ndim
        self.align = (divisor(arch),) * arch.ndim
        self.zoom = None  # same grid in and out
        self.factor = None
        self.fingerprint = ""  # a model folder is known by its hash
        self.pmin = config.normalization.pmin
        self.pmax = config.normalization.pmax
        # linear and ReLU heads are intensities (CSBDeep's unet_last_activation 'relu' too); softplus
        # heads are scales (only rescaled, not shifted); sigmoid heads stay as predicted
        self.kinds = {h.name: ("intensity" if h.activation in ("linear", "relu") else
                                "scale" if h.activation in ("softplus", "softplus_eps") else "raw") for h in arch.heads}
        # a recalibrated probabilistic model (bigcare calibrate --recalibrate): its scales times the factor
        self.scale_factor = config.calibration.scale_factor if config.calibration is not None else 1.0

    def forward_normalized(self, xn: np.ndarray, max_voxels: int | None = None) -> dict[str, np.ndarray]:
        """Run the network on normalized regions ``xn`` of shape (B, C, *spatial).

        Each region is padded at its high end by reflection to the pooling grid, and the
        prediction cropped back. Regions go through the network ``max_voxels`` (input voxels
        per call, default: all) at a time, so a batch of many 2D slices fills the device
        without holding every activation at once.

        Returns
        -------
        dict of str to numpy.ndarray
            Per head, float32 (B, C_out, *spatial), in normalized units.
        """
        if xn.shape[1] != self.n_channel_in:
            raise ModelMismatchError(
                f"model expects {self.n_channel_in} input channel(s), the region has {xn.shape[1]}"
            )
        spatial = xn.shape[2:]
        pads = [(0, 0), (0, 0)] + [(0, -n % a) for n, a in zip(spatial, self.align)]
        if any(p for _, p in pads):
            xn = np.pad(xn, pads, mode="reflect")
        per_item = int(np.prod(xn.shape[1:]))
        step = len(xn) if max_voxels is None else max(1, max_voxels // per_item)
        kept = tuple(n for a, n in zip(self.spatial_axes, spatial) if a not in self.drop_axes)
        crop = (slice(None), slice(None)) + tuple(slice(0, n) for n in kept)
        out = {name: np.empty((len(xn), self.n_channel_out) + kept, np.float32) for name in self.outputs}
        for a in range(0, len(xn), step):
            tensor = torch.from_numpy(np.ascontiguousarray(xn[a:a + step], dtype=np.float32))
            if self.device.type == "cuda":  # page-locked, so the copy to the GPU is asynchronous
                tensor = tensor.pin_memory()
            tensor = tensor.to(self.device, non_blocking=True)
            with _COMPUTE_LOCK:
                raw = self._run(tensor)
            for name in self.outputs:
                out[name][a:a + step] = raw[name][crop].float().cpu().numpy()
                if self.scale_factor != 1.0 and self.kinds[name] == "scale":
                    out[name][a:a + step] *= np.float32(self.scale_factor)
        return out

    def denormalize(self, name: str, y: np.ndarray, normalizer: Normalizer) -> np.ndarray:
        """Map head ``name``'s normalized prediction back to intensity units (float32)."""
        kind = self.kinds[name]
        if kind == "intensity":
            y = normalizer.denormalize(y)
        elif kind == "scale":
            y = normalizer.denormalize(y) - normalizer.denormalize(np.zeros_like(y))
        return y.astype(np.float32, copy=False)

    def predict(self, x: np.ndarray, normalizer: Normalizer) -> dict[str, np.ndarray]:
        """Restore region ``x`` of shape (C, *spatial) in raw intensities.

        Returns
        -------
        dict of str to numpy.ndarray
            One float32 array (C_out, *spatial) per head, in intensity units.
        """
        if x.shape[0] != self.n_channel_in:
            raise ModelMismatchError(
                f"model expects {self.n_channel_in} input channel(s), the region has {x.shape[0]}"
            )
        raw = self.forward_normalized(normalizer.normalize(x)[None])
        return {name: self.denormalize(name, y[0], normalizer) for name, y in raw.items()}
