"""Surface projection CARE: Z-softmax weights, the learned plane, the block engine, metadata, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
import zarr
from ome_zarr_models import open_ome_zarr

import bigcare
from bigcare.errors import ConfigError, InputError
from bigcare.models.architecture import UNetConfig
from bigcare.models.folder import ModelConfig, ProjectionConfig, load_model, save_model
from bigcare.models.projection import ProjectionCARENet
from bigcare.models.projection_arch import ProjectionNetConfig, projection_extents, projection_halo
from bigcare.synth.surface import Surface, surface_sample, write_surface
from conftest import read, smooth_volume, write_volume


def make_projection_model(path, *, depth=2, care_depth=1, seed=0):
    """A tiny random projection model folder (logits scaled up so the weights are far from uniform)."""
    care = UNetConfig(ndim=2, depth=care_depth, n_filter_base=4, kernel_size=3)
    proj = ProjectionNetConfig(depth=depth, n_filter_base=4)
    torch.manual_seed(seed)
    net = ProjectionCARENet(care, proj)
    with torch.no_grad():
        net.project.last.weight.mul_(20)
    save_model(path, net, ModelConfig(kind="projection", axes="ZYX", architecture=care,
                                      projection=ProjectionConfig(network=proj)))
    return path


@pytest.fixture
def proj_model(tmp_path):
    return make_projection_model(tmp_path / "proj")


def test_projection_weights_sum_to_one_along_z(proj_model):
    from bigcare.normalization import array_normalizer
    from bigcare.predictors.base import load_predictor

    predictor = load_predictor(str(proj_model))
    x = (smooth_volume((9, 21, 18), seed=1) * 1000)[None]
    w = predictor.weights(x, array_normalizer(x[0], None, 1, 99.8))  # type: ignore[attr-defined]
    assert w.shape == (9, 21, 18) and (w >= 0).all()
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-5)
    assert np.ptp(w) > 1e-3  # not the uniform 1/9 of a degenerate net


def test_projection_halo_covers_the_measured_receptive_field():
    proj = ProjectionNetConfig(depth=2, n_filter_base=4)
    torch.manual_seed(0)
    net = ProjectionCARENet(UNetConfig(ndim=2, depth=1, n_filter_base=4, kernel_size=3), proj).eval()
    extents = projection_extents(proj)
    reach = [0, 0]
    for o in range(40, 44):
        x = torch.rand(1, 1, 5, 96, 96, requires_grad=True)
        out = net(x)["restored"][0, 0, o, o]
        (g,) = torch.autograd.grad(out, x)
        cols = np.nonzero(g[0, 0].abs().sum(dim=(0, 1)).numpy())[0]
        assert cols.min() >= o - projection_halo(proj, net.config) and cols.max() <= o + projection_halo(proj, net.config)
        xl = torch.rand(1, 1, 5, 96, 96, requires_grad=True)
        (gl,) = torch.autograd.grad(net.project.logits(xl)[0, 0, 2, o, o], xl)
        cl = np.nonzero(gl[0, 0].abs().sum(dim=(0, 1)).numpy())[0]
        left, right = extents[o % 4]
        assert o - cl.min() <= left and cl.max() - o <= right
        reach = [max(reach[0], o - cl.min()), max(reach[1], cl.max() - o)]
    assert reach[0] >= max(e[0] for e in extents) - 4  # the bound is not loose by more than a pooling cell


def test_a_flat_surface_is_projected_to_its_plane(tmp_path):
    """Trained on flat sheets at plane 4 of 12, the weights pick plane 4 (+-1) on a held-out stack."""
    flat = Surface(amplitude=0.0, level=4 / 11, distractors=0.4, thickness=0.7)
    sources = []
    for seed in range(2):
        paths = write_surface(tmp_path / f"s{seed}", (12, 64, 64), seed=seed, surface=flat, photons=200.0,
                              psf_sigma=(0.7, 0.7, 0.7))
        sources.append({"input": paths["noisy"], "target": paths["texture"]})
    cfg = {"model_dir": str(tmp_path / "model"),
           "data": {"sources": sources, "patch_shape": [32, 32], "n_patches": 48, "validation_fraction": 0.2},
           "network": {"depth": 1, "n_filter_base": 8, "kernel_size": 3},
           "projection": {"network": {"depth": 2, "n_filter_base": 4}},
           "training": {"epochs": 6, "steps_per_epoch": 10, "batch_size": 8, "device": "cpu", "lr": 3e-3}}
    bigcare.train(cfg, progress=False)
    from bigcare.normalization import array_normalizer
    from bigcare.predictors.base import load_predictor

    held_out = surface_sample((12, 64, 64), seed=7, surface=flat, photons=200.0, psf_sigma=(0.7, 0.7, 0.7))
    x = held_out["noisy"][None] * 1000
    predictor = load_predictor(str(tmp_path / "model" / "best"))
    w = predictor.weights(x, array_normalizer(x[0], None, 2.0, 99.7))  # type: ignore[attr-defined]
    assert np.allclose(w.sum(axis=0), 1, atol=1e-5)
    near = w[3:6].sum(axis=0)
    assert near.mean() > 0.6, near.mean()  # chance: 3 of 12 planes = 0.25
    restored = bigcare.predict(x[0], tmp_path / "model" / "best", axes="zyx")["restored"]
    assert restored.shape == (64, 64)
    assert np.corrcoef(restored.ravel(), held_out["texture"].ravel())[0, 1] > 0.5


@pytest.mark.parametrize("block", [(11, 16, 24), (3, 8, 8), None])
def test_projection_blockwise_equals_whole_volume(client, tmp_path, proj_model, block):
    data = (smooth_volume((11, 45, 38), seed=3) * 1000).astype(np.uint16)
    vol = write_volume(str(tmp_path / "in.ome.zarr"), data, chunks=(4, 8, 8), scale=(2.0, 0.5, 0.25))
    result = bigcare.restore(vol, str(tmp_path / "out.ome.zarr"), proj_model, client=client, block_shape=block,
                             progress=False)
    assert result.blocks_computed == result.blocks_total >= 1
    got = read(str(tmp_path / "out.ome.zarr"))
    ref = bigcare.predict(data, proj_model, axes="zyx")["restored"]
    assert got.shape == ref.shape == (45, 38)
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    assert np.abs(ref - ref.mean()).max() > 1  # not a constant image
    out = bigcare.open_volume(str(tmp_path / "out.ome.zarr"))
    assert "".join(out.axis_names) == "yx"
    np.testing.assert_allclose(out.scale, (0.5, 0.25))  # the input's lateral voxel sizes
    model = open_ome_zarr(zarr.open_group(str(tmp_path / "out.ome.zarr"), mode="r"))  # valid NGFF 0.5
    axes = model.attributes.ome.multiscales[0].axes
    assert [a.name for a in axes] == ["y", "x"] and all(a.type == "space" for a in axes)
    assert out.attrs["bigcare"]["plan"]["halo"][0] == 0  # Z: every block reads the whole stack


def test_projection_with_time_and_channel_axes_keeps_them(client, tmp_path, proj_model):
    data = (smooth_volume((2, 1, 6, 24, 24), seed=4) * 1000).astype(np.uint16)
    vol = write_volume(str(tmp_path / "in.ome.zarr"), data, axes="tczyx", chunks=(1, 1, 6, 8, 8))
    bigcare.restore(vol, str(tmp_path / "out.ome.zarr"), proj_model, client=client, progress=False)
    out = bigcare.open_volume(str(tmp_path / "out.ome.zarr"))
    assert "".join(out.axis_names) == "tcyx" and out.shape == (2, 1, 24, 24)
    from bigcare.normalization import Normalizer

    ref = bigcare.predict(data[1], proj_model, axes="czyx",  # the run's percentiles are over both time points
                          normalizer=Normalizer.from_dict(out.attrs["bigcare"]["normalization"]))["restored"]
    np.testing.assert_allclose(read(str(tmp_path / "out.ome.zarr"))[1], ref, atol=1e-5 * np.abs(ref).max())


def test_a_stack_deeper_than_one_call_holds_is_refused(client, tmp_path, proj_model, monkeypatch):
    from bigcare.blocks import sizing

    monkeypatch.setitem(sizing.CALL_VOXELS, "cpu", 52 * 52 * 20)  # halo 24 + align 4 + halo 24: 20 planes fit
    data = (smooth_volume((24, 32, 32)) * 1000).astype(np.uint16)
    vol = write_volume(str(tmp_path / "in.ome.zarr"), data)
    with pytest.raises(InputError, match=r"has 24 Z planes.*at most 20 planes"):
        bigcare.restore(vol, str(tmp_path / "out.ome.zarr"), proj_model, client=client, progress=False)
    assert not (tmp_path / "out.ome.zarr").exists()


def test_model_folder_records_that_the_output_drops_z(proj_model):
    model, config = load_model(proj_model)
    assert isinstance(model, ProjectionCARENet)
    assert config.kind == "projection" and config.projection is not None
    assert config.projection.axis == "z" and config.projection.output_axes == "YX"
    with pytest.raises(Exception, match="projection"):
        ModelConfig(kind="projection", axes="ZYX", architecture=UNetConfig(ndim=3))


def test_config_rejects_3d_projection_patches(tmp_path):
    cfg = {"model_dir": str(tmp_path / "m"), "data": {"sources": [{"input": "a", "target": "b"}],
                                                      "patch_shape": [8, 32, 32]},
           "projection": {}}
    with pytest.raises(ConfigError, match=r"data.patch_shape: projection patches are lateral"):
        bigcare.train(cfg, progress=False)


def test_cli_trains_and_restores_a_projection_model(client, tmp_path, capsys):
    from bigcare.cli import main

    paths = write_surface(tmp_path / "s", (8, 48, 48), seed=0)
    cfg = {"model_dir": str(tmp_path / "model"),
           "data": {"sources": [{"input": paths["noisy"], "target": paths["texture"]}], "patch_shape": [16, 16],
                    "n_patches": 12, "validation_fraction": 0.25},
           "network": {"depth": 1, "n_filter_base": 4, "kernel_size": 3},
           "projection": {"network": {"depth": 1, "n_filter_base": 4}},
           "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "device": "cpu"},
           "cluster": {"scheduler": client.scheduler.address}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "train.yaml"), "-q"]) == 0
    assert load_model(tmp_path / "model" / "best")[1].kind == "projection"
    code = main(["restore", paths["noisy"], str(tmp_path / "out.ome.zarr"), "--model", str(tmp_path / "model" / "best"),
                 "--scheduler", client.scheduler.address])
    assert code == 0
    assert read(str(tmp_path / "out.ome.zarr")).shape == (48, 48)


def test_a_probabilistic_projection_model_predicts_mean_and_scale(tmp_path):
    paths = write_surface(tmp_path / "s", (8, 48, 48), seed=1)
    cfg = {"model_dir": str(tmp_path / "model"),
           "data": {"sources": [{"input": paths["noisy"], "target": paths["texture"]}], "patch_shape": [16, 16],
                    "n_patches": 12, "validation_fraction": 0.25},
           "network": {"depth": 1, "n_filter_base": 4, "kernel_size": 3},
           "projection": {"network": {"depth": 1, "n_filter_base": 4}},
           "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "device": "cpu", "loss": "laplace"}}
    bigcare.train(cfg, progress=False)
    out = bigcare.predict(read(paths["noisy"]), tmp_path / "model" / "best", axes="zyx")
    assert set(out) == {"mean", "scale"} and out["mean"].shape == out["scale"].shape == (48, 48)
    assert (out["scale"] > 0).all() and np.isfinite(out["mean"]).all()


def test_preview_of_a_projection_is_refused_before_anything_is_written(client, tmp_path, proj_model):
    data = (smooth_volume((6, 24, 24)) * 1000).astype(np.uint16)
    vol = write_volume(str(tmp_path / "in.ome.zarr"), data)
    with pytest.raises(ConfigError, match="--preview.*lacks the input's Z axis"):
        bigcare.restore(vol, str(tmp_path / "out.ome.zarr"), proj_model, client=client, progress=False,
                        preview=str(tmp_path / "p.png"))
    assert not (tmp_path / "out.ome.zarr").exists()
