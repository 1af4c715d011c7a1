"""Upsampling CARE: Z-subsampled training pairs, blockwise prediction after Z upsampling, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
import zarr
from ome_zarr_models import open_ome_zarr

import bigcare
from bigcare.blocks.zoom import zoom_length
from bigcare.errors import ConfigError
from bigcare.models import UNet, UNetConfig, save_model
from bigcare.models.folder import ModelConfig, UpsamplingConfig, load_model
from bigcare.training.projection import ZSubsampling
from conftest import read, smooth_volume, write_volume


def make_upsampling_model(path, factor=2.0, seed=0):
    arch = UNetConfig(ndim=3, depth=1, n_filter_base=4, kernel_size=3)
    torch.manual_seed(seed)
    net = UNet(arch)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
    save_model(path, net, ModelConfig(kind="upsampling", axes="ZYX", architecture=arch,
                                      upsampling=UpsamplingConfig(factor=factor)))
    return path


def test_subsampled_pairs_keep_every_factor_th_plane_and_interpolate_between():
    sub = ZSubsampling(3)
    assert sub.read_shape((8, 16, 16)) == (10, 16, 16)  # ceil(7 / 3) * 3 + 1
    y = np.random.default_rng(0).random((2, 1, 10, 4, 4)).astype(np.float32)
    x, t = sub.pair(y, 8)
    assert x.shape == t.shape == (2, 1, 8, 4, 4)
    np.testing.assert_array_equal(t, y[:, :, :8])
    np.testing.assert_array_equal(x[:, :, ::3], y[:, :, :8:3])  # the kept planes
    np.testing.assert_allclose(x[:, :, 1], (2 * y[:, :, 0] + y[:, :, 3]) / 3, atol=1e-6)
    assert not np.allclose(x[:, :, 1], y[:, :, 1])


@pytest.mark.parametrize("factor, block", [(2.0, (16, 16, 16)), (3.0, (8, 24, 8)), (2.0, None)])
def test_upsampling_blockwise_equals_whole_volume(client, tmp_path, factor, block):
    model = make_upsampling_model(tmp_path / "up", factor)
    data = (smooth_volume((9, 29, 22), seed=2) * 1000).astype(np.uint16)
    vol = write_volume(str(tmp_path / "in.ome.zarr"), data, chunks=(4, 8, 8), scale=(3.0, 0.5, 0.5))
    result = bigcare.restore(vol, str(tmp_path / "out.ome.zarr"), model, client=client, block_shape=block,
                             progress=False)
    assert result.blocks_computed == result.blocks_total >= 1
    got = read(str(tmp_path / "out.ome.zarr"))
    ref = bigcare.predict(data, model, axes="zyx")["restored"]
    assert got.shape == ref.shape == (zoom_length(9, factor), 29, 22)
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    out = bigcare.open_volume(str(tmp_path / "out.ome.zarr"))
    np.testing.assert_allclose(out.scale, (3.0 / factor, 0.5, 0.5))  # the new Z voxel size
    model_ = open_ome_zarr(zarr.open_group(str(tmp_path / "out.ome.zarr"), mode="r"))
    scale = model_.attributes.ome.multiscales[0].datasets[0].coordinateTransformations[0].scale
    np.testing.assert_allclose(scale, (3.0 / factor, 0.5, 0.5))


def test_upsampling_config_needs_a_factor_or_a_voxel_size(tmp_path):
    cfg = {"model_dir": str(tmp_path / "m"), "data": {"sources": ["a.ome.zarr"], "patch_shape": [8, 16, 16]},
           "upsampling": {}}
    with pytest.raises(ConfigError, match="upsampling.*give factor"):
        bigcare.train(cfg, progress=False)
    cfg["upsampling"] = {"factor": 2}
    cfg["data"]["sources"] = [{"input": "a.ome.zarr", "target": "b.ome.zarr"}]
    with pytest.raises(ConfigError, match="without 'target'"):
        bigcare.train(cfg, progress=False)


def test_cli_trains_and_restores_an_upsampling_model(client, tmp_path):
    from bigcare.cli import main

    data = (smooth_volume((24, 64, 64), seed=5) * 1000).astype(np.uint16)
    write_volume(str(tmp_path / "hires.ome.zarr"), data, chunks=(8, 16, 16), scale=(0.5, 0.5, 0.5))
    cfg = {"model_dir": str(tmp_path / "model"),
           "data": {"sources": [str(tmp_path / "hires.ome.zarr")], "patch_shape": [8, 16, 16], "n_patches": 12,
                    "validation_fraction": 0.25, "foreground_threshold": 0},
           "network": {"depth": 1, "n_filter_base": 4, "kernel_size": 3},
           "upsampling": {"voxel_size_z": 1.0},  # restored volumes have Z voxels of 1.0: factor 2
           "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "device": "cpu"},
           "cluster": {"scheduler": client.scheduler.address}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "train.yaml"), "-q"]) == 0
    config = load_model(tmp_path / "model" / "best")[1]
    assert config.kind == "upsampling" and config.upsampling is not None and config.upsampling.factor == 2
    coarse = data[::2]
    write_volume(str(tmp_path / "coarse.ome.zarr"), coarse[:, :32, :32], chunks=(6, 16, 16), scale=(1.0, 0.5, 0.5))
    code = main(["restore", str(tmp_path / "coarse.ome.zarr"), str(tmp_path / "out.ome.zarr"),
                 "--model", str(tmp_path / "model" / "best"), "--scheduler", client.scheduler.address])
    assert code == 0
    assert read(str(tmp_path / "out.ome.zarr")).shape == (zoom_length(12, 2.0), 32, 32) == (23, 32, 32)
    np.testing.assert_allclose(bigcare.open_volume(str(tmp_path / "out.ome.zarr")).scale, (0.5, 0.5, 0.5))
