"""Probabilistic CARE: the Laplace loss, its heads, training (2D, 3D, isotropic) and the isotropic merge."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_isotropic_training import aniso_volume, iso_config  # noqa: F401 (a fixture)

import bigcare
from bigcare.errors import ConfigError
from bigcare.models import UNet, UNetConfig, load_model
from bigcare.models.architecture import Head
from bigcare.models.folder import ModelConfig
from bigcare.normalization import Normalizer
from bigcare.predictors.base import load_predictor
from bigcare.synth import write_pair
from bigcare.training import fit, load_train_config, train
from bigcare.training.losses import laplace
from conftest import make_model, read, smooth_volume

LAPLACE = [{"name": "mean", "activation": "linear"}, {"name": "scale", "activation": "softplus_eps"}]


def test_laplace_nll_equals_its_closed_form_and_honours_the_mask():
    mu = torch.tensor([0.0, 1.0, 2.0, -1.0])
    y = torch.tensor([1.0, 1.0, 0.5, 2.0])
    b = torch.tensor([2.0, 0.5, 1.5, 3.0])
    want = [abs(yi - mi) / bi + math.log(bi) + math.log(2) for mi, yi, bi in zip(mu.tolist(), y.tolist(), b.tolist())]
    assert laplace(mu, y, scale=b).item() == pytest.approx(np.mean(want), rel=1e-6)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert laplace(mu, y, mask, scale=b).item() == pytest.approx((want[0] + want[2]) / 2, rel=1e-6)
    # the NLL integrates to 1: -log p at mu with b = 1 is log 2
    assert laplace(torch.zeros(1), torch.zeros(1), scale=torch.ones(1)).item() == pytest.approx(math.log(2))


def test_beta_1_gives_the_mean_the_mae_gradient_and_keeps_the_nll_value_and_scale_gradient():
    mu = torch.tensor([0.0, 1.0, 2.0, -1.0], requires_grad=True)
    b = torch.tensor([2.0, 0.5, 1.5, 3.0], requires_grad=True)
    y = torch.tensor([1.0, 0.2, 0.5, 2.0])
    value = laplace(mu, y, scale=b, beta=1.0)
    assert value.item() == pytest.approx(laplace(mu, y, scale=b).item())  # the NLL's value
    value.backward()
    mu_ref = mu.detach().clone().requires_grad_(True)
    (mu_ref - y).abs().mean().backward()  # plain CARE's MAE
    assert torch.allclose(mu.grad, mu_ref.grad)
    # d/db: the plain NLL's (1 - |y - mu| / b) / b / N, zero at b = |y - mu|
    scale_grad = (1 - (y - mu.detach()).abs() / b.detach()) / b.detach() / 4
    assert torch.allclose(b.grad, scale_grad)
    mu.grad = b.grad = None
    laplace(mu, y, scale=b).backward()  # beta 0: the plain NLL divides the mean's gradient by b
    assert torch.allclose(mu.grad, mu_ref.grad / b.detach()) and torch.allclose(b.grad, scale_grad)


def test_a_detached_scale_head_trains_only_itself_and_the_network_learns_as_plain_care():
    arch = UNetConfig(ndim=2, depth=1, n_filter_base=4, kernel_size=3, heads=[Head(**h) for h in LAPLACE])
    x, y = (torch.from_numpy(a) for a in next(_batches(3)))
    torch.manual_seed(0)
    model = UNet(arch)
    model.detach_heads = frozenset({"scale"})
    out = model(x)
    laplace(out["mean"], y, scale=out["scale"], beta=1.0).backward()
    net = {n: p.grad.clone() for n, p in model.named_parameters() if not n.startswith("heads.scale")}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.startswith("heads.scale"))
    model.zero_grad()
    model.detach_heads = frozenset()
    (model(x)["mean"] - y).abs().mean().backward()  # plain CARE's MAE on the same network
    for name, grad in net.items():
        assert torch.allclose(grad, model.get_parameter(name).grad, atol=1e-6), name


def _batches(seed, n=4, shape=(16, 16)):
    rng = np.random.default_rng(seed)
    while True:
        y = rng.random((n, 1, *shape), dtype=np.float32)
        yield y + rng.normal(0, 0.3, y.shape).astype(np.float32), y


@pytest.mark.parametrize("beta, detach", [(0.0, False), (1.0, True)])
def test_a_laplace_head_trained_a_few_steps_lowers_the_nll(beta, detach):
    arch = UNetConfig(ndim=2, depth=1, n_filter_base=4, kernel_size=3, heads=[Head(**h) for h in LAPLACE])
    torch.manual_seed(0)
    model = UNet(arch)
    val = [next(_batches(99, n=8))]

    def nll():
        with torch.no_grad():
            out = model(torch.from_numpy(val[0][0]))
            return laplace(out["mean"], torch.from_numpy(val[0][1]), scale=out["scale"]).item()

    before = nll()
    result = fit(model, ModelConfig(axes="YX", architecture=arch), _batches(0), validation=val, epochs=3,
                 steps_per_epoch=10, lr=3e-3, loss="laplace", laplace_beta=beta,
                 laplace_detach_scale=detach, progress=False)
    assert nll() < before - 0.05
    assert result.val_loss[-1] < result.val_loss[0]
    with torch.no_grad():
        assert float(model(torch.from_numpy(val[0][0]))["scale"].min()) >= 1e-3  # CSBDeep's floor


def test_loss_laplace_gives_the_network_mean_and_scale_heads():
    base = {"model_dir": "m", "data": {"sources": [["a.ome.zarr", "b.ome.zarr"]], "patch_shape": [16, 16]}}
    cfg = load_train_config({**base, "training": {"loss": "laplace"}})
    assert [(h.name, h.activation) for h in cfg.network.heads] == [("mean", "linear"), ("scale", "softplus_eps")]
    assert cfg.network.residual  # the residual goes to the mean (the first head)
    with pytest.raises(ConfigError, match="network.heads: loss laplace trains"):
        load_train_config({**base, "training": {"loss": "laplace"}, "network": {"heads": [{"name": "restored"}]}})
    with pytest.raises(ConfigError, match="training.ensemble: 3 members need loss laplace"):
        load_train_config({**base, "training": {"ensemble": 3}})
    assert len(load_train_config(base).network.heads) == 1  # other losses keep one head


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("laplace")
    write_pair(root / "low.ome.zarr", root / "high.ome.zarr", (16, 64, 64), chunks=(8, 32, 32), photons=5, seed=2)
    return root


@pytest.mark.parametrize("patch", [[16, 16], [8, 16, 16]])
def test_probabilistic_care_trains_in_2d_and_3d_and_restores_mean_and_scale(pair, tmp_path, client, patch):
    config = {"model_dir": str(tmp_path / "m"),
              "data": {"sources": [[str(pair / "low.ome.zarr"), str(pair / "high.ome.zarr")]], "patch_shape": patch,
                       "n_patches": 24},
              "network": {"depth": 1, "n_filter_base": 4, "kernel_size": 3},
              "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "loss": "laplace"}}
    result = train(config, client=client, progress=False)
    assert np.isfinite(result.val_loss).all()
    _, cfg = load_model(tmp_path / "m" / "best")
    assert [h.name for h in cfg.architecture.heads] == ["mean", "scale"]
    predictor = load_predictor(str(tmp_path / "m" / "best"))
    assert predictor.kinds == {"mean": "intensity", "scale": "scale"}


def test_isotropic_scale_is_the_larger_of_the_two_passes(tmp_path):
    path = make_model(tmp_path / "iso", ndim=2, depth=1, heads=LAPLACE, isotropic={"factor": 2.0, "combine": "geometric"})
    predictor = load_predictor(str(path))
    x = smooth_volume((1, 8, 16, 16))
    normalizer = Normalizer(lo=(0.0,), hi=(4.0,))
    out = predictor.predict(x, normalizer)
    net = predictor.net
    xn = normalizer.normalize(x)
    xz = net.forward_normalized(xn.transpose(2, 0, 1, 3))["scale"].transpose(1, 2, 0, 3)
    yz = net.forward_normalized(xn.transpose(3, 0, 1, 2))["scale"].transpose(1, 2, 3, 0)
    want = net.denormalize("scale", np.maximum(xz, yz), normalizer)
    assert np.allclose(out["scale"], want, rtol=1e-6)
    assert not np.allclose(xz, yz)  # the two passes differ: the maximum is a real choice
    assert (out["scale"] >= 4.0 * 1e-3 - 1e-7).all()  # the floor, in intensity units


def test_probabilistic_isotropic_model_trains_and_restores_blockwise(aniso_volume, tmp_path, client):  # noqa: F811

    path, data = aniso_volume
    config = iso_config(path, tmp_path / "m")
    config["training"]["loss"] = "laplace"
    result = train(config, client=client, progress=False)
    assert np.isfinite(result.val_loss).all()
    out = tmp_path / "out.ome.zarr"
    result = bigcare.restore(str(path), str(out), tmp_path / "m" / "best", client=client, block_shape=(16, 32, 32),
                             progress=False)
    ref = bigcare.predict(data, tmp_path / "m" / "best", axes="zyx")
    for name in ("mean", "scale"):
        got = read(result.outputs[name])
        assert np.abs(got - ref[name]).max() <= 1e-5 * np.abs(ref[name]).max()
    assert (read(result.outputs["scale"]) > 0).all()
