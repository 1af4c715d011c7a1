"""Synthetic phantoms/degradations and the CARE-convention metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bigcare.errors import ConfigError, InputError
from bigcare.metrics import fit_affine, normalize_percentile, nrmse, psnr, ssim
from bigcare.synth import degrade, phantom


@pytest.mark.parametrize("shape", [(64, 48), (16, 40, 32)])
def test_phantom_is_seeded_float32_in_unit_range(shape):
    a = phantom(shape, seed=3)
    assert a.shape == shape and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, phantom(shape, seed=3))
    assert not np.array_equal(a, phantom(shape, seed=4))
    assert 0.05 < (a > 0.1).mean() < 0.8  # blobs, not empty and not saturated
    assert a.max() > 0.5


def test_phantom_nuclei_count_and_shells():
    assert phantom((32, 32), n_nuclei=0).max() == 0
    one = phantom((48, 48), n_nuclei=1, shells=False, seed=1)
    assert one.max() > 0.2
    with_shells = phantom((64, 64), n_nuclei=10, shells=True, seed=2)
    without = phantom((64, 64), n_nuclei=10, shells=False, seed=2)
    assert (with_shells > 0.1).sum() > (without > 0.1).sum()


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4, 5), (0, 5)])
def test_phantom_rejects_bad_shape(shape):
    with pytest.raises(ConfigError, match="shape must be 2 or 3 positive ints"):
        phantom(shape)


def test_degrade_is_seeded_and_has_poisson_statistics():
    clean = np.full((200, 200), 0.5, np.float32)
    noisy = degrade(clean, photons=20, background=0.1, read_noise=0.0, seed=5)
    assert noisy.dtype == np.float32
    again = degrade(clean, photons=20, background=0.1, read_noise=0.0, seed=5)
    np.testing.assert_array_equal(noisy, again)
    assert noisy.mean() == pytest.approx(0.6, abs=0.01)
    assert noisy.var() == pytest.approx(0.6 / 20, rel=0.05)
    # read noise adds variance; more photons is less noisy
    assert degrade(clean, photons=20, read_noise=0.1, seed=5).var() > noisy.var() + 0.005
    assert degrade(clean, photons=200, read_noise=0.0, seed=5).var() < noisy.var() / 5


def test_degrade_blur_is_a_gaussian_filter_before_the_noise():
    from scipy import ndimage

    clean = phantom((64, 64), seed=0)
    photons = 1e6  # shot noise sd <= sqrt(1.1 / 1e6) ~ 1e-3
    blurred = degrade(clean, photons=photons, read_noise=0, background=0, blur_sigma=2.0)
    expected = ndimage.gaussian_filter(clean, 2.0)
    np.testing.assert_allclose(blurred, expected, atol=6 * math.sqrt(1.0 / photons))
    # the residual is shot noise of the blurred image: its variance is mean(expected) / photons
    assert np.var(blurred - expected) == pytest.approx(np.mean(expected) / photons, rel=0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(photons=0), "photons must be > 0"),
        (dict(photons=np.array([4.0, 0.0] * 4)), "photons must be > 0 everywhere, got an array"),
        (dict(photons=np.ones((3, 8))), "does not broadcast to the image's shape"),
        (dict(background=-1), "background must be >= 0"),
        (dict(read_noise=-0.1), "read_noise must be >= 0"),
        (dict(blur_sigma=-1), "blur_sigma must be >= 0"),
    ],
)
def test_degrade_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        degrade(np.zeros((8, 8)), **kwargs)


def test_degrade_with_a_photon_map_is_noisier_where_it_has_fewer_photons():
    """A photon budget falling along x (light-sheet attenuation) makes the right half noisier."""
    clean = np.full((64, 64), 0.5, dtype=np.float32)
    photons = np.geomspace(40.0, 2.5, 64)  # broadcasts along the last axis
    noisy = degrade(clean, photons=photons, background=0.1, read_noise=0.0, seed=3)
    assert noisy.shape == clean.shape
    var = (noisy - 0.6).var(axis=0)
    # shot-noise variance is (clean + background) / photons per column, within sampling error
    np.testing.assert_allclose(var[:8].mean(), np.mean(0.6 / photons[:8]), rtol=0.25)
    np.testing.assert_allclose(var[-8:].mean(), np.mean(0.6 / photons[-8:]), rtol=0.25)
    assert var[-8:].mean() > 8 * var[:8].mean()


def test_degrade_rejects_non_finite_input():
    with pytest.raises(InputError, match="finite"):
        degrade(np.array([[np.nan, 1.0]]))


# --- metrics -------------------------------------------------------------------------


def test_normalize_percentile_maps_percentiles_to_0_and_1():
    x = np.arange(1001, dtype=np.uint16)
    n = normalize_percentile(x, 1, 99)
    assert n.dtype == np.float32
    assert n[10] == pytest.approx(0, abs=1e-6) and n[990] == pytest.approx(1, abs=1e-6)
    with pytest.raises(ConfigError, match="0 <= pmin < pmax <= 100"):
        normalize_percentile(x, 99, 1)


def test_fit_affine_recovers_known_map():
    rng = np.random.default_rng(0)
    p = rng.normal(size=1000)
    alpha, beta = fit_affine(p, 2.5 * p - 0.7)
    assert (alpha, beta) == pytest.approx((2.5, -0.7))
    assert fit_affine(np.ones(10), np.arange(10.0)) == (0.0, 4.5)


@pytest.mark.parametrize("shape", [(96, 96), (24, 48, 48)])
def test_metrics_perfect_for_affinely_transformed_gt(shape):
    gt = phantom(shape, seed=1).astype(np.float64)
    pred = 3.0 * gt + 7.0
    assert nrmse(pred, gt) == pytest.approx(0, abs=1e-9)
    assert ssim(pred, gt) == pytest.approx(1, abs=1e-9)
    assert psnr(pred, gt) > 100


def _care_reference(pred, gt):
    """The CARE protocol written out independently: gt to percentiles (0.1, 99.9), pred fitted by lstsq."""
    gt = gt.astype(np.float64).ravel()
    lo, hi = np.percentile(gt, (0.1, 99.9))
    g = (gt - lo) / (hi - lo)
    a = np.stack([pred.astype(np.float64).ravel(), np.ones(pred.size)], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(a, g, rcond=None)
    return (alpha * pred.astype(np.float64) + beta).reshape(pred.shape), g.reshape(pred.shape)


@pytest.mark.parametrize("shape", [(96, 96), (24, 48, 48)])
def test_metrics_follow_the_care_protocol_and_rank_noisier_predictions_worse(shape):
    from skimage.metrics import structural_similarity

    gt = phantom(shape, seed=1)
    good = degrade(gt, photons=100, seed=2)
    bad = degrade(gt, photons=5, seed=2)
    for pred in (good, bad):
        p, g = _care_reference(pred, gt)
        mse = np.mean((p - g) ** 2)
        assert nrmse(pred, gt) == pytest.approx(math.sqrt(mse), rel=1e-9)
        assert psnr(pred, gt) == pytest.approx(10 * math.log10((g.max() - g.min()) ** 2 / mse), rel=1e-9)
        assert ssim(pred, gt) == pytest.approx(structural_similarity(g, p, win_size=7, data_range=g.max() - g.min()),
                                               rel=1e-9)
    assert nrmse(good, gt) < nrmse(bad, gt)
    assert ssim(bad, gt) < ssim(good, gt)
    assert psnr(bad, gt) < psnr(good, gt)


def test_nrmse_is_rmse_in_units_of_gt_percentile_range():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0, 10, size=(200, 200))
    noise = rng.normal(0, 0.5, size=gt.shape)
    # gt's (0.1, 99.9) range is ~10, the best affine fit barely rescales: NRMSE ~ 0.5 / 10
    assert nrmse(gt + noise, gt) == pytest.approx(0.05, rel=0.05)
    assert psnr(gt + noise, gt) == pytest.approx(20 * math.log10(1 / 0.05), abs=0.5)


def test_metrics_reject_shape_mismatch():
    with pytest.raises(InputError, match=r"same shape, got \(4, 4\) and \(4, 5\)"):
        nrmse(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(InputError, match="2D or 3D"):
        ssim(np.zeros(10), np.arange(10.0))


def test_ssim_works_on_thin_volumes():
    gt = phantom((5, 32, 32), seed=0)
    assert ssim(gt * 2, gt) == pytest.approx(1, abs=1e-6)


def test_spectral_isotropy_is_one_for_isotropic_and_low_for_axially_blurred_volumes():
    from scipy import ndimage

    from bigcare.metrics import spectral_isotropy

    rng = np.random.default_rng(0)
    noise = rng.random((48, 48, 48))
    iso = ndimage.gaussian_filter(noise, 1.0)
    assert 0.8 < spectral_isotropy(iso) < 1.25
    assert spectral_isotropy(ndimage.gaussian_filter(noise, (4.0, 1.0, 1.0))) < 0.2
