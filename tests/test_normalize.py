"""Percentile normalization: one sampler for restoration and training, exact and sampled."""

import numpy as np
import pytest

from bigcare.errors import InputError
from bigcare.normalization import EPS, Normalizer, array_normalizer, normalize, percentile_table, volume_normalizer
from bigcare.synth import degrade, phantom
from conftest import write_volume


def test_exact_percentiles_match_numpy(tmp_path):
    x = np.random.default_rng(0).gamma(2.0, 100.0, size=(20, 30, 40)).astype(np.float32)
    n = volume_normalizer(write_volume(tmp_path / "x.zarr", x, chunks=(10, 10, 10)), 1, 99.8)
    assert n.method == "exact"
    assert n.lo[0] == pytest.approx(np.percentile(x, 1), rel=1e-6)
    assert n.hi[0] == pytest.approx(np.percentile(x, 99.8), rel=1e-6)
    assert array_normalizer(x, None, 1, 99.8) == n


def test_sampled_percentiles_are_close_to_exact_on_the_demo_volume(tmp_path, monkeypatch):
    import bigcare.normalization as normalization

    noisy = degrade(phantom((64, 256, 256), seed=0), seed=1)
    vol = write_volume(tmp_path / "demo.zarr", noisy, chunks=(16, 64, 64))
    q = [1, 2, 3, 99.5, 99.8, 99.9]
    exact, method = percentile_table(vol.ref(), q)
    assert method == "exact"
    np.testing.assert_allclose(exact, np.percentile(noisy, q), rtol=1e-6)
    monkeypatch.setattr(normalization, "EXACT_LIMIT", 10_000)
    sampled, method = percentile_table(vol.ref(), q, n_chunks=32, sample_voxels=2**18)
    assert method == "sampled"
    span = exact[-1] - exact[0]
    assert np.all(np.abs(sampled - exact) < 0.01 * span), (sampled, exact)
    assert volume_normalizer(vol).method == "sampled"


def test_per_channel_statistics_and_round_trip(tmp_path):
    x = np.stack([np.linspace(0, 1, 1000), np.linspace(100, 300, 1000)]).astype(np.float32).reshape(2, 10, 100)
    n = volume_normalizer(write_volume(tmp_path / "c.zarr", x, axes="cyx"), 0, 100)
    assert n.lo == pytest.approx((0, 100)) and n.hi == pytest.approx((1, 300))
    y = n.normalize(x)
    assert y.min() == pytest.approx(0) and y.max() == pytest.approx(1)
    np.testing.assert_allclose(n.denormalize(y), x, rtol=1e-5, atol=1e-4)
    assert Normalizer.from_dict(n.as_dict()) == n
    assert array_normalizer(x, 0, 0, 100) == n


def test_all_nan_volume_is_rejected(tmp_path):
    vol = write_volume(tmp_path / "nan.zarr", np.full((4, 4), np.nan, np.float32), axes="yx")
    with pytest.raises(InputError, match=r"nan\.zarr holds no finite values"):
        volume_normalizer(vol)
    with pytest.raises(InputError, match="the array holds no finite values"):
        array_normalizer(np.full((4, 4), np.nan, np.float32), None)


def test_normalize_is_csbdeeps_formula_in_float32_and_float64():
    x = np.array([0, 5, 10, 20], np.uint16)
    np.testing.assert_array_equal(normalize(x, 5, 10), (x.astype(np.float32) - 5) / (np.float32(10) - 5 + np.float32(EPS)))
    assert normalize(x, 5, 10).dtype == np.float32 and normalize(x, 5, 10, dtype=np.float64).dtype == np.float64
    np.testing.assert_allclose(normalize(x, 5, 10, dtype=np.float64), [-1, 0, 1, 3])


def test_training_and_restoration_get_the_same_percentiles_for_the_same_image(tmp_path, monkeypatch):
    """The sampler's per-image tables and a restore's normalizer come from one draw of voxels."""
    import bigcare.normalization as normalization
    from bigcare.training.sampling import PatchSampler

    clean = phantom((32, 128, 128), seed=0)
    x = write_volume(tmp_path / "x.zarr", degrade(clean, seed=1), chunks=(8, 32, 32))
    y = write_volume(tmp_path / "y.zarr", clean, chunks=(8, 32, 32))
    for limit in (normalization.EXACT_LIMIT, 20_000):  # exact, then sampled
        monkeypatch.setattr(normalization, "EXACT_LIMIT", limit)
        sampler = PatchSampler([(x.url, y.url)], (8, 32, 32), n_patches=8, seed=7,
                               pmin_range=(1.0, 3.0), pmax_range=(99.5, 99.9))
        lows, highs = sampler.percentile_grid()
        table = sampler.tables[0]["input"]
        assert table["method"] == ("exact" if limit > 2**20 else "sampled")
        for k in (0, len(lows) - 1):
            for j in (0, len(highs) - 1):
                n = volume_normalizer(x, float(lows[k]), float(highs[j]))
                assert n.method == table["method"]
                assert n.lo[0] == table["low"][k] and n.hi[0] == table["high"][j]
