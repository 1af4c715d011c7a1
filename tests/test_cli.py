"""The command line: info, restore (with its own local cluster), errors, and the demo's plumbing."""

import numpy as np
import pytest
import zarr

from bigcare.cli import main
from bigcare.demo import run_demo
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


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True], ids=["shipped-model", "train-here"])
def test_demo_runs_end_to_end_on_a_tiny_volume(tmp_path, capsys, train):
    """The demo's numbers are those of the files it wrote, and its restoration is the model's
    (the shipped demo model, or one trained here with --train)."""
    import json

    import bigcare
    from bigcare.demo import DEMO_MODEL
    from bigcare.metrics import nrmse, ssim
    from conftest import read

    demo = tmp_path / "demo"
    metrics = run_demo(demo, shape=(16, 64, 64), block=(16, 32, 32), epochs=1, steps_per_epoch=2,
                       workers=1, progress=False, train=train)
    model = demo / "model" / "best" if train else DEMO_MODEL
    assert (demo / "model").exists() == train
    clean, noisy, restored = (read(demo / f"{n}.ome.zarr") for n in ("clean", "noisy", "restored"))
    assert restored.shape == clean.shape == (16, 64, 64) and np.isfinite(restored).all()
    for name, image in (("input", noisy), ("restored", restored)):
        assert metrics[name]["nrmse"] == pytest.approx(nrmse(image, clean), rel=1e-9)
        assert metrics[name]["ssim"] == pytest.approx(ssim(image, clean), rel=1e-9)
    # blockwise on the cluster == the trained model applied to the whole volume in memory
    whole = bigcare.predict(noisy, model, axes="zyx")["restored"]
    np.testing.assert_allclose(restored, whole, rtol=1e-4, atol=1e-4)
    assert not np.allclose(restored, noisy, atol=1e-3)  # the network did something
    summary = json.loads((demo / "restored.ome.zarr" / "bigcare_summary.json").read_text())
    assert summary["complete"] and summary["blocks"]["total"] == summary["blocks"]["computed"] == 4
    out = capsys.readouterr().out
    for name in ("input", "restored"):
        assert f"{metrics[name]['nrmse']:>8.4f}{metrics[name]['ssim']:>8.4f}" in out
