"""The multi-node path for real: `dask scheduler` + two `dask worker` processes on 127.0.0.1,
`bigcare restore --scheduler tcp://...`, and the model sent once instead of read from disk."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from dask_procs import DaskProcesses
from distributed import Client

import bigcare
from bigcare.cli import main
from bigcare.errors import ModelError
from bigcare.models import model_hash
from bigcare.predictors.shipping import ModelPayload
from conftest import builds, listening, make_model, read, smooth_volume, write_volume

BLOCK = (8, 32, 32)

pytestmark = pytest.mark.slow  # real dask scheduler and worker processes


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    p = DaskProcesses(tmp_path_factory.mktemp("dask"), n_workers=2)
    yield p
    p.close()


@pytest.fixture(scope="module")
def remote(procs):
    with Client(procs.address, timeout=60) as c:
        c.wait_for_workers(2, timeout=60)
        yield c


def test_cli_restore_on_scheduler_and_worker_processes_equals_local_run(tmp_path, client, procs, remote, capsys):
    data = smooth_volume((16, 64, 64))
    write_volume(tmp_path / "in.ome.zarr", data, chunks=BLOCK)
    model = make_model(tmp_path / "model")
    code = main(["restore", str(tmp_path / "in.ome.zarr"), str(tmp_path / "remote.ome.zarr"), "--model", str(model),
                 "--scheduler", procs.address, "--block", ",".join(map(str, BLOCK))])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"connected to {procs.address}" in out and "restored 8 block(s)" in out
    local = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "local.ome.zarr", model, client=client,
                            block_shape=BLOCK, progress=False)
    assert local.blocks_computed == 8
    np.testing.assert_array_equal(read(tmp_path / "remote.ome.zarr"), read(tmp_path / "local.ome.zarr"))
    summary = json.loads((tmp_path / "remote.ome.zarr" / "bigcare_summary.json").read_text())
    assert summary["cluster"]["scheduler"] == procs.address and summary["cluster"]["workers"] == 2
    assert summary["complete"] and summary["blocks"]["computed"] == 8
    assert summary["voxels"] == 16 * 64 * 64 and summary["voxels_per_second"] > 0
    assert (summary["retries"], summary["rescheduled"], summary["failed_blocks"]) == (0, 0, [])
    assert summary["halo_overhead"] > 1 and summary["peak_worker_rss_mb"] > 50
    assert set(summary["seconds_in"]) == {"read", "predict", "write"} and summary["seconds_in"]["predict"] > 0
    assert "Mvoxel/s" in out and "peak worker RSS" in out and "task seconds: read" in out
    # the workers got the model's bytes and built it at most once each
    counts = builds(remote)
    assert len(counts) == 2 and sum(counts.values()) >= 1 and max(counts.values()) <= 1


def test_sent_model_needs_no_model_files_on_the_workers(tmp_path, remote):
    data = smooth_volume((16, 64, 64), seed=1)
    write_volume(tmp_path / "in.ome.zarr", data, chunks=BLOCK)
    folder = make_model(tmp_path / "model", seed=3)
    whole = bigcare.predict(data, folder, axes="zyx")["restored"]
    payload = ModelPayload.from_folder(folder)
    assert payload.hash == model_hash(folder)
    shutil.rmtree(folder)  # the model now exists only in memory, on the client
    result = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", payload, client=remote,
                             block_shape=BLOCK, progress=False)
    assert result.blocks_computed == 8
    np.testing.assert_allclose(read(tmp_path / "out.ome.zarr"), whole, atol=1e-5, rtol=0)


def test_model_by_path_on_shared_storage_gives_the_same_output(tmp_path, remote):
    data = smooth_volume((16, 64, 64), seed=2)
    write_volume(tmp_path / "in.ome.zarr", data, chunks=BLOCK)
    model = make_model(tmp_path / "model", seed=4)
    for name, ship in (("sent", True), ("path", False)):
        bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / f"{name}.ome.zarr", model, client=remote,
                        block_shape=BLOCK, progress=False, ship_model=ship)
    np.testing.assert_array_equal(read(tmp_path / "sent.ome.zarr"), read(tmp_path / "path.ome.zarr"))


def test_damaged_model_bytes_are_refused_before_anything_is_written(tmp_path, remote):
    write_volume(tmp_path / "in.ome.zarr", smooth_volume((8, 32, 32)))
    payload = ModelPayload.from_folder(make_model(tmp_path / "model"))
    weights = bytearray(payload.weights)
    weights[-1] ^= 0xFF
    damaged = ModelPayload(payload.config_json, bytes(weights), payload.hash, "a test")
    with pytest.raises(ModelError, match="damaged: its bytes hash to"):
        bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", damaged, client=remote)
    assert not (tmp_path / "out.ome.zarr").exists()


def test_cli_train_reads_its_patches_on_a_named_scheduler(tmp_path, procs, remote):
    import yaml
    from distributed import get_task_stream

    from bigcare.synth import write_pair

    write_pair(tmp_path / "in.ome.zarr", tmp_path / "gt.ome.zarr", (24, 64, 64), chunks=(12, 32, 32), photons=5, seed=0)
    config = {
        "model_dir": str(tmp_path / "model"),
        "data": {"sources": [{"input": str(tmp_path / "in.ome.zarr"), "target": str(tmp_path / "gt.ome.zarr")}],
                 "patch_shape": [8, 32, 32], "n_patches": 16},
        "network": {"depth": 1, "n_filter_base": 4},
        "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    with get_task_stream(remote) as stream:
        assert main(["train", str(tmp_path / "train.yaml"), "--scheduler", procs.address]) == 0
    assert stream.data, "no task ran on the named scheduler's workers"
    assert (tmp_path / "model" / "best" / "model.safetensors").exists()


def test_the_scheduler_and_worker_processes_listen_on_loopback_only(procs, remote):
    found = listening(p.pid for p in procs.procs if p.poll() is None)
    assert len(found) >= 3  # the scheduler's comm and HTTP server, each worker's comm at least
    assert {ip for ip, _ in found} == {"127.0.0.1"}, found
