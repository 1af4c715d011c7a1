"""The Wang et al. 2019 GAN: generator architecture and halo, losses, a few steps, save/load, blockwise restore."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from test_unet import _measured_extents

import bigcare
from bigcare.models import UNet, load_model
from bigcare.models.architecture import halo, receptive_extents, receptive_radius
from bigcare.models.folder import ModelConfig, load_config
from bigcare.store.write import write_array
from bigcare.synth import Granules, Microscope, Tubules, acquire, clean, make_psf
from bigcare.training.gan import Discriminator, discriminator_loss, fit_gan, generator_config, generator_loss, ssim
from conftest import read


def test_generator_is_wangs_residual_unet():
    cfg = generator_config(2, n_filter_base=8)
    assert (cfg.depth, cfg.n_conv_per_depth, cfg.kernel, cfg.pooling, cfg.activation, cfg.block_residual) == \
        (4, 3, 3, "avg", "leaky_relu", True)
    net = UNet(cfg)
    assert isinstance(net.down[0][1], torch.nn.LeakyReLU) and net.down[0][1].negative_slope == 0.1
    out = net(torch.randn(2, 1, 32, 48))["restored"]
    assert out.shape == (2, 1, 32, 48)


@pytest.mark.parametrize("ndim, depth", [(2, 2), (2, 4), (3, 2)])
def test_generator_receptive_field_matches_impulse_response(ndim, depth):
    cfg = generator_config(ndim, n_filter_base=2, depth=depth)
    for axis in range(ndim):
        assert _measured_extents(cfg, axis, torch.float64, seed=axis) == receptive_extents(cfg), f"axis {axis}"


def test_generator_blockwise_prediction_with_halo_matches_whole_image():
    cfg = generator_config(2, n_filter_base=2, depth=4)
    torch.manual_seed(3)
    net = UNet(cfg).double().eval()
    h = halo(cfg)
    assert h >= receptive_radius(cfg) and h % 16 == 0
    size = 2 * h + 64
    img = torch.randn(1, 1, size, size, dtype=torch.float64)
    with torch.no_grad():
        whole = net(img)["restored"]
        y0, x0 = h + 16, h
        block = net(img[..., y0 - h:y0 + 32 + h, x0 - h:x0 + 48 + h])["restored"]
        torch.testing.assert_close(block[..., h:h + 32, h:h + 48], whole[..., y0:y0 + 32, x0:x0 + 48], atol=1e-10, rtol=0)


def test_losses_against_hand_computed_values():
    d_fake = torch.tensor([0.5, 0.25])
    y = torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # perfect prediction: MSE 0, SSIM 1 -> only the adversarial term, (log 2 + log 4) / 2
    assert float(generator_loss(d_fake, y, y, lam=3.0, nu=2.0)) == pytest.approx(1.5 * math.log(2), rel=1e-6)
    pred = y + 0.1
    s = structural_similarity(pred[0, 0].numpy(), y[0, 0].numpy(), gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0, full=True)[1][5:-5, 5:-5].mean()
    assert float(ssim(pred, y)) == pytest.approx(s, rel=1e-6)
    expected = 1.5 * math.log(2) + 3.0 * 0.01 - 2.0 * math.log((1 + s) / 2)
    assert float(generator_loss(d_fake, pred, y, lam=3.0, nu=2.0)) == pytest.approx(expected, rel=1e-6)
    assert float(discriminator_loss(torch.tensor([0.8]), torch.tensor([0.2]))) == pytest.approx(-2 * math.log(0.8))


def test_discriminator_outputs_probabilities():
    d = Discriminator(2, n_filter_base=4, n_blocks=3)
    p = d(torch.randn(5, 1, 32, 32))
    assert p.shape == (5,) and torch.all((p > 0) & (p < 1))
    assert [type(m).__name__ for m in d.dense] == ["Linear", "LeakyReLU", "Linear"]


def _batches(seed=0, n=4, size=32):
    v = (0.04, 0.04)
    structures = [Tubules(density=0.3), Granules(density=2.0)]
    microscope = Microscope(psf=make_psf({"kind": "gaussian", "fwhm": 0.25}, v, 2), photons=50)
    rng = np.random.default_rng(seed)
    while True:
        xs, ys = [], []
        for _ in range(n):
            s = int(rng.integers(0, 10**6))
            xs.append(acquire(structures, (size, size), v, microscope, seed=s))
            ys.append(clean(structures, (size, size), v, seed=s))
        yield np.stack(xs)[:, None], np.stack(ys)[:, None]


def test_a_few_gan_steps_save_a_generator_that_loads_and_restores_blockwise(tmp_path, client):
    cfg = generator_config(2, n_filter_base=4)
    model_config = ModelConfig(axes="YX", architecture=cfg)
    generator, discriminator = UNet(cfg), Discriminator(2, n_filter_base=4, n_blocks=3)
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    history = fit_gan(generator, discriminator, model_config, _batches(), steps=3, lam=1.0, nu=0.5,
                      validation=[next(_batches(seed=1))], every=2, model_dir=tmp_path / "gan")
    assert len(history["generator_loss"]) == 3 and np.isfinite(history["generator_loss"]).all()
    assert any(not torch.equal(before[k], v) for k, v in generator.state_dict().items())
    loaded, config = load_model(tmp_path / "gan" / "last")
    assert config.architecture == cfg and config.provenance["training"]["method"] == "gan"
    assert load_config(tmp_path / "gan" / "best").architecture == cfg
    x = torch.from_numpy(next(_batches(seed=2))[0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["restored"], generator(x)["restored"])
    # bigcare restore applies it blockwise, seam-free
    img = acquire([Tubules(density=0.3)], (160, 144), (0.04, 0.04), Microscope(photons=50), seed=9)
    write_array(tmp_path / "in.ome.zarr", img, chunks=(32, 48), scale=(0.04, 0.04), axes="yx")
    bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "blocks.ome.zarr", tmp_path / "gan" / "last",
                    block_shape=(32, 48), client=client, progress=False)
    bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "whole.ome.zarr", tmp_path / "gan" / "last",
                    block_shape=(160, 144), client=client, progress=False)
    blocks, whole = read(tmp_path / "blocks.ome.zarr"), read(tmp_path / "whole.ome.zarr")
    assert np.isfinite(blocks).all() and np.abs(blocks - whole).max() <= 1e-5


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from bigcare.synth.write import write_kind

    root = tmp_path_factory.mktemp("gan_pairs")
    write_kind(root, "tubules+granules", (96, 96), count=2, psf={"kind": "gaussian", "fwhm": 0.25}, chunks=(48, 48))
    return root


def gan_config(root, model_dir, **training):
    return {"model_dir": str(model_dir),
            "data": {"sources": [{"input": str(root / "noisy_0.ome.zarr"), "target": str(root / "clean_0.ome.zarr")}],
                     "patch_shape": [32, 32], "n_patches": 16},
            "network": {"n_filter_base": 4, "depth": 2},
            "training": {"method": "gan", "epochs": 2, "steps_per_epoch": 2, "batch_size": 2, **training}}


def test_training_config_method_gan_trains_a_generator_that_restore_applies(pairs, tmp_path, client):
    result = bigcare.train(gan_config(pairs, tmp_path / "m", **{"lambda": 3.0, "nu": 0.5}), client=client,
                           progress=False)
    assert result.epochs == 2 and len(result.val_loss) == 2 and np.isfinite(result.val_loss).all()
    model, cfg = load_model(tmp_path / "m" / "best")
    arch = cfg.architecture
    assert (arch.pooling, arch.activation, arch.block_residual, arch.n_conv_per_depth, arch.depth) == \
        ("avg", "leaky_relu", True, 3, 2)
    assert cfg.provenance["training"] | {"lambda": 3.0, "nu": 0.5, "method": "gan"} == cfg.provenance["training"]
    assert cfg.provenance["config"]["training"]["lambda"] == 3.0
    assert (tmp_path / "m" / "last" / "discriminator.safetensors").is_file()
    bigcare.restore(pairs / "noisy_1.ome.zarr", tmp_path / "out.ome.zarr", tmp_path / "m" / "best",
                    block_shape=(48, 48), client=client, progress=False)
    out = read(tmp_path / "out.ome.zarr")
    assert out.shape == (96, 96) and np.isfinite(out).all() and out.std() > 0


@pytest.mark.parametrize("change, message", [
    ({"training": {"lambda": 2.0}}, r"training.lambda: is read by training.method gan only"),
    ({"training": {"nu": 0.1, "method": "care"}}, r"training.nu: is read by training.method gan only"),
    ({"training": {"method": "gan", "lambda": -1}}, r"training.lambda: Input should be greater than or equal to 0"),
    ({"training": {"method": "gan", "lambda_": 1}}, r"training.lambda_: unknown key"),
    ({"training": {"method": "gan", "loss": "mae"}}, r"training.method gan: its generator loss is fixed"),
    ({"training": {"method": "gan"}, "network": {"pooling": "max"}}, r"network.pooling: training.method gan"),
    ({"training": {"method": "gan"}, "network": {"activation": "relu"}}, r"network.activation: training.method gan"),
    ({"training": {"method": "gan"}, "self_supervised": {"method": "n2v"}}, "different methods"),
    ({"training": {"method": "gan"}, "data": {"sources": ["a.ome.zarr"], "patch_shape": [32, 32]}},
     "learns from input/target pairs"),
    ({"training": {"method": "gans"}}, r"training.method: Input should be 'care' or 'gan'"),
    ({"training": {"method": "gan", "lr_schedule": "cosine"}}, r"training.lr_schedule: training.method gan keeps"),
])
def test_gan_config_errors_name_the_key(tmp_path, change, message):
    from bigcare.errors import ConfigError
    from bigcare.training import load_train_config

    config = {**gan_config(tmp_path, tmp_path / "m"), **change}
    with pytest.raises(ConfigError, match=message):
        load_train_config(config)


def test_gan_config_defaults_are_wangs_and_a_dumped_config_reads_back(tmp_path):
    from bigcare.training import load_train_config

    cfg = load_train_config({**gan_config(tmp_path, tmp_path / "m"), "network": {}})
    assert (cfg.network.depth, cfg.network.kernel_size, cfg.network.n_filter_base) == (4, 3, 32)
    assert (cfg.training.lr, cfg.training.lr_discriminator, cfg.training.lambda_, cfg.training.nu) == \
        (1e-4, 1e-5, 1.0, 1.0)
    assert load_train_config(cfg.model_dump(mode="json")) == cfg
    care = load_train_config({**gan_config(tmp_path, tmp_path / "m"), "training": {}})
    assert care.training.method == "care" and care.training.lr == 4e-4 and care.network.pooling == "max"
    assert load_train_config(care.model_dump(mode="json")) == care
