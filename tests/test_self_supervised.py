"""Self-supervised denoising: blind-spot masks (N2V, N2V2, structN2V), the masked loss, training
from noisy OME-Zarr volumes alone, and blockwise restoration with the result."""

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

import bigcare
from bigcare.errors import ConfigError
from bigcare.metrics import normalize_percentile, nrmse
from bigcare.models import UNet, UNetConfig, load_model
from bigcare.models.folder import ModelConfig
from bigcare.synth import write_pair
from bigcare.training import ArrayPairSampler, fit, load_train_config, train
from bigcare.training.blindspot import BlindSpot, blindspot_batches
from bigcare.training.losses import mae, mse
from conftest import read


def unique_batch(shape, seed=0):
    """A batch whose voxels all differ, so a voxel's value says where it came from."""
    values = np.random.default_rng(seed).permutation(int(np.prod(shape))).astype(np.float32)
    return values.reshape(shape)


def where(batch, value):
    return tuple(int(i) for i in np.argwhere(batch == value)[0])


@pytest.mark.parametrize("shape", [(8, 1, 64, 64), (4, 1, 16, 48, 48)])
def test_the_mask_never_replaces_a_voxel_by_itself_and_hits_the_fraction(shape):
    x = unique_batch(shape)
    spec = BlindSpot(fraction=0.002, radius=5)
    masked, mask = spec.apply(x, np.random.default_rng(1))
    hidden = np.argwhere(mask > 0)
    assert len(hidden) > 0 and np.array_equal(masked[mask == 0], x[mask == 0])  # nothing else changed
    for index in hidden:
        index = tuple(index)
        source = where(x, masked[index])
        assert source != index, "a voxel replaced by itself"
        assert source[:2] == index[:2]  # same patch, same channel
        offset = np.subtract(source[2:], index[2:])
        assert np.abs(offset).max() <= 5 and offset.any()
    per_patch = mask.reshape(len(x), -1).sum(1)
    voxels = np.prod(shape[2:])
    box = spec.box(len(shape) - 2)
    assert box == (22 if len(shape) == 4 else 8)
    # stratified: one per box, the random box grid's partial boxes at the borders give or take
    assert np.all(np.abs(per_patch / voxels - 0.002) < 0.0008), per_patch / voxels
    assert per_patch.std() < 0.25 * per_patch.mean()  # far below a Bernoulli draw's spread


def test_masked_voxels_are_spread_out_not_clumped():
    x = np.zeros((64, 1, 64, 64), np.float32)
    _, mask = BlindSpot(fraction=0.01).apply(x, np.random.default_rng(2))
    box = BlindSpot(fraction=0.01).box(2)  # 10
    # two voxels of one patch can be neighbours only across a box border: rare, never three in a row
    hit = mask[:, 0]
    three = hit[:, :, :-2] * hit[:, :, 1:-1] * hit[:, :, 2:]
    assert box == 10 and three.sum() == 0
    counts = [len(np.argwhere(p)) for p in hit]
    assert min(counts) >= 0.5 * 64 * 64 / box**2


def test_the_median_replacement_is_the_neighbourhood_median_without_the_centre():
    x = np.random.default_rng(3).random((3, 1, 12, 40, 40)).astype(np.float32)
    spec = BlindSpot(replace="median", radius=3)
    masked, mask = spec.apply(x, np.random.default_rng(4))
    for b, c, z, y, xx in np.argwhere(mask > 0):
        lo = [max(0, v - 3) for v in (z, y, xx)]
        window = x[b, c, lo[0]:z + 4, lo[1]:y + 4, lo[2]:xx + 4]
        centre = np.ravel_multi_index((z - lo[0], y - lo[1], xx - lo[2]), window.shape)
        assert masked[b, c, z, y, xx] == pytest.approx(np.median(np.delete(window.ravel(), centre)), rel=1e-6)


def test_structn2v_hides_the_configured_line_and_never_replaces_from_it():
    x = unique_batch((4, 1, 8, 40, 40), seed=5)
    spec = BlindSpot(struct_axis=2, struct_radius=2, radius=3)  # a line along X
    masked, mask = spec.apply(x, np.random.default_rng(6))
    centres = [tuple(i) for i in np.argwhere(mask > 0)]
    changed = {tuple(i) for i in np.argwhere(masked != x)}
    for b, c, z, y, xx in centres:
        for step in (-2, -1, 1, 2):
            if 0 <= xx + step < 40:
                assert (b, c, z, y, xx + step) in changed, "a voxel of the line kept its value"
        source = where(x, masked[b, c, z, y, xx])
        assert not (source[2:4] == (z, y) and abs(source[4] - xx) <= 2), "replaced from its own line"
    # nothing but the centres and their lines changed (another centre's line may cover a centre)
    lines = {(b, c, z, y, xx + s) for b, c, z, y, xx in centres for s in range(-2, 3)}
    assert changed <= lines


def test_the_loss_ignores_unmasked_voxels():
    torch.manual_seed(0)
    pred = torch.randn(2, 1, 16, 16, requires_grad=True)
    target = torch.randn(2, 1, 16, 16)
    mask = (torch.rand(2, 1, 16, 16) < 0.05).float()
    for loss in (mae, mse):
        (grad,) = torch.autograd.grad(loss(pred, target, mask), pred)
        assert grad[mask == 0].abs().max() == 0 and grad[mask == 1].abs().min() > 0
        other = target.clone()
        other[mask == 0] += 100  # the unmasked targets do not count
        assert loss(pred, other, mask).item() == pytest.approx(loss(pred, target, mask).item())
        expected = ((pred - target)[mask == 1].abs() ** (1 if loss is mae else 2)).mean()
        assert loss(pred, target, mask).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("replace, arch", [("uniform", {}), ("median", {"pooling": "maxblur", "top_skip": False})])
def test_a_few_n2v_steps_on_poisson_noise_lower_the_error_against_the_clean_image(replace, arch):
    rng = np.random.default_rng(0)
    clean = ndi.gaussian_filter(rng.random((128, 128)), 4)
    clean = (clean - clean.min()) / (clean.max() - clean.min())
    noisy = rng.poisson(clean * 20 + 2).astype(np.float32)
    sampler = ArrayPairSampler([(noisy, noisy)], (32, 32), seed=0)  # the noisy image is its own target
    spec = BlindSpot(fraction=0.02, replace=replace)
    validation = list(blindspot_batches(iter([next(sampler.batches(16))]), spec, 1))
    config = UNetConfig(ndim=2, depth=2, n_filter_base=8, kernel_size=3, residual=False, **arch)
    torch.manual_seed(0)
    model = UNet(config)
    fit(model, ModelConfig(axes="YX", architecture=config), blindspot_batches(sampler.batches(16), spec, 0),
        validation=validation, epochs=4, steps_per_epoch=25, loss="mse", progress=False)
    with torch.no_grad():
        denoised = model(torch.from_numpy(normalize_percentile(noisy, 1, 99.8)[None, None]))["restored"][0, 0]
    assert nrmse(denoised.numpy(), clean) < 0.85 * nrmse(noisy, clean)  # measured: 0.120 -> 0.090 / 0.085


def ssl_config(root, model_dir, method="n2v", **section):
    return {"model_dir": str(model_dir),
            "data": {"sources": [str(root / "noisy.ome.zarr")], "patch_shape": [8, 32, 32], "n_patches": 24},
            "network": {"depth": 2, "n_filter_base": 4},
            "training": {"epochs": 1, "steps_per_epoch": 3, "batch_size": 4},
            "self_supervised": {"method": method, **section}}


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssl")
    write_pair(root / "noisy.ome.zarr", root / "clean.ome.zarr", (16, 96, 80), chunks=(8, 32, 32), photons=5, seed=1)
    return root


@pytest.mark.parametrize("method, section", [("n2v2", {}), ("structn2v", {"struct_axis": "x"})])
def test_self_supervised_training_from_a_noisy_volume_restores_blockwise_equal_to_whole(noisy, tmp_path, client,
                                                                                      method, section):
    result = train(ssl_config(noisy, tmp_path / "m", method, **section), client=client, progress=False)
    assert result.epochs == 1 and np.isfinite(result.val_loss).all()
    model, cfg = load_model(tmp_path / "m" / "best")
    arch = cfg.architecture
    assert arch.residual is False
    assert (arch.pooling, arch.top_skip) == (("maxblur", False) if method == "n2v2" else ("max", True))
    assert cfg.provenance["config"]["self_supervised"]["method"] == method
    assert cfg.provenance["config"]["training"]["loss"] == "mse"
    src = noisy / "noisy.ome.zarr"
    bigcare.restore(src, tmp_path / "blocks.ome.zarr", tmp_path / "m" / "best", block_shape=(8, 32, 32),
                    client=client, progress=False)
    bigcare.restore(src, tmp_path / "whole.ome.zarr", tmp_path / "m" / "best", block_shape=(16, 96, 80),
                    client=client, progress=False)
    blocks, whole = read(tmp_path / "blocks.ome.zarr"), read(tmp_path / "whole.ome.zarr")
    assert np.isfinite(blocks).all() and np.abs(blocks - whole).max() <= 1e-5


@pytest.mark.parametrize("change, message", [
    ({"self_supervised": {"method": "structn2v"}}, "structn2v needs struct_axis"),
    ({"self_supervised": {"method": "n2v", "struct_axis": "x"}}, "struct_axis is for method structn2v"),
    ({"self_supervised": {"method": "n2v", "fraction": 0.5}}, "self_supervised.fraction"),
    ({"self_supervised": {"method": "n2v2"}, "network": {"depth": 2, "pooling": "max"}}, "network.pooling"),
    ({"self_supervised": {"method": "n2v"}, "network": {"depth": 2, "residual": True}}, "network.residual"),
    ({"data": {"sources": [{"input": "a.ome.zarr", "target": "b.ome.zarr"}], "patch_shape": [8, 32, 32]}},
     "without 'target'"),
    ({"data": {"sources": [{"input": "a.ome.zarr", "target_channel": 1}], "patch_shape": [8, 32, 32]}},
     "without 'target' or 'target_channel'"),
    ({"self_supervised": {"method": "n2v"}, "isotropic": {"psf": {"kind": "gaussian", "sigma_xy": 1, "sigma_z": 2}}},
     "different methods"),
])
def test_self_supervised_config_errors_name_the_problem(tmp_path, change, message):
    config = {**ssl_config(tmp_path, tmp_path / "m"), **change}
    with pytest.raises(ConfigError, match=message):
        load_train_config(config)
