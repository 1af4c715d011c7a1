"""The root of a multi-output restore is a readable NGFF group: a bioformats2raw-layout root that
lists its images (ome-zarr-models, ome-zarr-py), names them (OME-XML, ``bigcare.images``), and that
``bigcare info`` describes image by image."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import zarr
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr.utils import find_multiscales
from ome_zarr_models import open_ome_zarr, v04, v05

import bigcare
from bigcare.cli import main
from conftest import make_model, smooth_volume, write_volume


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_the_multi_output_root_opens_in_ome_zarr_models_and_ome_zarr_py(tmp_path, client, capsys, version):
    logging.getLogger("ome_zarr").setLevel(logging.ERROR)
    src = write_volume(tmp_path / "in.ome.zarr", smooth_volume((16, 32, 32)), chunks=(8, 16, 16))
    model = make_model(tmp_path / "prob", heads=[{"name": "mean"}, {"name": "scale", "activation": "softplus_eps"}])
    out = tmp_path / "out.ome.zarr"
    result = bigcare.restore(src.url, out, model, client=client, progress=False, ngff_version=version)
    assert list(result.outputs) == ["mean", "scale"]  # keyed by name, stored as series 0, 1
    root = zarr.open_group(str(out), mode="r")
    assert root.attrs["bigcare"]["images"] == {"mean": "0", "scale": "1"}

    models = v05 if version == "0.5" else v04
    # ome-zarr-models 1.7's open_ome_zarr tries BioFormats2Raw for 0.4 only: its 0.5 class is asked directly
    parsed = open_ome_zarr(root) if version == "0.4" else v05.BioFormats2Raw.from_zarr(root)
    assert isinstance(parsed, models.BioFormats2Raw)
    assert parsed.image_paths == ["0", "1"] and all(isinstance(i, models.Image) for i in parsed.images.values())

    listed = find_multiscales(out)  # ome-zarr-py: the layout's images with their names from OME/METADATA.ome.xml
    assert [(str(p), name) for p, name, _ in listed] == [(f"{out}/0", "mean"), (f"{out}/1", "scale")]
    fmt = FormatV05() if version == "0.5" else FormatV04()
    for (path, _, _), want in zip(listed, ("mean", "scale")):
        node = next(iter(Reader(parse_url(str(path), fmt=fmt))()))
        data = np.asarray(node.data[0])
        assert data.shape == (16, 32, 32) and np.array_equal(data, np.asarray(zarr.open_array(result.outputs[want], path="0")))

    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "images:   mean (0), scale (1)" in text and "\nmean:\nurl:      " in text and "\nscale:\nurl:      " in text
