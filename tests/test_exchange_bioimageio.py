"""bigcare models exported as bioimage.io packages: valid, reproducible by bioimageio.core, faithful."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import yaml

from bigcare.cli import main
from bigcare.errors import ModelError, OutputError
from bigcare.exchange.bioimageio import CARE_DOI, export_bioimageio
from bigcare.exchange.unet_arch import BigcareUNet
from bigcare.models import Head, UNet, UNetConfig
from conftest import make_model


@pytest.mark.parametrize("ndim, depth, n_conv, heads", [
    (2, 2, 2, [("restored", "linear")]),
    (3, 1, 3, [("mean", "relu"), ("scale", "softplus_eps")]),
    (2, 3, 1, [("p", "sigmoid"), ("s", "softplus")]),
])
def test_packaged_architecture_is_bigcare_unet_and_scripts(ndim, depth, n_conv, heads):
    cfg = UNetConfig(ndim=ndim, depth=depth, n_filter_base=4, kernel_size=3, n_conv_per_depth=n_conv,
                     heads=[Head(name=n, activation=a) for n, a in heads])
    torch.manual_seed(0)
    ref = UNet(cfg).eval()
    net = BigcareUNet(ndim=ndim, depth=depth, n_filter_base=4, kernel_size=3, n_conv_per_depth=n_conv, pool=2,
                      n_channel_in=1, n_channel_out=1, residual=True, heads=[list(h) for h in heads]).eval()
    net.load_state_dict(ref.state_dict(), strict=True)  # the same keys and shapes
    scripted = torch.jit.script(net)
    x = torch.randn((2, 1) + (16,) * ndim)
    with torch.no_grad():
        want = ref(x)
        for got in (net(x), scripted(x)):
            for (name, _), y in zip(heads, got):
                torch.testing.assert_close(y, want[name], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    model = make_model(tmp / "m3", ndim=3, depth=1, n_filter_base=4, kernel_size=3,
                       heads=[{"name": "mean"}, {"name": "scale", "activation": "softplus_eps"}])
    return model, export_bioimageio(model, tmp / "m3.zip", authors=["Ada Lovelace"], license="BSD-3-Clause")


def test_package_describes_halo_normalisation_weights_and_citation(package):
    from bigcare.models.architecture import halo
    from bigcare.models.folder import load_config

    model, zip_path = package
    with zipfile.ZipFile(zip_path) as z:
        names = set(z.namelist())
        rdf = yaml.safe_load(z.read("rdf.yaml"))
    assert {"rdf.yaml", "README.md", "weights.pt", "bigcare_unet.py", "model.ts.pt", "model.onnx",
            "test_input.npy", "test_mean.npy", "test_scale.npy"} <= names
    assert rdf["format_version"].startswith("0.5.")
    assert set(rdf["weights"]) == {"pytorch_state_dict", "torchscript", "onnx"}
    assert rdf["weights"]["pytorch_state_dict"]["architecture"]["callable"] == "BigcareUNet"
    (inp,) = rdf["inputs"]
    assert [a["type"] for a in inp["axes"]] == ["batch", "channel", "space", "space", "space"]
    steps = {step["id"]: step for step in inp["preprocessing"]}
    assert set(steps) <= {"scale_range", "ensure_dtype"}  # the spec adds float32 casts around it
    pre = steps["scale_range"]
    assert (pre["kwargs"]["min_percentile"], pre["kwargs"]["max_percentile"]) == (1.0, 99.8)
    assert pre["kwargs"]["axes"] == ["z", "y", "x"]
    want_halo = halo(load_config(model).architecture)
    for out in rdf["outputs"]:
        assert [a.get("halo") for a in out["axes"][2:]] == [want_halo] * 3
    assert [o["id"] for o in rdf["outputs"]] == ["mean", "scale"]
    assert rdf["cite"][0]["doi"] == CARE_DOI and rdf["license"] == "BSD-3-Clause"
    assert rdf["config"]["bigcare"]["outputs"] == {"mean": "intensity", "scale": "scale"}


@pytest.mark.slow
def test_package_passes_bioimageio_test_on_cpu(package, tmp_path):
    # the command the zoo's CI runs, in its own process
    _, zip_path = package
    run = subprocess.run([sys.executable, "-m", "bioimageio.core", "test", str(zip_path), "--devices", "cpu",
                          "--summary", str(tmp_path / "summary.json")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "passed"
    reproduced = {d["name"] for d in summary["details"] if d["status"] == "passed"}
    for weights in ("pytorch_state_dict", "torchscript", "onnx"):
        assert f"Reproduce test outputs from test inputs ({weights})" in reproduced


def test_export_refuses_isotropic_models_and_existing_outputs(tmp_path, package):
    model = make_model(tmp_path / "iso", ndim=2, isotropic={"factor": 4})
    with pytest.raises(ModelError, match="kind 'isotropic'"):
        export_bioimageio(model, tmp_path / "iso.zip")
    assert not (tmp_path / "iso.zip").exists()
    with pytest.raises(OutputError, match="exists"):
        export_bioimageio(package[0], package[1])
    with pytest.raises(OutputError, match=r"\.zip"):
        export_bioimageio(package[0], tmp_path / "model.tar")


def test_export_command_writes_a_package_and_exits_2_on_bad_model(tmp_path, capsys):
    model = make_model(tmp_path / "m2", ndim=2, depth=1, n_filter_base=2, kernel_size=3)
    assert main(["export", str(model), str(tmp_path / "m2.zip"), "--author", "A B"]) == 0
    assert "wrote bioimage.io package" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "x.zip")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "x.zip").exists()
    test_input = np.load(zipfile.ZipFile(tmp_path / "m2.zip").open("test_input.npy"))
    assert test_input.dtype == np.float32 and test_input.shape[:2] == (1, 1)


def test_export_refuses_architecture_options_the_packaged_unet_lacks(tmp_path):
    from bigcare.models import save_model
    from bigcare.models.folder import ModelConfig

    arch = UNetConfig(ndim=2, depth=1, n_filter_base=2, kernel_size=3, pooling="maxblur", top_skip=False)
    save_model(tmp_path / "n2v2", UNet(arch), ModelConfig(axes="YX", architecture=arch))
    with pytest.raises(ModelError, match="pooling = 'maxblur', top_skip = False.*cannot be exported"):
        export_bioimageio(tmp_path / "n2v2", tmp_path / "n2v2.zip")
    assert not (tmp_path / "n2v2.zip").exists()
