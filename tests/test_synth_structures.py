"""Blockwise synthetic structures (tubules, granules), their acquisition and the OME-Zarr writer."""

from __future__ import annotations

import numpy as np
import pytest

from bigcare.errors import ConfigError
from bigcare.psf import fwhm as psf_fwhm
from bigcare.resolution import fit_gaussian, granule_fwhm, tubule_fwhm
from bigcare.synth import Background, Granules, Microscope, Nuclei, Tubules, acquire, clean, make_psf, structures_of, write_synthetic

V2 = (0.05, 0.05)
V3 = (0.2, 0.1, 0.1)


def _tangent_correlation(paths, voxel, lags):
    out = []
    for lag in lags:
        dots = []
        for p, _ in paths:
            t = np.diff(p * np.asarray(voxel), axis=0)
            t /= np.linalg.norm(t, axis=1, keepdims=True)
            if len(t) > lag:
                dots.append(np.sum(t[:-lag] * t[lag:], axis=1))
        out.append(np.concatenate(dots).mean())
    return np.array(out)


@pytest.mark.parametrize("structure", [Tubules(density=0.1), Granules(density=2.0)])
def test_generators_are_deterministic_per_seed(structure):
    a = structure.render((96, 80), V2, seed=4)
    np.testing.assert_array_equal(a, structure.render((96, 80), V2, seed=4))
    assert not np.array_equal(a, structure.render((96, 80), V2, seed=5))
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() > 0.2


@pytest.mark.parametrize("region", [((0, 37), (0, 50)), ((37, 96), (21, 80)), ((5, 6), (79, 80))])
def test_block_generated_alone_equals_region_of_whole_2d(region):
    structures = [Tubules(density=0.2, width=0.12), Granules(density=3.0)]
    whole = clean(structures, (96, 80), V2, seed=1)
    block = clean(structures, (96, 80), V2, seed=1, region=region)
    np.testing.assert_array_equal(block, whole[tuple(slice(a, b) for a, b in region)])


def test_block_generated_alone_equals_region_of_whole_3d():
    structures = [Tubules(density=0.5, length=(1.0, 3.0), width=0.3), Granules(density=4.0, size=(0.2, 0.4))]
    shape, region = (20, 40, 36), ((3, 17), (0, 23), (11, 36))
    whole = clean(structures, shape, V3, seed=2)
    block = clean(structures, shape, V3, seed=2, region=region)
    np.testing.assert_array_equal(block, whole[tuple(slice(a, b) for a, b in region)])
    assert whole.max() > 0.3


@pytest.mark.parametrize("downsample", [1, 2])
def test_acquired_block_equals_region_of_whole_acquisition(downsample):
    psf = make_psf({"kind": "widefield", "na": 0.8, "wavelength": 0.52}, V2, 2)
    microscope = Microscope(psf=psf, background=Background(amplitude=0.3, scale=1.0), photons=20,
                            read_noise=0.02, downsample=downsample)
    structures = [Tubules(density=0.2), Granules(density=2.0)]
    shape = (96, 128)
    whole = acquire(structures, shape, V2, microscope, seed=3)
    assert whole.shape == (96 // downsample, 128 // downsample)
    np.testing.assert_array_equal(whole, acquire(structures, shape, V2, microscope, seed=3))
    region = ((7, 40 // downsample), (30 // downsample, 128 // downsample))
    block = acquire(structures, shape, V2, microscope, seed=3, region=region)
    np.testing.assert_allclose(block, whole[tuple(slice(a, b) for a, b in region)], atol=1e-5)


def test_background_is_smooth_blockwise_and_bounded():
    bg = Background(amplitude=0.5, scale=2.0, octaves=3)
    whole = bg.render(((0, 200), (0, 150)), V2, seed=9)
    part = bg.render(((60, 90), (-20, 70)), V2, seed=9)  # also outside the volume: a pure function of place
    np.testing.assert_array_equal(part[:, 20:], whole[60:90, :70])
    assert 0 <= whole.min() and whole.max() <= 0.5 and whole.std() > 0.02
    # low-frequency: neighbouring pixels differ far less than the background varies
    assert np.abs(np.diff(whole, axis=1)).mean() < 0.05 * whole.std() * 10


@pytest.mark.parametrize("ndim", [2, 3])
def test_tubule_tangent_correlation_decays_with_the_persistence_length(ndim):
    persistence = 2.0
    tubules = Tubules(density=3.0 if ndim == 2 else 10.0, length=(6.0, 6.0), persistence=persistence)
    voxel = (0.05,) * ndim
    shape = (130,) * ndim if ndim == 2 else (40, 40, 40)
    paths = tubules.paths(shape, voxel, seed=0)
    assert len(paths) > 100
    ds = 0.5 * 0.05
    lags = [int(s / ds) for s in (0.5, 1.0, 2.0)]
    measured = _tangent_correlation(paths, voxel, lags)
    expected = np.exp(-np.array([0.5, 1.0, 2.0]) / persistence)
    np.testing.assert_allclose(measured, expected, atol=0.05)
    # chain lengths follow the parameter
    lengths = [np.linalg.norm(np.diff(p * 0.05, axis=0), axis=1).sum() for p, _ in paths]
    assert np.allclose(lengths, 6.0, atol=ds)


@pytest.mark.parametrize("width", [0.15, 0.3])
def test_tubule_cross_sections_have_the_width_as_fwhm(width):
    tubules = Tubules(density=0.01, length=(6.0, 8.0), persistence=50.0, width=width, brightness=(1.0, 1.0))
    shape = (256, 256)
    image = tubules.render(shape, V2, seed=1)
    paths = [p for p, _ in tubules.paths(shape, V2, seed=1)]
    widths = tubule_fwhm(image, paths, V2, half_length=3 * width)
    assert len(widths) > 10
    assert np.median(widths) == pytest.approx(width, rel=0.05)
    assert image.max() == pytest.approx(1.0, rel=0.15)  # the peak of a lone tubule is its brightness


def test_granules_have_their_size_as_fwhm():
    granules = Granules(density=0.5, size=(0.2, 0.2), brightness=(1.0, 1.0))
    shape = (200, 200)
    image = granules.render(shape, V2, seed=2)
    rows = granules.points(shape, V2, seed=2)
    inside = rows[np.all((rows[:, :2] > 0) & (rows[:, :2] < 200), axis=1)]
    sizes = granule_fwhm(image, inside[:, :2], V2, radius=6)
    assert len(sizes) > 10
    np.testing.assert_allclose(np.median(sizes, axis=0), 0.2, rtol=0.03)


@pytest.mark.parametrize("kind", ["gaussian", "widefield"])
def test_fwhm_of_psf_degraded_granules_matches_the_psf(kind):
    spec = {"kind": "gaussian", "fwhm": 0.3} if kind == "gaussian" else {"kind": "widefield", "na": 0.8, "wavelength": 0.52}
    psf = make_psf(spec, V2, 2)
    granules = Granules(density=0.4, size=(0.02, 0.02), brightness=(1.0, 1.0))  # far below the PSF
    microscope = Microscope(psf=psf, photons=1e5, read_noise=0.0)
    shape = (256, 256)
    image = acquire([granules], shape, V2, microscope, seed=5)
    rows = granules.points(shape, V2, seed=5)
    inside = rows[np.all((rows[:, :2] > 10) & (rows[:, :2] < 246), axis=1)]
    measured = np.median(granule_fwhm(image, inside[:, :2], V2, radius=8, isolation=20), axis=0)
    reference = fit_gaussian(psf, V2)["fwhm"]  # the same Gaussian fit, on the PSF itself
    np.testing.assert_allclose(measured, reference, rtol=0.05)
    np.testing.assert_allclose(measured, psf_fwhm(psf, V2), rtol=0.1)


def test_noise_is_poisson_plus_gaussian():
    flat = Granules(density=1e-9)  # nothing: the image is offset + noise
    m = Microscope(photons=20, offset=0.5, read_noise=0.05)
    y = acquire([flat], (200, 200), V2, m, seed=1)
    assert y.mean() == pytest.approx(0.5, abs=0.01)
    assert y.var() == pytest.approx(0.5 / 20 + 0.05**2, rel=0.05)


def test_write_synthetic_writes_the_pair_chunk_by_chunk(tmp_path):
    from bigcare.store.volume import open_volume

    structures = structures_of("tubules+granules", density=0.3)
    microscope = Microscope(psf=make_psf({"kind": "gaussian", "fwhm": 0.25}, V2, 2), downsample=2,
                            background=Background())
    noisy, truth = write_synthetic(tmp_path / "in.ome.zarr", tmp_path / "gt.ome.zarr", (96, 160), structures,
                                   microscope, voxel_size=V2, chunks=(32, 48), seed=7)
    assert truth.shape == (96, 160) and noisy.shape == (48, 80)
    assert open_volume(noisy.url).scale == pytest.approx((0.1, 0.1))
    np.testing.assert_array_equal(truth.array()[:], clean(structures, (96, 160), V2, seed=7))
    np.testing.assert_allclose(noisy.array()[:], acquire(structures, (96, 160), V2, microscope, seed=7), atol=1e-5)
    assert open_volume(truth.url).attrs["bigcare"]["complete"] is True


def test_nuclei_kind_is_the_phantom():
    from bigcare.synth import phantom

    (nuclei,) = structures_of("nuclei", n_nuclei=5)
    assert isinstance(nuclei, Nuclei)
    np.testing.assert_array_equal(nuclei.render((40, 50), V2, seed=3, region=((10, 30), (0, 50))),
                                  phantom((40, 50), n_nuclei=5, seed=3)[10:30])


@pytest.mark.parametrize("make, message", [
    (lambda: Tubules(persistence=-1), "tubules persistence must be a number > 0"),
    (lambda: Tubules(length=(5, 2)), "tubules length must have low <= high"),
    (lambda: Granules(size=(0.1, -1)), "granules size must be a number > 0"),
    (lambda: Microscope(downsample=1.5), "downsample must be a whole number"),
    (lambda: Microscope(psf=np.ones((4, 4))), "odd size"),
    (lambda: make_psf({"kind": "airy"}, V2, 2), "psf kind must be gaussian, widefield"),
    (lambda: make_psf({"kind": "widefield", "na": 0.8}, V2, 2), "needs the parameter 'wavelength'"),
    (lambda: structures_of("fibres"), "kind must be one of"),
    (lambda: Tubules().render((10,), V2), "shape must be 2 or 3"),
    (lambda: Tubules().render((10, 10), V2, region=((0, 0), (0, 5))), "non-empty"),
])
def test_bad_parameters_are_named(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_cli_synth_writes_tubules_through_a_psf(tmp_path, capsys):
    from bigcare.cli import main
    from bigcare.store.volume import open_volume

    out = tmp_path / "syn"
    assert main(["synth", str(out), "--kind", "tubules+granules", "--psf", "widefield:na=0.8,wavelength=0.52",
                 "--shape", "96,64", "--count", "1", "--downsample", "2", "--background", "0.1"]) == 0
    noisy, truth = open_volume(out / "noisy_0.ome.zarr"), open_volume(out / "clean_0.ome.zarr")
    assert noisy.shape == (48, 32) and truth.shape == (96, 64)
    assert noisy.scale == pytest.approx((0.08, 0.08)) and truth.scale == pytest.approx((0.04, 0.04))
    assert main(["synth", str(tmp_path / "bad"), "--kind", "tubules", "--psf", "airy", "--shape", "64,64"]) == 2
    assert "psf kind must be gaussian, widefield, confocal or file, got 'airy'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
