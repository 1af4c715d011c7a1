"""``bigcare info``: state of bigcare's own images (complete, blocks done), provenance, multi-output
groups, shards and offsets."""

from __future__ import annotations

import zarr

import bigcare
from bigcare.cli import main
from bigcare.runs.info import info
from conftest import make_model, smooth_volume, write_volume


def test_info_tells_a_complete_output_from_an_unfinished_one(tmp_path, client):
    from bigcare.predictors.identity import IdentityPredictor
    from bigcare.runs.models import resolve_model
    from bigcare.runs.volume import plan_volume_run, start_volume_run

    src = write_volume(tmp_path / "in.ome.zarr", smooth_volume((16, 32, 32)), chunks=(8, 16, 16))
    model = make_model(tmp_path / "m", ndim=3)
    bigcare.restore(src.url, tmp_path / "done.ome.zarr", model, client=client, device="cpu", progress=False)
    text = info(str(tmp_path / "done.ome.zarr"))
    assert "state:    complete" in text and f"restore with model {model}" in text and f"from {src.url}" in text
    run = start_volume_run(plan_volume_run(src, tmp_path / "half.ome.zarr", resolve_model(IdentityPredictor()),
                                           block_shape=(8, 16, 16), device="cpu"))
    marker = zarr.open_array(store=str(tmp_path / "half.ome.zarr"), path="bigcare_done", mode="r+")
    marker[0, 0, 0] = 1
    assert f"state:    INCOMPLETE: 1 of {len(run.plan)} blocks done" in info(str(tmp_path / "half.ome.zarr"))
    assert "state:" not in info(src.url)  # not bigcare's: no state claimed


def test_info_of_a_multi_output_group_lists_its_images(tmp_path, client, capsys):
    src = write_volume(tmp_path / "in.ome.zarr", smooth_volume((16, 32, 32)), chunks=(8, 16, 16))
    model = make_model(tmp_path / "prob", heads=[{"name": "mean"}, {"name": "scale", "activation": "softplus"}])
    bigcare.restore(src.url, tmp_path / "out.ome.zarr", model, client=client, device="cpu", progress=False)
    assert main(["info", str(tmp_path / "out.ome.zarr")]) == 0
    text = capsys.readouterr().out
    assert "images:   mean (0), scale (1)" in text and "state:    complete" in text
    assert text.count("url:      ") == 3 and "\nscale:\nurl:      " in text and "out.ome.zarr/1" in text


def test_info_names_shards_and_offsets(tmp_path):
    from bigcare.store.axes import Axis
    from bigcare.store.write import create_volume

    url = str(tmp_path / "v.ome.zarr")
    create_volume(url, shape=(32, 64, 64), dtype="uint16", chunks=(32, 64, 64), axes=[Axis.named(a) for a in "zyx"],
                  scale=(2.0, 1.0, 1.0), translation=(10.0, 0.0, 0.0), levels=1)
    # level 0 re-made as a sharded array: 32x64x64 shards of 8x16x16 chunks
    zarr.create_array(url, name="0", shape=(32, 64, 64), chunks=(8, 16, 16), shards=(32, 64, 64), dtype="uint16",
                      overwrite=True)
    text = info(url)
    assert "chunks (8, 16, 16)" in text and "shards (32, 64, 64)" in text
    assert "offset (10, 0, 0)" in text
