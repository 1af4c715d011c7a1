"""The OpenVINO backend: the same restoration as torch, blockwise, for CARE and isotropic models."""

from __future__ import annotations

import numpy as np
import pytest

import bigcare
from bigcare.cli import main
from conftest import make_model, read, smooth_volume, write_volume

pytest.importorskip("openvino")

from bigcare.exchange.openvino import OpenVINOPredictor  # noqa: E402


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("bf16", 3e-3)])
def test_openvino_backend_restores_blockwise_as_torch(tmp_path, client, precision, tol):
    model = make_model(tmp_path / "m3", ndim=3, depth=1, n_filter_base=4, kernel_size=3,
                       heads=[{"name": "mean"}, {"name": "scale", "activation": "softplus_eps"}])
    data = smooth_volume((19, 40, 33)) * 300 + 100
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(8, 16, 16))
    predictor = OpenVINOPredictor(model, precision=precision)
    assert predictor.precision == precision and predictor.halo == (10, 10, 10)
    result = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "ov.ome.zarr", predictor, client=client,
                             block_shape=(8, 16, 16), progress=False)
    want = bigcare.predict(data, model, axes="zyx", precision="fp32")
    for head in ("mean", "scale"):
        got = read(result.outputs[head])
        assert np.abs(got - want[head]).max() <= tol * np.abs(want[head]).max(), head


def test_openvino_backend_runs_isotropic_models(tmp_path):
    model = make_model(tmp_path / "iso", ndim=2, kernel_size=3, isotropic={"factor": 2})
    data = smooth_volume((9, 30, 26)) * 300 + 100
    from bigcare.blocks.zoom import zoom_region
    from bigcare.normalization import array_normalizer

    want = bigcare.predict(data, model, axes="zyx", precision="fp32")["restored"]
    predictor = OpenVINOPredictor(model)
    assert predictor.zoom == (2.0, 1.0, 1.0) and predictor.spatial_axes == "zyx"
    normalizer = array_normalizer(data, None, predictor.pmin, predictor.pmax, name="data")
    got = predictor.predict(zoom_region(data, predictor.zoom)[None], normalizer)["restored"][0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_restore_command_takes_backend_openvino(tmp_path, capsys):
    model = make_model(tmp_path / "m2", ndim=2, depth=1, n_filter_base=2, kernel_size=3)
    data = smooth_volume((40, 48)) * 300 + 100
    write_volume(tmp_path / "in.ome.zarr", data, axes="yx")
    assert main(["restore", str(tmp_path / "in.ome.zarr"), str(tmp_path / "out.ome.zarr"), "--model", str(model),
                 "--backend", "openvino", "--precision", "fp32", "--workers", "1", "-q"]) == 0
    want = bigcare.predict(data, model, axes="yx", precision="fp32")["restored"]
    np.testing.assert_allclose(read(tmp_path / "out.ome.zarr"), want, rtol=0, atol=1e-5 * np.abs(want).max())
    heads = [{"name": "mean"}, {"name": "scale", "activation": "softplus_eps"}]
    members = [str(make_model(tmp_path / f"e{k}", ndim=2, depth=1, n_filter_base=2, kernel_size=3, heads=heads,
                              seed=k)) for k in range(2)]
    capsys.readouterr()
    assert main(["restore", str(tmp_path / "in.ome.zarr"), str(tmp_path / "o2.ome.zarr"), "--model", *members,
                 "--backend", "openvino", "-q"]) == 2
    assert "runs one bigcare model folder, not an ensemble" in capsys.readouterr().err
    assert not (tmp_path / "o2.ome.zarr").exists()


def test_the_runtime_benchmark_runs_in_smoke_mode(monkeypatch, capsys):
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    sys.modules.pop("onnx_backend", None)
    import onnx_backend

    onnx_backend.main(["--smoke"])
    out = capsys.readouterr().out
    for runtime in ("torch fp32", "torch bf16", "onnxruntime fp32", "openvino fp32"):
        assert f"| {runtime} |" in out
    rows = onnx_backend.main(["--smoke", "--restore", "--isotropic"])  # whole restores, an isotropic model
    assert rows["openvino fp32"]["backend"] == "openvino" and rows["torch fp32"]["backend"] == "torch"
    assert rows["openvino fp32"]["max_rel_err_vs_torch_fp32"] < 1e-5


def test_backend_auto_runs_openvino_on_cpu_workers_and_says_so(tmp_path, client):
    """The default backend: OpenVINO on CPU for a CARE U-Net, equal to torch in fp32; the result,
    the summary and the output's provenance say which ran."""
    import json

    model = make_model(tmp_path / "m", ndim=3, depth=1, n_filter_base=4, kernel_size=3)
    data = smooth_volume((19, 40, 33)) * 300 + 100
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(8, 16, 16))
    auto = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "auto.ome.zarr", model, client=client,
                           device="cpu", precision="fp32", block_shape=(8, 16, 16), progress=False)
    torch_ = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "torch.ome.zarr", model, client=client,
                             device="cpu", precision="fp32", backend="torch", block_shape=(8, 16, 16), progress=False)
    assert (auto.backend, torch_.backend) == ("openvino", "torch")
    want = read(torch_.outputs["restored"])
    np.testing.assert_allclose(read(auto.outputs["restored"]), want, rtol=0, atol=1e-5 * np.abs(want).max())
    summary = json.loads((tmp_path / "auto.ome.zarr" / "bigcare_summary.json").read_text())
    assert summary["backend"] == "openvino"


def test_backend_auto_keeps_torch_where_openvino_cannot_run_the_model(tmp_path):
    from bigcare.errors import ConfigError
    from bigcare.exchange.openvino import resolve_backend
    from bigcare.models.folder import load_config

    care = load_config(make_model(tmp_path / "care", ndim=2, depth=1, n_filter_base=2, kernel_size=3))
    assert resolve_backend("auto", "cpu", "fp32", care) == "openvino"
    assert resolve_backend("auto", "cuda", "auto", care) == "torch"  # GPUs run torch
    assert resolve_backend("auto", "cpu", "fp16", care) == "torch"
    assert resolve_backend("torch", "cpu", "fp32", care) == "torch"
    blur = care.model_copy(update={"architecture": care.architecture.model_copy(update={"pooling": "maxblur"})})
    assert resolve_backend("auto", "cpu", "fp32", blur) == "torch"  # N2V2's pooling: not in the exported U-Net
    with pytest.raises(ConfigError, match="CPU only"):
        resolve_backend("openvino", "cuda:0", "fp32", care)
    with pytest.raises(ConfigError, match="pooling"):
        resolve_backend("openvino", "cpu", "fp32", blur)


def test_openvino_uses_the_threads_torch_has_in_the_process(tmp_path):
    """A dask worker's thread count (given to torch) bounds OpenVINO too: no oversubscription."""
    import torch

    from bigcare.predictors.base import load_predictor

    model = make_model(tmp_path / "m", ndim=2, depth=1, n_filter_base=2, kernel_size=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        predictor = load_predictor(str(model), device="cpu", precision="fp32", backend="openvino")
        assert predictor.backend == "openvino"
        assert int(predictor._run.compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    finally:
        torch.set_num_threads(before)


def test_openvino_compiles_one_model_for_every_call_shape(tmp_path):
    """Blocks at a grid's low edge, inside and at its high edge read different shapes: one
    dynamic-shape model serves them all (a model per shape held its own buffers for each)."""
    import torch

    from bigcare.predictors.base import load_predictor

    model = make_model(tmp_path / "m", ndim=2, depth=1, n_filter_base=2, kernel_size=3)
    predictor = load_predictor(str(model), device="cpu", precision="fp32", backend="openvino")
    torch_net = load_predictor(str(model), device="cpu", precision="fp32", backend="torch")
    run = predictor._run
    assert run.compiled.input(0).get_partial_shape().is_dynamic
    for shape in ((1, 1, 16, 16), (1, 1, 24, 16), (1, 1, 16, 32)):
        x = torch.rand(shape)
        got, want = run(x)["restored"], torch_net._run(x)["restored"]
        assert tuple(got.shape) == shape and float((got - want).abs().max()) <= 1e-5
    assert predictor._run is run


def test_a_run_does_not_resume_on_another_backend(tmp_path, client):
    from bigcare.errors import OutputError

    model = make_model(tmp_path / "m", ndim=3, depth=1, n_filter_base=2, kernel_size=3)
    write_volume(tmp_path / "in.ome.zarr", smooth_volume((8, 32, 32)) * 300 + 100, chunks=(8, 16, 16))
    out = tmp_path / "out.ome.zarr"
    kw = dict(client=client, block_shape=(8, 16, 16), precision="bf16", progress=False)
    done = bigcare.restore(tmp_path / "in.ome.zarr", out, model, backend="torch", **kw)
    assert done.blocks_computed == 4 and done.backend == "torch"
    before = read(out)
    with pytest.raises(OutputError, match="different run .*backend"):  # blocks of the two would mix
        bigcare.restore(tmp_path / "in.ome.zarr", out, model, backend="openvino", **kw)
    np.testing.assert_array_equal(read(out), before)
    again = bigcare.restore(tmp_path / "in.ome.zarr", out, model, backend="torch", **kw)
    assert again.blocks_computed == 0  # the same run: nothing left to do
    replaced = bigcare.restore(tmp_path / "in.ome.zarr", out, model, backend="openvino", overwrite=True, **kw)
    assert replaced.blocks_computed == 4 and replaced.backend == "openvino"
