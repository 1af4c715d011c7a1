"""bioimage.io packages run blockwise: bigcare's own exports round-trip, hand-built ones run or are refused."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

import bigcare
from bigcare.cli import main
from bigcare.errors import ModelError
from bigcare.exchange.bioimageio import export_bioimageio
from bigcare.exchange.zoo import ZooPredictor, is_zoo_package
from conftest import make_model, read, smooth_volume, write_volume


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zoo")
    model = make_model(tmp / "m3", ndim=3, depth=1, n_filter_base=4, kernel_size=3,
                       heads=[{"name": "mean"}, {"name": "scale", "activation": "softplus_eps"}])
    return model, export_bioimageio(model, tmp / "m3.zip")


def test_exported_package_restores_blockwise_as_the_bigcare_model(tmp_path, client, exported):
    model, package = exported
    data = smooth_volume((19, 40, 33)) * 300 + 100
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(8, 16, 16))
    runs = {name: bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / f"{name}.ome.zarr", m, client=client,
                                  block_shape=(8, 16, 16), device="cpu", precision="fp32", progress=False)
            for name, m in (("zoo", package), ("own", model))}
    for head in ("mean", "scale"):
        own, zoo = read(runs["own"].outputs[head]), read(runs["zoo"].outputs[head])
        assert np.abs(own - zoo).max() <= 1e-5 * np.abs(own).max(), head
    assert np.abs(read(runs["own"].outputs["mean"]) - data).max() > 1.0  # the network did something
    assert runs["zoo"].precision == "fp32"


def test_a_package_says_it_runs_in_fp32_whatever_precision_asks(tmp_path, client, exported):
    _, package = exported
    write_volume(tmp_path / "in.ome.zarr", smooth_volume((8, 16, 16)) * 300 + 100)
    run = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "z.ome.zarr", package, client=client, device="cpu",
                          precision="auto", progress=False)
    assert run.precision.startswith("fp32 (the model runs in fp32")


def test_unpacked_folder_and_torchscript_weights_give_the_same_result(tmp_path, exported):
    model, package = exported
    with zipfile.ZipFile(package) as z:
        z.extractall(tmp_path / "unpacked")
    assert is_zoo_package(tmp_path / "unpacked") and is_zoo_package(package) and not is_zoo_package(model)
    data = smooth_volume((12, 20, 18)) * 300 + 100
    want = bigcare.predict(data, model, axes="zyx", precision="fp32")
    for source in (tmp_path / "unpacked", package):
        got = bigcare.predict(data, source, axes="zyx", precision="fp32")
        np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-6, atol=1e-4)
    scripted = ZooPredictor(package, weights="torchscript")
    assert scripted.weights == "torchscript" and ZooPredictor(package).weights == "pytorch_state_dict"
    from bigcare.normalization import array_normalizer

    normalizer = array_normalizer(data, None, scripted.pmin, scripted.pmax, name="data")
    np.testing.assert_allclose(scripted.predict(data[None], normalizer)["scale"][0], want["scale"], rtol=1e-5, atol=1e-4)


ARCH = """import torch


class Box(torch.nn.Module):
    def __init__(self, size):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, size, padding=size // 2)

    def forward(self, x):
        return self.conv(x)
"""


def _hand_built(tmp_path, preprocessing=None, halo: int | None = None, weights: str = "torchscript",
                postprocessing=None, test_output=None):
    """A 2D package made with bioimageio.spec's classes: a 3x3 box-filter net (TorchScript or a state dict)."""
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model.v0_5 import (
        ArchitectureFromFileDescr,
        Author,
        AxisId,
        BatchAxis,
        ChannelAxis,
        CiteEntry,
        FileDescr,
        Identifier,
        InputTensorDescr,
        LicenseId,
        ModelDescr,
        OutputTensorDescr,
        ParameterizedSize,
        PytorchStateDictWeightsDescr,
        ScaleRangeDescr,
        ScaleRangeKwargs,
        SizeReference,
        SpaceInputAxis,
        SpaceOutputAxis,
        SpaceOutputAxisWithHalo,
        TensorId,
        TorchscriptWeightsDescr,
        Version,
        WeightsDescr,
    )

    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    with torch.no_grad():
        net.weight.fill_(1 / 9)
        net.bias.fill_(0.5)
    torch.jit.script(net).save(str(tmp_path / "net.pt"))
    torch.save({"conv." + k: v for k, v in net.state_dict().items()}, tmp_path / "state.pt")
    (tmp_path / "box_arch.py").write_text(ARCH)
    x = (np.random.default_rng(1).random((1, 1, 32, 32)) * 1000).astype(np.float32)
    lo, hi = np.percentile(x, 2), np.percentile(x, 99)
    with torch.no_grad():
        y = net(torch.from_numpy((x - lo) / (hi - lo + 1e-6))).numpy()
    np.save(tmp_path / "in.npy", x)
    np.save(tmp_path / "out.npy", y if test_output is None else test_output(x, net))
    yx = [AxisId("y"), AxisId("x")]
    pre = preprocessing if preprocessing is not None else [
        ScaleRangeDescr(kwargs=ScaleRangeKwargs(axes=yx, min_percentile=2, max_percentile=99))]
    out_axes = [SpaceOutputAxisWithHalo(id=a, size=SizeReference(tensor_id=TensorId("image"), axis_id=a), halo=halo)
                if halo else SpaceOutputAxis(id=a, size=SizeReference(tensor_id=TensorId("image"), axis_id=a)) for a in yx]
    (tmp_path / "README.md").write_text("# box filter\n\n## Validation\n\nnone\n")
    descr = ModelDescr(
        name="hand built box filter", description="a 3x3 mean filter", authors=[Author(name="Test")],
        cite=[CiteEntry(text="none", doi="10.1038/s41592-018-0216-7")], license=LicenseId("MIT"),
        documentation=FileDescr(source=tmp_path / "README.md"),
        inputs=[InputTensorDescr(id=TensorId("image"), axes=[BatchAxis(), ChannelAxis(channel_names=[Identifier("c")])]
                                 + [SpaceInputAxis(id=a, size=ParameterizedSize(min=16, step=4)) for a in yx],
                                 test_tensor=FileDescr(source=tmp_path / "in.npy"), preprocessing=pre)],
        outputs=[OutputTensorDescr(id=TensorId("smooth"), axes=[BatchAxis(), ChannelAxis(channel_names=[Identifier("c")])]
                                   + out_axes, test_tensor=FileDescr(source=tmp_path / "out.npy"),
                                   postprocessing=postprocessing or [])],
        weights=WeightsDescr(torchscript=TorchscriptWeightsDescr(source=tmp_path / "net.pt", pytorch_version=Version("2.0")))
        if weights == "torchscript" else WeightsDescr(pytorch_state_dict=PytorchStateDictWeightsDescr(
            source=tmp_path / "state.pt", pytorch_version=Version("2.0"),
            architecture=ArchitectureFromFileDescr(source=tmp_path / "box_arch.py", callable="Box", kwargs={"size": 3}))),
    )
    return save_bioimageio_package(descr, output_path=tmp_path / "box.zip")


@pytest.mark.parametrize("weights", ["torchscript", "pytorch_state_dict"])
def test_hand_built_package_without_halo_gets_a_measured_one_and_runs(tmp_path, weights):
    package = _hand_built(tmp_path, weights=weights)
    with pytest.warns(UserWarning, match="measured by an impulse response: \\(1, 1\\)"):
        predictor = ZooPredictor(package)
    assert predictor.halo_source == "measured" and predictor.halo == (4, 4) and predictor.align == (4, 4)
    assert (predictor.pmin, predictor.pmax, predictor.outputs) == (2.0, 99.0, ("smooth",))
    assert predictor.weights == weights
    data = (np.random.default_rng(2).random((37, 50)) * 1000).astype(np.float32)
    got = bigcare.predict(data, package, axes="yx", precision="fp32")["smooth"]
    lo, hi = np.percentile(data, 2), np.percentile(data, 99)
    from scipy.ndimage import uniform_filter

    # the package's output as it gives it (normalised units), on the interior (bigcare pads at the high end)
    want = uniform_filter((data - lo) / (hi - lo), size=3, mode="constant") + 0.5
    np.testing.assert_allclose(got[1:-1, 1:-1], want[1:-1, 1:-1], rtol=1e-5, atol=1e-5)


def test_hand_built_package_halo_is_taken_from_its_axes(tmp_path):
    predictor = ZooPredictor(_hand_built(tmp_path, halo=6))
    assert predictor.halo_source == "package" and predictor.halo == (8, 8)


def test_preprocessing_bigcare_cannot_reproduce_is_refused(tmp_path, capsys):
    from bioimageio.spec.model.v0_5 import ZeroMeanUnitVarianceDescr

    package = _hand_built(tmp_path, preprocessing=[ZeroMeanUnitVarianceDescr()])
    with pytest.raises(ModelError, match="preprocessing 'zero_mean_unit_variance'.*cannot be reproduced"):
        ZooPredictor(package)
    write_volume(tmp_path / "in.ome.zarr", smooth_volume((40, 40)), axes="yx")
    assert main(["restore", str(tmp_path / "in.ome.zarr"), str(tmp_path / "out.ome.zarr"), "--model", str(package),
                 "-q"]) == 2
    err = capsys.readouterr().err
    assert "zero_mean_unit_variance" in err and "Traceback" not in err
    assert not (tmp_path / "out.ome.zarr").exists()


def test_careamics_style_fixed_normalisation_is_reproduced(tmp_path):
    # CAREamics exports normalise with the training set's mean/std and map back with scale_linear
    from bioimageio.spec.model.v0_5 import (
        FixedZeroMeanUnitVarianceDescr,
        FixedZeroMeanUnitVarianceKwargs,
        ScaleLinearDescr,
        ScaleLinearKwargs,
    )

    mean, std = 480.0, 250.0

    def expected(x, net):
        with torch.no_grad():
            return net(torch.from_numpy((x - mean) / (std + 1e-6))).numpy() * std + mean

    package = _hand_built(
        tmp_path, preprocessing=[FixedZeroMeanUnitVarianceDescr(kwargs=FixedZeroMeanUnitVarianceKwargs(mean=mean, std=std))],
        postprocessing=[ScaleLinearDescr(kwargs=ScaleLinearKwargs(gain=std, offset=mean))], halo=1, test_output=expected)
    data = (np.random.default_rng(3).random((36, 44)) * 1000).astype(np.float32)
    got = bigcare.predict(data, package, axes="yx", precision="fp32")["smooth"]
    from scipy.ndimage import uniform_filter

    want = (uniform_filter((data - mean) / (std + 1e-6), size=3, mode="constant") + 0.5) * std + mean
    np.testing.assert_allclose(got[1:-1, 1:-1], want[1:-1, 1:-1], rtol=1e-5, atol=1e-3)


def test_recalibrated_scale_travels_as_scale_linear_and_round_trips(tmp_path):
    import json

    model = make_model(tmp_path / "m", ndim=2, depth=1, n_filter_base=4, kernel_size=3,
                       heads=[{"name": "mean"}, {"name": "scale", "activation": "softplus_eps"}])
    config = json.loads((model / "config.json").read_text())
    config["calibration"] = {"scale_factor": 1.7}
    (model / "config.json").write_text(json.dumps(config))
    package = export_bioimageio(model, tmp_path / "m.zip")
    import yaml

    rdf = yaml.safe_load(zipfile.ZipFile(package).read("rdf.yaml"))
    scale = next(o for o in rdf["outputs"] if o["id"] == "scale")
    assert [(s["id"], s["kwargs"]["gain"]) for s in scale["postprocessing"] if s["id"] == "scale_linear"] == [
        ("scale_linear", 1.7)]
    data = smooth_volume((40, 36)) * 300 + 100
    want = bigcare.predict(data, model, axes="yx", precision="fp32")
    got = bigcare.predict(data, package, axes="yx", precision="fp32")
    for head in ("mean", "scale"):
        np.testing.assert_allclose(got[head], want[head], rtol=1e-5, atol=1e-4 * np.abs(want[head]).max())
