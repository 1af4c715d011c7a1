"""Batch restoration: several inputs (paths, globs, @list files) as one queue on one cluster, the
model built once per worker, per-volume outputs and summaries, errors before anything runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bigcare
from bigcare.cli import main
from bigcare.errors import ConfigError, InputError
from bigcare.runs.batch import expand_inputs, output_paths
from conftest import builds, make_model, read, smooth_volume, write_volume

BLOCK = (8, 32, 32)


def test_cli_batch_restores_every_volume_with_one_model_load_per_worker(tmp_path, client, capsys):
    scans = tmp_path / "scans"
    shapes = {"a": (16, 64, 64), "b": (8, 64, 96), "c": (16, 32, 64)}
    data = {name: smooth_volume(shape, seed=k) for k, (name, shape) in enumerate(shapes.items())}
    for name, volume in data.items():
        write_volume(scans / f"{name}.ome.zarr", volume, chunks=BLOCK)
    (tmp_path / "more.txt").write_text(f"# the third scan\n{scans / 'c.ome.zarr'}\n")
    model = make_model(tmp_path / "model", seed=7)  # a model no worker has built yet
    before = builds(client)
    args = ["restore", str(scans / "[ab].ome.zarr"), f"@{tmp_path / 'more.txt'}", "--output-dir",
            str(tmp_path / "out"), "--model", str(model), "--block", ",".join(map(str, BLOCK)),
            "--scheduler", client.scheduler.address]
    assert main(args) == 0
    out = capsys.readouterr().out
    after = builds(client)
    assert max(after[w] - before[w] for w in after) == 1  # once per worker process, not per volume
    for name, volume in data.items():
        whole = bigcare.predict(volume, model, axes="zyx")["restored"]
        np.testing.assert_allclose(read(tmp_path / "out" / f"{name}.ome.zarr"), whole, atol=1e-5, rtol=0)
        summary = json.loads((tmp_path / "out" / f"{name}.ome.zarr" / "bigcare_summary.json").read_text())
        assert summary["complete"] and summary["input"] == str(scans / f"{name}.ome.zarr")
        assert f"{scans / f'{name}.ome.zarr'}: restored" in out
    batch = json.loads((tmp_path / "out" / "bigcare_batch_summary.json").read_text())
    assert (batch["volumes"], batch["blocks_computed"], batch["complete"]) == (3, 8 + 6 + 4, True)
    # a single-volume run gives the same bits as the batch
    bigcare.restore(scans / "b.ome.zarr", tmp_path / "b_alone.ome.zarr", model, client=client, block_shape=BLOCK,
                    progress=False)
    np.testing.assert_array_equal(read(tmp_path / "b_alone.ome.zarr"), read(tmp_path / "out" / "b.ome.zarr"))
    # running the batch again resumes every volume: nothing left
    assert main(args) == 0
    assert capsys.readouterr().out.count("restored 0 block(s)") == 3


def test_a_bad_input_stops_the_batch_before_anything_is_written(tmp_path, client, capsys):
    write_volume(tmp_path / "good.ome.zarr", smooth_volume((8, 32, 32)))
    model = make_model(tmp_path / "model")
    code = main(["restore", str(tmp_path / "good.ome.zarr"), str(tmp_path / "missing.ome.zarr"), "-o",
                 str(tmp_path / "out"), "--model", str(model), "--scheduler", client.scheduler.address])
    assert code == 2 and "missing.ome.zarr" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    code = main(["restore", str(tmp_path / "good.ome.zarr"), "x", "y", "--model", str(model)])
    assert code == 2 and "several inputs with --output-dir" in capsys.readouterr().err


def test_input_expansion_and_output_names(tmp_path):
    for name in ("b", "a"):
        (tmp_path / f"{name}.ome.zarr").mkdir()
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'b.ome.zarr'}\n\n")
    found = expand_inputs([str(tmp_path / "*.ome.zarr"), f"@{tmp_path / 'list.txt'}"])
    assert found == [str(tmp_path / "a.ome.zarr"), str(tmp_path / "b.ome.zarr")]  # sorted, no duplicates
    assert output_paths(found, "s3://bucket/out/") == ["s3://bucket/out/a.ome.zarr", "s3://bucket/out/b.ome.zarr"]
    with pytest.raises(InputError, match="matches nothing"):
        expand_inputs([str(tmp_path / "*.tif")])
    with pytest.raises(InputError, match="input list .* does not exist"):
        expand_inputs([f"@{tmp_path / 'nope.txt'}"])
    with pytest.raises(ConfigError, match="would both be written to"):
        output_paths(["/data/x/scan.ome.zarr", "/data/y/scan.ome.zarr"], tmp_path / "out")
