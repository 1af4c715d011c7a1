"""A bigcare model folder as a bioimage.io model package (spec 0.5), built with bioimageio.spec.

::

    my_model/                         MODEL.zip (bioimage.io 0.5 package)
      config.json          ──►         rdf.yaml          axes (batch, channel, z/y/x with halo),
      model.safetensors                                  preprocessing scale_range(pmin, pmax),
                                                         cite CARE, license, config.bigcare
                                       weights.pt        pytorch_state_dict (tensors only)
                                       bigcare_unet.py   its architecture: torch only, no bigcare
                                       model.ts.pt       torchscript (scripted from that file)
                                       model.onnx        onnx (opset 17)
                                       test_input.npy / test_<head>.npy, README.md

bioimage.io's preprocessing expresses bigcare's input normalisation exactly: ``scale_range``
with the model's percentiles over the spatial axes of each channel, eps 1e-20. It has no
operation for bigcare's way back to intensities (``y * (hi - lo) + lo`` with the *input's*
percentiles), so the package's outputs, and its test outputs, are in normalised units;
``config.bigcare.outputs`` records per output how bigcare maps it back (``intensity``,
``scale``: only multiplied, or ``raw``), and bigcare applies it when it runs the package.
"""

from __future__ import annotations

import getpass
import json
import os
import pathlib
import shutil
import tempfile
import warnings
from typing import Any, cast

import numpy as np

from bigcare.errors import ModelError, OutputError

__all__ = ["export_bioimageio", "check_package", "require_bioimageio", "CARE_DOI", "INPUT_ID"]

CARE_DOI = "10.1038/s41592-018-0216-7"
CARE_CITATION = ("Weigert, M. et al. Content-aware image restoration: pushing the limits of fluorescence "
                 "microscopy. Nature Methods 15, 1090-1097 (2018).")
INPUT_ID = "raw"
ONNX_OPSET = 17
_ARCH_FILE = "bigcare_unet.py"


def _output_kind(activation: str) -> str:
    # as bigcare.predictors.care.CAREPredictor maps heads back to intensity units
    return "intensity" if activation in ("linear", "relu") else "scale" if activation.startswith("softplus") else "raw"


def _scale_factor(config) -> float:
    """The recalibration factor of a probabilistic model's scale (``bigcare calibrate``), 1 when none."""
    calibration = getattr(config, "calibration", None)
    return float(calibration.scale_factor) if calibration is not None else 1.0


def _test_input(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth, positive float32 image (camera-like offset and range), deterministic."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.random(shape), sigma=(0, 0) + (1.5,) * (len(shape) - 2))
    return (100 + 1000 * (x - x.min()) / (np.ptp(x) + 1e-12) + 20 * rng.standard_normal(shape)).astype(np.float32)


def _readme(name: str, config, halo_: int, divisor_: int, outputs: dict[str, str]) -> str:
    arch = config.architecture
    lines = [
        f"# {name}", "",
        f"A {arch.ndim}D CARE U-Net (depth {arch.depth}, {arch.n_filter_base} first filters, kernel "
        f"{arch.kernel}, {'residual' if arch.residual else 'not residual'}) exported by bigcare.", "",
        "## Input and output", "",
        f"- Input `{INPUT_ID}`: axes batch, channel, {', '.join(config.axes.lower())}; every spatial size a "
        f"multiple of {divisor_}. Preprocessing: percentile normalisation `(x - p{config.normalization.pmin}) / "
        f"(p{config.normalization.pmax} - p{config.normalization.pmin})` per channel over the whole image "
        "(`scale_range`).",
        f"- Outputs ({', '.join(outputs)}) are in normalised units. To get intensities back, as bigcare "
        "does: `y * (hi - lo) + lo` for intensity outputs and `y * (hi - lo)` for scale outputs, with `lo`, "
        "`hi` the input's percentiles. Kinds: " + ", ".join(f"`{k}`: {v}" for k, v in outputs.items()) + ".",
        f"- Halo: {halo_} voxels per side (from the receptive field). Tiles that overlap by it and start on "
        f"multiples of {divisor_} give the whole-image result exactly.", "",
        "## Weights", "",
        f"`pytorch_state_dict` (tensors only; architecture `{_ARCH_FILE}`, torch only), `torchscript` and "
        f"`onnx` (opset {ONNX_OPSET}), all converted from the same weights. TorchScript is code: run it only "
        "if you trust where the package came from.", "",
        "## Validation", "",
        "The package's test input and outputs were computed by bigcare with the `pytorch_state_dict` weights. "
        "Validate a model on held-out pairs (low-SNR input, high-SNR target) with NRMSE and SSIM after "
        "normalising the target to percentiles (0.1, 99.9) and fitting the prediction to it with the "
        "least-squares affine map, as in the CARE paper.", "",
        "## Training", "",
        "```json", json.dumps(config.provenance, indent=2, default=str)[:4000], "```", "",
        "## Cite", "", CARE_CITATION + f" https://doi.org/{CARE_DOI}", "",
    ]
    return "\n".join(lines)


def export_bioimageio(model: str | os.PathLike, out: str | os.PathLike, *, name: str | None = None,
                      authors: list[str] | None = None, license: str = "CC-BY-4.0",
                      description: str | None = None, test_input: np.ndarray | None = None,
                      overwrite: bool = False) -> pathlib.Path:
    """Write a bigcare model folder as a bioimage.io model package (a .zip).

    Parameters
    ----------
    model : str or PathLike
        The bigcare model folder (a CARE kind; an isotropic model cannot be described by the
        spec: its network runs on XZ and YZ slices of a Z-upsampled volume).
    out : str or PathLike
        The ``.zip`` to write.
    name, description : str, optional
        Shown by the model zoo; default from the folder name.
    authors : list of str, optional
        Author names; default the current user's login name.
    license : str
        SPDX license identifier of the weights. Default ``CC-BY-4.0``.
    test_input : numpy.ndarray, optional
        A raw image with axes (channel, *spatial) whose spatial sizes fit the network (multiples
        of ``pool ** depth``, larger than twice the halo); default a synthetic smooth image of the
        smallest such size.
    overwrite : bool
        Replace an existing ``out``.

    Returns
    -------
    pathlib.Path
        The package.

    Raises
    ------
    ModelError
        If the model is not exportable (isotropic kind, N2V2 pooling) or the built description
        does not validate (the message holds bioimageio.spec's summary).
    OutputError
        If ``out`` exists and ``overwrite`` is False, or does not end in ``.zip``.
    """
    import torch

    from bigcare.models.architecture import divisor, halo
    from bigcare.models.folder import load_model

    require_bioimageio()
    out = pathlib.Path(out)
    if out.suffix != ".zip":
        raise OutputError(f"the package path must end in .zip, got {out}")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    net, config = load_model(model)
    arch = config.architecture
    if config.kind != "care":
        raise ModelError(f"model {model} is of kind {config.kind!r}: a bioimage.io package describes one network on "
                         "one grid, so only kind 'care' models can be exported")
    check_packaged_options(arch, f"model {model}")
    h, d = halo(arch), divisor(arch)
    min_size = d * (-(-(2 * h + 1) // d))
    if test_input is None:
        test_input = _test_input((1, arch.n_channel_in) + (min_size,) * arch.ndim)
    else:
        test_input = np.asarray(test_input, dtype=np.float32)[None]
        bad = [s for s in test_input.shape[2:] if s % d or s < min_size]
        if test_input.shape[1] != arch.n_channel_in or test_input.ndim != arch.ndim + 2 or bad:
            raise ModelError(f"test_input has shape {test_input.shape[1:]}: expected (channels = {arch.n_channel_in}, "
                             f"{arch.ndim} spatial sizes, multiples of {d}, at least {min_size})")
    kinds = {hd.name: _output_kind(hd.activation) for hd in arch.heads}
    arch_kwargs = dict(ndim=arch.ndim, depth=arch.depth, n_filter_base=arch.n_filter_base, kernel_size=arch.kernel,
                       n_conv_per_depth=arch.n_conv_per_depth, pool=arch.pool, n_channel_in=arch.n_channel_in,
                       n_channel_out=arch.n_channel_out, residual=arch.residual,
                       heads=[[hd.name, hd.activation] for hd in arch.heads])
    if name is None:  # the zoo allows letters, digits, '_+- ()' and 5 to 128 characters
        stem = "".join(c if c.isalnum() or c in "_+- ()" else "-" for c in pathlib.Path(model).resolve().name)
        name = f"{stem} (bigcare CARE {arch.ndim}D)"[:128]
    with tempfile.TemporaryDirectory(prefix="bigcare-export-") as tmp:
        work = pathlib.Path(tmp)
        shutil.copy(pathlib.Path(__file__).with_name("unet_arch.py"), work / _ARCH_FILE)
        package_net = _package_network(work / _ARCH_FILE, arch_kwargs)
        package_net.load_state_dict(net.state_dict(), strict=True)
        package_net.eval()
        torch.save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, work / "weights.pt")
        torch.jit.script(package_net).save(str(work / "model.ts.pt"))
        _export_onnx(package_net, test_input, list(kinds), work / "model.onnx")
        # the test outputs: the network on the normalised test input, as bioimageio.core computes them
        axes_r = tuple(range(2, test_input.ndim))
        lo = np.percentile(test_input, config.normalization.pmin, axis=axes_r, keepdims=True)
        hi = np.percentile(test_input, config.normalization.pmax, axis=axes_r, keepdims=True)
        xn = ((test_input - lo) / (hi - lo + 1e-20)).astype(np.float32)
        with torch.no_grad():
            ys = [y.numpy() for y in package_net(torch.from_numpy(xn))]
        factor = _scale_factor(config)  # a recalibrated scale: the package's scale_linear postprocessing
        ys = [y * np.float32(factor) if kinds[h] == "scale" else y for h, y in zip(kinds, ys)]
        import tifffile

        np.save(work / "test_input.npy", test_input)
        tifffile.imwrite(work / "sample_input.tif", test_input[0])  # the zoo shows these
        for head, y in zip(kinds, ys):
            np.save(work / f"test_{head}.npy", y)
            tifffile.imwrite(work / f"sample_{head}.tif", y[0])
        readme = work / "README.md"
        readme.write_text(_readme(name, config, h, d, kinds))
        from pydantic import ValidationError

        try:
            descr = _describe(work, config, name=name, description=description, authors=authors, license=license,
                              arch_kwargs=arch_kwargs, kinds=kinds, halo_=h, divisor_=d, min_size=min_size)
        except ValidationError as e:  # a name, author or license the spec does not accept
            from bigcare.errors import format_validation_error

            raise ModelError(f"the bioimage.io description is not valid: {format_validation_error(e)}") from None
        from bioimageio.spec import save_bioimageio_package

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_zip = out.with_name(out.name + ".tmp.zip")
        try:
            save_bioimageio_package(descr, output_path=tmp_zip)
            check_package(tmp_zip)
        except BaseException:
            tmp_zip.unlink(missing_ok=True)
            raise
        os.replace(tmp_zip, out)
    return out


#: the UNetConfig fields bigcare_unet.py takes; every other field must keep its default (CSBDeep's U-Net)
PACKAGED_FIELDS = {"ndim", "depth", "n_filter_base", "kernel_size", "n_conv_per_depth", "pool", "n_channel_in",
                   "n_channel_out", "residual", "heads"}


def check_packaged_options(arch, where: str) -> None:
    """ModelError naming each architecture option the packaged U-Net (CSBDeep's) does not have.

    New UNetConfig options (N2V2's blur pooling, the GAN generator's LeakyReLU, ...) are refused
    until ``unet_arch.py`` learns them, rather than exported as a different network.
    """
    unsupported = [f"{name} = {getattr(arch, name)!r}" for name, field in type(arch).model_fields.items()
                   if name not in PACKAGED_FIELDS and getattr(arch, name) != field.get_default(call_default_factory=True)]
    if unsupported:
        raise ModelError(f"{where}: architecture option(s) {', '.join(unsupported)} are not in the packaged "
                         "U-Net (CSBDeep's CARE network); such models run in bigcare but cannot be exported yet")


def require_bioimageio() -> None:
    """ModelError naming the extra to install when bioimageio.spec (or onnx) is missing."""
    import importlib.util

    missing = [m for m in ("bioimageio.spec", "onnx") if importlib.util.find_spec(m.split(".")[0]) is None
               or importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(f"bioimage.io packages need {', '.join(missing)}: pip install 'bigcare[exchange]'")


def _package_network(source: pathlib.Path, kwargs: dict[str, Any]):
    """The network the package's architecture file builds (imported from that file, as consumers do)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bigcare_packaged_unet", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BigcareUNet(**kwargs)


def _export_onnx(net, test_input: np.ndarray, heads: list[str], path) -> None:
    import torch

    nd = test_input.ndim - 2
    dynamic = {INPUT_ID: {0: "batch", **{2 + i: f"s{i}" for i in range(nd)}}}
    dynamic.update({h: {0: "batch", **{2 + i: f"s{i}" for i in range(nd)}} for h in heads})
    with warnings.catch_warnings():  # the TorchScript-based exporter: deprecated, but needs no onnxscript
        warnings.simplefilter("ignore")
        target = str(path) if isinstance(path, pathlib.Path) else path  # a path or a writable file object
        torch.onnx.export(net, (torch.from_numpy(test_input),), target, dynamo=False, input_names=[INPUT_ID],
                          output_names=heads, dynamic_axes=dynamic, opset_version=ONNX_OPSET)


def _describe(work: pathlib.Path, config, *, name, description, authors, license, arch_kwargs, kinds, halo_,
              divisor_, min_size):
    import torch
    from bioimageio.spec.model.v0_5 import (
        ArchitectureFromFileDescr,
        Author,
        AxisId,
        BatchAxis,
        ChannelAxis,
        CiteEntry,
        Doi,
        FileDescr,
        Identifier,
        InputTensorDescr,
        LicenseId,
        ModelDescr,
        OnnxWeightsDescr,
        OutputTensorDescr,
        ParameterizedSize,
        PytorchStateDictWeightsDescr,
        ScaleLinearDescr,
        ScaleLinearKwargs,
        ScaleRangeDescr,
        ScaleRangeKwargs,
        SizeReference,
        SpaceInputAxis,
        SpaceOutputAxisWithHalo,
        TensorId,
        TorchscriptWeightsDescr,
        Version,
        WeightsDescr,
    )

    arch = config.architecture
    spatial = [AxisId(a) for a in config.axes.lower()]
    channels_in: list[Any] = [Identifier(f"channel{i}") for i in range(arch.n_channel_in)]
    channels_out: list[Any] = [Identifier(f"channel{i}") for i in range(arch.n_channel_out)]
    in_axes: list[Any] = [BatchAxis(), ChannelAxis(channel_names=channels_in)]
    out_axes: list[Any] = [BatchAxis(), ChannelAxis(channel_names=channels_out)]
    inputs = [InputTensorDescr(
        id=TensorId(INPUT_ID), description="raw image (any intensity range; normalised by the preprocessing)",
        axes=in_axes + [SpaceInputAxis(id=a, size=ParameterizedSize(min=min_size, step=divisor_)) for a in spatial],
        test_tensor=FileDescr(source=work / "test_input.npy"),
        sample_tensor=FileDescr(source=work / "sample_input.tif"),
        preprocessing=[ScaleRangeDescr(kwargs=ScaleRangeKwargs(
            axes=spatial, min_percentile=config.normalization.pmin, max_percentile=config.normalization.pmax,
            eps=1e-20))],
    )]
    outputs = [OutputTensorDescr(
        id=TensorId(head), description=f"{kind} output in normalised units (see config.bigcare.outputs)",
        axes=out_axes + [SpaceOutputAxisWithHalo(id=a, size=SizeReference(tensor_id=TensorId(INPUT_ID), axis_id=a), halo=halo_)
           for a in spatial],
        test_tensor=FileDescr(source=work / f"test_{head}.npy"),
        sample_tensor=FileDescr(source=work / f"sample_{head}.tif"),
        postprocessing=[ScaleLinearDescr(kwargs=ScaleLinearKwargs(gain=_scale_factor(config)))]
        if kind == "scale" and _scale_factor(config) != 1.0 else [],
    ) for head, kind in kinds.items()]
    torch_version = Version(torch.__version__.split("+")[0])
    weights = WeightsDescr(
        pytorch_state_dict=PytorchStateDictWeightsDescr(
            source=work / "weights.pt", pytorch_version=torch_version,
            architecture=ArchitectureFromFileDescr(source=work / _ARCH_FILE, callable=Identifier("BigcareUNet"),
                                                   kwargs=arch_kwargs)),
        torchscript=TorchscriptWeightsDescr(source=work / "model.ts.pt", pytorch_version=torch_version,
                                            parent="pytorch_state_dict"),
        onnx=OnnxWeightsDescr(source=work / "model.onnx", opset_version=ONNX_OPSET, parent="pytorch_state_dict"),
    )
    from bigcare.models.folder import canonical_json
    from bigcare.version import __version__

    return ModelDescr(
        name=name,
        description=description or f"CARE restoration ({arch.ndim}D U-Net) exported by bigcare {__version__}",
        authors=[Author(name=a) for a in (authors or [getpass.getuser()])],
        cite=[CiteEntry(text=CARE_CITATION, doi=Doi(CARE_DOI))],
        license=LicenseId(license),
        documentation=FileDescr(source=work / "README.md"),
        tags=["care", "restoration", "denoising", f"{arch.ndim}d", "unet", "bigcare"],
        inputs=inputs, outputs=outputs, weights=weights,
        config=cast(Any, {"bigcare": {"outputs": kinds, "model_config": json.loads(canonical_json(config)),
                                      "bigcare_version": __version__}}),
    )


def check_package(path: str | os.PathLike) -> None:
    """Validate a package with bioimageio.spec, reading every file it names (no network needed).

    Raises
    ------
    ModelError
        If bioimageio.spec finds the package invalid; the message holds its summary.
    """
    from bioimageio.spec import InvalidDescr, load_model_description

    descr = load_model_description(str(path), perform_io_checks=True)
    if isinstance(descr, InvalidDescr) or descr.validation_summary.status == "failed":
        raise ModelError(f"{path} is not a valid bioimage.io model package: "
                         f"{descr.validation_summary.format()}")
