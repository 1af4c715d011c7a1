"""The command line: info, restore (with its own local cluster), errors, and the demo's plumbing."""

import numpy as np
import zarr

from bigcare.cli import main

from conftest import make_model, write_volume


def test_info_prints_axes_shape_and_levels(tmp_path, capsys):
    write_volume(tmp_path / "v.ome.zarr", np.zeros((8, 140, 140), np.uint16), chunks=(8, 70, 70))
    assert main(["info", str(tmp_path / "v.ome.zarr")]) == 0
    out = capsys.readouterr().out
    assert "0.5" in out and "uint16" in out and "(8, 140, 140)" in out and "micrometer" in out


def test_restore_command_starts_a_local_cluster_and_writes_output(tmp_path, capsys):
    data = np.random.default_rng(0).random((8, 40, 40)).astype(np.float32)
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(8, 20, 20))
    model = make_model(tmp_path / "model")
    code = main(["restore", str(tmp_path / "in.ome.zarr"), str(tmp_path / "out.ome.zarr"), "--model", str(model),
                 "--workers", "1", "--block", "8,20,20", "--json"])
    assert code == 0
    out = capsys.readouterr().out
    assert "dashboard" in out and "restored 4 block(s)" in out
    assert zarr.open_array(str(tmp_path / "out.ome.zarr"), path="0").shape == (8, 40, 40)


def test_restore_command_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    model = make_model(tmp_path / "model")
    code = main(["restore", str(tmp_path / "missing.ome.zarr"), str(tmp_path / "out.ome.zarr"), "--model", str(model)])
    assert code == 2
    assert "missing.ome.zarr" in capsys.readouterr().err
    assert not (tmp_path / "out.ome.zarr").exists()


def test_demo_runs_end_to_end_on_a_tiny_volume(tmp_path, capsys):
    from bigcare.demo import run_demo

    metrics = run_demo(tmp_path / "demo", shape=(16, 64, 64), block=(16, 32, 32), epochs=1, steps_per_epoch=2,
                       workers=1, progress=False)
    assert set(metrics) >= {"input", "restored"}
    assert (tmp_path / "demo" / "model" / "best" / "model.safetensors").exists()
    out = capsys.readouterr().out
    assert "NRMSE" in out and "SSIM" in out
