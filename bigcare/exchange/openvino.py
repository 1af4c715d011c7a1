"""bigcare's networks run through OpenVINO on CPU: measured 1.35-1.7x torch on the project's CPU.

``bigcare restore --backend auto`` (the default) runs every CARE or isotropic U-Net this way on CPU
workers where openvino is installed (:func:`resolve_backend`, :func:`with_openvino`, used by
:func:`bigcare.predictors.base.build_predictor`); :class:`OpenVINOPredictor` is the same as a
predictor object for Python callers::

    OpenVINOPredictor(model folder) ── client: config only (halo, axes, percentiles, hash)
        │ sent with every task (small: a path and the config)
        ▼
    worker, once per process: the U-Net ──ONNX (the exported package's)──► OpenVINO, compiled once
    for every input shape (dynamic) with INFERENCE_PRECISION_HINT f32 or bf16; the rest
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

__all__ = ["OpenVINOPredictor", "BACKENDS", "resolve_backend", "with_openvino"]

#: ``--backend`` values: ``auto`` is OpenVINO where :func:`resolve_backend` can run it, torch elsewhere
BACKENDS = ("auto", "torch", "openvino")

_LOCK = threading.Lock()
_BUILT: dict[tuple, Any] = {}


def _hint(precision: str) -> Literal["f32", "bf16"]:
    """OpenVINO's inference precision for bigcare's ``precision``: auto follows
    :func:`~bigcare.predictors.fastpath.resolve_precision` (bf16 where the CPU computes it natively)."""
    from bigcare.predictors.fastpath import resolve_precision

    ran = resolve_precision(precision, "cpu")
    if ran in ("fp32", "bf16"):
        return "bf16" if ran == "bf16" else "f32"
    raise ConfigError(f"precision for the OpenVINO backend must be 'fp32', 'bf16' or 'auto', got {precision!r}")


def _unsupported(device: str, precision: str, config) -> str | None:
    """Why OpenVINO cannot run this model here (None: it can)."""
    import importlib.util

    from bigcare.exchange.bioimageio import check_packaged_options

    if not str(device).startswith("cpu"):
        return f"it runs on CPU only (device {device!r})"
    if importlib.util.find_spec("openvino") is None:
        return "openvino is not installed: pip install 'bigcare[openvino]'"
    if precision not in ("auto", "fp32", "bf16"):
        return f"it runs fp32 or bf16, not {precision}"
    if config.kind not in ("care", "isotropic"):
        return f"it runs CARE and isotropic U-Nets, not a {config.kind} model"
    try:
        check_packaged_options(config.architecture, "model")
    except ModelError as e:
        return str(e)
    return None


def resolve_backend(backend: str, device: str, precision: str, config) -> Literal["torch", "openvino"]:
    """The backend a predictor of ``config`` runs with on ``device``.

    ``auto``: OpenVINO where it can run the model (a CPU device, openvino installed, fp32 / bf16,
    a CARE or isotropic U-Net of the packaged architecture), torch elsewhere: OpenVINO ran CSBDeep's
    default 3D network 1.35-1.69x faster than torch in fp32 on the project's CPU and 1.06-1.59x in
    bf16 (benchmarks/RESULTS.md, issue 15), equal to it within 1e-7 relative in fp32. ``openvino``
    where it cannot is a ConfigError naming why; ``torch`` is torch.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return "torch"
    why = _unsupported(device, precision, config)
    if why is None:
        return "openvino"
    if backend == "openvino":
        raise ConfigError(f"--backend openvino cannot run this model: {why}; use --backend torch")
    return "torch"


def with_openvino(predictor, net, config, precision: str):
    """``predictor`` (bigcare's own, for ``net``/``config``) with its network call run by OpenVINO.

    The network is exported to ONNX in memory (the packaged U-Net of bioimage.io export) and
    compiled once, with as many inference threads as torch has in this process (a dask worker's
    thread count: no oversubscription). Normalising, padding, cropping and the isotropic passes
    stay bigcare's.
    """
    import torch

    from bigcare.exchange.bioimageio import _export_onnx
    from bigcare.exchange.unet_arch import BigcareUNet
    from bigcare.models.architecture import divisor

    arch = config.architecture
    packaged = BigcareUNet(ndim=arch.ndim, depth=arch.depth, n_filter_base=arch.n_filter_base,
                           kernel_size=arch.kernel, n_conv_per_depth=arch.n_conv_per_depth, pool=arch.pool,
                           n_channel_in=arch.n_channel_in, n_channel_out=arch.n_channel_out,
                           residual=arch.residual, heads=[[h.name, h.activation] for h in arch.heads]).eval()
    packaged.load_state_dict({k: v.detach().cpu() for k, v in net.state_dict().items()}, strict=True)
    example = np.zeros((1, arch.n_channel_in) + (2 * divisor(arch),) * arch.ndim, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buffer = io.BytesIO()
        _export_onnx(packaged, example, list(predictor.outputs), buffer)  # type: ignore[arg-type]
    care = getattr(predictor, "net", predictor)  # an isotropic predictor wraps a CARE one
    hint = _hint(precision)
    care._run = _Compiled(buffer.getvalue(), list(predictor.outputs), hint, torch.get_num_threads())
    care.precision = "bf16" if hint == "bf16" else "fp32"
    predictor.backend = "openvino"
    return predictor


class _Compiled:
    """The network call of a CAREPredictor (tensor -> dict of tensors) through OpenVINO.

    One model compiled for dynamic shapes serves every call, and its buffers grow to the
    largest call and are reused: the memory of one call, as the block sizing plans it. A model
    compiled per static shape held its own buffers for each (~400 MB per 0.65-Mvoxel shape, and
    a 3D grid's first, interior and last blocks read up to 27 shapes), for 4-5% more speed on a
    4-Mvoxel call and none on a 0.65-Mvoxel one, identical outputs (benchmarks/RESULTS.md).
    Calls are serialised by the CAREPredictor's compute lock: one infer request suffices.
    """

    def __init__(self, onnx: bytes, heads: list[str], hint: str, threads: int):
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(io.BytesIO(onnx)), "CPU",
                                      {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads})
        self.compiled, self.request, self.heads = compiled, compiled.create_infer_request(), heads

    def __call__(self, x):
        import torch

        self.request.infer([np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)])
        # copies: the request's output tensors are overwritten by the next call
        return {h: torch.from_numpy(np.array(self.request.get_output_tensor(i).data)) for i, h in enumerate(self.heads)}


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
        from bigcare.models.folder import load_config, model_hash
        from bigcare.predictors.base import load_predictor

        self.model = str(pathlib.Path(model).resolve())
        try:
            resolve_backend("openvino", "cpu", precision, load_config(self.model))
        except ConfigError as e:
            raise ModelError(f"model {model}: {e}") from None
        self.precision = "bf16" if _hint(precision) == "bf16" else "fp32"
        self.hash = model_hash(self.model)
        # axes, halo, alignment, zoom, percentiles: exactly those of bigcare's own predictor
        self.adopt(load_predictor(self.model, device="cpu", precision="fp32"))
        self.fingerprint = f"openvino-{self.precision}-{self.hash}"

    def _predictor(self):
        """bigcare's own predictor for this model, its network call replaced (built once per process)."""
        key = (self.model, self.hash, self.precision)
        with _LOCK:
            built = _BUILT.get(key)
            if built is None:
                built = _BUILT[key] = self._build()
            return built

    def _build(self):
        from bigcare.models.folder import load_model, model_hash
        from bigcare.predictors.base import build_predictor

        if model_hash(self.model) != self.hash:
            raise ModelError(f"model folder {self.model} changed since the run was planned (hash differs)")
        net, config = load_model(self.model)
        return build_predictor(net, config, device="cpu", precision=self.precision, backend="openvino")

    def predict(self, x: np.ndarray, normalizer: Normalizer) -> dict[str, np.ndarray]:
        """Restore one region ``x`` (C, *spatial) in raw intensities, as bigcare's own predictor does."""
        return self._predictor().predict(x, normalizer)
