"""The trainer and its config: loss goes down, determinism, resume, checkpoints, config errors."""

import json

import pydantic
import pytest
import torch

from bigcare.errors import ConfigError
from bigcare.models import UNet, UNetConfig, load_model
from bigcare.models.folder import ModelConfig
from bigcare.synth import degrade, phantom, write_pair
from bigcare.training import ArrayPairSampler, fit, load_train_config, train


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    for k in range(2):
        write_pair(root / f"in{k}.ome.zarr", root / f"gt{k}.ome.zarr", (24, 64, 64), chunks=(12, 32, 32),
                   photons=5, seed=k)
    return root


def config(pairs, model_dir, **training):
    return {
        "model_dir": str(model_dir),
        "data": {"sources": [{"input": str(pairs / f"in{k}.ome.zarr"), "target": str(pairs / f"gt{k}.ome.zarr")}
                             for k in range(2)],
                 "patch_shape": [8, 32, 32], "n_patches": 40},
        "network": {"depth": 1, "n_filter_base": 4},
        "training": {"epochs": 2, "steps_per_epoch": 3, "batch_size": 4, **training},
    }


def test_a_few_steps_lower_the_loss():
    gt = phantom((16, 48, 48), seed=3)
    sampler = ArrayPairSampler([(degrade(gt, photons=3, seed=4), gt)], (8, 32, 32), seed=0)
    validation = [next(sampler.batches(8))]
    arch = UNetConfig(ndim=3, depth=1, n_filter_base=8)
    torch.manual_seed(0)
    model = UNet(arch)

    def val_loss():
        with torch.no_grad():
            x, y = (torch.from_numpy(a) for a in validation[0])
            return float((model(x)["restored"] - y).abs().mean())

    before = val_loss()
    result = fit(model, ModelConfig(axes="ZYX", architecture=arch), sampler.batches(4), validation=validation,
                 epochs=3, steps_per_epoch=10, progress=False)
    assert val_loss() < 0.9 * before
    assert result.train_loss[-1] < result.train_loss[0] and result.val_loss[-1] < result.val_loss[0]
    assert result.val_loss[result.best_epoch] == min(result.val_loss)
    assert val_loss() == pytest.approx(min(result.val_loss), rel=1e-5)  # fit leaves the best epoch's weights


def test_train_writes_checkpoints_and_log_and_is_deterministic(pairs, tmp_path, client):
    a = train(config(pairs, tmp_path / "a"), client=client, progress=False)
    b = train(config(pairs, tmp_path / "b"), client=client, progress=False)
    assert a.train_loss == b.train_loss and a.val_loss == b.val_loss
    for which in ("best", "last"):
        model, cfg = load_model(tmp_path / "a" / which)
        assert cfg.provenance["training"]["epochs"] == 2
        assert cfg.provenance["data"]["patch_shape"] == [8, 32, 32]
    lines = (tmp_path / "a" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    png = (tmp_path / "a" / "loss_curves.png").read_bytes()  # redrawn each epoch, a whole PNG
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and not list((tmp_path / "a").glob("*.partial.png"))


def test_resume_continues_from_the_saved_epoch(pairs, tmp_path, client):
    first = train(config(pairs, tmp_path / "m"), client=client, progress=False)
    last_weights = load_model(tmp_path / "m" / "last")[0].state_dict()
    # asking for the same number of epochs again: nothing to do, weights come from last/
    again = train(config(pairs, tmp_path / "m"), client=client, progress=False)
    assert again.start_epoch == 2 and again.epochs == 2 and again.train_loss == first.train_loss
    resumed = train(config(pairs, tmp_path / "m", epochs=4), client=client, progress=False)
    assert resumed.start_epoch == 2 and resumed.epochs == 4
    assert resumed.train_loss[:2] == first.train_loss
    lines = (tmp_path / "m" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    now = load_model(tmp_path / "m" / "last")[0].state_dict()
    assert any(not torch.equal(now[k], last_weights[k]) for k in now)  # it kept training
    fresh = train(config(pairs, tmp_path / "m", epochs=4, resume=False), client=client, progress=False)
    assert fresh.start_epoch == 0


def test_the_cosine_schedule_anneals_per_step_and_a_resume_continues_it(pairs, tmp_path, client):
    """lr_schedule cosine: lr falls every epoch to lr / 100 at the last step; plateau keeps it here."""
    cos = train(config(pairs, tmp_path / "c", epochs=4, lr_schedule="cosine"), client=client, progress=False)
    assert all(a > b for a, b in zip(cos.lr, cos.lr[1:])) and cos.lr[-1] == pytest.approx(4e-6)
    half = train(config(pairs, tmp_path / "r", epochs=2, lr_schedule="cosine"), client=client, progress=False)
    resumed = train(config(pairs, tmp_path / "r", epochs=4, lr_schedule="cosine"), client=client, progress=False)
    # the run of 2 epochs annealed over 2 epochs; resuming to 4 continues from its state (T_max is
    # the first run's): the lr it ends at is what the saved scheduler gives, not a fresh start at 4e-4
    assert resumed.lr[:2] == half.lr and resumed.lr[2] < 4e-4
    plateau = train(config(pairs, tmp_path / "p", epochs=4), client=client, progress=False)
    assert plateau.lr == [4e-4] * 4
    _, cfg = load_model(tmp_path / "c" / "best")
    assert cfg.provenance["config"]["training"]["lr_schedule"] == "cosine"


@pytest.mark.parametrize("change, message", [
    (lambda c: c["training"].update(epoch=3), r"training\.epoch: unknown key"),
    (lambda c: c["training"].update(epochs="ten"), r"training\.epochs: .*integer"),
    (lambda c: c["data"].update(patch_shape=[8, 31, 32]), r"multiples of network\.pool\*\*network\.depth = 2\*\*1 = 2$"),
    (lambda c: c["network"].update(depht=3), r"network\.depht: unknown key \(not allowed\)"),
    (lambda c: c["network"].update(ndim=2), r"network\.ndim: 2 does not match data\.patch_shape \[8, 32, 32\]"),
    (lambda c: c["network"].update(n_channel_in=2, residual=False), r"network\.n_channel_in: expected 1"),
    (lambda c: c["network"].update(heads=[{"name": "mean"}, {"name": "scale"}]), r"network\.heads: training fits one head"),
    (lambda c: c["data"].update(validation_fraction=0), r"data\.validation_fraction: training .* needs validation"),
    (lambda c: c["data"]["sources"][0].update(inputs="x"), r"data\.sources\.0\.inputs: unknown key"),
    (lambda c: c.pop("model_dir"), r"model_dir: required key missing"),
    (lambda c: c["training"].update(loss="l3"), r"training\.loss"),
    (lambda c: c["training"].update(lr_schedule="step"), r"training\.lr_schedule"),
])
def test_config_errors_name_the_key(tmp_path, change, message):
    cfg = config(tmp_path, tmp_path / "m")
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        load_train_config(cfg)


def test_yaml_config_file_and_cli_help(tmp_path, capsys):
    import yaml

    from bigcare.cli import main

    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path, tmp_path / "m")))
    assert load_train_config(path).training.epochs == 2
    path.write_text("model_dir: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(path)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key in ("data.patch_shape", "training.steps_per_epoch", "network.n_filter_base", "cluster.scheduler",
                "network.pool", "network.kernel_size", "data.sources[].input_channel", "data.coarse_level",
                "training.read_ahead", "training.seed"):
        assert f"  {key} (" in out
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2


# --- one schema: YAML and Python -------------------------------------------------------------------


@pytest.mark.parametrize("section, key, value", [
    ("data", "n_patches", 0),
    ("data", "n_patches", 1),  # with the default validation_fraction: no patch left for training
    ("data", "validation_fraction", 1.5),
    ("data", "foreground_threshold", 1.5),
    ("data", "pmin_range", [3.0, 1.0]),
    ("data", "pmax_range", [2.0, 99.0]),
    ("data", "patch_shape", [4, 8, 32, 32]),
    ("data", "sources", [{"input": "x.zarr", "target": "y.zarr", "input_chanel": 0}]),
    ("data", "sources", [{"input": "x.zarr", "target_channel": -1}]),
    ("data", "sources", [7]),
    ("training", "seed", -1),
    ("training", "batch_size", 0),
    ("training", "read_ahead", -1),
])
def test_yaml_and_python_reject_the_same_values_with_the_same_message(tmp_path, section, key, value):
    import yaml

    from bigcare.training import PatchSampler

    cfg = config(tmp_path, tmp_path / "m")
    cfg[section].pop("validation_fraction", None)
    cfg[section][key] = value
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as from_yaml:
        load_train_config(path)
    python = {"sources": [("x.zarr", "y.zarr")], "patch_shape": (8, 32, 32), key: value}
    with pytest.raises(ConfigError) as from_python:  # before any image is opened: the paths do not exist
        PatchSampler(**python)
    assert str(from_yaml.value) == f"{path}: {section}.{from_python.value}"
    named = "validation_fraction" if key == "n_patches" and value == 1 else key  # the cross-field rule's key
    assert str(from_python.value).startswith(f"{named}.0" if key == "sources" else f"{named}:")
    assert ";" not in str(from_python.value)  # one bad key, one message


def test_python_accepts_what_yaml_accepts(tmp_path):
    """A source as an image path or an [input, target] pair, as in Python; a config's sampler
    settings are the sampler's."""
    from bigcare.training import SamplingConfig, Source

    cfg = config(tmp_path, tmp_path / "m")
    cfg["data"]["sources"] = ["two_channels.zarr", ["in.zarr", "gt.zarr"],
                              {"input": "in.zarr", "target": "gt.zarr", "storage_options": {"key": "s3cr3t"}}]
    cfg["data"].update(coarse_level=1, validation_fraction=0.25)
    cfg["training"].update(seed=3, read_ahead=2)
    loaded = load_train_config(cfg)
    assert loaded.data.sources[:2] == [Source("two_channels.zarr"), Source("in.zarr", "gt.zarr")]
    assert loaded.data.sources[2].storage_options == {"key": "s3cr3t"}
    assert "s3cr3t" not in json.dumps(loaded.model_dump(mode="json"))  # what provenance records
    settings = loaded.sampling()
    assert isinstance(settings, SamplingConfig)
    assert (settings.coarse_level, settings.validation_fraction, settings.seed, settings.batch_size,
            settings.read_ahead) == (1, 0.25, 3, 4, 2)
    assert settings.sources == loaded.data.sources


def test_network_section_is_the_models_own_unet_config(pairs, tmp_path, client):
    import yaml

    from bigcare.errors import format_validation_error

    def with_network(**network):
        cfg = config(pairs, tmp_path / "m")
        cfg["data"]["patch_shape"] = [64, 64]
        cfg["network"] = network
        return cfg

    # a depth the model accepts and the old training schema did not (it stopped at 5)
    deep = load_train_config(with_network(depth=6, n_filter_base=1)).network
    assert deep == UNetConfig(ndim=2, depth=6, n_filter_base=1)
    assert deep.kernel_size == 5  # the model's 2D default
    # a depth the model refuses: its own message, under network.
    for bad, message in (({"depth": 7}, "network.depth: Input should be less than or equal to 6 (got 7)"),
                         ({"kernel_size": 4}, "network: kernel_size must be odd, got 4")):
        with pytest.raises(pydantic.ValidationError) as model_error:
            UNetConfig.model_validate({"ndim": 2, **bad})
        with pytest.raises(ConfigError) as config_error:
            load_train_config(with_network(**bad))
        model_message = format_validation_error(model_error.value)
        assert str(config_error.value) == f"config: {message}"
        assert message in (f"network.{model_message}", f"network: {model_message}")
    assert load_train_config(with_network(ndim=2, n_channel_in=1)).network.ndim == 2  # consistent: accepted

    # the trained model's architecture is the YAML's network section
    cfg = config(pairs, tmp_path / "net", epochs=1, steps_per_epoch=1)
    cfg["network"] = {"depth": 1, "n_filter_base": 4, "kernel_size": 5, "n_conv_per_depth": 1, "pool": 4,
                      "residual": False}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train(path, client=client, progress=False)
    _, saved = load_model(tmp_path / "net" / "best")
    expected = load_train_config(path).network
    assert saved.architecture == expected
    assert (expected.ndim, expected.pool, expected.residual) == (3, 4, False)
    written = json.loads((tmp_path / "net" / "best" / "config.json").read_text())["architecture"]
    assert written == expected.model_dump(mode="json")
    # the recorded config validates again, to the same network
    assert load_train_config(saved.provenance["config"]).network == expected


def test_the_config_schema_loads_neither_torch_nor_dask():
    import subprocess
    import sys

    code = ("import sys, bigcare.training.config as c; c.describe_schema(); "
            "print(sorted(m for m in ('torch', 'dask', 'zarr') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_nan_voxels_in_a_training_target_are_refused_naming_the_image(pairs, tmp_path, monkeypatch):
    """NaN in a target would train to a NaN loss; the patch reader refuses it, naming the image
    and the patch (here the percentile pass is made to miss them)."""
    import numpy as np

    import bigcare.normalization as normalization
    from bigcare.errors import InputError
    from bigcare.store.volume import open_volume
    from conftest import write_volume

    target = np.asarray(open_volume(pairs / "gt0.ome.zarr").array(0)[...], dtype=np.float32)
    target[:, :, :40] = np.nan  # most patches overlap it
    write_volume(tmp_path / "gt_nan.ome.zarr", target, chunks=(12, 32, 32))
    monkeypatch.setattr(normalization, "_percentiles", lambda values, q, name: np.nanpercentile(values, q))
    cfg = config(pairs, tmp_path / "m")
    cfg["data"]["sources"] = [{"input": str(pairs / "in0.ome.zarr"), "target": str(tmp_path / "gt_nan.ome.zarr")}]
    with pytest.raises(InputError, match=r"gt_nan\.ome\.zarr: the training target holds NaN/inf voxels in the patch at"):
        train(cfg, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_training_on_a_cuda_device_without_cuda_is_one_line_exit_2(pairs, tmp_path, capsys):
    import yaml

    from bigcare.cli import main

    cfg = config(pairs, tmp_path / "m", device="cuda")
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "train.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training.device 'cuda' is not usable on this machine (CUDA is not available)" in err[0]
    assert not (tmp_path / "m").exists()
