"""Pair registration: a known shift and scale are recovered to sub-pixel accuracy; a warp is reduced."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from bigcare.errors import InputError
from bigcare.register import register
from bigcare.synth import Granules, Tubules, clean

SCALE, SHIFT, N_LOW = 2.1, np.array([5.3, -3.7]), 110


def _pair(warp: float, seed: int = 4):
    """high: sharp 256^2 crop of a canvas; low: the canvas blurred, sampled at 32 + SCALE u + SHIFT + w(u)."""
    truth = clean([Tubules(density=0.15), Granules(density=1.0)], (340, 340), (0.05, 0.05), seed=seed)
    rng = np.random.default_rng(0)
    high = ndimage.gaussian_filter(truth, 1.0)[32:288, 32:288] + rng.normal(0, 0.01, (256, 256))

    def w(u):
        return warp * np.stack([1.5 * np.sin(2 * np.pi * u[1] / 140), 1.2 * np.cos(2 * np.pi * u[0] / 160)])

    u = np.indices((N_LOW, N_LOW), float)
    where = 32 + SCALE * u + SHIFT[:, None, None] + w(u)
    low = ndimage.map_coordinates(ndimage.gaussian_filter(truth, 2.5), where, order=3)
    low = low + rng.normal(0, 0.01, low.shape)
    x = np.indices((256, 256), float)
    true = (x - SHIFT[:, None, None]) / SCALE
    for _ in range(50):  # the inverse map: solve SCALE u + SHIFT + w(u) = x
        true = (x - SHIFT[:, None, None] - w(true)) / SCALE
    return low, high, true


def _residual(reg, true, margin=48):
    """Error of the estimated map, in high pixels, where the low image covers the high grid."""
    err = np.linalg.norm(reg.coordinates((256, 256)) - true, axis=0) * SCALE
    covered = np.all((true >= 0) & (true <= N_LOW - 1), axis=0)
    inner = (slice(margin, -margin),) * 2
    return err[inner][covered[inner]]


def test_register_recovers_a_known_shift_and_scale_to_a_fifth_of_a_pixel():
    low, high, true = _pair(warp=0.0)
    reg = register(low, high, scale=2.0, search=0.1, tile=None)  # the guess is 5% off
    assert reg.scale == pytest.approx(SCALE, rel=0.002)
    err = _residual(reg, true, margin=8)
    assert np.percentile(err, 95) < 0.2
    assert reg.correlation > 0.9
    # the local refinement adds noise of its own (measured with the default tiles: 0.16 px rms)
    assert np.sqrt(np.mean(_residual(register(low, high, scale=2.0), true) ** 2)) < 0.2


@pytest.mark.parametrize("seed", [4, 7, 11])
def test_local_refinement_brings_a_smooth_warp_under_a_fifth_of_a_pixel(seed):
    low, high, true = _pair(warp=1.0, seed=seed)
    global_only = _residual(register(low, high, scale=2.0, tile=None), true)
    refined = _residual(register(low, high, scale=2.0), true)  # default tiles 96, 96, 48
    assert np.sqrt(np.mean(global_only**2)) > 1.0
    # measured 0.187, 0.155, 0.190 px rms (from 1.3); tiles 64, 64 gave 0.222, 0.155, 0.209
    assert np.sqrt(np.mean(refined**2)) < 0.2


def test_register_refuses_images_it_cannot_register():
    with pytest.raises(InputError, match="two 2D or two 3D images"):
        register(np.zeros((8, 8)), np.zeros((8, 8, 8)))
    with pytest.raises(InputError, match="finite"):
        register(np.full((32, 32), np.nan), np.zeros((32, 32)))


def test_cli_register_writes_the_aligned_pair(tmp_path):
    from bigcare.cli import main
    from bigcare.store.volume import open_volume
    from bigcare.store.write import write_array

    low, high, _ = _pair(warp=0.0)
    write_array(tmp_path / "low.ome.zarr", low.astype(np.float32), chunks=(64, 64), scale=(0.105, 0.105), axes="yx")
    write_array(tmp_path / "high.ome.zarr", high.astype(np.float32), chunks=(64, 64), scale=(0.05, 0.05), axes="yx")
    out = tmp_path / "pair"
    assert main(["register", str(tmp_path / "low.ome.zarr"), str(tmp_path / "high.ome.zarr"), str(out)]) == 0
    moved, target = open_volume(out / "input.ome.zarr"), open_volume(out / "target.ome.zarr")
    assert moved.shape == target.shape and min(moved.shape) > 180
    assert moved.scale == pytest.approx((0.05, 0.05))
    record = json.loads((out / "registration.json").read_text())
    assert record["scale"] == pytest.approx(SCALE, rel=0.002) and record["correlation"] > 0.9
    a, b = moved.array()[:], target.array()[:]
    assert np.corrcoef(ndimage.gaussian_filter(b, 2).ravel(), a.ravel())[0, 1] > 0.9
    assert main(["register", str(tmp_path / "low.ome.zarr"), str(tmp_path / "missing.ome.zarr"), str(out / "x")]) == 2
