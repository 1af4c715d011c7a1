"""TIFF -> OME-Zarr conversion: lossless, physical sizes from metadata, streamed slab by slab."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr_models import v05

import bigcare.store.convert as convert
from bigcare.errors import InputError
from bigcare.store.convert import describe, tiff_to_ome_zarr
from bigcare.store.volume import open_volume

BRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain_cells_5x2x2um.tif"


def imagej_tiff(path: Path, data: np.ndarray, axes: str, z: float, yx: float, unit: str = "um", **kw) -> Path:
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / yx, 1 / yx),
                     metadata={"axes": axes, "spacing": z, "unit": unit}, **kw)
    return path


def test_zyx_imagej_converts_losslessly_with_its_voxel_size(tmp_path):
    data = np.random.default_rng(0).integers(0, 4000, (11, 70, 50), dtype=np.uint16)
    src = imagej_tiff(tmp_path / "s.tif", data, "ZYX", z=2.5, yx=0.4, unit="micron", compression="zlib")
    vol = tiff_to_ome_zarr(src, tmp_path / "s.zarr", chunks=(4, 32, 32))
    assert vol.axis_names == "zyx" and vol.scale == pytest.approx((2.5, 0.4, 0.4))
    assert [a.unit for a in vol.axes] == ["micrometer"] * 3 and vol.chunks == (4, 32, 32)
    np.testing.assert_array_equal(open_volume(tmp_path / "s.zarr").array(0)[:], data)
    # The pyramid is written too (lateral only: z is 6x coarser than y, x).
    assert vol.levels[1].shape == (11, 35, 25)
    np.testing.assert_array_equal(vol.array(1)[:, 0, 0], np.rint(data[:, :2, :2].mean(axis=(1, 2))))


@pytest.mark.parametrize("layout", ["CZYX", "ZCYX"])
def test_channel_stacks_become_czyx(tmp_path, layout):
    czyx = np.random.default_rng(1).integers(0, 255, (2, 5, 30, 20), dtype=np.uint8)
    data = czyx if layout == "CZYX" else czyx.transpose(1, 0, 2, 3)
    if layout == "CZYX":  # ImageJ hyperstacks are always ...ZCYX; write CZYX as an OME-TIFF
        src = tmp_path / "c.ome.tif"
        tifffile.imwrite(src, data, ome=True, metadata={"axes": "CZYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2,
                                                         "PhysicalSizeZ": 1000.0, "PhysicalSizeZUnit": "nm"})
    else:
        src = imagej_tiff(tmp_path / "c.tif", data, "ZCYX", z=1.0, yx=0.2)
    vol = tiff_to_ome_zarr(src, tmp_path / "c.zarr", ngff_version="0.4")
    assert vol.axis_names == "czyx" and vol.axes[0].type == "channel" and vol.ngff_version == "0.4"
    assert vol.scale == pytest.approx((1.0, 1.0, 0.2, 0.2))  # nm converted to micrometer
    assert vol.chunks == (1, 5, 30, 20)
    np.testing.assert_array_equal(vol.array(0)[:], czyx)


def test_conversion_streams_one_slab_at_a_time(tmp_path, monkeypatch):
    data = np.random.default_rng(2).integers(0, 60000, (3, 23, 40, 30), dtype=np.uint16)  # TZYX
    src = tmp_path / "t.tif"
    tifffile.imwrite(src, data, imagej=True, metadata={"axes": "TZYX"})

    slabs, pages_read = [], []
    read_slab, page_asarray = convert._read_slab, tifffile.TiffPage.asarray

    def counting_read_slab(*args, **kwargs):
        slab = read_slab(*args, **kwargs)
        slabs.append(slab.shape)
        return slab

    def counting_page(self, *args, **kwargs):
        pages_read.append(self.index)
        return page_asarray(self, *args, **kwargs)

    def whole_stack(*args, **kwargs):
        raise AssertionError("the whole TIFF series was read at once")

    monkeypatch.setattr(convert, "_read_slab", counting_read_slab)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", counting_page)
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", whole_stack)
    monkeypatch.setattr(tifffile.TiffFile, "asarray", whole_stack)
    monkeypatch.setattr(tifffile, "imread", whole_stack)
    vol = tiff_to_ome_zarr(src, tmp_path / "t.zarr", voxel_size=(1.0, 0.5, 0.5), chunks=(1, 8, 16, 16))

    assert slabs == [(1, 8, 40, 30), (1, 8, 40, 30), (1, 7, 40, 30)] * 3  # chunk depth 8 over 23 planes
    assert len(pages_read) == 3 * 23 and len(set(pages_read)) == 3 * 23  # every page decoded exactly once
    assert vol.axis_names == "tzyx" and vol.axes[0].type == "time"
    np.testing.assert_array_equal(vol.array(0)[:], data)


class SlicedOnly:
    """Stands in for a memory map: records every slice read, refuses whole-array reads."""

    def __init__(self, arr, reads):
        self.arr, self.reads = arr, reads

    def reshape(self, shape):
        return SlicedOnly(self.arr.reshape(shape), self.reads)

    def __getitem__(self, key):
        self.reads.append(self.arr[key].shape)
        return self.arr[key]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole memory-mapped stack was read")


def test_truncated_imagej_file_is_memory_mapped_slab_by_slab(tmp_path, monkeypatch):
    data = np.arange(6 * 2 * 10 * 12, dtype=np.uint16).reshape(6, 2, 10, 12)
    src = imagej_tiff(tmp_path / "big.tif", data, "ZCYX", z=3.0, yx=0.5, truncate=True)
    assert len(tifffile.TiffFile(src).pages) == 1  # as ImageJ writes files over 4 GB
    reads, memmap = [], tifffile.memmap
    monkeypatch.setattr(tifffile, "memmap", lambda *a, **k: SlicedOnly(memmap(*a, **k), reads))
    vol = tiff_to_ome_zarr(src, tmp_path / "big.zarr", chunks=(1, 4, 10, 12))
    assert reads == [(4, 1, 10, 12), (2, 1, 10, 12)] * 2  # (z, c, y, x) slabs of chunk depth 4
    assert vol.scale == pytest.approx((1.0, 3.0, 0.5, 0.5))
    np.testing.assert_array_equal(vol.array(0)[:], data.transpose(1, 0, 2, 3))


def test_rgb_samples_and_2d_images(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 255, (4, 20, 30, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    with pytest.warns(UserWarning, match=r"no voxel size for axes 'zyx'.*using 1.0 micrometer"):
        vol = tiff_to_ome_zarr(tmp_path / "rgb.tif", tmp_path / "rgb.zarr")
    assert vol.axis_names == "czyx" and vol.scale == (1.0, 1.0, 1.0, 1.0)
    np.testing.assert_array_equal(vol.array(0)[:], rgb.transpose(3, 0, 1, 2))

    plane = rgb[0, :, :, 0]
    tifffile.imwrite(tmp_path / "yx.tif", plane)
    vol = tiff_to_ome_zarr(tmp_path / "yx.tif", tmp_path / "yx.zarr", voxel_size=(0.1, 0.1), unit="nanometer")
    assert vol.axis_names == "yx" and vol.axes[0].unit == "nanometer" and vol.chunks == (20, 30)
    np.testing.assert_array_equal(vol.array(0)[:], plane)


def test_bad_inputs_raise_input_error_naming_the_problem(tmp_path):
    with pytest.raises(InputError, match=r"nope\.tif: no such TIFF file"):
        tiff_to_ome_zarr(tmp_path / "nope.tif", tmp_path / "o.zarr")
    (tmp_path / "fake.tif").write_bytes(b"this is not a tiff")
    with pytest.raises(InputError, match=r"fake\.tif: not a readable TIFF file"):
        tiff_to_ome_zarr(tmp_path / "fake.tif", tmp_path / "o.zarr")
    tifffile.imwrite(tmp_path / "z.tif", np.zeros((3, 8, 8), np.uint8), metadata={"axes": "ZYX"},
                     photometric="minisblack")
    with pytest.raises(InputError, match=r"voxel_size: expected 3 positive values for axes 'zyx', got \(1.0, 1.0\)"):
        tiff_to_ome_zarr(tmp_path / "z.tif", tmp_path / "o.zarr", voxel_size=(1.0, 1.0))
    with pytest.raises(InputError, match=r"chunks: expected 3 values for axes 'zyx'"):
        tiff_to_ome_zarr(tmp_path / "z.tif", tmp_path / "o.zarr", voxel_size=(1, 1, 1), chunks=(8, 8))
    assert not (tmp_path / "o.zarr").exists()  # argument errors come before anything is written


def test_a_conversion_cut_short_stays_incomplete_and_restore_and_training_refuse_it(tmp_path, model3d):
    import bigcare
    from bigcare.store.volume import check_finished
    from bigcare.training import load_train_config
    from bigcare.training.sources import resolve

    data = (np.random.default_rng(0).random((40, 64, 64)) * 1000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "t.tif", data, photometric="minisblack", metadata={"axes": "ZYX"})
    whole = tiff_to_ome_zarr(tmp_path / "t.tif", tmp_path / "whole.ome.zarr", chunks=(8, 64, 64), voxel_size=(1, 1, 1))
    check_finished(whole)  # a finished conversion is taken
    from bigcare.runs.info import info

    assert whole.attrs["bigcare"]["complete"] is True and "state:    complete" in info(whole.url)
    size = (tmp_path / "t.tif").stat().st_size
    with open(tmp_path / "t.tif", "r+b") as f:
        f.truncate(int(size * 0.6))
    with pytest.raises(InputError, match=r"t\.tif: cannot read z .*truncated or corrupt.*marked incomplete"):
        tiff_to_ome_zarr(tmp_path / "t.tif", tmp_path / "cut.ome.zarr", chunks=(8, 64, 64), voxel_size=(1, 1, 1))
    cut = open_volume(tmp_path / "cut.ome.zarr")
    assert "INCOMPLETE: its conversion from" in info(cut.url)
    with pytest.raises(InputError, match=r"cut\.ome\.zarr is incomplete: its conversion from .*t\.tif did not finish"):
        bigcare.restore(cut.url, tmp_path / "out.ome.zarr", model3d, device="cpu", progress=False)
    assert not (tmp_path / "out.ome.zarr").exists()
    cfg = load_train_config({"model_dir": str(tmp_path / "m"), "data": {
        "sources": [{"input": cut.url, "target": whole.url}], "patch_shape": [8, 32, 32]}})
    with pytest.raises(InputError, match="is incomplete"):
        resolve(cfg.data.sources[0], 0, (8, 32, 32))


@pytest.mark.skipif(not BRAIN.exists(), reason="shared brain_cells_5x2x2um.tif not available")
def test_crop_of_real_brain_volume(tmp_path):
    with tifffile.TiffFile(BRAIN) as tif:
        crop = np.stack([tif.pages[i].asarray()[100:300, 200:360] for i in range(8, 20)])
    src = tmp_path / "brain_crop.tif"
    tifffile.imwrite(src, crop, metadata={"axes": "ZYX"}, compression="zlib")
    vol = tiff_to_ome_zarr(src, tmp_path / "brain.zarr", voxel_size=(5.0, 2.0, 2.0), chunks=(8, 64, 64))
    assert isinstance(v05.Image.from_zarr(zarr.open_group(str(tmp_path / "brain.zarr"), mode="r")), v05.Image)
    np.testing.assert_array_equal(vol.array(0)[:], crop)
    assert vol.scale == (5.0, 2.0, 2.0) and vol.levels[1].scale == (5.0, 4.0, 4.0)
    assert vol.levels[2].scale == (10.0, 8.0, 8.0)  # z joins once lateral voxels are within 1.5x
    assert [lv.shape for lv in vol.levels] == [(12, 200, 160), (12, 100, 80), (6, 50, 40)]

    text = describe(open_volume(tmp_path / "brain.zarr"))
    assert str(tmp_path / "brain.zarr") in text and "OME-NGFF 0.5" in text
    assert "z (space, micrometer), y (space, micrometer), x (space, micrometer)" in text and "uint16" in text
    assert "0  shape (12, 200, 160)" in text and "chunks (8, 64, 64)" in text and "scale (5, 4, 4)" in text
