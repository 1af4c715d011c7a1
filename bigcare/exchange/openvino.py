"""A bigcare model run through OpenVINO on CPU: measured 1.6-1.7x torch on the project's CPU.

::

    OpenVINOPredictor(model folder) ── client: config only (halo, axes, percentiles, hash)
        │ sent with every task (small: a path and the config)
        ▼
    worker, once per process: the U-Net ──ONNX (the exported package's)──► OpenVINO, compiled per
    input shape (at most SHAPES of them) with INFERENCE_PRECISION_HINT f32 or bf16; the rest
    (normalise, pad to the pooling grid, crop, map back, isotropic XZ/YZ passes) is bigcare's own
    CARE / isotropic predictor with only its network call replaced.

``benchmarks/onnx_backend.py`` (RESULTS.md, issue 15): OpenVINO 1.69x torch in fp32 and 1.59x in
bf16 on the 2-core VM; ONNX Runtime was slower than torch (0.92x), so it is not offered. The
workers read the model folder from its path (shared storage on a multi-node cluster).
"""

from __future__ import annotations

import io
import os
import pathlib
import threading
import warnings
from typing import Any, Literal

import numpy as np

from bigcare.errors import ConfigError, ModelError
from bigcare.normalization import Normalizer
from bigcare.predictors.base import WrappingPredictor

__all__ = ["OpenVINOPredictor", "SHAPES"]

#: compiled input shapes kept per process (blocks of a run share one or a few shapes)
SHAPES = 8
_LOCK = threading.Lock()
_BUILT: dict[tuple, Any] = {}


def _hint(precision: str) -> Literal["f32", "bf16"]:
    if precision == "fp32":
        return "f32"
    import openvino as ov

    native = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if precision == "bf16" or (precision == "auto" and native):
        return "bf16"
    if precision == "auto":
        return "f32"
    raise ConfigError(f"precision for the OpenVINO backend must be 'fp32', 'bf16' or 'auto', got {precision!r}")


class _Compiled:
    """The network call of a CAREPredictor (tensor -> dict of tensors) through OpenVINO, per shape."""

    def __init__(self, onnx: bytes, heads: list[str], hint: str):
        import openvino as ov

        self.core, self.onnx, self.heads, self.hint = ov.Core(), onnx, heads, hint
        self.models: dict[tuple, Any] = {}

    def __call__(self, x):
        import torch

        shape = tuple(x.shape)
        compiled = self.models.get(shape)
        if compiled is None:
            model = self.core.read_model(io.BytesIO(self.onnx))
            model.reshape({0: shape})  # static shapes compile to the fastest kernels
            compiled = self.core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": self.hint})
            if len(self.models) >= SHAPES:
                self.models.pop(next(iter(self.models)))
            self.models[shape] = compiled
        result = compiled([np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)])
        return {h: torch.from_numpy(np.array(result[i])) for i, h in enumerate(self.heads)}


class OpenVINOPredictor(WrappingPredictor):
    """A bigcare model folder as a predictor whose network runs in OpenVINO (CPU).

    Parameters
    ----------
    model : str or PathLike
        The model folder (care or isotropic kind).
    precision : {"fp32", "bf16", "auto"}
        OpenVINO's inference precision; "auto": bf16 where the CPU has it natively.

    Raises
    ------
    ModelError
        If the folder is not a usable model, or openvino is not installed.
    """

    def __init__(self, model: str | os.PathLike, precision: str = "fp32"):
        import importlib.util

        if importlib.util.find_spec("openvino") is None:
            raise ModelError("the OpenVINO backend needs openvino: pip install 'bigcare[openvino]'")
        from bigcare.models.folder import load_config, model_hash
        from bigcare.predictors.base import load_predictor

        self.model = str(pathlib.Path(model).resolve())
        from bigcare.exchange.bioimageio import check_packaged_options

        if load_config(self.model).kind == "projection":
            raise ModelError(f"model {model} is a projection model; the OpenVINO backend runs U-Nets only: "
                             "restore it with the PyTorch backend")
        check_packaged_options(load_config(self.model).architecture, f"model {model} (OpenVINO backend)")
        self.hint = _hint(precision)
        self.precision = "bf16" if self.hint == "bf16" else "fp32"
        self.hash = model_hash(self.model)
        # axes, halo, alignment, zoom, percentiles: exactly those of bigcare's own predictor
        self.adopt(load_predictor(self.model, device="cpu", precision="fp32"))
        self.fingerprint = f"openvino-{self.precision}-{self.hash}"

    def _predictor(self):
        """bigcare's own predictor for this model, its network call replaced (built once per process)."""
        key = (self.model, self.hash, self.hint)
        with _LOCK:
            built = _BUILT.get(key)
            if built is None:
                built = _BUILT[key] = self._build()
            return built

    def _build(self):
        from bigcare.exchange.bioimageio import _export_onnx
        from bigcare.exchange.unet_arch import BigcareUNet
        from bigcare.models.architecture import divisor
        from bigcare.models.folder import load_model, model_hash
        from bigcare.predictors.base import build_predictor

        if model_hash(self.model) != self.hash:
            raise ModelError(f"model folder {self.model} changed since the run was planned (hash differs)")
        net, config = load_model(self.model)
        arch = config.architecture
        packaged = BigcareUNet(ndim=arch.ndim, depth=arch.depth, n_filter_base=arch.n_filter_base,
                               kernel_size=arch.kernel, n_conv_per_depth=arch.n_conv_per_depth, pool=arch.pool,
                               n_channel_in=arch.n_channel_in, n_channel_out=arch.n_channel_out,
                               residual=arch.residual, heads=[[h.name, h.activation] for h in arch.heads]).eval()
        packaged.load_state_dict(net.state_dict(), strict=True)
        example = np.zeros((1, arch.n_channel_in) + (2 * divisor(arch),) * arch.ndim, np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            buffer = io.BytesIO()
            _export_onnx(packaged, example, list(self.outputs), buffer)  # type: ignore[arg-type]
        predictor = build_predictor(net, config, device="cpu", precision="fp32")
        care = getattr(predictor, "net", predictor)  # an isotropic predictor wraps a CARE one
        care._run = _Compiled(buffer.getvalue(), list(self.outputs), self.hint)
        return predictor

    def predict(self, x: np.ndarray, normalizer: Normalizer) -> dict[str, np.ndarray]:
        """Restore one region ``x`` (C, *spatial) in raw intensities, as bigcare's own predictor does."""
        return self._predictor().predict(x, normalizer)
