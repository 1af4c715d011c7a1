"""The block runner: blockwise == whole volume, resume, failures, bad input, named outputs."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import zarr

import bigcare
from bigcare.errors import BlockError, InputError, ModelMismatchError, OutputError
from bigcare.store.volume import open_volume
from bigcare.tasks.block import MARKER
from conftest import make_model, read, smooth_volume, write_volume


@pytest.mark.parametrize(
    "shape, block",
    [
        ((37, 45, 51), (8, 16, 16)),     # nothing is a multiple of the block or of 2**depth
        ((20, 64, 40), (12, 24, 40)),    # blocks cut Z and Y, whole X
        ((9, 30, 33), (16, 16, 16)),     # one block along Z, shorter than the halo
    ],
)
def test_blockwise_equals_whole_volume_3d(tmp_path, client, model3d, shape, block):
    data = smooth_volume(shape)
    write_volume(tmp_path / "in.ome.zarr", data, chunks=block)
    result = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", model3d, client=client,
                             block_shape=block, device="cpu", progress=False)
    assert result.blocks_total == int(np.prod([-(-n // b) for n, b in zip(shape, block)]))
    whole = bigcare.predict(data, model3d, axes="zyx")["restored"]
    blockwise = read(tmp_path / "out.ome.zarr")
    assert blockwise.shape == shape
    assert np.abs(whole - data).max() > 0.05, "the model must change the data for the test to mean anything"
    np.testing.assert_allclose(blockwise, whole, atol=1e-5, rtol=0)


def test_blocks_predicted_in_tiles_equal_whole_volume(tmp_path, client, model3d):
    data = smooth_volume((20, 64, 40))
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(20, 32, 40))
    result = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", model3d, client=client,
                             block_shape=(20, 32, 40), tile_shape=(12, 16, 24), progress=False)
    assert result.blocks_total == 2
    assert result.halo_overhead > 1.5  # tiles recompute their halos: reported in the summary
    whole = bigcare.predict(data, model3d, axes="zyx")["restored"]
    np.testing.assert_allclose(read(tmp_path / "out.ome.zarr"), whole, atol=1e-5, rtol=0)


def test_blockwise_equals_whole_volume_2d_timelapse_and_channels(tmp_path, client):
    # a 2D model over a time-lapse: t is iterated, y/x are blocked
    model = make_model(tmp_path / "m2d", ndim=2, kernel_size=3)
    data = smooth_volume((3, 50, 61))
    write_volume(tmp_path / "t.ome.zarr", data, axes="tyx", chunks=(1, 16, 24))
    bigcare.restore(tmp_path / "t.ome.zarr", tmp_path / "t_out.ome.zarr", model, client=client,
                    block_shape=(16, 24), progress=False)
    whole = bigcare.predict(data, model, axes="tyx")["restored"]
    np.testing.assert_allclose(read(tmp_path / "t_out.ome.zarr"), whole, atol=1e-5, rtol=0)

    # a two-channel 3D model, per-channel normalization
    model_c = make_model(tmp_path / "mc", ndim=3, n_in=2, n_out=2)
    data_c = np.stack([smooth_volume((13, 30, 22), 1), 10 * smooth_volume((13, 30, 22), 2)])
    write_volume(tmp_path / "c.ome.zarr", data_c, axes="czyx", chunks=(2, 8, 16, 8))
    bigcare.restore(tmp_path / "c.ome.zarr", tmp_path / "c_out.ome.zarr", model_c, client=client,
                    block_shape=(8, 16, 8), progress=False)
    whole_c = bigcare.predict(data_c, model_c, axes="czyx")["restored"]
    np.testing.assert_allclose(read(tmp_path / "c_out.ome.zarr"), whole_c, atol=1e-4, rtol=0)


def test_output_metadata_validates_and_keeps_voxel_size(tmp_path, client, model3d):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models import open_ome_zarr

    data = smooth_volume((20, 136, 136))
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(20, 68, 68), scale=(2.0, 0.25, 0.25))
    for version in ("0.5", "0.4"):
        out = tmp_path / f"out{version}.ome.zarr"
        bigcare.restore(tmp_path / "in.ome.zarr", out, model3d, client=client, ngff_version=version, progress=False)
        zgroup = zarr.open_group(str(out), mode="r")
        open_ome_zarr(zgroup)  # raises if the metadata is not valid NGFF
        vol = open_volume(out)
        assert vol.ngff_version == version
        assert vol.scale == (2.0, 0.25, 0.25)
        assert [a.unit for a in vol.axes] == ["micrometer"] * 3
        assert len(vol.levels) >= 2
        nodes = list(Reader(parse_url(str(out)))())
        assert nodes and nodes[0].data[0].shape == (20, 136, 136)
        assert vol.attrs["bigcare"]["complete"] is True


def test_rerun_recomputes_only_missing_blocks(tmp_path, client, model3d):
    data = smooth_volume((16, 48, 48))
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(8, 16, 16))
    out = tmp_path / "out.ome.zarr"
    first = bigcare.restore(tmp_path / "in.ome.zarr", out, model3d, client=client, block_shape=(8, 16, 16),
                            progress=False)
    assert first.blocks_computed == 18
    reference = read(out)
    # simulate an interrupted run: three blocks never finished (no marker, no data)
    marker = zarr.open_array(store=str(out), path=MARKER, mode="r+")
    output = zarr.open_array(store=str(out), path="0", mode="r+")
    lost = [(0, 0, 0), (1, 2, 1), (0, 1, 2)]
    for z, y, x in lost:
        marker[z, y, x] = 0
        output[z * 8:(z + 1) * 8, y * 16:(y + 1) * 16, x * 16:(x + 1) * 16] = 0
    second = bigcare.restore(tmp_path / "in.ome.zarr", out, model3d, client=client, block_shape=(8, 16, 16),
                             progress=False)
    assert (second.blocks_computed, second.blocks_skipped) == (3, 15)
    np.testing.assert_array_equal(read(out), reference)
    third = bigcare.restore(tmp_path / "in.ome.zarr", out, model3d, client=client, block_shape=(8, 16, 16),
                            progress=False)
    assert third.blocks_computed == 0


def test_failing_block_is_reported_others_finish_and_rerun_completes(tmp_path, client, model3d):
    data = smooth_volume((16, 96, 96))
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(8, 16, 16))
    out = tmp_path / "out.ome.zarr"
    kwargs = dict(client=client, block_shape=(8, 16, 16), progress=False)
    bigcare.restore(tmp_path / "in.ome.zarr", out, model3d, **kwargs)
    reference = read(out)
    # start over from the markers' point of view, with one input chunk now corrupt
    marker = zarr.open_array(store=str(out), path=MARKER, mode="r+")
    marker[...] = 0
    chunk_file = tmp_path / "in.ome.zarr" / "0" / "c" / "1" / "5" / "5"
    good_bytes = chunk_file.read_bytes()
    chunk_file.write_bytes(b"this is not a compressed chunk")
    with pytest.raises(BlockError, match=r"\d+ of 72 block\(s\) failed.*block \(\d, \d, \d\).*decompression"):
        bigcare.restore(tmp_path / "in.ome.zarr", out, model3d, **kwargs)
    done = np.asarray(zarr.open_array(store=str(out), path=MARKER, mode="r")[...])
    # blocks whose read region avoids the corrupt chunk finished; the others did not
    assert done[1, 5, 5] == 0 and done[0, 0, 0] == 1
    assert zarr.open_group(str(out), mode="r").attrs["bigcare"]["complete"] is False
    chunk_file.write_bytes(good_bytes)
    result = bigcare.restore(tmp_path / "in.ome.zarr", out, model3d, **kwargs)
    assert result.blocks_computed == done.size - done.sum()
    np.testing.assert_array_equal(read(out), reference)
    assert zarr.open_group(str(out), mode="r").attrs["bigcare"]["complete"] is True


def test_several_named_outputs_are_written_as_images(tmp_path, client):
    model = make_model(tmp_path / "prob", heads=[{"name": "mean"}, {"name": "scale", "activation": "softplus"}])
    data = smooth_volume((12, 32, 32))
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(12, 16, 16))
    out = tmp_path / "out.zarr"
    result = bigcare.restore(tmp_path / "in.ome.zarr", out, model, client=client, progress=False)
    whole = bigcare.predict(data, model, axes="zyx")
    assert result.outputs == {"mean": f"{out}/0", "scale": f"{out}/1"}  # series of a bioformats2raw root
    for name in ("mean", "scale"):
        vol = open_volume(result.outputs[name])
        np.testing.assert_allclose(np.asarray(vol.array()[...]), whole[name], atol=1e-5)
    assert (whole["scale"] > 0).all()


# ---- bad input: one clear error, nothing written -------------------------------------------

def test_missing_input_path(tmp_path, client, model3d):
    with pytest.raises(InputError, match="does-not-exist"):
        bigcare.restore(tmp_path / "does-not-exist.ome.zarr", tmp_path / "out.ome.zarr", model3d, client=client)
    assert not (tmp_path / "out.ome.zarr").exists()


def test_model_for_another_dimensionality(tmp_path, client, model2d, model3d):
    write_volume(tmp_path / "vol3d.ome.zarr", smooth_volume((8, 16, 16)))
    with pytest.raises(ModelMismatchError, match=r"2D with spatial axes 'YX'.*'ZYX'"):
        bigcare.restore(tmp_path / "vol3d.ome.zarr", tmp_path / "out.ome.zarr", model2d, client=client)
    write_volume(tmp_path / "img2d.ome.zarr", smooth_volume((16, 16)), axes="yx")
    with pytest.raises(ModelMismatchError, match=r"3D with spatial axes 'ZYX'.*'YX'"):
        bigcare.restore(tmp_path / "img2d.ome.zarr", tmp_path / "out.ome.zarr", model3d, client=client)
    assert not (tmp_path / "out.ome.zarr").exists()


def test_wrong_channel_count(tmp_path, client, model3d):
    write_volume(tmp_path / "c.ome.zarr", np.stack([smooth_volume((8, 16, 16))] * 2), axes="czyx")
    with pytest.raises(ModelMismatchError, match="expects 1 input channel.*has 2"):
        bigcare.restore(tmp_path / "c.ome.zarr", tmp_path / "out.ome.zarr", model3d, client=client)
    assert not (tmp_path / "out.ome.zarr").exists()


def test_nan_only_volume(tmp_path, client, model3d):
    write_volume(tmp_path / "nan.ome.zarr", np.full((8, 16, 16), np.nan, np.float32))
    with pytest.raises(InputError, match="no finite values"):
        bigcare.restore(tmp_path / "nan.ome.zarr", tmp_path / "out.ome.zarr", model3d, client=client)
    assert not (tmp_path / "out.ome.zarr").exists()


def test_existing_output_not_ours_is_never_touched(tmp_path, client, model3d):
    write_volume(tmp_path / "in.ome.zarr", smooth_volume((8, 16, 16)))
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="not written by bigcare"):
            bigcare.restore(tmp_path / "in.ome.zarr", foreign, model3d, client=client, overwrite=overwrite)
    assert os.listdir(foreign) == ["notes.txt"]


def test_rerun_with_another_model_refuses_unless_overwrite(tmp_path, client, model3d):
    write_volume(tmp_path / "in.ome.zarr", smooth_volume((8, 16, 16)))
    out = tmp_path / "out.ome.zarr"
    bigcare.restore(tmp_path / "in.ome.zarr", out, model3d, client=client, progress=False)
    before = read(out)
    other = make_model(tmp_path / "other", seed=1)
    with pytest.raises(OutputError, match="different run"):
        bigcare.restore(tmp_path / "in.ome.zarr", out, other, client=client, progress=False)
    np.testing.assert_array_equal(read(out), before)
    with pytest.raises(OutputError, match="different run"):
        bigcare.restore(tmp_path / "in.ome.zarr", out, model3d, client=client, block_shape=(8, 8, 8), progress=False)
    result = bigcare.restore(tmp_path / "in.ome.zarr", out, other, client=client, overwrite=True, progress=False)
    assert result.blocks_computed == result.blocks_total
    assert not np.array_equal(read(out), before)


def test_corrupt_model_folder(tmp_path, client):
    write_volume(tmp_path / "in.ome.zarr", smooth_volume((8, 16, 16)))
    broken = make_model(tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(bigcare.ModelError, match="broken"):
        bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", broken, client=client)
    shutil.rmtree(broken)
    with pytest.raises(bigcare.ModelError, match="broken"):
        bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", broken, client=client)
    assert not (tmp_path / "out.ome.zarr").exists()


def test_identity_predictor_object_copies_the_volume(tmp_path, client):
    from bigcare.predictors.identity import IdentityPredictor

    data = (np.random.default_rng(1).random((10, 40, 30)) * 1000).astype(np.uint16)
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(5, 16, 16))
    result = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", IdentityPredictor("zyx"),
                             client=client, progress=False)
    assert result.blocks_total >= 1 and result.halo_overhead == 1.0
    np.testing.assert_array_equal(read(tmp_path / "out.ome.zarr"), data.astype(np.float32))


def test_bf16_autocast_stays_close_to_fp32(tmp_path):
    model = make_model(tmp_path / "m", n_filter_base=8)
    data = smooth_volume((16, 32, 32))
    fp32 = bigcare.predict(data, model, axes="zyx", precision="fp32")["restored"]
    bf16 = bigcare.predict(data, model, axes="zyx", precision="bf16")["restored"]
    rel_l2 = np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32)
    assert 0 < rel_l2 < 2e-2


def test_the_summary_says_which_precision_ran(tmp_path, client, model3d):
    from bigcare.predictors.fastpath import resolve_precision
    from bigcare.runs.results import format_summary

    write_volume(tmp_path / "in.ome.zarr", smooth_volume((8, 16, 16)))
    auto = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "a.ome.zarr", model3d, client=client, progress=False)
    assert auto.precision == f"auto: {resolve_precision('auto', 'cpu')}"  # the workers share this machine's CPU
    assert f"precision {auto.precision}" in format_summary(auto)
    summary = json.loads((tmp_path / "a.ome.zarr" / "bigcare_summary.json").read_text())
    assert summary["precision"] == auto.precision
    fp32 = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "b.ome.zarr", model3d, client=client, progress=False,
                           precision="fp32")
    assert fp32.precision == "fp32"


def test_overwrite_keeps_the_old_output_when_the_new_input_is_unusable(tmp_path, client, model3d):
    write_volume(tmp_path / "in.ome.zarr", smooth_volume((8, 16, 16)))
    out = tmp_path / "out.ome.zarr"
    bigcare.restore(tmp_path / "in.ome.zarr", out, model3d, client=client, progress=False)
    before = read(out)
    write_volume(tmp_path / "nan.ome.zarr", np.full((8, 16, 16), np.nan, np.float32))
    with pytest.raises(InputError, match="no finite values"):
        bigcare.restore(tmp_path / "nan.ome.zarr", out, model3d, client=client, overwrite=True, progress=False)
    np.testing.assert_array_equal(read(out), before)


def test_gpu_runs_request_one_gpu_resource_per_block_task(tmp_path):
    """device="cuda" is the CPU path plus a GPU resource per block task: with one worker that
    advertises GPU=1 and one that does not, every block runs on the GPU worker. The identity
    predictor never touches torch, so this runs for real on a CPU-only machine."""
    import subprocess
    import sys

    from distributed import Client, LocalCluster, get_task_stream

    from bigcare.predictors.identity import IdentityPredictor

    data = smooth_volume((8, 32, 32))
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(4, 16, 16))
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None, silence_logs=40) as cluster, \
            Client(cluster) as client:
        gpu_worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address, "--nthreads", "1",
             "--resources", "GPU=1", "--name", "gpu0", "--no-dashboard", "--host", "127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client.wait_for_workers(2, timeout=60)
            gpu_address = next(a for a, w in client.scheduler_info()["workers"].items() if w.get("name") == "gpu0")
            with get_task_stream(client) as stream:
                bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", IdentityPredictor("zyx"),
                                client=client, device="cuda", block_shape=(4, 16, 16), pyramid=False, progress=False)
            workers = {t["worker"] for t in stream.data if str(t["key"]).startswith("bigcare-block")}
            assert workers == {gpu_address}
        finally:
            gpu_worker.terminate()
            gpu_worker.wait(timeout=30)
    np.testing.assert_array_equal(read(tmp_path / "out.ome.zarr"), data)
