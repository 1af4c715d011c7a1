"""OME-Zarr layer: create_volume / write_pyramid / open_volume against ome-zarr-py and ome-zarr-models."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import zarr
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr.writer import write_image
from ome_zarr_models import open_ome_zarr, v04, v05

import bigcare.store.pyramid as pyramid
from bigcare.errors import BlockError, ConfigError, InputError, OutputError
from bigcare.store.axes import Axis
from bigcare.store.pyramid import write_pyramid
from bigcare.store.volume import open_volume
from bigcare.store.write import create_volume, downsample_factors, update_attrs

UM = "micrometer"
CZYX = (Axis("c", "channel"), Axis("z", "space", UM), Axis("y", "space", UM), Axis("x", "space", UM))
FORMATS = {"0.5": (FormatV05(), v05), "0.4": (FormatV04(), v04)}


def mean_pyramid_reference(data: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Independent numpy reference: edge-pad to a multiple, mean over each cell, round."""
    out_shape = [-(-n // f) for n, f in zip(data.shape, factors)]
    padded = np.pad(data, [(0, o * f - n) for o, f, n in zip(out_shape, factors, data.shape)], mode="edge")
    mean = padded.astype(np.float64)
    for axis, f in enumerate(factors):
        mean = np.add.reduceat(mean, np.arange(0, mean.shape[axis], f), axis=axis) / f
    return np.rint(mean).astype(data.dtype) if data.dtype.kind in "ui" else mean.astype(data.dtype)


def read_with_ome_zarr_py(url: str, version: str):
    logging.getLogger("ome_zarr").setLevel(logging.ERROR)
    nodes = list(Reader(parse_url(url, fmt=FORMATS[version][0]))())
    return nodes[0]


@pytest.fixture
def data4d():
    return np.random.default_rng(1).integers(0, 65535, (2, 9, 37, 29), dtype=np.uint16)


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_round_trip_is_valid_ngff_and_pyramid_is_2x_mean(tmp_path, data4d, version):
    url = str(tmp_path / "img.zarr")
    vol = create_volume(url, shape=data4d.shape, dtype=data4d.dtype, chunks=(1, 4, 8, 8), axes=CZYX,
                       scale=(1.0, 2.0, 0.5, 0.5), levels=3, ngff_version=version, name="cells",
                       attrs={"bigcare": {"run": 1}})
    vol.array(0, mode="r+")[:] = data4d
    write_pyramid(vol)

    # Validators of the community accept it.
    group = zarr.open_group(url, mode="r")
    assert isinstance(FORMATS[version][1].Image.from_zarr(group), FORMATS[version][1].Image)
    assert isinstance(open_ome_zarr(group), FORMATS[version][1].Image)
    node = read_with_ome_zarr_py(url, version)
    assert [a.get("unit") for a in node.metadata["axes"]] == [None, UM, UM, UM]
    assert [t[0]["scale"] for t in node.metadata["coordinateTransformations"]] == [
        [1.0, 2.0, 0.5, 0.5], [1.0, 2.0, 1.0, 1.0], [1.0, 2.0, 2.0, 2.0]]

    # Pyramid: anisotropic z (2 um vs 0.5 um) is left alone, y and x are averaged 2x2.
    expected = data4d
    for k in (1, 2):
        expected = mean_pyramid_reference(expected, (1, 1, 2, 2))
        np.testing.assert_array_equal(np.asarray(node.data[k]), expected)

    back = open_volume(url)
    assert back.ngff_version == version and back.name == "cells" and back.axis_names == "czyx"
    assert back.spatial_axes == "zyx" and back.axes == CZYX
    assert [lv.shape for lv in back.levels] == [(2, 9, 37, 29), (2, 9, 19, 15), (2, 9, 10, 8)]
    assert back.chunks == (1, 4, 8, 8) and back.levels[2].chunks == (1, 4, 8, 8)
    assert back.attrs["bigcare"] == {"run": 1}


def test_float_pyramid_averages_isotropic_odd_shapes(tmp_path):
    data = np.random.default_rng(2).random((70, 67, 66), dtype=np.float32)
    vol = create_volume(tmp_path / "f.zarr", shape=data.shape, dtype="float32", chunks=(16, 16, 32),
                       axes="zyx", scale=(1.0, 1.0, 1.0), levels=3)
    vol.array(0, "r+")[:] = data
    write_pyramid(vol)
    lv1 = mean_pyramid_reference(data, (2, 2, 2))
    np.testing.assert_allclose(vol.array(1)[:], lv1, rtol=1e-6)
    np.testing.assert_allclose(vol.array(2)[:], mean_pyramid_reference(lv1, (2, 2, 2)), rtol=1e-6)


def test_pyramid_tasks_read_only_their_own_region(tmp_path, monkeypatch):
    vol = create_volume(tmp_path / "m.zarr", shape=(8, 96, 80), dtype="uint8", chunks=(8, 16, 16),
                       axes="zyx", scale=(1.0, 1.0, 1.0), levels=2)
    vol.array(0, "r+")[:] = 7
    seen, reduce = [], pyramid.mean_reduce
    monkeypatch.setattr(pyramid, "mean_reduce", lambda block, *a: seen.append(block.size) or reduce(block, *a))
    write_pyramid(vol)
    assert len(seen) == 3 * 3  # one task per level-1 chunk (4 x 48 x 40 in chunks of 4 x 16 x 16)
    assert max(seen) <= 8 * 32 * 32  # one output chunk times the 2x2x2 cell, never the level
    assert (vol.array(1)[:] == 7).all()


def test_failed_pyramid_tasks_raise_block_error_naming_the_level(tmp_path, monkeypatch):
    vol = create_volume(tmp_path / "e.zarr", shape=(4, 40, 40), dtype="uint8", chunks=(4, 16, 16),
                       axes="zyx", scale=(1.0, 1.0, 1.0), levels=2)

    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pyramid, "mean_reduce", broken)
    with pytest.raises(BlockError, match=r"pyramid level 1: 4 of 4 chunks failed.*disk full"):
        write_pyramid(vol)


def test_recreated_image_is_not_written_through_a_stale_cached_array(tmp_path):
    data = np.random.default_rng(4).integers(0, 255, (4, 48, 48), dtype=np.uint8)
    for chunks in [(4, 32, 32), (4, 8, 8)]:  # same url, path and shape, new chunk grid
        vol = create_volume(tmp_path / "r.zarr", shape=data.shape, dtype="uint8", chunks=chunks, axes="zyx",
                           scale=(4.0, 1.0, 1.0), levels=2, overwrite=True)
        vol.array(0, "r+")[:] = data
        write_pyramid(vol)
        np.testing.assert_array_equal(open_volume(vol.url).array(1)[:], mean_pyramid_reference(data, (1, 2, 2)))


def test_pyramid_with_distributed_client_matches_local(tmp_path):
    distributed = pytest.importorskip("distributed")
    data = np.random.default_rng(3).integers(0, 255, (3, 50, 45), dtype=np.uint8)
    vol = create_volume(tmp_path / "d.zarr", shape=data.shape, dtype="uint8", chunks=(3, 16, 16),
                       axes="zyx", scale=(3.0, 1.0, 1.0), levels=2)
    vol.array(0, "r+")[:] = data
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address="127.0.0.1:0") as client:
        write_pyramid(vol, client=client)
    np.testing.assert_array_equal(vol.array(1)[:], mean_pyramid_reference(data, (1, 2, 2)))


def test_downsample_factors_keep_voxels_near_isotropic():
    # 5 x 2 x 2 um: lateral first, then all three once within 1.5x.
    f = downsample_factors((1000, 1000, 1000), "zyx", (5.0, 2.0, 2.0))
    assert f[:3] == [(1, 2, 2), (2, 2, 2), (2, 2, 2)]
    # A small axis is still halved with the others while it is as fine as they are; stops once
    # every spatial axis is <= min_size.
    assert downsample_factors((30, 510, 667), "zyx", (5.0, 2.0, 2.0), min_size=64) == [
        (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert downsample_factors((11, 70, 50), "zyx", (2.5, 0.4, 0.4)) == [(1, 2, 2)]
    assert downsample_factors((10, 64, 64), "zyx", (1.0, 1.0, 1.0)) == []
    # Channel and time axes are never downsampled; `levels` gives the exact count.
    tc = downsample_factors((2, 3, 40, 40, 40), "tczyx", (1, 1, 1, 1, 1), levels=4)
    assert tc == [(1, 1, 2, 2, 2)] * 3
    with pytest.raises(ConfigError, match=r"cannot make 9 levels from shape \(4, 4\)"):
        downsample_factors((4, 4), "yx", (1.0, 1.0), levels=9)
    with pytest.raises(ConfigError, match=r"scale: expected 3 values \(one per axis 'zyx'\)"):
        downsample_factors((4, 4, 4), "zyx", (1.0, 1.0))


def test_level_coordinates_are_centres_of_averaged_voxels(tmp_path):
    vol = create_volume(tmp_path / "c.zarr", shape=(4, 20, 24), dtype="uint16", chunks=(4, 8, 8),
                       axes=CZYX[1:], scale=(3.0, 0.5, 0.25), translation=(10.0, -1.0, 2.0), levels=3)
    lv0, lv2 = vol.to_xarray(0), vol.to_xarray(2)
    # x (0.25 um) is halved twice, y (0.5 um) once, z (3 um) never: level 2 averages 2 (y) x 4 (x)
    # level-0 voxels, and its coordinates are their mean.
    assert vol.levels[2].scale == (3.0, 1.0, 1.0)
    np.testing.assert_allclose(lv2.y.values, lv0.y.values.reshape(-1, 2).mean(axis=1))
    np.testing.assert_allclose(lv2.x.values, lv0.x.values.reshape(-1, 4).mean(axis=1))
    np.testing.assert_allclose(lv0.z.values, 10.0 + 3.0 * np.arange(4))
    assert lv0.y.attrs["units"] == UM and lv0.dims == ("z", "y", "x")


def test_to_dask_is_lazy_with_zarr_chunks(tmp_path):
    vol = create_volume(tmp_path / "l.zarr", shape=(2, 10, 30, 20), dtype="uint16", chunks=(1, 5, 16, 16),
                       axes=CZYX, scale=(1, 1, 1, 1), levels=1)
    lazy = vol.to_dask()
    assert lazy.chunksize == (1, 5, 16, 16) and lazy.chunks[2] == (16, 14)
    vol.array(0, "r+")[:] = 5  # written after the graph was built: the graph must not hold data
    assert int(lazy.sum().compute()) == 5 * 2 * 10 * 30 * 20
    xr_view = vol.to_xarray()
    assert xr_view.dims == ("c", "z", "y", "x") and "c" not in xr_view.coords
    assert int(xr_view.sel(y=3.0, x=4.0).isel(c=1, z=2)) == 5


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_open_volume_reads_ome_zarr_py_images(tmp_path, data4d, version):
    fmt = FORMATS[version][0]
    path = str(tmp_path / "ozp.zarr")
    group = zarr.open_group(path, mode="w", zarr_format=fmt.zarr_format)
    write_image(data4d, group, fmt=fmt, axes="czyx", scale_factors=(2, 4), scale={"c": 1.0, "z": 2.0, "y": 0.5, "x": 0.5},
                axes_units={"z": UM, "y": UM, "x": UM}, storage_options={"chunks": (1, 3, 16, 16)})
    vol = open_volume(path)
    assert vol.ngff_version == version and vol.axis_names == "czyx"
    assert vol.axes[1:] == CZYX[1:] and vol.axes[0].type == "channel"
    assert [lv.path for lv in vol.levels] == ["s0", "s1", "s2"]
    assert vol.scale == (1.0, 2.0, 0.5, 0.5) and vol.levels[2].shape == (2, 9, 9, 7)
    # ome-zarr-py floors shapes and derives level scales from the shape ratio (37 -> 9 voxels).
    assert vol.levels[2].scale == pytest.approx((1.0, 2.0, 0.5 * 37 / 9, 0.5 * 29 / 7))
    assert vol.chunks == (1, 3, 16, 16)
    np.testing.assert_array_equal(vol.to_dask().compute(), data4d)


def test_sharded_levels_report_the_shard_as_write_unit(tmp_path):
    url = str(tmp_path / "sh.zarr")
    multiscale = {"axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                  "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0]}]}]}
    group = zarr.open_group(url, mode="w", zarr_format=3, attributes={"ome": {"version": "0.5", "multiscales": [multiscale]}})
    group.create_array("0", shape=(64, 48), chunks=(8, 8), shards=(32, 16), dtype="uint16", dimension_names=["y", "x"])
    vol = open_volume(url)
    assert vol.chunks == (32, 16) and vol.to_dask().chunksize == (32, 16)


def test_fsspec_urls_round_trip(tmp_path):
    data = np.arange(6 * 40 * 36, dtype=np.uint16).reshape(6, 40, 36)
    url = (tmp_path / "u.zarr").as_uri()  # file:///...
    vol = create_volume(url, shape=data.shape, dtype="uint16", chunks=(6, 16, 16), axes="zyx",
                       scale=(1.0, 1.0, 1.0), levels=2, storage_options={})
    assert vol.url == url
    vol.array(0, "r+")[:] = data
    write_pyramid(vol)
    by_path = open_volume(tmp_path / "u.zarr")
    np.testing.assert_array_equal(by_path.array(1)[:], mean_pyramid_reference(data, (2, 2, 2)))
    np.testing.assert_array_equal(open_volume(url + "/").to_dask(0).compute(), data)

    mem = create_volume("memory://bigcare-test/m.zarr", shape=data.shape, dtype="uint16", chunks=(6, 16, 16),
                       axes="zyx", scale=(1.0, 1.0, 1.0), levels=2, overwrite=True)
    mem.array(0, "r+")[:] = data
    write_pyramid(mem)
    np.testing.assert_array_equal(open_volume("memory://bigcare-test/m.zarr").array(1)[:], by_path.array(1)[:])


def test_update_attrs_merges_at_the_root_next_to_ome(tmp_path):
    vol = create_volume(tmp_path / "a.zarr", shape=(8, 8), dtype="uint8", chunks=(8, 8), axes="yx",
                       scale=(1.0, 1.0), attrs={"bigcare": {"state": "running"}, "keep": 1})
    update_attrs(vol.url, {"bigcare": {"state": "done"}})
    attrs = open_volume(vol.url).attrs
    assert attrs["bigcare"] == {"state": "done"} and attrs["keep"] == 1 and attrs["ome"]["version"] == "0.5"
    with pytest.raises(OutputError, match="not an existing zarr group"):
        update_attrs(tmp_path / "nothing.zarr", {"a": 1})


@pytest.mark.parametrize("marker", ["bigcare_done", ".bigcare_done"])
@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_done_marker_array_inside_image_keeps_it_valid(tmp_path, marker, version):
    url = str(tmp_path / "img.zarr")
    create_volume(url, shape=(4, 32, 32), dtype="uint8", chunks=(4, 16, 16), axes="zyx", scale=(1, 1, 1),
                 levels=2, ngff_version=version)
    zarr.open_group(url, mode="a").create_array(marker, shape=(1, 2, 2), chunks=(1, 2, 2), dtype="bool")
    group = zarr.open_group(url, mode="r")
    assert marker in dict(group.members())
    assert isinstance(FORMATS[version][1].Image.from_zarr(group), FORMATS[version][1].Image)
    assert isinstance(open_ome_zarr(group), FORMATS[version][1].Image)
    assert len(read_with_ome_zarr_py(url, version).data) == 2
    assert [lv.path for lv in open_volume(url).levels] == ["0", "1"]


def test_open_volume_errors_name_the_path(tmp_path):
    with pytest.raises(InputError, match=r"missing\.zarr: no such file or directory"):
        open_volume(tmp_path / "missing.zarr")
    zarr.create_array(str(tmp_path / "arr.zarr"), shape=(4,), dtype="uint8")
    with pytest.raises(InputError, match=r"arr\.zarr: is a zarr array, not a group"):
        open_volume(tmp_path / "arr.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match=r"plain: not a zarr group"):
        open_volume(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "bare.zarr"), mode="w", attributes={"other": 1})
    with pytest.raises(InputError, match=r"bare\.zarr: zarr group has no OME-NGFF 'multiscales' metadata"):
        open_volume(tmp_path / "bare.zarr")
    with pytest.raises(InputError, match=r"bare\.zarr/nope: no such file or directory"):
        open_volume((tmp_path / "bare.zarr").as_uri().replace("bare.zarr", "bare.zarr/nope"))


def test_open_volume_rejects_malformed_metadata(tmp_path):
    vol = create_volume(tmp_path / "bad.zarr", shape=(4, 8, 8), dtype="uint8", chunks=(4, 8, 8), axes="zyx",
                       scale=(1.0, 1.0, 1.0), levels=1)
    ome = dict(vol.attrs["ome"])
    ome["multiscales"] = [dict(ome["multiscales"][0])]
    ome["multiscales"][0]["datasets"] = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0]}]}]
    update_attrs(vol.url, {"ome": ome})
    with pytest.raises(InputError, match=r"bad\.zarr: dataset '0': scale must be 3 numbers \(one per axis\)"):
        open_volume(vol.url)
    ome["multiscales"][0]["datasets"] = [{"path": "9"}]
    update_attrs(vol.url, {"ome": ome})
    with pytest.raises(InputError, match=r"bad\.zarr: dataset '9' listed in multiscales does not exist"):
        open_volume(vol.url)


def test_create_volume_refuses_existing_paths(tmp_path):
    kwargs = dict(shape=(4, 8, 8), dtype="uint8", chunks=(4, 8, 8), axes="zyx", scale=(1.0, 1.0, 1.0))
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("precious")
    with pytest.raises(OutputError, match=r"results: already exists; pass overwrite=True"):
        create_volume(foreign, **kwargs)
    with pytest.raises(OutputError, match=r"results: exists and is not a zarr store.*refusing to delete"):
        create_volume(foreign, overwrite=True, **kwargs)
    assert (foreign / "thesis.txt").read_text() == "precious"

    create_volume(tmp_path / "img.zarr", **kwargs)
    with pytest.raises(OutputError, match=r"img\.zarr: already exists"):
        create_volume(tmp_path / "img.zarr", **kwargs)
    vol = create_volume(tmp_path / "img.zarr", overwrite=True, ngff_version="0.4", **kwargs)
    assert open_volume(vol.url).ngff_version == "0.4"
    with pytest.raises(ConfigError, match=r"chunks: expected 3 values \(one per axis 'zyx'\), got \(8, 8\)"):
        create_volume(tmp_path / "x.zarr", **{**kwargs, "chunks": (8, 8)})
    with pytest.raises(ConfigError, match=r"ngff_version: expected '0.4' or '0.5', got '0.6'"):
        create_volume(tmp_path / "x.zarr", ngff_version="0.6", **kwargs)


def test_restored_images_carry_a_display_window_pyramid_type_and_named_marker_dimensions(tmp_path, client):
    """Readers open the outputs as data: omero window from the input's percentiles (intensity
    outputs only), multiscales type/metadata, a done-marker array xarray takes (zarr v3)."""
    import xarray as xr

    import bigcare
    from conftest import make_model, smooth_volume, write_volume

    src = write_volume(tmp_path / "in.ome.zarr", smooth_volume((16, 64, 64)), chunks=(8, 32, 32))
    model = make_model(tmp_path / "prob", heads=[{"name": "mean"}, {"name": "scale", "activation": "softplus"}])
    result = bigcare.restore(src.url, tmp_path / "out.ome.zarr", model, client=client, device="cpu", progress=False)
    lo, hi = result.normalization["lo"][0], result.normalization["hi"][0]
    mean = zarr.open_group(result.outputs["mean"], mode="r")
    assert isinstance(open_ome_zarr(mean), v05.Image)
    ome = mean.attrs["ome"]
    (channel,) = ome["omero"]["channels"]
    assert (channel["window"]["start"], channel["window"]["end"]) == pytest.approx((lo, hi))
    assert ome["multiscales"][0]["type"] == "mean" and "method" in ome["multiscales"][0]["metadata"]
    assert "omero" not in zarr.open_group(result.outputs["scale"], mode="r").attrs["ome"]  # a scale, not intensity
    single = bigcare.restore(src.url, tmp_path / "flat.ome.zarr", make_model(tmp_path / "m"), client=client,
                             device="cpu", progress=False, pyramid=False)
    ds = xr.open_zarr(single.outputs["restored"], consolidated=False)
    assert ds["0"].dims == ("z", "y", "x") and ds["bigcare_done"].dims == ("z_block", "y_block", "x_block")


def test_metadata_that_readers_would_refuse_is_never_written(tmp_path):
    from bigcare.store.write import create_volume

    with pytest.raises(ConfigError, match="not valid OME-NGFF 0.5"):
        create_volume(tmp_path / "bad.ome.zarr", shape=(8, 2), dtype="uint8", chunks=(8, 2),  # one space axis
                      axes=[Axis("x", "space", UM), Axis("c", "channel")], scale=(1.0, 1.0))
    assert not (tmp_path / "bad.ome.zarr").exists()
