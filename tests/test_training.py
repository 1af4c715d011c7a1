"""The trainer and its config: loss goes down, determinism, resume, checkpoints, config errors."""

import json

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
    assert result.val_loss[-1] < result.val_loss[0] or result.best_epoch > 0


def test_train_writes_checkpoints_and_log_and_is_deterministic(pairs, tmp_path, client):
    a = train(config(pairs, tmp_path / "a"), client=client, progress=False)
    b = train(config(pairs, tmp_path / "b"), client=client, progress=False)
    assert a.train_loss == b.train_loss and a.val_loss == b.val_loss
    for which in ("best", "last"):
        model, cfg = load_model(tmp_path / "a" / which)
        assert cfg.provenance["training"]["epochs"] == 2
        assert cfg.provenance["data"]["patch_shape"] == [8, 32, 32] or tuple(cfg.provenance["data"]["patch_shape"]) == (8, 32, 32)
    lines = (tmp_path / "a" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


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


@pytest.mark.parametrize("change, message", [
    (lambda c: c["training"].update(epoch=3), r"training\.epoch: unknown key"),
    (lambda c: c["training"].update(epochs="ten"), r"training\.epochs: .*integer"),
    (lambda c: c["data"].update(patch_shape=[8, 31, 32]), r"multiples of 2\*\*network\.depth = 2"),
    (lambda c: c["data"]["sources"][0].update(inputs="x"), r"data\.sources\.0\.inputs: unknown key"),
    (lambda c: c.pop("model_dir"), r"model_dir: required key missing"),
    (lambda c: c["training"].update(loss="l3"), r"training\.loss"),
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
    for key in ("data.patch_shape", "training.steps_per_epoch", "network.n_filter_base", "cluster.scheduler"):
        assert key in out
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
