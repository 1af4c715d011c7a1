"""Calibration of probabilistic models and ensembles: coverage, ECE, the recalibration factor."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bigcare
from bigcare.cli import main
from bigcare.models.folder import load_config, model_hash
from bigcare.runs.calibrate import LEVELS, calibrate, coverage, expected_calibration_error, fit_scale_factor
from conftest import make_model, smooth_volume, write_volume

LAPLACE = [{"name": "mean", "activation": "linear"}, {"name": "scale", "activation": "softplus_eps"}]
N = 20_000


def _within_sampling_error(cov, levels=LEVELS, n=N):
    tol = 4 * np.sqrt(np.asarray(levels) * (1 - np.asarray(levels)) / n)  # 4 binomial standard errors
    return np.all(np.abs(np.asarray(cov) - np.asarray(levels)) <= tol)


def test_coverage_of_known_laplace_distributions_is_the_nominal_level():
    rng = np.random.default_rng(0)
    mu, b = rng.normal(0, 1, N), np.exp(rng.normal(-1, 0.5, N))
    y = mu + rng.laplace(0, b)
    cov = coverage(mu[None], b[None], y)
    assert _within_sampling_error(cov)
    assert expected_calibration_error(LEVELS, cov) < 0.01
    # too narrow by 2: coverage below the diagonal; the closed-form factor finds the 2 back
    y2 = mu + rng.laplace(0, 2 * b)
    assert np.all(coverage(mu[None], b[None], y2) < np.asarray(LEVELS))
    s = fit_scale_factor(mu[None], b[None], y2)
    assert s == pytest.approx(2.0, rel=0.03)
    assert _within_sampling_error(coverage(mu[None], b[None] * s, y2))


def test_coverage_of_a_known_mixture_is_the_nominal_level_and_its_factor_is_found():
    rng = np.random.default_rng(1)
    n = 8_000
    mu = rng.normal(0, 1, (3, n))
    b = np.exp(rng.normal(-1, 0.3, (3, n)))
    pick = rng.integers(0, 3, n)  # y from the mixture: a random member per voxel
    cols = np.arange(n)
    y = mu[pick, cols] + rng.laplace(0, b[pick, cols])
    assert _within_sampling_error(coverage(mu, b, y), n=n)
    y3 = mu[pick, cols] + rng.laplace(0, 3 * b[pick, cols])
    s = fit_scale_factor(mu, b, y3)
    assert s == pytest.approx(3.0, rel=0.05)
    assert expected_calibration_error(LEVELS, coverage(mu, b * s, y3)) < 0.015


@pytest.fixture
def held_out(tmp_path):
    data = smooth_volume((8, 32, 32), seed=4)
    truth = smooth_volume((8, 32, 32), seed=4) * 1.1 + np.random.default_rng(5).normal(0, 0.05, data.shape)
    write_volume(str(tmp_path / "in.ome.zarr"), data, chunks=(8, 16, 16))
    write_volume(str(tmp_path / "gt.ome.zarr"), truth.astype(np.float32), chunks=(8, 16, 16))
    return str(tmp_path / "in.ome.zarr"), str(tmp_path / "gt.ome.zarr"), data


def test_calibrate_writes_curve_and_json_and_recalibration_changes_every_later_restore(tmp_path, held_out, capsys):
    inp, gt, data = held_out
    model = make_model(tmp_path / "m", ndim=3, heads=LAPLACE)
    before_hash = model_hash(model)
    scale_before = bigcare.predict(data, model, axes="zyx", precision="fp32")["scale"]
    assert main(["calibrate", str(model), "--data", inp, gt, "--recalibrate"]) == 0
    assert "ECE" in capsys.readouterr().out
    report = json.loads((model / "calibration.json").read_text())
    assert (model / "calibration.png").stat().st_size > 1000
    assert len(report["coverage"]) == 9 and report["voxels"] == 8 * 32 * 32
    assert report["ece_after"] <= report["ece"] + 1e-9
    s = load_config(model).calibration.scale_factor
    assert s == pytest.approx(report["scale_factor"]) and model_hash(model) != before_hash
    scale_after = bigcare.predict(data, model, axes="zyx", precision="fp32")["scale"]
    assert np.allclose(scale_after, scale_before * s, rtol=1e-5)
    # measured again: the stored factor is already applied, coverage is the recalibrated one
    again = calibrate(model, [(inp, gt)], plot=False)
    assert np.allclose(again["coverage"], report["coverage_after"], atol=2e-3)


def test_calibrate_refuses_a_model_without_a_scale_head_and_odd_pairs(tmp_path, held_out, capsys):
    inp, gt, _ = held_out
    plain = make_model(tmp_path / "plain", ndim=3)
    assert main(["calibrate", str(plain), "--data", inp, gt]) == 2
    assert "no Laplace scale head" in capsys.readouterr().err
    assert main(["calibrate", str(plain), "--data", inp]) == 2
    assert "--data takes pairs" in capsys.readouterr().err


def test_calibrating_an_ensemble_stores_its_factor_in_ensemble_json(tmp_path, held_out):
    from bigcare.models.ensemble import EnsembleConfig, load_ensemble, save_ensemble

    inp, gt, data = held_out
    for k in range(2):
        make_model(tmp_path / "ens" / f"member_{k}", ndim=3, heads=LAPLACE, seed=k)
    save_ensemble(tmp_path / "ens", EnsembleConfig(members=["member_0", "member_1"]))
    before = bigcare.predict(data, tmp_path / "ens", axes="zyx", precision="fp32")
    report = calibrate(tmp_path / "ens", [(inp, gt)], recalibrate=True)
    assert report["members"] == 2
    assert load_ensemble(tmp_path / "ens").scale_factor == pytest.approx(report["scale_factor"])
    after = bigcare.predict(data, tmp_path / "ens", axes="zyx", precision="fp32")
    width = (after["upper"] - after["lower"]).mean() / (before["upper"] - before["lower"]).mean()
    assert (width > 1) == (report["scale_factor"] > 1)
    again = calibrate(tmp_path / "ens", [(inp, gt)], plot=False)  # measured with the stored factor
    assert np.allclose(again["coverage"], report["coverage_after"], atol=2e-3)
