"""Isotropic training data: lateral slices degraded like axial ones, and `bigcare train` with it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

import bigcare
from bigcare.blocks.zoom import upsample_rows, zoom_length
from bigcare.errors import ConfigError
from bigcare.models import load_model
from bigcare.training import train
from bigcare.training.isotropic import LateralDegradation, degrade_batches
from conftest import read, write_volume


def _gaussian_rows(sigma: float) -> np.ndarray:
    r = int(np.ceil(4 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return (k / k.sum())[:, None]  # 2D kernel blurring along axis 0 only


def _row_spectrum(images: np.ndarray) -> np.ndarray:
    """Mean power spectrum along axis -2 (rows) of a stack of 2D images, normalized to sum 1."""
    window = np.hanning(images.shape[-2])[:, None]
    p = np.abs(np.fft.rfft((images - images.mean(axis=-2, keepdims=True)) * window, axis=-2)) ** 2
    p = p.mean(axis=tuple(i for i in range(p.ndim) if i != p.ndim - 2))
    return p / p.sum()


def test_degraded_lateral_slices_match_axial_slices_in_resolution():
    """A lateral slice degraded for training has the axial slices' spectrum along the degraded axis."""
    rng = np.random.default_rng(0)
    n, sxy, sz, factor = 112, 1.0, 3.0, 4
    points = np.zeros((n, n, n), np.float32)
    idx = rng.integers(0, n, size=(3, 10000))
    points[tuple(idx)] = rng.uniform(0.5, 1.0, idx.shape[1])
    iso = ndimage.gaussian_filter(points, sxy)  # what lateral slices look like in every direction
    # the microscope: extra axial blur, Z sampled every `factor` planes, then the engine's upsampling
    aniso = ndimage.gaussian_filter1d(iso, np.sqrt(sz**2 - sxy**2), axis=0)[::factor]
    up = upsample_rows(aniso, 0, factor, 0, 0, zoom_length(len(aniso), factor))
    axial = up[:, 24:88, 24:88].transpose(1, 0, 2)  # XZ slices: rows are Z

    degradation = LateralDegradation.build(_gaussian_rows(np.sqrt(sz**2 - sxy**2)), factor)
    m = degradation.margin
    lateral = iso[::6, 24 - m:88 + m, 24 - m:88 + m][:, None]  # (B, 1, H, W) lateral slices
    x, y = degradation(lateral, np.random.default_rng(1))
    assert x.shape == y.shape == (len(lateral), 1, 64, 64)

    s_axial, s_degraded, s_lateral = (_row_spectrum(a[..., :64, :]) for a in (axial, x[:, 0], y[:, 0]))
    f = np.fft.rfftfreq(64)
    high = f > 0.08  # beyond the axial cut-off, where lateral slices still have detail

    def energy(s):
        return s[high].sum()

    assert energy(s_lateral) > 3 * energy(s_axial)  # the problem is real: lateral is much sharper
    assert abs(energy(s_degraded) / energy(s_axial) - 1) < 0.3  # and the degradation reproduces axial
    np.testing.assert_allclose(s_degraded[~high], s_axial[~high], atol=0.03)


def test_degradation_is_reproducible_and_handles_non_integer_factors():
    rng = np.random.default_rng(0)
    y = rng.random((3, 1, 40, 40)).astype(np.float32)
    degradation = LateralDegradation.build(_gaussian_rows(1.5), 2.5)
    batches = [(None, y), (None, y)]
    a = list(degrade_batches(batches, degradation, seed=7))
    b = list(degrade_batches(batches, degradation, seed=7))
    np.testing.assert_array_equal(a[0][0], b[0][0])
    assert not np.array_equal(a[0][0], a[1][0])  # each batch draws its own sub-voxel phases
    p = 40 - 2 * degradation.margin
    assert a[0][0].shape == (3, 1, p, p) and np.isfinite(a[0][0]).all()
    # blurred and subsampled along rows only: columns keep more high-frequency energy than rows
    x = a[0][0][:, 0]
    assert np.abs(np.diff(x, axis=2)).mean() > 2 * np.abs(np.diff(x, axis=1)).mean()


@pytest.fixture(scope="module")
def aniso_volume(tmp_path_factory):
    from bigcare.synth import phantom

    root = tmp_path_factory.mktemp("iso")
    gt = phantom((40, 128, 128), seed=2).astype(np.float32)
    aniso = ndimage.gaussian_filter(gt, (2.5, 1.0, 1.0))[::2]  # axial blur, Z sampled every 2nd plane
    data = (aniso / aniso.max() * 3000 + 100).astype(np.uint16)
    write_volume(str(root / "vol.ome.zarr"), data, chunks=(10, 64, 64), scale=(2.0, 1.0, 1.0))
    return root / "vol.ome.zarr", data


def iso_config(path, model_dir, patch: int = 16) -> dict:
    """A seconds-long isotropic training config of one volume."""
    return {
        "model_dir": str(model_dir),
        "data": {"sources": [{"input": str(path)}], "patch_shape": [patch, patch], "n_patches": 40},
        "network": {"depth": 1, "n_filter_base": 4, "kernel_size": 3},
        "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4},
        "isotropic": {"psf": {"kind": "gaussian", "sigma_xy": 1.0, "sigma_z": 2.5}},
    }


def test_train_isotropic_from_config_and_restore(aniso_volume, tmp_path, client):
    path, data = aniso_volume
    config = iso_config(path, tmp_path / "m")
    result = train(config, client=client, progress=False)
    assert result.epochs == 1 and np.isfinite(result.train_loss).all()
    _, cfg = load_model(tmp_path / "m" / "best")
    assert cfg.kind == "isotropic" and cfg.axes == "YX"
    assert cfg.isotropic.factor == pytest.approx(2.0)
    assert cfg.isotropic.psf["kind"] == "gaussian" and cfg.isotropic.psf["split"] is True
    assert cfg.isotropic.psf["noise"] is True and cfg.isotropic.psf["phase"] == "continuous"  # the defaults
    out = tmp_path / "out.ome.zarr"
    bigcare.restore(str(path), str(out), tmp_path / "m" / "best", client=client, block_shape=(16, 32, 32),
                    progress=False)
    got = read(str(out))
    assert got.shape == (zoom_length(len(data), 2.0), 128, 128)
    ref = bigcare.predict(data, tmp_path / "m" / "best", axes="zyx")["restored"]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("change, message", [
    ({"data": {"sources": [{"input": "x", "target": "y"}], "patch_shape": [16, 16]}}, "without 'target'"),
    ({"data": {"sources": [{"input": "x"}], "patch_shape": [8, 16, 16]}}, "2D patches"),
    ({"isotropic": {"psf": {"kind": "airy"}}}, "isotropic.psf.kind"),
])
def test_isotropic_config_errors_name_the_problem(tmp_path, change, message):
    from bigcare.training import load_train_config

    config = {"model_dir": str(tmp_path / "m"),
              "data": {"sources": [{"input": "x"}], "patch_shape": [16, 16]},
              "isotropic": {"psf": {"kind": "gaussian", "sigma_xy": 1, "sigma_z": 2}}}
    config.update(change)
    with pytest.raises(ConfigError, match=message):
        load_train_config(config)


def test_axial_blur_is_recovered_from_the_volume_itself():
    from bigcare.training.isotropic import axial_blur_match

    rng = np.random.default_rng(3)
    n = 96
    points = np.zeros((n, n, n), np.float32)
    idx = rng.integers(0, n, size=(3, 8000))
    points[tuple(idx)] = 1.0
    iso = ndimage.gaussian_filter(points, 1.0)
    for sz in (2.0, 4.0):
        aniso = ndimage.gaussian_filter1d(iso, np.sqrt(sz**2 - 1.0), axis=0)[::3]
        found = axial_blur_match(aniso, 3.0, sigma_xy=1.0, voxel_xy=1.0)
        assert found["sigma_z"] == pytest.approx(sz, rel=0.25), found


def test_isotropic_training_on_a_thin_stack_splits_validation_by_planes(tmp_path):
    """15 planes and 2D patches: zones of the patch's physical size do not fit (one zone), so
    along Z, which the patches do not span, they are cut to single planes, with a warning."""
    from conftest import smooth_volume

    path = tmp_path / "thin.ome.zarr"
    write_volume(path, smooth_volume((15, 128, 128)), chunks=(15, 64, 64), scale=(2.0, 0.5, 0.5))
    config = iso_config(path, tmp_path / "m", patch=32)
    with pytest.warns(UserWarning, match="cut thinner.*validation loss is optimistic"):
        result = train(config, progress=False)
    assert result.epochs == 1 and np.isfinite(result.val_loss).all()


@pytest.mark.parametrize("planes", [10, 12, 20])
def test_a_thin_volume_trains_with_the_default_data_and_isotropic_config(tmp_path, client, planes):
    """Anisotropic acquisitions are often 10-20 planes: the default draw (2000 patches, 10%
    validation, foreground filter) must still find disjoint validation patches on 12 planes."""
    from bigcare.synth import phantom

    gt = phantom((4 * planes, 128, 128), seed=5).astype(np.float32)
    data = (ndimage.gaussian_filter(gt, (3.0, 1.0, 1.0))[::4] * 3000 + 100).astype(np.uint16)
    assert len(data) == planes
    path = tmp_path / "thin.ome.zarr"
    write_volume(str(path), data, chunks=(planes, 64, 64), scale=(4.0, 1.0, 1.0))
    config = {"model_dir": str(tmp_path / "m"), "data": {"sources": [{"input": str(path)}], "patch_shape": [32, 32]},
              "network": {"depth": 1, "n_filter_base": 4}, "training": {"epochs": 1, "steps_per_epoch": 1},
              "isotropic": {"psf": {"kind": "gaussian", "sigma_xy": 1.0, "sigma_z": 3.0}}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the sources are small for disjoint validation")  # said, not an error
        result = train(config, client=client, progress=False)
    assert np.isfinite(result.val_loss).all()
    _, cfg = load_model(tmp_path / "m" / "best")
    assert cfg.kind == "isotropic" and cfg.isotropic.factor == pytest.approx(4.0)
    drawn = cfg.provenance["data"]
    assert drawn["n_train"] == 1800 and drawn["n_val"] == 200  # the default 2000 patches, 10% validation


def test_isotropic_patches_that_do_not_fit_with_their_margin_are_refused_naming_the_margin(tmp_path):
    from conftest import smooth_volume

    path = tmp_path / "small.ome.zarr"
    write_volume(str(path), smooth_volume((10, 64, 64)), scale=(4.0, 1.0, 1.0))
    config = iso_config(path, tmp_path / "m", patch=64)
    config["isotropic"]["psf"]["sigma_z"] = 4.0
    with pytest.raises(ConfigError, match=r"patch_shape \[64, 64\].*margin.*at most \[\d+, \d+\]"):
        train(config, progress=False)
    assert not (tmp_path / "m").exists()


def test_bigcare_train_estimates_sigma_z_from_the_volume_and_records_it(tmp_path, capsys):
    """``psf: {kind: gaussian, sigma_z: auto}``: the axial sigma comes from the volume itself
    (axial_blur_match), is trained with, and is written into the model's config and provenance."""
    import yaml

    from bigcare.cli import main

    rng = np.random.default_rng(5)
    n, sz = 96, 3.0
    points = np.zeros((n, n, n), np.float32)
    idx = rng.integers(0, n, size=(3, 8000))
    points[tuple(idx)] = 1.0
    aniso = ndimage.gaussian_filter(points, (sz, 1.0, 1.0))[::3]
    path = tmp_path / "vol.ome.zarr"
    write_volume(str(path), (aniso / aniso.max() * 3000 + 100).astype(np.uint16), chunks=(16, 48, 48),
                 scale=(0.3, 0.1, 0.1))  # micrometres: sigma_xy 0.1 um = 1 voxel, true sigma_z 0.3 um
    config = iso_config(path, tmp_path / "m")
    config["isotropic"]["psf"] = {"kind": "gaussian", "sigma_xy": 0.1, "sigma_z": "auto"}
    config["cluster"] = {"workers": 1}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "train.yaml"), "-q"]) == 0
    _, cfg = load_model(tmp_path / "m" / "best")
    found = cfg.isotropic.psf["sigma_z"]
    assert found == pytest.approx(0.3, rel=0.25)
    est = cfg.provenance["isotropic"]["sigma_z"]
    assert est["auto"] == found and est["method"].endswith("axial_blur_match")
    assert est["region_zyx"] == [[0, 32], [0, 96], [0, 96]] and len(est["candidate_isotropy"]) >= 5
    assert cfg.provenance["config"]["isotropic"]["psf"]["sigma_z"] == "auto"  # what was asked, beside what was found


def test_sigma_z_auto_needs_a_gaussian_with_sigma_xy(tmp_path):
    from bigcare.training import load_train_config

    config = {"model_dir": str(tmp_path / "m"), "data": {"sources": [{"input": "x"}], "patch_shape": [16, 16]},
              "isotropic": {"psf": {"kind": "gaussian", "sigma_z": "auto"}}}
    with pytest.raises(ConfigError, match="sigma_z: auto.*sigma_xy"):
        load_train_config(config)
    config["isotropic"]["psf"] = {"kind": "gaussian", "sigma_xy": 1, "sigma_z": "guess"}
    with pytest.raises(ConfigError, match="positive number or 'auto', got 'guess'"):
        load_train_config(config)


def test_grid_phase_puts_the_subsampled_rows_on_the_patch_rows_as_planes_fall_on_the_upsampled_grid():
    rng = np.random.default_rng(1)
    y = rng.random((6, 1, 60, 40)).astype(np.float32)
    for phase, exact in (("grid", True), ("continuous", False)):
        degradation = LateralDegradation.build(np.ones((1, 1)), 4.0, phase=phase)  # no blur: rows are samples
        x, t = degradation(y, np.random.default_rng(2))
        same_rows = (np.abs(x - t).max(axis=-1) < 1e-5).sum(axis=-1)[:, 0]  # rows copied unchanged, per patch
        if exact:
            assert (same_rows >= x.shape[-2] // 4).all()  # every 4th row is a sample, interpolated between
        else:
            assert (same_rows == 0).mean() > 0.5  # sub-voxel phases fall between rows


def test_noise_matching_gives_the_samples_back_the_noise_the_blur_averaged_away():
    rng = np.random.default_rng(3)
    sigma = 0.1
    y = (1.0 + sigma * rng.standard_normal((8, 1, 120, 120))).astype(np.float32)  # flat signal, white noise
    kernel = _gaussian_rows(6.0)
    plain = LateralDegradation.build(kernel, 8.0, phase="grid")
    matched = LateralDegradation.build(kernel, 8.0, phase="grid", noise=True)
    x0, t = plain(y, np.random.default_rng(4))
    x1, _ = matched(y, np.random.default_rng(4))
    assert x0.std() < 0.3 * sigma  # blurred: most of the noise averaged away
    # the rows that are samples (not interpolated between two) carry about the input's noise again
    per_row = x1.std(axis=-1)[:, 0]  # (patch, row): noise across the columns of each row
    noisiest = np.sort(per_row, axis=1)[:, -(per_row.shape[1] // 8):]  # as many rows as there are samples
    assert np.median(noisiest) == pytest.approx(sigma, rel=0.15)
    assert np.median(x0.std(axis=-1)) < 0.3 * sigma
