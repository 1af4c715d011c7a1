"""CARE restoration of one region with a U-Net (denoising / deconvolution-style restoration)."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch

from ..errors import ModelMismatchError
from ..models import UNet, divisor, halo, load_model, model_hash
from ..models.store import ModelConfig
from ..normalize import Normalizer

__all__ = ["CAREPredictor", "PRECISIONS"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# One model call at a time per process: torch already uses all the threads it was given, and
# dask threads that are not computing keep reading and writing blocks meanwhile.
_COMPUTE_LOCK = threading.Lock()


class CAREPredictor:
    """Runs a CARE U-Net on a region: normalise, pad to the pooling grid, predict, crop, undo.

    The region is padded at its high end only, by reflection, up to a multiple of the network's
    pooling divisor. Blocks read aligned regions, so interior blocks are never padded and the
    last block along an axis is padded exactly as the whole volume is: blockwise equals
    whole-volume prediction.
    """

    def __init__(self, model: UNet, config: ModelConfig, *, device: str = "cpu", precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        arch = config.architecture
        self.model = model.to(device).eval()
        self.config = config
        self.device = torch.device(device)
        self.precision = precision
        self.spatial_axes = config.axes.lower()
        self.outputs = tuple(h.name for h in arch.heads)
        self.n_channel_in = arch.n_channel_in
        self.n_channel_out = arch.n_channel_out
        self.halo = (halo(arch),) * arch.ndim
        self.align = (divisor(arch),) * arch.ndim
        self.pmin = config.normalization.pmin
        self.pmax = config.normalization.pmax
        # heads with a non-linear activation are scales/probabilities: only rescaled, not shifted
        self._kinds = {h.name: ("intensity" if h.activation == "linear" else
                                "scale" if h.activation == "softplus" else "raw") for h in arch.heads}

    @classmethod
    def from_folder(cls, path, *, device="cpu", precision="fp32", expected_hash=None) -> "CAREPredictor":
        """Load a model folder (never unpickling) and wrap it."""
        if expected_hash is not None and model_hash(path) != expected_hash:
            raise ModelMismatchError(
                f"model folder {path} changed since the run was planned (hash differs); "
                "re-run the command to plan again"
            )
        model, config = load_model(path, device=device)
        return cls(model, config, device=device, precision=precision)

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

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
        spatial = x.shape[1:]
        xn = normalizer.normalize(x)
        pads = [(0, 0)] + [(0, -n % a) for n, a in zip(spatial, self.align)]
        if any(p for _, p in pads):
            xn = np.pad(xn, pads, mode="reflect")
        tensor = torch.from_numpy(np.ascontiguousarray(xn))[None].to(self.device, non_blocking=True)
        with _COMPUTE_LOCK, torch.inference_mode(), self._autocast():
            raw = self.model(tensor)
        crop = (0, slice(None)) + tuple(slice(0, n) for n in spatial)
        out = {}
        for name in self.outputs:
            y = raw[name][crop].float().cpu().numpy()
            kind = self._kinds[name]
            if kind == "intensity":
                y = normalizer.denormalize(y)
            elif kind == "scale":
                y = normalizer.denormalize(y) - normalizer.denormalize(np.zeros_like(y))
            out[name] = y.astype(np.float32, copy=False)
        return out
