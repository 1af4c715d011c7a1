"""Ensembles of probabilistic models: the mixture's interval and disagreement, training M members,
and restoring blockwise with every member in one pass per block."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

import bigcare
from bigcare.cli import main
from bigcare.errors import ModelError
from bigcare.models import load_model
from bigcare.models.ensemble import load_ensemble
from bigcare.predictors.mixture import disagreement, mixture_interval
from bigcare.synth import write_pair
from bigcare.training import train
from conftest import builds, make_model, read, smooth_volume, write_volume

LAPLACE = [{"name": "mean", "activation": "linear"}, {"name": "scale", "activation": "softplus_eps"}]


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).reshape(len(values), -1)


def _kl_on_a_grid(mus, bs) -> float:
    """(1/M) sum_k KL(p_k || mixture) / log M by the trapezoidal rule on a fine grid."""
    x = np.linspace(-150, 150, 3_000_001)
    logs = np.array([-np.log(2 * b) - np.abs(x - m) / b for m, b in zip(mus, bs)])
    log_mix = logsumexp(logs, axis=0) - np.log(len(mus))
    kl = [np.trapezoid(np.exp(lk) * (lk - log_mix), x) for lk in logs]
    return float(np.mean(kl) / np.log(len(mus)))


def test_disagreement_is_zero_for_identical_members():
    mus, bs = _t([[0.3, -2.0, 5.0]] * 3), _t([[0.1, 1.0, 4.0]] * 3)
    assert torch.allclose(disagreement(mus, bs), torch.zeros(3, dtype=torch.float64), atol=1e-7)


def test_disagreement_grows_as_two_means_separate_and_matches_a_numerical_kl():
    gaps = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    got = disagreement(_t([[0.0] * len(gaps), gaps]), _t([[1.0] * len(gaps), [1.0] * len(gaps)])).numpy()
    assert np.all(np.diff(got) > 0) and got[0] == pytest.approx(0, abs=1e-7)
    assert got[-1] > 0.95  # disjoint members reach the bound log M
    want = [_kl_on_a_grid([0.0, g], [1.0, 1.0]) for g in gaps]
    assert np.abs(got - want).max() < 0.01  # the Gauss-Laguerre rule's accuracy (module docstring)
    # unequal scales and three members
    mus, bs = [0.0, 0.4, 3.0], [1.0, 2.5, 0.4]
    assert disagreement(_t(mus), _t(bs)).item() == pytest.approx(_kl_on_a_grid(mus, bs), abs=0.01)


def test_mixture_interval_holds_its_level_of_the_mixture_mass():
    rng = np.random.default_rng(0)
    mus, bs = rng.normal(0, 2, (3, 50)), np.exp(rng.normal(0, 0.5, (3, 50)))
    lower, upper = mixture_interval(torch.from_numpy(mus), torch.from_numpy(bs), 0.9)

    def cdf(x):
        z = (x - mus) / bs
        return np.where(z < 0, 0.5 * np.exp(np.minimum(z, 0)), 1 - 0.5 * np.exp(-np.maximum(z, 0))).mean(axis=0)

    assert np.allclose(cdf(lower.numpy()), 0.05, atol=1e-9) and np.allclose(cdf(upper.numpy()), 0.95, atol=1e-9)
    # one distribution (identical members): the Laplace quantiles mu -+ b log(1 / (1 - level))
    lo, hi = mixture_interval(_t([[1.0], [1.0]]), _t([[2.0], [2.0]]), 0.8)
    assert lo.item() == pytest.approx(1 - 2 * math.log(5)) and hi.item() == pytest.approx(1 + 2 * math.log(5))


@pytest.fixture
def members(tmp_path):
    return [str(make_model(tmp_path / f"m{k}", ndim=3, heads=LAPLACE, seed=k)) for k in range(3)]


def test_ensemble_restore_blockwise_equals_whole_volume_and_builds_each_member_once_per_worker(
        tmp_path, client, members):
    data = smooth_volume((16, 32, 48))
    src = write_volume(str(tmp_path / "in.ome.zarr"), data, chunks=(8, 16, 16)).url
    before = builds(client)
    result = bigcare.restore(src, str(tmp_path / "blocks.ome.zarr"), members, client=client, block_shape=(8, 16, 16),
                             progress=False, precision="fp32")
    made = {w: builds(client)[w] - before[w] for w in before}
    assert sorted(set(made.values()) - {0}) == [3]  # a worker that ran blocks built each member once
    assert result.blocks_computed == 12
    assert sorted(result.outputs) == ["disagreement", "lower", "mean", "upper"]
    whole_run = bigcare.restore(src, str(tmp_path / "whole.ome.zarr"), members, client=client, block_shape=(16, 32, 48),
                                progress=False, precision="fp32")
    ref = bigcare.predict(data, members, axes="zyx", precision="fp32")
    for name in ("mean", "lower", "upper", "disagreement"):
        blocks, whole = read(result.outputs[name]), read(whole_run.outputs[name])
        assert np.abs(blocks - whole).max() <= 1e-5 and np.abs(blocks - ref[name]).max() <= 1e-5
    d = read(result.outputs["disagreement"])
    assert 0 <= d.min() and d.max() <= 1 and d.max() > 0
    lower, mean, upper = (read(result.outputs[n]) for n in ("lower", "mean", "upper"))
    assert (lower <= upper).all() and np.mean((lower <= mean) & (mean <= upper)) > 0.9


def test_ensemble_members_must_be_probabilistic_and_share_normalization(tmp_path, members):
    plain = make_model(tmp_path / "plain", ndim=3)
    with pytest.raises(ModelError, match="has no Laplace scale head .* training: {loss: laplace}"):
        bigcare.predict(smooth_volume((8, 16, 16)), [members[0], plain], axes="zyx")
    config = json.loads((tmp_path / "m1" / "config.json").read_text())
    config["normalization"]["pmax"] = 99.0
    (tmp_path / "m1" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="members differ in pmax"):
        bigcare.predict(smooth_volume((8, 16, 16)), members[:2], axes="zyx")
    assert main(["restore", str(tmp_path / "x.ome.zarr"), str(tmp_path / "y.ome.zarr"),
                 "--model", members[0], str(plain)]) == 2


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    write_pair(root / "low.ome.zarr", root / "high.ome.zarr", (16, 64, 64), chunks=(8, 32, 32), photons=5, seed=3)
    return root


def test_training_an_ensemble_differs_only_in_seed_and_order_and_restores_from_its_folder(pair, tmp_path, client):
    config = {"model_dir": str(tmp_path / "ens"),
              "data": {"sources": [[str(pair / "low.ome.zarr"), str(pair / "high.ome.zarr")]], "patch_shape": [8, 16, 16],
                       "n_patches": 24},
              "network": {"depth": 1, "n_filter_base": 4, "kernel_size": 3},
              "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "loss": "laplace", "ensemble": 2}}
    result = train(config, client=client, progress=False)
    assert len(result.members) == 2
    ens = load_ensemble(tmp_path / "ens")
    assert ens.members == ["member_0/best", "member_1/best"] and "not for intensity quantification" in ens.limits
    (m0, c0), (m1, c1) = (load_model(tmp_path / "ens" / f"member_{k}" / "best") for k in range(2))
    assert c0.provenance["data"] == c1.provenance["data"]  # the same patch positions and split
    assert "calibration data" in c0.provenance["limits"]
    assert any(not torch.equal(a, b) for a, b in zip(m0.state_dict().values(), m1.state_dict().values()))
    assert (tmp_path / "ens" / "member_1" / "loss_curves.png").exists()
    out = tmp_path / "out.ome.zarr"
    assert main(["restore", str(pair / "low.ome.zarr"), str(out), "--model", str(tmp_path / "ens"), "-q",
                 "--interval", "0.8", "--workers", "1"]) == 0
    assert set(json.loads((out / "zarr.json").read_text())["attributes"]["bigcare"]["outputs"]) == {
        "mean", "lower", "upper", "disagreement"}


def test_summary_reports_disagreement_fractions_and_interval_width_and_preview_draws_d(tmp_path, client, members):
    import matplotlib.image as mpimg

    from bigcare.runs.results import format_summary

    data = smooth_volume((16, 32, 48))
    src = write_volume(str(tmp_path / "in.ome.zarr"), data, chunks=(8, 16, 16)).url
    out = tmp_path / "out.ome.zarr"
    result = bigcare.restore(src, str(out), members, client=client, block_shape=(8, 16, 16), progress=False,
                             precision="fp32", preview=tmp_path / "p.png")
    rel = json.loads((out / "bigcare_summary.json").read_text())["reliability"]
    d = read(result.outputs["disagreement"])
    width = read(result.outputs["upper"]) - read(result.outputs["lower"])
    assert rel["voxels"] == d.size and rel["interval"] == 0.9
    assert rel["mean_interval_width"] == pytest.approx(float(width.mean()), rel=1e-5)
    assert rel["mean_disagreement"] == pytest.approx(float(d.mean()), rel=1e-5)
    assert rel["fraction_disagreement_above"]["0.1"] == pytest.approx(float(np.mean(d > 0.1)))
    assert "reliability: mean 90% interval width" in format_summary(result)
    image = mpimg.imread(tmp_path / "p.png")
    assert image.shape[1] > image.shape[0] * 2  # input, 4 outputs and the D histogram side by side
