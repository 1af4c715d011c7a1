"""Resolution measurements: Gaussian-fit FWHM and Fourier ring/shell correlation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from bigcare.errors import InputError
from bigcare.resolution import FWHM_PER_SIGMA, fit_gaussian, frc, frc_resolution, granule_fwhm, tubule_fwhm


def test_fwhm_of_a_rendered_gaussian_equals_its_width_1d():
    x = (np.arange(41) - 20.3) * 0.1
    profile = 0.2 + 3.0 * np.exp(-x**2 / (2 * 0.25**2))
    fit = fit_gaussian(profile, 0.1)
    assert fit["fwhm"][0] == pytest.approx(FWHM_PER_SIGMA * 0.25, rel=1e-6)
    assert fit["centre"][0] == pytest.approx(0.03, abs=1e-6)
    assert fit["amplitude"] == pytest.approx(3.0, rel=1e-6) and fit["offset"] == pytest.approx(0.2, abs=1e-6)


def test_fwhm_of_an_anisotropic_gaussian_patch_per_axis():
    y, x = np.meshgrid((np.arange(21) - 10) * 0.2, (np.arange(25) - 12) * 0.1, indexing="ij")
    patch = np.exp(-y**2 / (2 * 0.5**2) - x**2 / (2 * 0.3**2))
    fit = fit_gaussian(patch, (0.2, 0.1))
    np.testing.assert_allclose(fit["fwhm"], (FWHM_PER_SIGMA * 0.5, FWHM_PER_SIGMA * 0.3), rtol=1e-6)


def test_fit_gaussian_refuses_what_is_not_a_peak():
    assert fit_gaussian(np.zeros(15)) is None
    assert fit_gaussian(-np.exp(-((np.arange(21) - 10) ** 2) / 8)) is None  # a dip
    assert fit_gaussian(np.full(21, np.nan)) is None


def test_tubule_fwhm_on_a_straight_line_of_known_width():
    image = np.zeros((64, 64))
    image[:, 30] = 1.0
    image = ndimage.gaussian_filter(image, (0, 2.0))
    path = np.column_stack([np.arange(64.0), np.full(64, 30.0)])
    widths = tubule_fwhm(image, [path], 0.05, every=0.05)
    assert len(widths) > 30
    np.testing.assert_allclose(widths, FWHM_PER_SIGMA * 2.0 * 0.05, rtol=0.01)
    # a second line nearby: its profiles are skipped as not isolated
    image2 = image + np.roll(image, 5, axis=1)
    assert len(tubule_fwhm(image2, [path, path + [0, 5]], 0.05, every=0.2)) == 0
    with pytest.raises(InputError, match="2D images"):
        tubule_fwhm(np.zeros((4, 4, 4)), [path], 0.05)


def test_granule_fwhm_of_gaussian_spots():
    image = np.zeros((80, 80))
    centres = np.array([[20.0, 20.0], [20.0, 60.0], [60.0, 40.0], [61.0, 43.0]])  # the last two too close
    for c in centres:
        yy, xx = np.mgrid[:80, :80]
        image += np.exp(-((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / (2 * 1.5**2))
    sizes = granule_fwhm(image, centres, 0.1, radius=6)
    assert sizes.shape == (2, 2)
    np.testing.assert_allclose(sizes, FWHM_PER_SIGMA * 0.15, rtol=1e-3)


def _texture(shape, sigma, seed):
    return ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma, mode="wrap")


def test_frc_is_one_for_identical_images_and_near_zero_for_independent_noise():
    a = _texture((128, 128), 1.0, 0)
    _, same = frc(a, a)
    np.testing.assert_allclose(same, 1.0, atol=1e-9)
    rng = np.random.default_rng(1)
    _, indep = frc(rng.standard_normal((128, 128)), rng.standard_normal((128, 128)))
    assert np.abs(indep[2:]).mean() < 0.1


@pytest.mark.parametrize("shape", [(256, 256), (48, 64, 64)])
def test_frc_resolution_follows_the_blur_as_theory_says(shape):
    # signal: white noise blurred by a Gaussian of sigma px; two realisations with independent white noise.
    # FRC = S / (S + N), S(q) = S0 exp(-(2 pi sigma q)^2): 1/7 where S(q) = N / 6
    out = {}
    for sigma in (1.5, 3.0):
        raw = np.random.default_rng(2).standard_normal(shape)
        signal = ndimage.gaussian_filter(raw, sigma, mode="wrap")
        k2 = np.sum(ndimage.gaussian_filter(np.pad([1.0], 20), sigma) ** 2) ** len(shape)
        gain = 1 / np.sqrt(k2)  # unit-variance signal: its spectrum starts at S0 = 1 / k2
        noise_sd = 0.5
        rng = np.random.default_rng(3)
        a, b = (signal * gain + rng.normal(0, noise_sd, shape) for _ in range(2))
        q = math.sqrt(math.log(6 * gain**2 / noise_sd**2)) / (2 * math.pi * sigma)
        out[sigma] = frc_resolution(a, b, 0.1)
        assert out[sigma] == pytest.approx(0.1 / q, rel=0.12)
    assert out[3.0] > 1.7 * out[1.5]


def test_frc_refuses_mismatched_images():
    with pytest.raises(InputError, match="same shape"):
        frc(np.zeros((16, 16)), np.zeros((16, 17)))
