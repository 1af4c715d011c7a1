"""CSBDeep models imported into bigcare predict what CSBDeep itself predicted.

The reference models and predictions in tests/data/csbdeep/ were made with CSBDeep 0.8.2 /
TensorFlow 2.21 by tests/data/make_csbdeep_models.py; no TensorFlow is needed here.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import h5py
import numpy as np
import pytest

import bigcare
from bigcare.cli import main
from bigcare.errors import ModelError
from bigcare.exchange import import_csbdeep
from bigcare.models.folder import load_config
from conftest import read, write_volume

DATA = pathlib.Path(__file__).parent / "data" / "csbdeep"
MODELS = sorted(p.name for p in DATA.iterdir() if p.is_dir())


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _expected(folder: pathlib.Path) -> dict[str, np.ndarray]:
    if (folder / "expected.npy").exists():
        return {"restored": np.load(folder / "expected.npy")}
    return {"mean": np.load(folder / "expected_mean.npy"), "scale": np.load(folder / "expected_scale.npy")}


def _copy(name: str, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(DATA / name, tmp_path / name))


def test_reference_data_covers_2d_3d_plain_and_probabilistic():
    assert {"care2d", "care3d", "care2d_prob_relu", "care3d_prob", "care2d_2ch"} <= set(MODELS)
    total = sum(f.stat().st_size for f in DATA.rglob("*") if f.is_file())
    assert total < 500_000, f"tests/data/csbdeep holds {total} bytes"


@pytest.mark.parametrize("name", [m for m in MODELS if m != "care2d_2ch"])
def test_imported_model_matches_csbdeep_prediction(tmp_path, name):
    folder = DATA / name
    out = import_csbdeep(folder, tmp_path / "model")
    config = load_config(out)
    axes = json.loads((folder / "versions.json").read_text())["axes"].lower()
    got = bigcare.predict(np.load(folder / "input.npy"), out, axes=axes, precision="fp32")
    want = _expected(folder)
    assert set(got) == set(want)
    for head, expected in want.items():
        assert got[head].shape == expected.shape
        assert _rel_err(got[head], expected) < 1e-4, (name, head)
    # CSBDeep's predict default, PercentileNormalizer(2, 99.8)
    assert (config.normalization.pmin, config.normalization.pmax) == (2.0, 99.8)
    assert config.provenance["imported_from"] == "csbdeep"


def test_probabilistic_import_has_mean_and_csbdeep_scale_heads(tmp_path):
    config = load_config(import_csbdeep(DATA / "care2d_prob_relu", tmp_path / "m"))
    heads = [(h.name, h.activation) for h in config.architecture.heads]
    assert heads == [("mean", "relu"), ("scale", "softplus_eps")]
    assert config.architecture.residual and config.architecture.kernel == 3


def test_two_channel_model_matches_csbdeep_in_normalised_units(tmp_path):
    # CSBDeep leaves the output normalised when n_channel_in != n_channel_out; compare the network
    from bigcare.normalization import normalize
    from bigcare.predictors.base import load_predictor

    folder = DATA / "care2d_2ch"
    out = import_csbdeep(folder, tmp_path / "m")
    arch = load_config(out).architecture
    assert (arch.n_channel_in, arch.n_channel_out, arch.residual) == (2, 1, False)
    x = np.moveaxis(np.load(folder / "input.npy"), -1, 0)  # YXC -> CYX
    lo = np.percentile(x, 2, axis=(1, 2), keepdims=True)
    hi = np.percentile(x, 99.8, axis=(1, 2), keepdims=True)
    y = load_predictor(str(out), precision="fp32").forward_normalized(normalize(x, lo, hi)[None])["restored"][0]
    assert _rel_err(np.moveaxis(y, 0, -1), np.load(folder / "expected.npy")) < 1e-4


def test_imported_3d_model_restores_a_zarr_blockwise_as_csbdeep_predicts(tmp_path, client):
    folder = DATA / "care3d"
    model = import_csbdeep(folder, tmp_path / "m")
    x = np.load(folder / "input.npy")  # (8, 20, 28)
    write_volume(tmp_path / "in.ome.zarr", x, chunks=(8, 8, 12))
    bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", model, client=client,
                    block_shape=(8, 8, 12), device="cpu", precision="fp32", progress=False)
    assert _rel_err(read(tmp_path / "out.ome.zarr"), np.load(folder / "expected.npy")) < 1e-4


def test_output_heads_are_told_apart_by_keras_creation_order(tmp_path):
    # conv2d_9 was created before conv2d_10: it is the mean head although it sorts after as text
    folder = _copy("care2d_prob_relu", tmp_path)
    with h5py.File(folder / "weights_best.h5", "r+") as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
        heads = [n for n in names if n.startswith("conv2d")]
        assert len(heads) == 2
        for old, new in zip(heads, ("conv2d_9", "conv2d_10")):
            f.move(old, new)
            f[new].move(old, new)
            f[new].attrs["weight_names"] = [f"{new}/kernel", f"{new}/bias"]
        f.attrs["layer_names"] = [{heads[0]: "conv2d_9", heads[1]: "conv2d_10"}.get(n, n) for n in names]
    out = import_csbdeep(folder, tmp_path / "m")
    got = bigcare.predict(np.load(folder / "input.npy"), out, axes="yx", precision="fp32")
    assert _rel_err(got["mean"], np.load(folder / "expected_mean.npy")) < 1e-4


def _edit_config(folder: pathlib.Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, match", [
    ({"proj_n_depth": 2}, "'proj_n_depth'.*cannot represent"),
    ({"axes": "TYXC", "n_dim": 3}, "'axes'.*T \\(time\\)"),
    ({"unet_last_activation": "tanh"}, "'unet_last_activation' = 'tanh'"),
    ({"unet_n_depth": 3}, "unet_n_depth = 3"),
    ({"unet_kern_size": 3}, "'down_level_0_no_0' has kernel size \\(5, 5\\).*unet_kern_size = 3"),
    ({"unet_n_first": 8}, "down.0.0.weight have shape \\(4, 1, 5, 5\\).*unet_n_first = 8"),
    ({"train_loss": "laplace"}, "'train_loss'.*probabilistic = False"),
])
def test_config_bigcare_cannot_represent_is_refused_naming_the_key(tmp_path, changes, match):
    folder = _copy("care2d", tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(ModelError, match=match):
        import_csbdeep(folder, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_batch_normalisation_layer_is_refused_naming_it(tmp_path):
    folder = _copy("care2d", tmp_path)
    with h5py.File(folder / "weights_best.h5", "r+") as f:
        g = f["down_level_0_no_0"]
        g.attrs["weight_names"] = list(g.attrs["weight_names"]) + ["down_level_0_no_0/gamma"]
        g["down_level_0_no_0/gamma"] = np.ones(4, np.float32)
    with pytest.raises(ModelError, match="down_level_0_no_0.*gamma.*no batch normalisation"):
        import_csbdeep(folder, tmp_path / "m")


def test_import_command_writes_a_model_and_exits_2_on_a_bad_config(tmp_path, capsys):
    assert main(["import-model", "csbdeep", str(DATA / "care3d"), str(tmp_path / "m"), "--pmin", "1"]) == 0
    assert load_config(tmp_path / "m").normalization.pmin == 1.0
    assert "wrote" in capsys.readouterr().out
    folder = _copy("care2d", tmp_path)
    _edit_config(folder, unet_n_first="many")
    assert main(["import-model", "csbdeep", str(folder), str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert "unet_n_first" in err and "Traceback" not in err
    assert not (tmp_path / "m2").exists()


def test_isotropic_care_imports_as_bigcare_isotropic_kind(tmp_path):
    config = load_config(import_csbdeep(DATA / "care2d", tmp_path / "m", isotropic_factor=4))
    assert config.kind == "isotropic" and config.isotropic.factor == 4 and config.isotropic.combine == "geometric"
    with pytest.raises(ModelError, match="axes YX"):
        import_csbdeep(DATA / "care3d", tmp_path / "m3", isotropic_factor=4)


def test_keras2_layout_under_model_weights_is_read_the_same(tmp_path):
    # Keras 2 / TF 2.x wrote 'layer/kernel:0' names, and model.save nests them under model_weights/
    folder = _copy("care3d", tmp_path)
    src = folder / "weights_best.h5"
    keras2 = folder / "weights_keras2.h5"
    with h5py.File(src, "r") as f, h5py.File(keras2, "w") as g:
        root = g.create_group("model_weights")
        root.attrs["layer_names"] = f.attrs["layer_names"]
        g.attrs["keras_version"] = "2.15.0"
        for name in f.attrs["layer_names"]:
            name = name.decode() if isinstance(name, bytes) else name
            if name not in f:
                continue
            layer = root.create_group(name)
            names = [n.decode() if isinstance(n, bytes) else n for n in f[name].attrs["weight_names"]]
            layer.attrs["weight_names"] = [f"{n}:0".encode() for n in names]
            for n in names:
                layer[f"{n}:0"] = f[name][n][()]
    src.unlink()
    _edit_config(folder, train_checkpoint="weights_keras2.h5")
    out = import_csbdeep(folder, tmp_path / "m")
    assert load_config(out).provenance["keras"]["keras_version"] == "2.15.0"
    got = bigcare.predict(np.load(folder / "input.npy"), out, axes="zyx", precision="fp32")["restored"]
    assert _rel_err(got, np.load(folder / "expected.npy")) < 1e-4
