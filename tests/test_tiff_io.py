"""TIFF in and out of a restore: converted once (streamed), restored as OME-Zarr, written back."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

import bigcare
import bigcare.runs.tiff as tiff_io
from bigcare.errors import ConfigError, InputError, OutputError
from conftest import smooth_volume


@pytest.fixture
def stack(tmp_path):
    data = (smooth_volume((16, 64, 64)) * 500).astype(np.uint16)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                     metadata={"axes": "ZYX", "spacing": 2.0, "unit": "um"})
    return path, data


def test_a_tiff_restores_to_a_tiff_equal_to_the_ome_zarr_path(tmp_path, stack, client, model3d):
    path, data = stack
    kw = dict(client=client, device="cpu", progress=False, block_shape=(8, 32, 32))
    result = bigcare.restore(path, tmp_path / "restored.tif", model3d, **kw)
    assert result.tiff == {"restored": str(tmp_path / "restored.tif")}
    staged = tmp_path / "restored.input.ome.zarr"
    np.testing.assert_array_equal(zarr.open_group(str(staged), mode="r")["0"][...], data)
    reference = bigcare.restore(staged, tmp_path / "ref.ome.zarr", model3d, **kw)
    expected = zarr.open_group(reference.outputs["restored"], mode="r")["0"][...]
    with tifffile.TiffFile(tmp_path / "restored.tif") as tif:
        np.testing.assert_array_equal(tif.asarray(), expected)
        assert tif.is_ome and tif.series[0].axes == "ZYX"
        assert 'PhysicalSizeZ="2.0"' in tif.ome_metadata and 'PhysicalSizeX="0.5"' in tif.ome_metadata
    # a rerun reuses the converted input and refuses to replace the TIFF unless asked
    before = (staged / "zarr.json").stat().st_mtime_ns
    with pytest.raises(OutputError, match="restored.tif exists"):
        bigcare.restore(path, tmp_path / "restored.tif", model3d, **kw)
    again = bigcare.restore(path, tmp_path / "restored.tif", model3d, overwrite=True, **kw)
    assert again.blocks_computed == 0 and (staged / "zarr.json").stat().st_mtime_ns == before


def test_a_tiff_output_over_the_limit_is_refused_before_the_run(tmp_path, stack, client, model3d, monkeypatch):
    path, _ = stack
    monkeypatch.setattr(tiff_io, "TIFF_OUTPUT_LIMIT", 1000)
    with pytest.raises(ConfigError, match=r"over the 0 GiB bigcare writes as TIFF.*restore to OME-Zarr"):
        bigcare.restore(path, tmp_path / "big.tif", model3d, client=client, device="cpu", progress=False)
    assert not (tmp_path / "big.tif").exists() and not (tmp_path / "big.ome.zarr").exists()


def test_a_folder_in_the_staged_place_that_bigcare_did_not_make_is_never_replaced(tmp_path, stack, model3d):
    path, _ = stack
    (tmp_path / "out.input.ome.zarr").mkdir()
    (tmp_path / "out.input.ome.zarr" / "mine.txt").write_text("keep me")
    with pytest.raises(OutputError, match="is not a conversion bigcare made"):
        bigcare.restore(path, tmp_path / "out.ome.zarr", model3d, device="cpu", progress=False)
    assert (tmp_path / "out.input.ome.zarr" / "mine.txt").read_text() == "keep me"


def test_other_formats_are_refused_naming_what_is_read_and_how_to_convert(tmp_path, model3d):
    (tmp_path / "scan.czi").write_bytes(b"CZI")
    with pytest.raises(InputError, match=r"scan\.czi: is a file, not an OME-Zarr image group.*bioformats2raw"):
        bigcare.restore(tmp_path / "scan.czi", tmp_path / "out.ome.zarr", model3d, device="cpu", progress=False)
