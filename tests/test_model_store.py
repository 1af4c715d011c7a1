"""Model folder format: round trip, hash, and every load error with a clear message."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from bigcare.errors import ConfigError, ModelError, ModelMismatchError, OutputError
from bigcare.models import ModelConfig, UNet, UNetConfig, load_config, load_model, model_hash, save_model


def _small(ndim: int = 2) -> tuple[UNet, ModelConfig]:
    arch = UNetConfig(ndim=ndim, depth=1, n_filter_base=4, kernel_size=3)
    torch.manual_seed(0)
    net = UNet(arch)
    cfg = ModelConfig(axes="ZYX"[3 - ndim :], architecture=arch, provenance={"epochs": 3})
    return net, cfg


@pytest.fixture
def saved(tmp_path):
    net, cfg = _small()
    return save_model(tmp_path / "m", net, cfg), net, cfg


def test_round_trip_gives_identical_outputs(saved):
    path, net, cfg = saved
    loaded, cfg2 = load_model(path)
    assert cfg2 == cfg and not loaded.training
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["restored"], net(x)["restored"], rtol=0, atol=0)


def test_round_trip_3d_with_two_heads(tmp_path):
    heads = [{"name": "mean"}, {"name": "scale", "activation": "softplus"}]
    arch = UNetConfig(ndim=3, depth=1, n_filter_base=2, heads=heads)
    net = UNet(arch)
    path = save_model(tmp_path / "m3", net, ModelConfig(axes="zyx", architecture=arch))
    loaded, cfg = load_model(path)
    assert cfg.axes == "ZYX"
    x = torch.randn(1, 1, 4, 4, 4)
    with torch.no_grad():
        a, b = loaded(x), net(x)
    assert list(a) == ["mean", "scale"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_config_json_is_readable_and_kernel_size_filled(saved):
    path, _, _ = saved
    data = json.loads((path / "config.json").read_text())
    assert data["format"] == "bigcare-model" and data["format_version"] == 1
    assert data["architecture"]["kernel_size"] == 3
    assert data["provenance"] == {"epochs": 3}
    assert load_config(path).architecture.kernel_size == 3


def test_hash_changes_when_weights_change(saved, tmp_path):
    path, net, cfg = saved
    h = model_hash(path)
    assert len(h) == 64 and h == model_hash(path)
    with torch.no_grad():
        net.heads["restored"].bias += 1e-3
    save_model(path, net, cfg, overwrite=True)
    assert model_hash(path) != h


def test_hash_ignores_json_formatting_but_not_config_values(saved):
    path, _, _ = saved
    h = model_hash(path)
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(data, indent=7, sort_keys=False))
    assert model_hash(path) == h
    data["normalization"]["pmax"] = 99.0
    (path / "config.json").write_text(json.dumps(data))
    assert model_hash(path) != h


def test_save_refuses_existing_model_without_overwrite(saved):
    path, net, cfg = saved
    with pytest.raises(OutputError, match="already holds.*overwrite=True"):
        save_model(path, net, cfg)


def test_save_refuses_config_of_other_architecture(tmp_path):
    net, cfg = _small()
    other = cfg.model_copy(update={"architecture": UNetConfig(ndim=2, depth=2)})
    with pytest.raises(ModelMismatchError, match="does not match"):
        save_model(tmp_path / "m", net, other)


def test_model_config_rejects_axes_of_wrong_length():
    with pytest.raises(ConfigError, match="has 3 axes but architecture.ndim is 2"):
        ModelConfig(axes="ZYX", architecture=UNetConfig(ndim=2))
    with pytest.raises(ConfigError, match="distinct letters"):
        ModelConfig(axes="YY", architecture=UNetConfig(ndim=2))


def test_normalization_rejects_pmin_above_pmax():
    with pytest.raises(ConfigError, match="pmin must be < pmax"):
        ModelConfig(
            axes="YX", architecture=UNetConfig(ndim=2), normalization={"pmin": 50, "pmax": 2}
        )


# --- load errors -----------------------------------------------------------------------


def test_load_missing_folder(tmp_path):
    with pytest.raises(ModelError, match=r"model folder .*nope does not exist"):
        load_model(tmp_path / "nope")


def test_load_missing_config(saved):
    path, _, _ = saved
    (path / "config.json").unlink()
    with pytest.raises(ModelError, match=r"has no config\.json"):
        load_model(path)


def test_load_bad_json(saved):
    path, _, _ = saved
    (path / "config.json").write_text('{"axes": "YX",')
    with pytest.raises(ModelError, match=r"config\.json is not valid JSON"):
        load_model(path)


def _edit_config(path, edit):
    data = json.loads((path / "config.json").read_text())
    edit(data)
    (path / "config.json").write_text(json.dumps(data))


def test_load_unknown_key_names_the_key(saved):
    path, _, _ = saved
    _edit_config(path, lambda d: d["architecture"].update(n_filters=8))
    with pytest.raises(ModelError, match=r"architecture\.n_filters: unknown key"):
        load_model(path)


def test_load_missing_key_names_the_key(saved):
    path, _, _ = saved
    _edit_config(path, lambda d: d.pop("axes"))
    with pytest.raises(ModelError, match=r"axes: required key missing"):
        load_model(path)


def test_load_wrong_axes_for_ndim(saved):
    path, _, _ = saved
    _edit_config(path, lambda d: d.update(axes="ZYX"))
    with pytest.raises(ModelError, match=r"axes 'ZYX' has 3 axes but architecture\.ndim is 2"):
        load_model(path)


def test_load_unsupported_format_version(saved):
    path, _, _ = saved
    _edit_config(path, lambda d: d.update(format_version=2))
    with pytest.raises(ModelError, match=r"format_version: .*got 2"):
        load_model(path)


def test_load_missing_weights(saved):
    path, _, _ = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"has no model\.safetensors"):
        load_model(path)


def test_load_weight_shape_mismatch_names_tensor_and_shapes(saved):
    path, _, _ = saved
    _edit_config(path, lambda d: d["architecture"].update(n_filter_base=8))
    match = r"tensor 'down\.0\.0\.weight' has shape \(4, 1, 3, 3\).*expects \(8, 1, 3, 3\)"
    with pytest.raises(ModelError, match=match):
        load_model(path)


def test_load_missing_tensor_is_named(saved):
    path, net, _ = saved
    sd = {k: v.contiguous() for k, v in net.state_dict().items() if k != "heads.restored.bias"}
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(ModelError, match=r"missing tensors \['heads\.restored\.bias'\]"):
        load_model(path)


def test_load_truncated_safetensors(saved):
    path, _, _ = saved
    w = path / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelError, match=r"model\.safetensors is not a readable safetensors file"):
        load_model(path)


class _Tripwire:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_pickle_named_safetensors_is_refused_without_unpickling(saved, tmp_path):
    path, _, _ = saved
    tripwire = tmp_path / "was_unpickled"
    (path / "model.safetensors").write_bytes(pickle.dumps(_Tripwire(tripwire)))
    with pytest.raises(ModelError, match=r"never loads pickled weights"):
        load_model(path)
    assert not tripwire.exists()
    # the payload is live: unpickling it would have tripped the wire
    pickle.loads((path / "model.safetensors").read_bytes()).close()
    assert tripwire.exists()


def test_torch_save_file_named_safetensors_is_refused(saved):
    path, net, _ = saved
    torch.save(net.state_dict(), path / "model.safetensors")
    with pytest.raises(ModelError, match=r"not a readable safetensors file"):
        load_model(path)
