"""What a microscopist sees before a run: the plan (dry run), one shape syntax, --version, --quiet."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

import bigcare
from bigcare.cli import build_parser, main
from bigcare.runs.dryrun import plan_restore
from conftest import make_model, smooth_volume, write_volume


@pytest.fixture
def volume(tmp_path):
    return write_volume(tmp_path / "in.ome.zarr", smooth_volume((16, 64, 64)), chunks=(8, 32, 32))


def test_the_plan_writes_nothing_and_matches_the_run(tmp_path, volume, client):
    model = make_model(tmp_path / "m", ndim=3)
    out = tmp_path / "out.ome.zarr"
    plan = plan_restore(volume.url, out, model, block_shape=(8, 32, 32), device="cpu")
    assert not out.exists()
    assert plan["state"] == "fresh" and plan["blocks"] == plan["blocks_to_do"] == 8
    assert plan["block_shape"] == [8, 32, 32] and plan["network_calls"] == 8
    assert plan["outputs"]["restored"]["shape"] == [16, 64, 64] and plan["estimated_peak_worker_mb"] > 0
    result = bigcare.restore(volume.url, out, model, client=client, block_shape=(8, 32, 32), device="cpu",
                             progress=False)
    assert result.blocks_total == plan["blocks"]
    assert result.halo_overhead == pytest.approx(plan["halo_overhead"])
    assert zarr.open_group(str(out), mode="r")["0"].shape == tuple(plan["outputs"]["restored"]["shape"])
    # after the run: a resume with nothing left to do
    marker = zarr.open_array(store=str(out), path="bigcare_done", mode="r+")
    marker[0, 0, 0] = 0  # one block undone
    again = plan_restore(volume.url, out, model, block_shape=(8, 32, 32), device="cpu")
    assert again["state"] == "resume" and again["blocks_to_do"] == 1
    assert "resume (7 of 8 blocks already done)" in again["action"]


def test_plan_and_dry_run_print_the_plan_and_exit_2_where_restore_would_refuse(tmp_path, volume, capsys):
    model = make_model(tmp_path / "m", ndim=3)
    args = [volume.url, str(tmp_path / "out.ome.zarr"), "--model", str(model), "--device", "cpu"]
    assert main(["plan", *args, "--json"]) == 0
    printed = capsys.readouterr().out
    assert "plan: start:" in printed and "nothing was written (dry run)" in printed
    assert json.loads(printed.strip().splitlines()[-1])["blocks"] >= 1
    assert main(["restore", *args, "--dry-run"]) == 0
    assert "estimated peak memory per worker" in capsys.readouterr().out
    assert not (tmp_path / "out.ome.zarr").exists()
    (tmp_path / "theirs.ome.zarr").mkdir()  # a folder bigcare did not write
    assert main(["plan", volume.url, str(tmp_path / "theirs.ome.zarr"), "--model", str(model), "--device", "cpu"]) == 2
    assert "was not written by bigcare" in capsys.readouterr().err


@pytest.mark.parametrize("written", [["8,16,16"], ["8x16x16"], ["8", "16", "16"], ["8, 16, 16"]])
def test_one_syntax_for_shapes_and_sizes(written):
    parser = build_parser()
    args = parser.parse_args(["restore", "a", "b", "--model", "m", "--block-shape", *written])
    assert args.block_shape == (8, 16, 16)
    args = parser.parse_args(["convert", "a.tif", "b", "--voxel-size", *[w.replace("16", "0.5") for w in written]])
    assert args.voxel_size == (8.0, 0.5, 0.5)


def test_a_size_that_is_no_number_says_how_to_write_it(capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["restore", "--block-shape", "8", "16", "in.ome.zarr", "out", "--model", "m"])
    assert exit.value.code == 2
    assert "write sizes with commas when paths follow the option" in capsys.readouterr().err


def test_version_and_output_folders_alike(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"bigcare {bigcare.__version__}"
    parser = build_parser()
    for command in ("demo", "synth"):
        assert parser.parse_args([command, "DIR"]).out == "DIR"
        assert parser.parse_args([command, "--out", "DIR"]).out_option == "DIR"  # the earlier form
    assert main(["synth", "A", "--out", "B"]) == 2
    assert "two output folders given" in capsys.readouterr().err


def test_quiet_restore_prints_only_the_summary(tmp_path, volume, capfd):
    model = make_model(tmp_path / "m", ndim=3)
    assert main(["restore", volume.url, str(tmp_path / "out.ome.zarr"), "--model", str(model), "--device", "cpu",
                 "--workers", "1", "-q"]) == 0
    out, err = capfd.readouterr()
    assert "restored" in out and "dashboard" not in out + err and "block/s" not in err
    assert np.isfinite(zarr.open_group(str(tmp_path / "out.ome.zarr"), mode="r")["0"][...]).all()
