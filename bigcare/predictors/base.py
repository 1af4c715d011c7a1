"""The predictor protocol, the per-process predictor cache, and applying a predictor to a region."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from bigcare.errors import ConfigError
from bigcare.normalization import Normalizer
from bigcare.types import Precision

if TYPE_CHECKING:
    from bigcare.blocks.layout import AxisLayout

__all__ = ["Predictor", "load_predictor", "build_predictor", "cached_predictor", "forget_predictors", "check_predictor",
           "predict_region", "WrappingPredictor"]


#: What the engine reads of a predictor, besides :meth:`Predictor.predict`.
MEMBERS = ("spatial_axes", "outputs", "n_channel_in", "n_channel_out", "halo", "align", "zoom", "factor",
           "fingerprint", "pmin", "pmax")


@runtime_checkable
class Predictor(Protocol):
    """What the block runner needs from a restoration method.

    Attributes
    ----------
    spatial_axes : str
        Lower-case spatial axes the predictor works on, e.g. ``"zyx"``.
    outputs : tuple of str
        Names of the outputs, in order; the first is the primary image.
    n_channel_in, n_channel_out : int
        Channels expected on input and produced per output.
    halo, align : tuple of int
        Context and grid alignment per spatial axis (see :mod:`bigcare.blocks.plan`), in the
        grid the predictor sees.
    zoom : tuple of float or None
        Output voxels per input voxel per spatial axis, for methods that change the grid
        (isotropic restoration: ``(factor, 1, 1)``). The engine upsamples the input by it
        (:mod:`bigcare.blocks.zoom`) before :meth:`predict`. None: the same grid.
    factor : float or None
        The axial factor (Z voxel size / lateral voxel size) an isotropic model was trained
        for; the engine checks the volume's voxel sizes against it. None for other methods.
    fingerprint : str
        Identity of a predictor object sent with the run (part of the run key); model folders
        use their hash instead.
    pmin, pmax : float
        Normalization percentiles the model was trained with.
    """

    # read-only members (properties), so that a class attribute or an instance attribute fits
    @property
    def spatial_axes(self) -> str: ...

    @property
    def outputs(self) -> tuple[str, ...]: ...

    @property
    def n_channel_in(self) -> int: ...

    @property
    def n_channel_out(self) -> int: ...

    @property
    def halo(self) -> tuple[int, ...]: ...

    @property
    def align(self) -> tuple[int, ...]: ...

    @property
    def zoom(self) -> tuple[float, ...] | None: ...

    @property
    def factor(self) -> float | None: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def pmin(self) -> float: ...

    @property
    def pmax(self) -> float: ...

    def predict(self, x: np.ndarray, normalizer: Normalizer) -> dict[str, np.ndarray]:
        """Restore one region ``x`` (C, *spatial) given in raw intensities."""
        ...


class WrappingPredictor:
    """Base of predictors that wrap another predictor's network (isotropic, upsampling, OpenVINO).

    :meth:`adopt` gives the wrapper every :data:`MEMBERS` attribute of the wrapped predictor except
    those it overrides: one place, so a new member reaches every wrapper.
    """

    spatial_axes: str
    outputs: tuple[str, ...]
    n_channel_in: int
    n_channel_out: int
    halo: tuple[int, ...]
    align: tuple[int, ...]
    zoom: tuple[float, ...] | None
    factor: float | None
    fingerprint: str
    pmin: float
    pmax: float

    def adopt(self, source: object, **overrides) -> None:
        """Copy ``source``'s predictor members onto this one, ``overrides`` (member: value) instead."""
        unknown = set(overrides) - set(MEMBERS)
        if unknown:
            raise TypeError(f"not predictor members: {sorted(unknown)}")
        for name in MEMBERS:
            setattr(self, name, overrides[name] if name in overrides else getattr(source, name))


def check_predictor(obj: object) -> Predictor:
    """``obj`` if it has everything of :class:`Predictor`; else ConfigError naming what it lacks."""
    missing = [name for name in (*MEMBERS, "predict") if not hasattr(obj, name)]
    if missing:
        raise ConfigError(
            f"model object {type(obj).__name__} is not a bigcare predictor: it lacks {', '.join(missing)} "
            "(see bigcare.predictors.Predictor)"
        )
    return obj  # type: ignore[return-value]


def build_predictor(model, config, *, device: str = "cpu", precision: Precision = "fp32",
                    backend: str = "torch") -> Predictor:
    """The predictor of a loaded network, chosen by its config's ``kind``.

    ``backend``: ``torch``, ``openvino`` or ``auto`` (OpenVINO where it can run the model on this
    device, torch elsewhere: :func:`~bigcare.exchange.openvino.resolve_backend`).
    """
    if backend != "torch":
        from bigcare.exchange.openvino import resolve_backend, with_openvino

        if resolve_backend(backend, device, precision, config) == "openvino":
            predictor = _build_torch(model, config, "cpu", "fp32")  # its network call is replaced
            return with_openvino(predictor, model, config, precision)
    return _build_torch(model, config, device, precision)


def _build_torch(model, config, device: str, precision: Precision) -> Predictor:
    from bigcare.predictors.care import CAREPredictor

    if config.kind in ("projection", "upsampling"):
        from bigcare.predictors.projection import ProjectionPredictor, UpsamplingPredictor

        if config.kind == "projection":
            return ProjectionPredictor(model, config, device=device, precision=precision)
        return UpsamplingPredictor(CAREPredictor(model, config, device=device, precision=precision))
    net = CAREPredictor(model, config, device=device, precision=precision)
    if config.kind == "isotropic":
        from bigcare.predictors.isotropic import IsotropicPredictor

        return IsotropicPredictor(net)
    return net


_CACHE: dict[tuple, Predictor] = {}
_CACHE_LOCK = threading.Lock()


def forget_predictors() -> None:
    """Forget every predictor (and shipped model) built in this process: their memory (a
    network, OpenVINO's compiled model and its buffers) is freed once no caller holds them."""
    import sys

    with _CACHE_LOCK:
        _CACHE.clear()
    for name, attr in (("bigcare.exchange.openvino", "_BUILT"), ("bigcare.predictors.shipping", "_PAYLOADS")):
        module = sys.modules.get(name)  # only what this process imported can hold anything
        if module is not None:
            getattr(module, attr).clear()


def cached_predictor(key: tuple, build: Callable[[], Predictor]) -> Predictor:
    """The predictor cached under ``key`` in this process, built by ``build()`` the first time."""
    with _CACHE_LOCK:
        predictor = _CACHE.get(key)
        if predictor is None:
            predictor = _CACHE[key] = build()
    return predictor


def load_predictor(model_path: str, *, device: str = "cpu", precision: Precision = "auto",
                   expected_hash: str | None = None, backend: str = "torch") -> Predictor:
    """Build (once per process) the predictor a model folder describes.

    Worker processes call this for every block; the model is read from disk and moved to the
    device only the first time for a given (path, hash, device, precision).

    Parameters
    ----------
    model_path : str
        Model folder (config.json + model.safetensors), or a bioimage.io package (.zip or a folder
        with rdf.yaml; :class:`~bigcare.exchange.zoo.ZooPredictor`).
    device : str
        ``"cpu"`` or ``"cuda"``/``"cuda:N"``.
    precision : str
        ``"auto"`` (default: bf16 where the device computes it natively, else fp32), ``"fp32"``,
        ``"bf16"`` or ``"fp16"`` (autocast).
    expected_hash : str, optional
        If given, the folder's current hash must match (the model changed under a run
        otherwise) - checked once, on load.
    backend : {"torch", "openvino", "auto"}
        What runs the network (:func:`build_predictor`); bioimage.io packages run as they are.

    Returns
    -------
    Predictor
    """
    from bigcare.exchange.zoo import is_zoo_package

    if is_zoo_package(model_path):  # a bioimage.io package (.zip or folder with rdf.yaml)
        from bigcare.exchange.zoo import ZooPredictor

        return cached_predictor(("bioimageio", str(model_path), device), lambda: ZooPredictor(model_path, device=device))

    def build() -> Predictor:
        from bigcare.errors import ModelMismatchError
        from bigcare.models.folder import load_model, model_hash

        if expected_hash is not None and model_hash(model_path) != expected_hash:
            raise ModelMismatchError(
                f"model folder {model_path} changed since the run was planned (hash differs); "
                "re-run the command to plan again"
            )
        model, config = load_model(model_path, device=device)
        return build_predictor(model, config, device=device, precision=precision, backend=backend)

    return cached_predictor((str(model_path), expected_hash, device, precision, backend), build)


def predict_region(predictor: Predictor, layout: AxisLayout, region: np.ndarray, normalizer: Normalizer) -> dict[str, np.ndarray]:
    """Predict every named output of a region given in the volume's axis order.

    The same function serves whole-volume prediction (the region is the volume) and blockwise
    prediction (the region is a block's read region), so the two cannot drift apart.
    """
    x = layout.to_core(region)
    nb = len(layout.batch)
    spatial = tuple(n for a, n in zip(layout.spatial, x.shape[nb + 1:]) if a not in layout.drop)
    results = {name: np.empty(x.shape[:nb] + (layout.n_channel_out,) + spatial, np.float32)
               for name in predictor.outputs}
    for b in np.ndindex(*x.shape[:nb]):
        for name, y in predictor.predict(x[b], normalizer).items():
            results[name][b] = y
    return {name: layout.from_core(y) for name, y in results.items()}
