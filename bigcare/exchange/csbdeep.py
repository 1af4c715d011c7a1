"""CSBDeep (Keras) CARE models as bigcare model folders: config.json + weights .h5, read as data.

::

    csbdeep_model/                         bigcare_model/
      config.json   axes, n_dim, unet_*,    config.json        ModelConfig: architecture,
                    probabilistic, train_*    ──►                normalization (2 / 99.8), provenance
      weights_best.h5  Keras h5 (h5py only)    model.safetensors  the same weights, torch layout

The mapping, layer by layer (CSBDeep's ``unet_block`` names its convolutions; the heads are
unnamed 1x1 convolutions, told apart by the order Keras created them in)::

    down_level_{l}_no_{i}            -> down.{l}.{2i}
    middle_{i} (i < n-1), middle_{n} -> middle.{2i}, middle.{2(n-1)}
    up_level_{l}_no_{i} (i < n-1),   -> up.{l}.{2i},
    up_level_{l}_no_{n}                 up.{l}.{2(n-1)}
    1st 1x1 conv  (+ input if unet_residual, then unet_last_activation) -> heads.restored / heads.mean
    2nd 1x1 conv  (probabilistic: softplus + 1e-3)                       -> heads.scale

Keras kernels are ``(*spatial, in, out)`` (channels last), torch's ``(out, in, *spatial)``; both
are cross-correlations with symmetric 'same' padding for odd kernels, and both concatenate
``[upsampled, skip]`` along channels, so the kernel transpose is the whole conversion.

Normalisation: CSBDeep's ``CARE.predict`` defaults to ``PercentileNormalizer(pmin=2, pmax=99.8)``
(per channel, over the whole image); the imported model says 2 / 99.8 unless told otherwise.
Nothing is unpickled: the .h5 is read with h5py, numeric datasets and string attributes only.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

import numpy as np

from bigcare.errors import ConfigError, ModelError

__all__ = ["read_csbdeep_config", "read_keras_weights", "csbdeep_state_dict", "import_csbdeep"]

#: CSBDeep's ``CARE.predict`` normaliser: ``PercentileNormalizer()`` is pmin=2, pmax=99.8.
CSBDEEP_PMIN, CSBDEEP_PMAX = 2.0, 99.8
#: keys of a CSBDeep ``Config`` bigcare reads (train_* keys only go to the provenance)
_KNOWN = {"n_dim", "axes", "n_channel_in", "n_channel_out", "probabilistic", "unet_residual", "unet_n_depth",
          "unet_kern_size", "unet_n_first", "unet_last_activation", "unet_input_shape", "unet_n_conv_per_depth"}
_ACTIVATIONS = ("linear", "relu", "softplus", "sigmoid")
_NAMED = re.compile(r"^(down_level_(\d+)_no_(\d+)|middle_(\d+)|up_level_(\d+)_no_(\d+))$")


def _fail(key: str, value: Any, why: str) -> ModelError:
    return ModelError(f"CSBDeep config key {key!r} = {value!r}: {why}")


def read_csbdeep_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a CSBDeep model folder's ``config.json`` and check every key bigcare must represent.

    Parameters
    ----------
    path : str or PathLike
        The CSBDeep model folder (``config.json`` + ``weights_best.h5``).

    Returns
    -------
    dict
        The config as CSBDeep wrote it, with CSBDeep's defaults filled in for missing keys.

    Raises
    ------
    ModelError
        If the folder or ``config.json`` is missing or not JSON, or a key holds a value bigcare
        cannot represent (the message names the key, its value and what bigcare supports).
    """
    folder = pathlib.Path(path)
    cfile = folder / "config.json"
    if not folder.is_dir():
        raise ModelError(f"CSBDeep model folder {folder} does not exist or is not a folder")
    if not cfile.is_file():
        raise ModelError(f"{folder} has no config.json: not a CSBDeep model folder")
    try:
        raw = json.loads(cfile.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{cfile} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{cfile} must hold a JSON object, got {type(raw).__name__}")
    for key in raw:
        if key not in _KNOWN and not key.startswith("train_"):
            raise _fail(key, raw[key], "bigcare cannot represent this key (it reads plain CARE configs: n_dim, axes, "
                        "n_channel_in/out, probabilistic, unet_*; other CSBDeep model kinds, e.g. ProjectionCARE's "
                        "proj_* keys, are not supported)")
    if "axes" not in raw:
        raise _fail("axes", None, "required")
    axes = str(raw["axes"]).upper()
    spatial = axes.replace("C", "").replace("S", "")
    if "T" in spatial:
        raise _fail("axes", raw["axes"], "a T (time) axis used as a network axis cannot be represented: bigcare "
                    "networks run on Z, Y, X")
    n_dim = raw.get("n_dim", len(spatial))
    if n_dim not in (2, 3) or len(spatial) != n_dim or any(a not in "ZYX" for a in spatial):
        raise _fail("axes", raw["axes"], f"expected {n_dim} distinct spatial axes from ZYX (n_dim = {n_dim}), "
                    "plus an optional C")
    cfg = {"n_dim": n_dim, "axes": axes, "spatial_axes": spatial,
           "n_channel_in": raw.get("n_channel_in", 1), "n_channel_out": raw.get("n_channel_out", 1),
           "probabilistic": raw.get("probabilistic", False)}
    cfg["unet_residual"] = raw.get("unet_residual", cfg["n_channel_in"] == cfg["n_channel_out"])
    cfg["unet_n_depth"] = raw.get("unet_n_depth", 2)
    cfg["unet_kern_size"] = raw.get("unet_kern_size", 5 if n_dim == 2 else 3)
    cfg["unet_n_first"] = raw.get("unet_n_first", 32)
    cfg["unet_last_activation"] = raw.get("unet_last_activation", "linear")
    for key in ("n_channel_in", "n_channel_out", "unet_n_depth", "unet_kern_size", "unet_n_first"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise _fail(key, cfg[key], "expected a positive whole number")
    if cfg["unet_kern_size"] % 2 != 1:
        raise _fail("unet_kern_size", cfg["unet_kern_size"], "bigcare supports odd kernel sizes only")
    for key in ("probabilistic", "unet_residual"):
        if not isinstance(cfg[key], bool):
            raise _fail(key, cfg[key], "expected true or false")
    if cfg["unet_last_activation"] not in _ACTIVATIONS:
        raise _fail("unet_last_activation", cfg["unet_last_activation"], f"bigcare supports {list(_ACTIVATIONS)}")
    if cfg["unet_residual"] and cfg["n_channel_in"] != cfg["n_channel_out"]:
        raise _fail("unet_residual", True, f"a residual net needs n_channel_in == n_channel_out, got "
                    f"{cfg['n_channel_in']} and {cfg['n_channel_out']}")
    shape = raw.get("unet_input_shape")
    if shape is not None:
        if not isinstance(shape, list) or len(shape) != n_dim + 1 or shape[-1] != cfg["n_channel_in"]:
            raise _fail("unet_input_shape", shape, f"expected {n_dim} spatial sizes then n_channel_in = "
                        f"{cfg['n_channel_in']} (channels last)")
    loss = raw.get("train_loss")
    if loss is not None and (loss == "laplace") != cfg["probabilistic"]:
        raise _fail("train_loss", loss, f"does not fit probabilistic = {cfg['probabilistic']}")
    cfg["raw"] = raw
    return cfg


def _attr_strings(group, name: str) -> list[str]:
    """A Keras string-list attribute; Keras splits long ones into name0, name1, ..."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, k = [], 0
        while f"{name}{k}" in group.attrs:
            values += list(group.attrs[f"{name}{k}"])
            k += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def read_keras_weights(path: str | os.PathLike) -> tuple[dict[str, dict[str, np.ndarray]], list[str], dict[str, str]]:
    """The layers' weights of a Keras h5 file (``save_weights`` or ``model.save`` layout), read with h5py.

    Parameters
    ----------
    path : str or PathLike
        The ``.h5`` file.

    Returns
    -------
    weights : dict
        Layer name -> {"kernel": array, "bias": array} for every layer that has weights.
    layer_names : list of str
        All layer names in the model's order (the ``layer_names`` attribute).
    attrs : dict
        ``keras_version`` and ``backend`` as recorded in the file.

    Raises
    ------
    ModelError
        If the file is not HDF5, has no Keras layer list, or a layer holds weights other than
        one kernel and one bias (batch normalisation, for example), naming the layer.
    """
    try:
        import h5py
    except ImportError:
        raise ModelError("reading Keras .h5 weights needs h5py: pip install 'bigcare[exchange]'") from None
    try:
        f = h5py.File(os.fspath(path), "r")
    except OSError as e:
        raise ModelError(f"{path} is not a readable HDF5 file ({e})") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        layer_names = _attr_strings(root, "layer_names")
        if not layer_names:
            hint = " (Keras 3 '.weights.h5' files are not read; save with CSBDeep, which writes the h5 layout)" \
                if "layers" in f else ""
            raise ModelError(f"{path} has no Keras 'layer_names' attribute: not a Keras h5 weights file{hint}")
        weights: dict[str, dict[str, np.ndarray]] = {}
        for name in layer_names:
            if name not in root:
                continue
            names = _attr_strings(root[name], "weight_names")
            if not names:
                continue
            tensors = {}
            for wname in names:
                kind = wname.rsplit("/", 1)[-1].split(":")[0]
                if kind not in ("kernel", "bias") or kind in tensors:
                    raise ModelError(f"{path}: layer {name!r} holds weight {wname!r}; bigcare maps convolution layers "
                                     "with one kernel and one bias only (no batch normalisation)")
                dset = root[name][wname]
                if dset.dtype.kind != "f":
                    raise ModelError(f"{path}: weight {wname!r} has dtype {dset.dtype}, expected floats")
                tensors[kind] = np.asarray(dset[()], dtype=np.float32)
            if set(tensors) != {"kernel", "bias"}:
                raise ModelError(f"{path}: layer {name!r} has weights {sorted(tensors)}, expected kernel and bias")
            weights[name] = tensors
        attrs = {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in f.attrs.items()
                 if k in ("keras_version", "backend")}
    return weights, layer_names, attrs


def _creation_order(name: str, layer_names: list[str]) -> tuple[int, int]:
    # Keras names unnamed layers conv2d, conv2d_1, conv2d_2 ... in the order they were created
    m = re.search(r"_(\d+)$", name)
    return (int(m.group(1)) if m else 0, layer_names.index(name))


def csbdeep_state_dict(cfg: dict[str, Any], weights: dict[str, dict[str, np.ndarray]], layer_names: list[str],
                       where: str = "weights") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The bigcare architecture and torch state dict of CSBDeep weights (see the module's mapping).

    Parameters
    ----------
    cfg : dict
        From :func:`read_csbdeep_config`.
    weights, layer_names
        From :func:`read_keras_weights`.
    where : str
        The weights file, for messages.

    Returns
    -------
    architecture : dict
        :class:`~bigcare.models.architecture.UNetConfig` fields.
    state : dict of str to numpy.ndarray
        State-dict key -> float32 array in torch's layout.

    Raises
    ------
    ModelError
        If the layers do not form the U-Net the config describes (the message names the layer
        or the config key that disagrees).
    """
    nd, depth = cfg["n_dim"], cfg["unet_n_depth"]
    named = {n: m for n in weights if (m := _NAMED.match(n))}
    heads = sorted((n for n in weights if n not in named), key=lambda n: _creation_order(n, layer_names))
    down_levels = {int(m.group(2)) for m in named.values() if m.group(2) is not None}
    n_conv = sum(1 for m in named.values() if m.group(2) == "0")
    if down_levels != set(range(depth)):
        raise ModelError(f"{where}: the down levels {sorted(down_levels)} do not fit CSBDeep config key unet_n_depth "
                         f"= {depth}")
    if n_conv < 1 or cfg["raw"].get("unet_n_conv_per_depth", n_conv) != n_conv:
        raise ModelError(f"{where}: {n_conv} convolution(s) per level in the weights, CSBDeep config key "
                         f"unet_n_conv_per_depth = {cfg['raw'].get('unet_n_conv_per_depth')!r}")
    want_heads = 2 if cfg["probabilistic"] else 1
    if len(heads) != want_heads:
        raise ModelError(f"{where}: unexpected layer(s) {heads}: expected {want_heads} unnamed 1x1 output "
                         f"convolution(s) for probabilistic = {cfg['probabilistic']}")

    def index(i: int) -> int:  # conv i of a block sits at 2*i of the torch Sequential (conv, ReLU, ...)
        return 2 * min(i, n_conv - 1)

    keys: dict[str, str] = {}
    for name, m in named.items():
        if m.group(2) is not None:
            keys[name] = f"down.{m.group(2)}.{index(int(m.group(3)))}"
        elif m.group(4) is not None:
            keys[name] = f"middle.{index(int(m.group(4)))}"
        else:
            keys[name] = f"up.{m.group(5)}.{index(int(m.group(6)))}"
    names = ["mean", "scale"] if cfg["probabilistic"] else ["restored"]
    keys.update({layer: f"heads.{head}" for layer, head in zip(heads, names)})
    if len(set(keys.values())) != len(keys):
        raise ModelError(f"{where}: layers {sorted(keys)} map onto the same U-Net convolution more than once")
    activation = cfg["unet_last_activation"]
    architecture = dict(
        ndim=nd, depth=depth, n_filter_base=cfg["unet_n_first"], kernel_size=cfg["unet_kern_size"],
        n_conv_per_depth=n_conv, pool=2, n_channel_in=cfg["n_channel_in"], n_channel_out=cfg["n_channel_out"],
        residual=cfg["unet_residual"],
        heads=[{"name": names[0], "activation": activation}] + ([{"name": "scale", "activation": "softplus_eps"}]
                                                                 if cfg["probabilistic"] else []))
    state: dict[str, np.ndarray] = {}
    for layer, key in keys.items():
        kernel, bias = weights[layer]["kernel"], weights[layer]["bias"]
        if kernel.ndim != nd + 2:
            raise ModelError(f"{where}: layer {layer!r} has a {kernel.ndim - 2}D kernel {kernel.shape}, CSBDeep config "
                             f"key n_dim = {nd}")
        size = 1 if key.startswith("heads.") else cfg["unet_kern_size"]
        if kernel.shape[:nd] != (size,) * nd:
            raise ModelError(f"{where}: layer {layer!r} has kernel size {kernel.shape[:nd]}, CSBDeep config key "
                             f"unet_kern_size = {cfg['unet_kern_size']}")
        # Keras (*spatial, in, out) -> torch (out, in, *spatial)
        state[f"{key}.weight"] = np.ascontiguousarray(np.transpose(kernel, (nd + 1, nd, *range(nd))))
        state[f"{key}.bias"] = bias
    return architecture, state


def _weights_file(folder: pathlib.Path, raw: dict[str, Any]) -> pathlib.Path:
    """CSBDeep's choice: the config's train_checkpoint (weights_best.h5), else the newest '*best*' .h5, else any."""
    named = folder / str(raw.get("train_checkpoint") or "weights_best.h5")
    if named.is_file():
        return named
    files = sorted(list(folder.glob("*.h5")) + list(folder.glob("*.hdf5")), key=lambda p: p.stat().st_mtime, reverse=True)
    if not files:
        raise ModelError(f"CSBDeep model folder {folder} has no weights (.h5 / .hdf5)")
    best = [p for p in files if "best" in p.name]
    return (best or files)[0]


def import_csbdeep(path: str | os.PathLike, out: str | os.PathLike, *, pmin: float = CSBDEEP_PMIN,
                   pmax: float = CSBDEEP_PMAX, isotropic_factor: float | None = None,
                   overwrite: bool = False) -> pathlib.Path:
    """Write the bigcare model folder that predicts what a CSBDeep CARE model predicts.

    Parameters
    ----------
    path : str or PathLike
        CSBDeep model folder (``config.json``, ``weights_best.h5``), as ``CARE(config, name)``
        writes it.
    out : str or PathLike
        The bigcare model folder to write.
    pmin, pmax : float
        Normalisation percentiles recorded in the model; default CSBDeep's ``CARE.predict``
        default (2, 99.8). Give the ones you predicted with in CSBDeep, e.g. 1 and 99.8.
    isotropic_factor : float, optional
        The model is an ``IsotropicCARE`` (2D, axes YX) trained for this axial subsampling
        factor: it is imported as bigcare's isotropic kind, with CSBDeep's geometric-mean
        combination of the XZ and YZ predictions.
    overwrite : bool
        Replace a model already in ``out``.

    Returns
    -------
    pathlib.Path
        The written model folder.

    Raises
    ------
    ModelError
        If the CSBDeep folder is missing or unreadable, or holds something bigcare cannot
        represent (the message names the config key or the layer).
    OutputError
        If ``out`` holds a model and ``overwrite`` is False.
    """
    import torch

    from bigcare.models.architecture import UNetConfig
    from bigcare.models.folder import IsotropicConfig, ModelConfig, Normalization, check_finite_weights, save_model
    from bigcare.models.unet import UNet

    folder = pathlib.Path(path)
    cfg = read_csbdeep_config(folder)
    wfile = _weights_file(folder, cfg["raw"])
    weights, layer_names, attrs = read_keras_weights(wfile)
    architecture, state = csbdeep_state_dict(cfg, weights, layer_names, str(wfile))
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    check_finite_weights(tensors, str(wfile))
    try:
        arch = UNetConfig.model_validate(architecture)
        norm = Normalization(pmin=pmin, pmax=pmax)
        iso = None
        if isotropic_factor is not None:
            if cfg["spatial_axes"] != "YX":
                raise ConfigError(f"isotropic_factor: an IsotropicCARE model is 2D with axes YX, this one has axes "
                                  f"{cfg['raw']['axes']!r}")
            iso = IsotropicConfig(factor=isotropic_factor, combine="geometric")
    except ConfigError as e:
        raise ModelError(f"CSBDeep model {folder}: {e}") from None
    model = UNet(arch)
    for key, want in model.state_dict().items():
        got = tensors.get(key)
        if got is None or tuple(got.shape) != tuple(want.shape):
            raise ModelError(f"{wfile}: the weights for {key} have shape {None if got is None else tuple(got.shape)} "
                             f"(torch layout), config.json's unet_n_first = {cfg['unet_n_first']}, n_channel_in = "
                             f"{cfg['n_channel_in']}, n_channel_out = {cfg['n_channel_out']} need {tuple(want.shape)}")
    model.load_state_dict(tensors, strict=True)
    provenance = {
        "imported_from": "csbdeep", "source": str(folder.resolve()), "weights_file": wfile.name,
        "keras": attrs, "csbdeep_config": cfg["raw"],
        "normalization_note": f"percentiles {pmin} / {pmax} per channel over the whole image, as CSBDeep's "
                              "PercentileNormalizer; bigcare samples them on volumes over 2**24 voxels",
    }
    config = ModelConfig(kind="isotropic" if iso is not None else "care", axes=cfg["spatial_axes"], architecture=arch,
                         normalization=norm, isotropic=iso, provenance=provenance)
    return save_model(out, model, config, overwrite=overwrite)
