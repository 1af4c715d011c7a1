"""PSF models, measured PSFs and the kernels of isotropic restoration (bigcare.psf)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage, signal

from bigcare.errors import ConfigError, InputError
from bigcare.psf import (
    confocal_psf,
    fwhm,
    gaussian_psf,
    isotropic_kernels,
    lateral_kernel,
    lightsheet_psf,
    load_psf,
    rotate_psf,
    second_moment_sigma,
    split_psf,
    widefield_psf,
)

MEASURED = Path("/work/shared/data/llsm_psf_measured_skewed.tif")
# a water-immersion widefield setup, sampled finely enough to measure its widths
NA, WL, N = 0.8, 0.52, 1.33
VOXEL = (0.1, 0.05, 0.05)
SHAPE = (61, 33, 33)


@pytest.fixture(scope="module")
def widefield():
    return widefield_psf(NA, WL, N, VOXEL, SHAPE)


def assert_valid_psf(psf, centred=True):
    """float64, non-negative, sums to 1, odd sizes, centre of mass on the central voxel."""
    assert psf.dtype == np.float64
    assert psf.min() >= 0
    assert math.isclose(psf.sum(), 1.0, rel_tol=1e-9)
    assert all(s % 2 == 1 for s in psf.shape), psf.shape
    if centred:
        com = ndimage.center_of_mass(psf)
        np.testing.assert_allclose(com, [s // 2 for s in psf.shape], atol=0.05)


def conv_same_centre(a, b, shape):
    """Full convolution of a and b, cropped to ``shape`` about the centre."""
    r = signal.fftconvolve(a, b, mode="full")
    return r[tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(r.shape, shape))]


# ---------------------------------------------------------------------------- models
@pytest.mark.parametrize("kind", ["gaussian", "gaussian2d", "widefield", "confocal", "lightsheet"])
def test_every_model_psf_is_normalized_odd_and_centred(kind):
    psf = {
        "gaussian": lambda: gaussian_psf((0.5, 0.13, 0.2), (0.3, 0.07, 0.11)),
        "gaussian2d": lambda: gaussian_psf((0.13, 0.2), (0.07, 0.11)),
        "widefield": lambda: widefield_psf(NA, WL, N, (0.2, 0.09, 0.07), (21, 17, 15)),
        "confocal": lambda: confocal_psf(NA, 0.488, WL, N, (0.2, 0.09, 0.07), (21, 17, 15)),
        "lightsheet": lambda: lightsheet_psf(NA, WL, N, (0.2, 0.09, 0.07), (21, 17, 15), sheet_na=0.2),
    }[kind]()
    assert_valid_psf(psf)


def test_gaussian_psf_widths_with_anisotropic_voxels():
    sigma, voxel = (1.2, 0.25, 0.35), (0.4, 0.1, 0.12)
    psf = gaussian_psf(sigma, voxel)
    # default shape covers +-4 sigma: 2 * ceil(4 sigma / voxel) + 1
    assert psf.shape == (25, 21, 25)
    np.testing.assert_allclose(second_moment_sigma(psf, voxel), sigma, rtol=0.03)
    assert_valid_psf(psf)


def test_gaussian_psf_integrates_narrow_psfs_over_the_voxel():
    # sigma of a quarter voxel: point sampling would give a centre weight of ~1; the voxel
    # integral gives erf(2 / sqrt(2))
    psf = gaussian_psf((0.025, 0.025), (0.1, 0.1), shape=(5, 5))
    assert psf[2, 2] == pytest.approx(math.erf(2 / math.sqrt(2)) ** 2, rel=1e-6)


def test_widefield_lateral_and_axial_fwhm_match_paraxial_theory(widefield):
    fz, fy, fx = fwhm(widefield, VOXEL)
    assert fy == pytest.approx(0.51 * WL / NA, rel=0.10)
    assert fx == pytest.approx(fy, rel=1e-9)
    assert fz == pytest.approx(1.77 * N * WL / NA**2, rel=0.10)  # paraxial axial FWHM
    assert_valid_psf(widefield)


def test_widefield_has_a_dark_airy_ring_at_0_61_lambda_over_na(widefield):
    # first zero of the in-focus Airy pattern: r = 0.61 lambda / NA = 0.396 um, ~8 voxels
    profile = widefield[SHAPE[0] // 2, SHAPE[1] // 2, SHAPE[2] // 2:]
    first_min = int(np.argmin(profile[:12]))
    assert first_min * VOXEL[2] == pytest.approx(0.61 * WL / NA, abs=VOXEL[2])
    assert profile[first_min] < 0.02 * profile[0]


def test_widefield_averages_over_each_voxel():
    # coarse voxels (0.2 um, ~0.6 lateral FWHM) against a 3x finer PSF binned 3 x 3 x 3
    coarse = widefield_psf(NA, WL, N, (0.2, 0.2, 0.2), (5, 7, 7))
    fine = widefield_psf(NA, WL, N, (0.2 / 3,) * 3, (15, 21, 21))
    binned = fine.reshape(5, 3, 7, 3, 7, 3).sum(axis=(1, 3, 5))
    np.testing.assert_allclose(coarse, binned, atol=0.03 * coarse.max())


def test_confocal_is_about_sqrt2_narrower_than_widefield(widefield):
    confocal = confocal_psf(NA, WL, WL, N, VOXEL, SHAPE)
    ratio = np.array(fwhm(confocal, VOXEL)) / np.array(fwhm(widefield, VOXEL))
    np.testing.assert_allclose(ratio, 1 / math.sqrt(2), rtol=0.15)
    assert_valid_psf(confocal)


def test_lightsheet_multiplies_by_the_sheet_profile_and_shortens_the_axial_psf(widefield):
    sheet_na = 0.1
    sheet = lightsheet_psf(NA, WL, N, VOXEL, SHAPE, sheet_na=sheet_na)
    s = WL / (math.pi * sheet_na) / 2  # sigma = w0 / 2
    cy, cx = SHAPE[1] // 2, SHAPE[2] // 2
    ratio = sheet[:, cy, cx] / widefield[:, cy, cx]
    z = (np.arange(SHAPE[0]) - SHAPE[0] // 2) * VOXEL[0]
    near = np.abs(z) < 2 * s
    np.testing.assert_allclose((ratio / ratio[SHAPE[0] // 2])[near], np.exp(-(z**2) / (2 * s**2))[near],
                               rtol=0.02)
    assert fwhm(sheet, VOXEL)[0] < 0.8 * fwhm(widefield, VOXEL)[0]
    assert fwhm(sheet, VOXEL)[1] == pytest.approx(fwhm(widefield, VOXEL)[1], rel=0.02)
    # sheet_sigma gives the same PSF as the equivalent sheet_na
    np.testing.assert_allclose(lightsheet_psf(NA, WL, N, VOXEL, SHAPE, sheet_sigma=s), sheet, rtol=1e-12)


# ---------------------------------------------------------------------------- rotation, kernels
def test_rotate_psf_with_isotropic_voxels_is_exactly_the_transpose():
    rng = np.random.default_rng(0)
    psf = rng.random((5, 7, 9))
    rotated, voxel = rotate_psf(psf, (0.2, 0.2, 0.2), axis="y")
    assert voxel == 0.2
    np.testing.assert_array_equal(rotated, np.swapaxes(psf / psf.sum(), 0, 1))
    rotated_x, _ = rotate_psf(psf, (0.2, 0.2, 0.2), axis="x")
    np.testing.assert_array_equal(rotated_x, np.swapaxes(psf / psf.sum(), 0, 2))


def test_rotate_psf_resamples_anisotropic_voxels_and_swaps_the_widths():
    sigma, voxel = (1.2, 0.2, 0.3), (0.4, 0.1, 0.1)
    psf = gaussian_psf(sigma, voxel)
    rotated, iso = rotate_psf(psf, voxel, axis="y")
    assert iso == 0.1
    assert rotated.shape == (psf.shape[1], 8 * (psf.shape[0] // 2) + 1, psf.shape[2])
    np.testing.assert_allclose(second_moment_sigma(rotated, (iso,) * 3), (0.2, 1.2, 0.3), rtol=0.03)
    assert_valid_psf(rotated)
    rotated_x, _ = rotate_psf(psf, voxel, axis="x")
    np.testing.assert_allclose(second_moment_sigma(rotated_x, (iso,) * 3), (0.3, 0.2, 1.2), rtol=0.03)


def test_lateral_kernel_is_the_normalized_projection():
    psf = gaussian_psf((0.6, 0.2, 0.3), (0.2, 0.1, 0.1))
    kernel = lateral_kernel(psf)
    np.testing.assert_allclose(kernel, gaussian_psf((0.2, 0.3), (0.1, 0.1)), atol=1e-12)
    assert lateral_kernel(psf, axis=1).shape == (psf.shape[0], psf.shape[2])


def test_isotropic_kernels_of_a_gaussian_psf():
    sz, sxy, voxel = 0.8, 0.2, (0.4, 0.1, 0.1)
    kernels = isotropic_kernels(gaussian_psf((sz, sxy, sxy), voxel), voxel)
    assert kernels["voxel"] == 0.1
    full, lateral, split = kernels["full"], kernels["lateral"], kernels["split"]
    # full: axis 0 is the original Z (degradation direction), axis 1 lateral
    np.testing.assert_allclose(second_moment_sigma(full, (0.1, 0.1)), (sz, sxy), rtol=0.03)
    np.testing.assert_allclose(second_moment_sigma(lateral, (0.1, 0.1)), (sxy, sxy), rtol=0.03)
    split_sigma = second_moment_sigma(split, (0.1, 0.1))
    assert split_sigma[0] == pytest.approx(math.sqrt(sz**2 - sxy**2), rel=0.05)
    assert split_sigma[1] < 0.4 * sxy
    assert split.shape == full.shape
    assert isotropic_kernels(gaussian_psf((sz, sxy, sxy), voxel), voxel, split=False)["split"] is None


@pytest.mark.parametrize("sz, sxy", [(0.8, 0.2), (0.6, 0.3)])
def test_split_psf_of_gaussians_recovers_the_difference_and_reproduces_full(sz, sxy):
    full = gaussian_psf((sz, sxy), (0.1, 0.1))
    iso = gaussian_psf((sxy, sxy), (0.1, 0.1))
    split = split_psf(full, iso)
    assert_valid_psf(split)
    var = np.array(second_moment_sigma(split, (0.1, 0.1))) ** 2
    assert var[0] == pytest.approx(sz**2 - sxy**2, rel=0.10)
    assert var[1] < 0.15 * sxy**2  # ~0: no extra lateral blur
    rebuilt = conv_same_centre(iso, split, full.shape)
    assert np.linalg.norm(rebuilt - full) / np.linalg.norm(full) < 0.05


def test_split_psf_in_3d():
    full = gaussian_psf((0.6, 0.2, 0.3), (0.1, 0.1, 0.1))
    iso = gaussian_psf((0.2, 0.2, 0.2), (0.1, 0.1, 0.1))
    split = split_psf(full, iso)
    assert split.shape == full.shape
    var = np.array(second_moment_sigma(split, (0.1,) * 3)) ** 2
    np.testing.assert_allclose(var[[0, 2]], [0.6**2 - 0.2**2, 0.3**2 - 0.2**2], rtol=0.10)
    assert var[1] < 0.15 * 0.2**2


def test_fwhm_of_a_sampled_gaussian():
    psf = gaussian_psf((0.0, 0.5), (0.1, 0.05), shape=(1, 81))
    # 2 sqrt(2 ln 2) sigma along x; NaN along the 1-voxel axis (never falls to half); a delta
    # is 1 voxel wide (linear interpolation between samples)
    width = fwhm(psf, (0.1, 0.05))
    assert math.isnan(width[0])
    assert width[1] == pytest.approx(2 * math.sqrt(2 * math.log(2)) * 0.5, rel=0.01)
    delta = np.zeros((3, 3))
    delta[1, 1] = 1
    assert fwhm(delta, (0.2, 0.3)) == pytest.approx((0.2, 0.3))


# ---------------------------------------------------------------------------- measured PSFs
def test_load_psf_of_the_measured_lattice_psf():
    if not MEASURED.is_file():
        pytest.skip(f"{MEASURED} not available")
    psf = load_psf(MEASURED, (0.1, 0.1, 0.1))
    assert_valid_psf(psf, centred=False)
    assert psf.ndim == 3
    centre = np.array([s // 2 for s in psf.shape])
    assert np.unravel_index(np.argmax(psf), psf.shape) == tuple(centre)
    np.testing.assert_allclose(ndimage.center_of_mass(psf), centre, atol=0.5)
    # the camera background (~145 counts) and its noise floor (~800k voxels) are gone: the
    # mass sits within +-1.5 um laterally of the bead, as a bead's should
    cy, cx = centre[1:]
    assert psf[:, cy - 15:cy + 16, cx - 15:cx + 16].sum() > 0.99
    assert second_moment_sigma(psf, (0.1, 0.1, 0.1))[1] < 0.3
    coarse = load_psf(MEASURED, (0.1, 0.1, 0.1), target_voxel_size=(0.3, 0.1, 0.1), shape=(21, 41, 41))
    assert coarse.shape == (21, 41, 41)
    assert_valid_psf(coarse, centred=False)
    peak = np.unravel_index(np.argmax(coarse), coarse.shape)
    assert np.abs(np.array(peak) - [10, 20, 20]).max() <= 1


def write_bead(path, noise=0.0):
    """A Gaussian bead off the centre of a uint16 TIFF, over a constant background of 100."""
    sigma, voxel = (0.6, 0.2, 0.25), (0.2, 0.1, 0.1)
    bead = gaussian_psf(sigma, voxel, shape=(31, 41, 41))
    data = np.zeros((36, 50, 47))
    data[2:33, 6:47, 1:42] = bead / bead.max() * 5000
    data += 100 + noise * np.random.default_rng(0).standard_normal(data.shape)
    tifffile.imwrite(path, np.round(data).astype(np.uint16))
    return path, sigma, voxel


@pytest.fixture
def gaussian_bead(tmp_path):
    return write_bead(tmp_path / "bead.tif")


def test_load_psf_removes_the_background_and_centres_the_bead(gaussian_bead):
    path, sigma, voxel = gaussian_bead
    psf = load_psf(path, voxel)
    assert_valid_psf(psf)
    np.testing.assert_allclose(second_moment_sigma(psf, voxel), sigma, rtol=0.05)
    # without background subtraction the constant 100 dominates the second moments
    kept = load_psf(path, voxel, background=None)
    assert second_moment_sigma(kept, voxel)[1] > 1.5 * sigma[1]
    # a numeric background works as well as "auto"
    np.testing.assert_allclose(load_psf(path, voxel, background=100), psf, atol=1e-12)


def test_load_psf_removes_the_noise_floor_of_a_noisy_bead(tmp_path):
    path, sigma, voxel = write_bead(tmp_path / "noisy.tif", noise=10.0)
    psf = load_psf(path, voxel)
    assert_valid_psf(psf, centred=False)
    np.testing.assert_allclose(ndimage.center_of_mass(psf), [s // 2 for s in psf.shape], atol=0.5)
    np.testing.assert_allclose(second_moment_sigma(psf, voxel), sigma, rtol=0.05)


def test_load_psf_resamples_npy_and_crops_to_shape(gaussian_bead, tmp_path):
    path, sigma, voxel = gaussian_bead
    npy = tmp_path / "bead.npy"
    np.save(npy, tifffile.imread(path))
    target = (0.4, 0.4, 0.1)
    psf = load_psf(npy, voxel, target_voxel_size=target, shape=(9, 7, 25))
    assert psf.shape == (9, 7, 25)
    assert_valid_psf(psf)
    # coarse voxels integrate over their width: variance sigma^2 + target^2 / 12 (y: 0.231,
    # where point sampling the 0.1 um voxels would give 0.202)
    expected = [math.sqrt(s**2 + t**2 / 12) for s, t in zip(sigma, target)]
    np.testing.assert_allclose(second_moment_sigma(psf, target), expected, rtol=0.03)


# ---------------------------------------------------------------------------- errors
def test_errors_name_the_bad_parameter(tmp_path):
    with pytest.raises(ConfigError, match=r"na must not exceed refractive_index=1\.33, got na=1\.4"):
        widefield_psf(1.4, WL, 1.33, VOXEL, SHAPE)
    with pytest.raises(ConfigError, match=r"voxel_size must be positive.*-0\.1"):
        gaussian_psf((0.3, 0.3, 0.3), (-0.1, 0.1, 0.1))
    with pytest.raises(ConfigError, match=r"voxel_size must have 3 entries"):
        widefield_psf(NA, WL, N, (0.1, 0.1), SHAPE)
    with pytest.raises(ConfigError, match=r"shape must be 3 odd positive ints.*32"):
        widefield_psf(NA, WL, N, VOXEL, (32, 33, 33))
    with pytest.raises(ConfigError, match="exactly one of sheet_na and sheet_sigma"):
        lightsheet_psf(NA, WL, N, VOXEL, SHAPE)
    with pytest.raises(ConfigError, match="exactly one of sheet_na and sheet_sigma"):
        lightsheet_psf(NA, WL, N, VOXEL, SHAPE, sheet_na=0.1, sheet_sigma=0.5)
    with pytest.raises(ConfigError, match=r"equal lateral voxel sizes.*y=0\.1, x=0\.2"):
        rotate_psf(np.ones((3, 3, 3)), (0.3, 0.1, 0.2))
    with pytest.raises(ConfigError, match=r"axis must be 'y' or 'x', got 'z'"):
        rotate_psf(np.ones((3, 3, 3)), (0.3, 0.1, 0.1), axis="z")
    with pytest.raises(ConfigError, match=r"psf must be 3D, got ndim=2"):
        lateral_kernel(np.ones((3, 3)))
    with pytest.raises(ConfigError, match=r"eps must be a finite number > 0, got 0"):
        split_psf(np.ones((3, 3)), np.ones((3, 3)), eps=0)
    missing = tmp_path / "no_such_psf.tif"
    with pytest.raises(InputError, match="no_such_psf.tif"):
        load_psf(missing, (0.1, 0.1, 0.1))
    flat = tmp_path / "flat.npy"
    np.save(flat, np.full((9, 11, 11), 100.0))
    with pytest.raises(InputError, match="flat.npy.*no signal above the background 100"):
        load_psf(flat, (0.1, 0.1, 0.1))
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"not a tiff")
    with pytest.raises(InputError, match="cannot read PSF file.*garbage.tif"):
        load_psf(garbage, (0.1, 0.1, 0.1))
