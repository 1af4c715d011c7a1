"""Lazy percentile normalisation."""

import dask.array as da
import numpy as np
import pytest

from bigcare.errors import InputError
from bigcare.normalize import Normalizer, compute_normalizer
from bigcare.synth import degrade, phantom


def test_exact_percentiles_match_numpy():
    x = np.random.default_rng(0).gamma(2.0, 100.0, size=(20, 30, 40)).astype(np.float32)
    n = compute_normalizer(da.from_array(x, chunks=(10, 10, 10)), None, 1, 99.8)
    assert n.method == "exact"
    assert n.lo[0] == pytest.approx(np.percentile(x, 1), rel=1e-6)
    assert n.hi[0] == pytest.approx(np.percentile(x, 99.8), rel=1e-6)


def test_sampled_percentiles_are_close_to_exact_on_the_demo_volume():
    clean = phantom((64, 256, 256), seed=0)
    noisy = degrade(clean, seed=1)
    data = da.from_array(noisy, chunks=(16, 64, 64))
    exact = compute_normalizer(data, None)
    sampled = compute_normalizer(data, None, exact_limit=10_000, n_chunks=32, sample_voxels=2**18)
    assert sampled.method == "sampled"
    span = exact.hi[0] - exact.lo[0]
    assert abs(sampled.lo[0] - exact.lo[0]) < 0.01 * span
    assert abs(sampled.hi[0] - exact.hi[0]) < 0.01 * span


def test_per_channel_statistics_and_round_trip():
    x = np.stack([np.linspace(0, 1, 1000), np.linspace(100, 300, 1000)]).astype(np.float32)
    n = compute_normalizer(da.from_array(x), 0, 0, 100)
    assert n.lo == pytest.approx((0, 100)) and n.hi == pytest.approx((1, 300))
    y = n.normalize(x)
    assert y.min() == pytest.approx(0) and y.max() == pytest.approx(1)
    np.testing.assert_allclose(n.denormalize(y), x, rtol=1e-5, atol=1e-4)
    assert Normalizer.from_dict(n.as_dict()) == n


def test_all_nan_volume_is_rejected():
    with pytest.raises(InputError, match="holds no finite values"):
        compute_normalizer(da.full((4, 4), np.nan, dtype=np.float32), None, name="vol.zarr")
