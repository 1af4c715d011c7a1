"""Never lose data: an output is never (inside) an input, the demo only replaces its own folder,
and an unusable device is refused before an old result is touched."""

from __future__ import annotations

import os

import numpy as np
import pytest

import bigcare
from bigcare.cli import main
from bigcare.errors import ConfigError, OutputError
from conftest import make_model, read, smooth_volume, write_volume


def _restored_once(tmp_path, client, model):
    data = smooth_volume((8, 32, 32))
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(8, 16, 16))
    bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "r.ome.zarr", model, client=client, device="cpu",
                    progress=False)
    return read(tmp_path / "r.ome.zarr")


def test_an_output_is_never_its_own_input_even_with_overwrite(tmp_path, client, model3d):
    before = _restored_once(tmp_path, client, model3d)
    os.symlink(tmp_path / "r.ome.zarr", tmp_path / "link.ome.zarr")
    for output in (tmp_path / "r.ome.zarr", tmp_path / "link.ome.zarr", f"file://{tmp_path}/r.ome.zarr/"):
        with pytest.raises(OutputError, match="is the input .*an output may never be"):
            bigcare.restore(tmp_path / "r.ome.zarr", output, model3d, client=client, device="cpu", overwrite=True,
                            progress=False)
    np.testing.assert_array_equal(read(tmp_path / "r.ome.zarr"), before)  # untouched


def test_an_output_inside_an_input_or_containing_it_is_refused(tmp_path, client, model3d, capsys):
    _restored_once(tmp_path, client, model3d)
    listing = sorted(os.listdir(tmp_path / "in.ome.zarr"))
    code = main(["restore", str(tmp_path / "in.ome.zarr"), str(tmp_path / "in.ome.zarr" / "inside.ome.zarr"),
                 "--model", str(model3d), "--device", "cpu"])
    assert code == 2 and "is inside the input" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "in.ome.zarr")) == listing
    with pytest.raises(OutputError, match="contains the input"):
        bigcare.restore(tmp_path / "in.ome.zarr", tmp_path, model3d, client=client, device="cpu", overwrite=True,
                        progress=False)


def test_a_batch_never_writes_over_one_of_its_inputs(tmp_path, client, model3d, capsys):
    before = _restored_once(tmp_path, client, model3d)
    code = main(["restore", str(tmp_path / "r.ome.zarr"), "--output-dir", str(tmp_path), "--model", str(model3d),
                 "--device", "cpu", "--overwrite"])
    assert code == 2 and "is the input" in capsys.readouterr().err
    np.testing.assert_array_equal(read(tmp_path / "r.ome.zarr"), before)


def test_training_refuses_a_model_dir_inside_a_source(tmp_path):
    from bigcare.training import train

    write_volume(tmp_path / "x.ome.zarr", smooth_volume((8, 32, 32)))
    config = {"model_dir": str(tmp_path / "x.ome.zarr" / "model"),
              "data": {"sources": [{"input": str(tmp_path / "x.ome.zarr"), "target": str(tmp_path / "x.ome.zarr")}],
                       "patch_shape": [8, 16, 16], "n_patches": 10}}
    with pytest.raises(OutputError, match="model_dir .* is inside the training image"):
        train(config, progress=False)
    assert not (tmp_path / "x.ome.zarr" / "model").exists()


def test_the_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    code = main(["demo", "--out", str(mine), "--epochs", "1", "--steps-per-epoch", "1"])
    assert code == 2 and "did not make" in capsys.readouterr().err
    assert (mine / "thesis.txt").read_text() == "years of work" and sorted(os.listdir(mine)) == ["thesis.txt"]
    cwd = os.getcwd()
    try:
        os.chdir(mine)
        assert main(["demo", "--out", ".", "--epochs", "1", "--steps-per-epoch", "1"]) == 2
    finally:
        os.chdir(cwd)
    assert sorted(os.listdir(mine)) == ["thesis.txt"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_no_worker_has_is_refused_before_the_old_result_is_touched(tmp_path, client, model3d):
    before = _restored_once(tmp_path, client, model3d)
    other = make_model(tmp_path / "other", ndim=3, seed=1)
    with pytest.raises(ConfigError, match="device 'cuda' is not usable on any of the 2 worker"):
        bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "r.ome.zarr", other, client=client, device="cuda",
                        overwrite=True, progress=False)
    np.testing.assert_array_equal(read(tmp_path / "r.ome.zarr"), before)
    with pytest.raises(ConfigError, match="not usable"):
        bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "new.ome.zarr", other, client=client, device="cuda",
                        progress=False)
    assert not (tmp_path / "new.ome.zarr").exists()
    with pytest.raises(ConfigError, match="device must be 'cpu', 'cuda' or 'cuda:N', got 'nonsense'"):
        bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "r.ome.zarr", other, client=client,
                        device="nonsense", overwrite=True, progress=False)
    np.testing.assert_array_equal(read(tmp_path / "r.ome.zarr"), before)


def test_a_batch_with_an_unusable_second_volume_writes_nothing(tmp_path, client, model3d, capsys):
    write_volume(tmp_path / "a.ome.zarr", smooth_volume((8, 32, 32)))
    write_volume(tmp_path / "b.ome.zarr", np.full((8, 32, 32), np.nan, np.float32))
    code = main(["restore", str(tmp_path / "a.ome.zarr"), str(tmp_path / "b.ome.zarr"), "--output-dir",
                 str(tmp_path / "out"), "--model", str(model3d), "--device", "cpu", "--workers", "1"])
    assert code == 2 and "holds no finite values" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resuming_onto_an_input_replaced_in_place_is_refused(tmp_path, client, model3d):
    """The run key covers path, shape and dtype; the fingerprint covers the voxels."""
    import zarr

    from bigcare.tasks.block import MARKER

    data = smooth_volume((8, 64, 64))
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(8, 32, 32))
    out = tmp_path / "out.ome.zarr"
    bigcare.restore(tmp_path / "in.ome.zarr", out, model3d, client=client, device="cpu", block_shape=(8, 32, 32),
                    progress=False)
    marker = zarr.open_array(str(out), path=MARKER, mode="r+")
    marker[0, 1, 1] = 0  # as if the run had been cut short
    first = read(out)
    zarr.open_array(str(tmp_path / "in.ome.zarr"), path="0", mode="r+")[...] = smooth_volume((8, 64, 64), seed=5)
    with pytest.raises(bigcare.InputError, match="changed since .* was started .*resuming would mix two inputs"):
        bigcare.restore(tmp_path / "in.ome.zarr", out, model3d, client=client, device="cpu",
                        block_shape=(8, 32, 32), progress=False)
    np.testing.assert_array_equal(read(out), first)
    bigcare.restore(tmp_path / "in.ome.zarr", out, model3d, client=client, device="cpu", block_shape=(8, 32, 32),
                    overwrite=True, progress=False)  # starts over on the new input
    whole = bigcare.predict(smooth_volume((8, 64, 64), seed=5), model3d, axes="zyx")["restored"]
    np.testing.assert_allclose(read(out), whole, atol=1e-5)
