"""Run a bioimage.io model package blockwise: the package becomes a bigcare predictor.

::

    MODEL.zip / folder with rdf.yaml ──► ZooPredictor (client)       ──► every worker: the network,
      inputs[0]: batch?, channel?, z/y/x    spatial axes, channels,        loaded once per process from
        size min + n*step  -> align, pad    halo, align, pmin/pmax,        the package path (cached by
        scale_range        -> percentiles   fingerprint (sha256)           its sha256)
      outputs: halo        -> halo (else measured by an impulse response, with a warning)
      weights: pytorch_state_dict | torchscript

Which weights run, in this order:

1. ``pytorch_state_dict`` of a package bigcare exported (``config.bigcare``): bigcare's own U-Net
   is built from the recorded config and the tensors are read with ``torch.load(weights_only=True)``;
   no code from the package runs.
2. ``torchscript``: ``torch.jit.load``. TorchScript is code; it runs because you asked to run
   this package.
3. ``pytorch_state_dict`` with the package's own architecture (a Python file or library callable,
   imported through bioimageio.core: code again), tensors through ``torch.load(weights_only=True)``.

Preprocessing bigcare reproduces: ``scale_range`` over all spatial axes per channel (the engine's
percentiles, sampled on volumes over 2**24 voxels), then any fixed per-channel affine steps
(``fixed_zero_mean_unit_variance``, ``scale_linear``: CAREamics exports normalise so), and
``ensure_dtype`` float32; postprocessing: fixed affine steps and ``ensure_dtype``. Anything else
(statistics of the data other than percentiles, clip, sigmoid, ...) is refused, naming it. Outputs come back as the
package gives them, except for packages bigcare exported, whose ``config.bigcare.outputs`` says how
to map them back to intensities. The workers read the package from its path (shared storage on a
multi-node cluster).
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import threading
import warnings
from typing import Any

import numpy as np

from bigcare.errors import ConfigError, ModelError
from bigcare.normalization import Normalizer

__all__ = ["is_zoo_package", "ZooPredictor"]

_LOCK = threading.Lock()
_NETS: dict[tuple, Any] = {}


def is_zoo_package(path) -> bool:
    """Whether ``path`` is a bioimage.io package: a ``.zip`` file, or a folder with rdf.yaml / bioimageio.yaml."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    p = pathlib.Path(path)
    if p.is_file():
        return p.suffix == ".zip"
    return p.is_dir() and any((p / n).is_file() for n in ("rdf.yaml", "bioimageio.yaml"))


def _fingerprint(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _load_description(source: str, io_checks: bool):
    from bioimageio.spec import InvalidDescr, load_model_description

    try:
        descr = load_model_description(source, perform_io_checks=io_checks)
    except Exception as e:  # not a package, unreadable yaml, an unknown resource type
        raise ModelError(f"{source} is not a readable bioimage.io model package: {e}") from None
    if isinstance(descr, InvalidDescr):
        raise ModelError(f"{source} is not a valid bioimage.io model: {descr.validation_summary.format()[:2000]}")
    if not str(descr.format_version).startswith("0.5"):
        raise ModelError(f"{source} uses bioimage.io spec {descr.format_version}; bigcare runs 0.5 packages "
                         "(update it with bioimageio.spec's update_format)")
    return descr


def _fixed_affine(step, n_channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(gain, offset) per channel of a data-independent affine step, as bioimageio.core applies it; else None.

    ``fixed_zero_mean_unit_variance``: ``(x - mean) / (std + 1e-6)``; ``scale_linear``:
    ``x * gain + offset``; scalars, or one value per channel (``axis: channel``).
    """
    kw = step.kwargs
    if step.id == "fixed_zero_mean_unit_variance":
        mean, std = np.asarray(kw.mean, float), np.asarray(kw.std, float)
        gain, offset = 1 / (std + 1e-6), -mean / (std + 1e-6)
    elif step.id == "scale_linear":
        gain, offset = np.asarray(kw.gain, float), np.asarray(kw.offset, float)
    else:
        return None
    axis = getattr(kw, "axis", None)
    if gain.ndim and (str(axis) != "channel" or gain.size not in (1, n_channels)):
        return None  # along a spatial axis, or a count that fits no channel axis
    return np.broadcast_to(gain, (n_channels,)).copy(), np.broadcast_to(offset, (n_channels,)).copy()


def _parse(descr, source: str) -> dict[str, Any]:
    """The plain-data facts a predictor needs; ModelError for anything bigcare cannot run."""
    from bioimageio.spec.model.v0_5 import ParameterizedSize

    if len(descr.inputs) != 1:
        raise ModelError(f"{source}: the model has {len(descr.inputs)} inputs; bigcare runs one-input models")
    (inp,) = descr.inputs
    meta: dict[str, Any] = {"input_id": str(inp.id), "batch": False, "channel_in": False, "n_in": 1,
                            "spatial": "", "min": [], "step": []}
    for ax in inp.axes:
        if ax.type == "batch":
            meta["batch"] = True
        elif ax.type == "channel":
            meta["channel_in"], meta["n_in"] = True, len(ax.channel_names)
        elif ax.type == "space" and str(ax.id) in "zyx":
            if isinstance(ax.size, int):
                raise ModelError(f"{source}: input axis {ax.id} has the fixed size {ax.size}; bigcare needs a "
                                 "parameterized size (min + n * step) to run blocks")
            if not isinstance(ax.size, ParameterizedSize):
                raise ModelError(f"{source}: input axis {ax.id} takes its size from another tensor; not supported")
            meta["spatial"] += str(ax.id)
            meta["min"].append(int(ax.size.min))
            meta["step"].append(int(ax.size.step))
        else:
            raise ModelError(f"{source}: input axis {ax.id!s} of type {ax.type!r} cannot be run blockwise by "
                             "bigcare (it runs batch, channel and z/y/x space axes)")
    meta.update(normalize=False, pmin=1.0, pmax=99.8, eps=1e-20)
    pre = (np.ones(meta["n_in"]), np.zeros(meta["n_in"]))
    for step in inp.preprocessing:
        if step.id == "ensure_dtype" and str(step.kwargs.dtype) == "float32":
            continue
        axes = {str(a) for a in (step.kwargs.axes or ())} if step.id == "scale_range" else set()
        ok_ref = step.id == "scale_range" and step.kwargs.reference_tensor in (None, inp.id)
        first = not meta["normalize"] and not (np.any(pre[0] != 1) or np.any(pre[1] != 0))
        if step.id == "scale_range" and ok_ref and first and set(meta["spatial"]) <= axes <= set(meta["spatial"]) | {"batch"}:
            meta.update(normalize=True, pmin=float(step.kwargs.min_percentile),
                        pmax=float(step.kwargs.max_percentile), eps=float(step.kwargs.eps))
            continue
        affine = _fixed_affine(step, meta["n_in"])
        if affine is not None:
            pre = (affine[0] * pre[0], affine[0] * pre[1] + affine[1])
            continue
        raise ModelError(f"{source}: preprocessing {step.id!r} ({step.kwargs}) cannot be reproduced by bigcare, "
                         "which normalises by percentiles over all spatial axes of each channel (scale_range) "
                         "and applies fixed per-channel affine steps (fixed_zero_mean_unit_variance, scale_linear)")
    meta["pre"] = [pre[0].tolist(), pre[1].tolist()]
    outputs, halo, n_out, post = [], [0] * len(meta["spatial"]), set(), {}
    for out in descr.outputs:
        n_ch = next((len(ax.channel_names) for ax in out.axes if ax.type == "channel"), 1)
        g, o = np.ones(n_ch), np.zeros(n_ch)
        for step in out.postprocessing:
            if step.id == "ensure_dtype" and str(step.kwargs.dtype) == "float32":
                continue
            affine = _fixed_affine(step, n_ch)
            if affine is None:
                raise ModelError(f"{source}: postprocessing {step.id!r} of output {out.id!s} is not supported by "
                                 "bigcare (only fixed per-channel affine steps and ensure_dtype float32)")
            g, o = affine[0] * g, affine[0] * o + affine[1]
        post[str(out.id)] = [g.tolist(), o.tolist()]
        spatial = ""
        for ax in out.axes:
            if ax.type == "channel":
                n_out.add(len(ax.channel_names))
            elif ax.type == "space":
                size = ax.size
                if getattr(size, "tensor_id", None) != inp.id or str(size.axis_id) != str(ax.id) or size.offset:
                    raise ModelError(f"{source}: output {out.id!s} axis {ax.id!s} is not the same size as the input "
                                     "axis of that name; bigcare runs same-grid models")
                spatial += str(ax.id)
                i = meta["spatial"].index(str(ax.id))
                halo[i] = max(halo[i], int(getattr(ax, "halo", 0) or 0))
            elif ax.type != "batch":
                raise ModelError(f"{source}: output {out.id!s} has a {ax.type!r} axis; not supported")
        if spatial != meta["spatial"]:
            raise ModelError(f"{source}: output {out.id!s} has spatial axes {spatial!r}, the input {meta['spatial']!r}")
        outputs.append(str(out.id))
        meta["channel_out"] = any(ax.type == "channel" for ax in out.axes)
    if len(n_out) > 1:
        raise ModelError(f"{source}: outputs have different channel counts {sorted(n_out)}; bigcare needs one")
    bigcare = (descr.config.model_dump().get("bigcare") or {}) if descr.config is not None else {}
    meta.update(outputs=outputs, n_out=n_out.pop() if n_out else 1, halo=halo, kinds=bigcare.get("outputs", {}),
                bigcare_config=bigcare.get("model_config"), post=post)
    if meta["bigcare_config"] is not None:
        # bigcare's packages state min > 2 * halo because the spec asks it; the U-Net runs on any
        # multiple of step, and padding small regions up to min would change them near their edges
        meta["min"] = list(meta["step"])
    for name in outputs:
        if not name.isidentifier():
            raise ModelError(f"{source}: output id {name!r} is not an identifier bigcare can name an image by")
    return meta


class ZooPredictor:
    """A bioimage.io model package as a bigcare :class:`~bigcare.predictors.base.Predictor`.

    Parameters
    ----------
    source : str or PathLike
        The package: a ``.zip`` or an unpacked folder with ``rdf.yaml``.
    device : str
        ``"auto"`` (cuda where the worker has it), ``"cpu"``, ``"cuda"``.
    weights : str, optional
        ``"pytorch_state_dict"`` or ``"torchscript"``; default the first usable (module docstring).

    Raises
    ------
    ModelError
        If the package is invalid or needs something bigcare cannot reproduce (the message names it).
    """

    zoom = None
    factor = None
    #: packages run in float32 whatever the run's precision (the summary says so)
    fixed_precision = "fp32"

    def __init__(self, source: str | os.PathLike, device: str = "auto", weights: str | None = None):
        from bigcare.exchange.bioimageio import require_bioimageio

        require_bioimageio()
        path = pathlib.Path(source).resolve()
        self.source = str(path)
        self.sha256 = _fingerprint(path)
        self.fingerprint = f"bioimageio-{self.sha256}"
        descr = _load_description(self.source, io_checks=True)
        meta = _parse(descr, self.source)
        self.meta = meta
        self.device = device
        self.weights = self._choose_weights(descr, weights)
        self.spatial_axes = meta["spatial"]
        self.outputs = tuple(meta["outputs"])
        self.n_channel_in, self.n_channel_out = meta["n_in"], meta["n_out"]
        self.pmin, self.pmax = meta["pmin"], meta["pmax"]
        self.align = tuple(meta["step"])
        self.halo_source = "package"
        if not any(meta["halo"]):
            self.halo_source = "measured"
            measured = self.measure_halo()
            warnings.warn(f"{self.source} gives no halo; measured by an impulse response: {measured} voxels per side "
                          f"({self.spatial_axes}); blocks use it rounded up to the grid", stacklevel=2)
            meta["halo"] = list(measured)
        self.halo = tuple(-(-h // a) * a for h, a in zip(meta["halo"], self.align))

    def _choose_weights(self, descr, wanted: str | None) -> str:
        w = descr.weights
        own = (w.pytorch_state_dict is not None and self.meta["bigcare_config"] is not None
               and str(w.pytorch_state_dict.architecture.callable) == "BigcareUNet")
        order = (["pytorch_state_dict"] if own else []) + ["torchscript", "pytorch_state_dict"]
        if wanted is not None:
            order = [wanted]
        for name in order:
            if getattr(w, name, None) is not None:
                return name
        have = [n for n in ("pytorch_state_dict", "torchscript", "onnx", "keras_hdf5") if getattr(w, n, None)]
        raise ModelError(f"{self.source} has weights {have}; bigcare runs pytorch_state_dict or torchscript"
                         + (f" (asked for {wanted!r})" if wanted else ""))

    def __getstate__(self) -> dict:
        return dict(self.__dict__)  # plain data: the network stays in each process's cache

    def _device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def network(self):
        """The package's network on this process's device (loaded once per process)."""
        device = self._device()
        key = (self.sha256, self.weights, str(device))
        with _LOCK:
            if key not in _NETS:
                if _fingerprint(pathlib.Path(self.source)) != self.sha256:
                    raise ModelError(f"bioimage.io package {self.source} changed since the run was planned")
                _NETS[key] = self._load(device)
            return _NETS[key]

    def _load(self, device):
        import torch
        from bioimageio.spec.utils import get_reader

        descr = _load_description(self.source, io_checks=False)
        entry = getattr(descr.weights, self.weights)
        data = io.BytesIO(get_reader(entry).read())
        if self.weights == "torchscript":
            return torch.jit.load(data, map_location=device).eval()
        state = torch.load(data, map_location="cpu", weights_only=True)  # tensors only: never unpickles objects
        if self.meta["bigcare_config"] is not None and str(entry.architecture.callable) == "BigcareUNet":
            from bigcare.models.folder import ModelConfig, check_finite_weights
            from bigcare.models.unet import UNet

            config = ModelConfig.model_validate(self.meta["bigcare_config"])
            net = UNet(config.architecture)
            check_finite_weights(state, self.source)
            names = [h.name for h in config.architecture.heads]

            class _Heads(torch.nn.Module):  # bigcare's dict of heads as the package's tuple of outputs
                def __init__(self, unet):
                    super().__init__()
                    self.unet = unet

                def forward(self, x):
                    out = self.unet(x)
                    return [out[n] for n in names]

            module: torch.nn.Module = _Heads(net)
        else:
            from bioimageio.core.digest_spec import import_callable

            module = import_callable(entry.architecture)(**entry.architecture.kwargs)
            net = module
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ModelError(f"{self.source}: the state dict does not fit the architecture: {e}") from None
        return module.to(device).eval()

    def _valid(self, n: int, axis: int) -> int:
        lo, step = self.meta["min"][axis], self.meta["step"][axis]
        return lo if n <= lo else lo + -(-(n - lo) // step) * step

    def forward_normalized(self, xn: np.ndarray) -> dict[str, np.ndarray]:
        """Run the network on one normalised region (C, *spatial); outputs (C_out, *spatial) per output."""
        import torch

        spatial = xn.shape[1:]
        pads = [(0, 0)] + [(0, self._valid(n, i) - n) for i, n in enumerate(spatial)]
        if any(p for _, p in pads):
            xn = np.pad(xn, pads, mode="reflect" if all(p < n for (_, p), n in zip(pads[1:], spatial)) else "symmetric")
        x = torch.from_numpy(np.ascontiguousarray(xn, dtype=np.float32))
        x = x[None] if self.meta["batch"] else x
        if not self.meta["channel_in"]:
            x = x[:, 0] if self.meta["batch"] else x[0]
        net = self.network()
        with _LOCK, torch.inference_mode():
            ys = net(x.to(self._device()))
        ys = [ys] if isinstance(ys, torch.Tensor) else list(ys)
        crop = tuple(slice(0, n) for n in spatial)
        out = {}
        for name, y in zip(self.outputs, ys):
            y = y.float().cpu().numpy()
            y = y[0] if self.meta["batch"] else y
            y = y if self.meta.get("channel_out") else y[None]
            out[name] = y[(slice(None),) + crop]
        return out

    def predict(self, x: np.ndarray, normalizer: Normalizer) -> dict[str, np.ndarray]:
        """Restore one region ``x`` (C, *spatial) in raw intensities."""
        if x.shape[0] != self.n_channel_in:
            raise ModelError(f"{self.source} expects {self.n_channel_in} input channel(s), the region has {x.shape[0]}")
        xn = normalizer.normalize(x) if self.meta["normalize"] else x.astype(np.float32)
        shape = (-1,) + (1,) * (x.ndim - 1)
        gain, offset = (np.asarray(v, np.float32).reshape(shape) for v in self.meta.get("pre", ([1.0], [0.0])))
        xn = (xn * gain + offset).astype(np.float32, copy=False)
        out = {}
        for name, y in self.forward_normalized(xn).items():
            g, o = self.meta.get("post", {}).get(name, ([1.0], [0.0]))
            y = y * np.asarray(g, np.float32).reshape(shape) + np.asarray(o, np.float32).reshape(shape)
            kind = self.meta["kinds"].get(name, "raw")
            if kind == "intensity":
                y = normalizer.denormalize(y)
            elif kind == "scale":
                y = normalizer.denormalize(y) - normalizer.denormalize(np.zeros_like(y))
            out[name] = y.astype(np.float32, copy=False)
        return out

    def measure_halo(self) -> tuple[int, ...]:
        """Input voxels on each side that change the centre output voxel, from a perturbation at the centre.

        A random background keeps ReLUs active (a lone impulse on zeros can hide influence); the
        extent is a lower bound of the receptive radius for these weights.
        """
        rng = np.random.default_rng(0)
        size = [self._valid(max(lo, 96 if len(self.spatial_axes) == 3 else 192), i)
                for i, lo in enumerate(self.meta["min"])]
        x = rng.random((self.n_channel_in, *size), dtype=np.float32)
        centre = tuple(s // 2 for s in size)
        bumped = x.copy()
        bumped[(slice(None),) + centre] += 1.0
        base, moved = self.forward_normalized(x), self.forward_normalized(bumped)
        changed = np.zeros(size, bool)
        for name in self.outputs:
            changed |= np.abs(moved[name] - base[name]).max(axis=0) > 0
        if not changed.any():
            raise ConfigError(f"{self.source}: measuring the halo found no output change; the package must give one")
        idx = np.nonzero(changed)
        return tuple(int(max(c - i.min(), i.max() - c)) for c, i in zip(centre, idx))
