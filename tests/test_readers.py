"""Every kind of image bigcare writes opens in the community readers: ome-zarr-models (the NGFF
schema), ngff-zarr with its strict JSON-schema validation, ome-zarr-py (napari's reader) and, for
single-level images, xarray on the image group."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr_models import open_ome_zarr, v04, v05

import bigcare
from bigcare.store.convert import tiff_to_ome_zarr
from conftest import make_model, smooth_volume, write_volume


def _kinds(tmp_path, client) -> dict[str, tuple[str, str]]:
    """name -> (image url, NGFF version) of one output of every kind."""
    src = write_volume(tmp_path / "in.ome.zarr", smooth_volume((16, 48, 48)), chunks=(8, 24, 24),
                       scale=(2.5, 0.5, 0.5))
    kw = dict(client=client, device="cpu", progress=False)
    care = make_model(tmp_path / "care", ndim=3)
    prob = make_model(tmp_path / "prob", heads=[{"name": "mean"}, {"name": "scale", "activation": "softplus"}])
    iso = make_model(tmp_path / "iso", ndim=2, depth=2, n_filter_base=4, kernel_size=3, isotropic={"factor": 5.0})
    out: dict[str, tuple[str, str]] = {}
    out["restore"] = (bigcare.restore(src.url, tmp_path / "r.ome.zarr", care, **kw).outputs["restored"], "0.5")
    out["restore 0.4"] = (bigcare.restore(src.url, tmp_path / "r4.ome.zarr", care, ngff_version="0.4",
                                          **kw).outputs["restored"], "0.4")
    out["no pyramid"] = (bigcare.restore(src.url, tmp_path / "np.ome.zarr", care, pyramid=False,
                                         **kw).outputs["restored"], "0.5")
    multi = bigcare.restore(src.url, tmp_path / "m.ome.zarr", prob, **kw).outputs
    out["mean"], out["scale"] = (multi["mean"], "0.5"), (multi["scale"], "0.5")
    out["isotropic"] = (bigcare.restore(src.url, tmp_path / "iso.ome.zarr", iso, **kw).outputs["restored"], "0.5")
    tifffile.imwrite(tmp_path / "s.tif", (smooth_volume((8, 32, 32)) * 100).astype(np.uint16),
                     photometric="minisblack", metadata={"axes": "ZYX"})
    out["convert"] = (tiff_to_ome_zarr(tmp_path / "s.tif", tmp_path / "c.ome.zarr", voxel_size=(2, 1, 1)).url, "0.5")
    return out


def test_every_kind_of_output_opens_in_every_reader(tmp_path, client):
    import ngff_zarr
    import xarray as xr

    logging.getLogger("ome_zarr").setLevel(logging.ERROR)
    for kind, (url, version) in _kinds(tmp_path, client).items():
        group = zarr.open_group(url, mode="r")
        models = v05 if version == "0.5" else v04
        assert isinstance(open_ome_zarr(group), models.Image), kind
        strict = ngff_zarr.from_ngff_zarr(url, validate=True)  # raises on a schema violation
        assert len(strict.images) == len([k for k in group.array_keys() if k.isdigit()]), kind
        node = next(iter(Reader(parse_url(url, fmt=FormatV05() if version == "0.5" else FormatV04()))()))
        assert node.data and np.isfinite(np.asarray(node.data[0])).all(), kind
        levels = [k for k in group.array_keys() if k.isdigit()]
        if version == "0.5" and len(levels) == 1:
            ds = xr.open_zarr(url, consolidated=False)
            assert ds["0"].shape == group["0"].shape, kind


@pytest.mark.parametrize("bad", ["multiscales", "axes"])
def test_the_readers_test_would_fail_on_broken_metadata(tmp_path, bad):
    """The check above can fail: an image whose metadata lost its multiscales or axes is refused."""
    from pydantic import ValidationError

    url = write_volume(tmp_path / "v.ome.zarr", smooth_volume((8, 32, 32)), chunks=(8, 16, 16)).url
    group = zarr.open_group(url, mode="r+")
    ome = dict(group.attrs["ome"])
    if bad == "multiscales":
        ome.pop("multiscales")
    else:
        ome["multiscales"] = [{**ome["multiscales"][0], "axes": []}]
    group.attrs["ome"] = ome
    with pytest.raises((ValidationError, ValueError, KeyError, RuntimeError)):
        open_ome_zarr(zarr.open_group(url, mode="r"))
