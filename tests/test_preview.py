"""restore --preview: slices through the busiest region, input and outputs side by side."""

from __future__ import annotations

import numpy as np

import bigcare
from bigcare.runs.preview import busiest_point
from conftest import make_model, write_volume


def test_the_busiest_region_is_found_on_a_coarse_level(tmp_path):
    data = np.zeros((32, 256, 256), np.float32)
    rng = np.random.default_rng(0)
    data[16:28, 150:200, 40:90] = rng.random((12, 50, 50)) * 100  # bright texture off-centre
    data[2, 10, 10] = 1e4  # a hot pixel must not win
    volume = write_volume(tmp_path / "v.ome.zarr", data, chunks=(16, 64, 64))
    assert len(volume.levels) > 1
    z, y, x = busiest_point(volume, crop=32)
    assert 12 <= z <= 31 and 140 <= y <= 210 and 30 <= x <= 100


def test_restore_writes_a_preview_png(tmp_path, client):
    data = np.zeros((16, 64, 64), np.float32)
    data[4:12, 20:40, 20:40] = np.random.default_rng(1).random((8, 20, 20))
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(8, 32, 32), scale=(2.0, 0.5, 0.5))
    model = make_model(tmp_path / "m", heads=[{"name": "mean"}, {"name": "scale", "activation": "softplus"}])
    result = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", model, client=client, device="cpu",
                             progress=False, preview=tmp_path / "p.png")
    png = (tmp_path / "p.png").read_bytes()
    assert result.preview == str(tmp_path / "p.png") and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "p.partial.png").exists()
