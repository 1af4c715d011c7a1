"""Isotropic restoration through the block engine: Z upsampled, 2D net on XZ and YZ slices."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from ome_zarr_models import open_ome_zarr

import bigcare
from bigcare.blocks.zoom import source_range, upsample_rows, zoom_length
from bigcare.errors import ModelMismatchError
from conftest import make_model, read, smooth_volume, write_volume


@pytest.mark.parametrize("factor", [2.0, 2.5, 3.0])
def test_blockwise_upsampling_equals_whole(factor):
    rng = np.random.default_rng(0)
    x = rng.random((11, 5, 3)).astype(np.float32)
    n_out = zoom_length(11, factor)
    whole = upsample_rows(x, 0, factor, 0, 0, n_out)
    assert whole.shape == (n_out, 5, 3)
    np.testing.assert_array_equal(whole[::1][[round(i * factor) for i in range(11) if (i * factor) % 1 == 0]],
                                  x[[i for i in range(11) if (i * factor) % 1 == 0]])
    for o0, o1 in [(0, 4), (3, 9), (7, n_out), (n_out - 1, n_out)]:
        i0, i1 = source_range(o0, o1, factor, 11)
        part = upsample_rows(x[i0:i1], 0, factor, i0, o0, o1)
        np.testing.assert_array_equal(part, whole[o0:o1])


def test_upsampling_is_linear_between_neighbours():
    x = np.array([0.0, 10.0, 20.0], np.float32)
    y = upsample_rows(x, 0, 2.5, 0, 0, zoom_length(3, 2.5))
    np.testing.assert_allclose(y, [0, 4, 8, 12, 16, 20], atol=1e-5)


@pytest.fixture
def iso_model(tmp_path):
    return make_model(tmp_path / "iso", ndim=2, depth=2, n_filter_base=4, kernel_size=3,
                      isotropic={"factor": 2.5})


@pytest.mark.parametrize("block, tile", [((16, 24, 20), None), ((8, 16, 40), None), ((31, 40, 40), (10, 16, 24))])
def test_isotropic_blockwise_equals_whole_volume(client, tmp_path, iso_model, block, tile):
    data = (smooth_volume((13, 37, 29), seed=3) * 1000).astype(np.uint16)
    vol = write_volume(str(tmp_path / "in.ome.zarr"), data, chunks=(4, 8, 10), scale=(2.5, 1.0, 1.0))
    result = bigcare.restore(vol, str(tmp_path / "out.ome.zarr"), iso_model, client=client, block_shape=block,
                             tile_shape=tile, progress=False)
    assert result.blocks_computed == result.blocks_total >= 1
    got = read(str(tmp_path / "out.ome.zarr"))
    ref = bigcare.predict(data, iso_model, axes="zyx")["restored"]
    assert got.shape == ref.shape == (zoom_length(13, 2.5), 37, 29) == (31, 37, 29)
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    out = bigcare.open_volume(str(tmp_path / "out.ome.zarr"))
    np.testing.assert_allclose(out.scale, (1.0, 1.0, 1.0))  # z: 2.5 / 2.5
    assert out.levels[0].translation == vol.levels[0].translation
    open_ome_zarr(zarr.open_group(str(tmp_path / "out.ome.zarr"), mode="r"))  # valid NGFF 0.5
    assert out.attrs["bigcare"]["plan"]["zoom"] == [2.5, 1.0, 1.0]


def test_isotropic_model_refuses_a_volume_with_other_anisotropy(client, tmp_path, iso_model):
    data = (smooth_volume((8, 16, 16)) * 1000).astype(np.uint16)
    vol = write_volume(str(tmp_path / "in.ome.zarr"), data, scale=(4.0, 1.0, 1.0))
    with pytest.raises(ModelMismatchError, match=r"factor of 2.5.*z=4, x=1"):
        bigcare.restore(vol, str(tmp_path / "out.ome.zarr"), iso_model, client=client, progress=False)
    assert not (tmp_path / "out.ome.zarr").exists()


def test_cli_restore_recognises_an_isotropic_model(client, tmp_path, iso_model, capsys):
    from bigcare.cli import main

    data = (smooth_volume((9, 32, 32), seed=1) * 1000).astype(np.uint16)
    write_volume(str(tmp_path / "in.ome.zarr"), data, chunks=(9, 32, 32), scale=(2.5, 1.0, 1.0))
    code = main(["restore", str(tmp_path / "in.ome.zarr"), str(tmp_path / "out.ome.zarr"), "--model", str(iso_model),
                 "--scheduler", client.scheduler.address])
    assert code == 0
    assert read(str(tmp_path / "out.ome.zarr")).shape == (zoom_length(9, 2.5), 32, 32) == (21, 32, 32)
