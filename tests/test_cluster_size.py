"""The run summary names the cluster's kind and its size over the run (workers at the start, the
most at once, at the end), counted from a real local cluster that grows and shrinks."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from distributed import Client, LocalCluster

import bigcare
from bigcare.cli import main
from bigcare.predictors.identity import IdentityPredictor
from bigcare.tasks.cluster_size import ClusterSize, cluster_kind
from conftest import make_model, smooth_volume, write_volume


def _wait(client, n: int) -> None:
    deadline = time.monotonic() + 60
    while len(client.scheduler_info()["workers"]) != n:
        assert time.monotonic() < deadline, f"the cluster did not reach {n} worker(s)"
        time.sleep(0.1)


def test_cluster_size_follows_workers_that_join_and_leave():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster) as client:
        client.wait_for_workers(1, timeout=60)
        assert cluster_kind(client) == "local"
        with ClusterSize(client) as size:
            cluster.scale(2)
            _wait(client, 2)
            time.sleep(0.5)  # the add-worker event reaches the client on its own stream
            cluster.scale(1)
            _wait(client, 1)
        assert (size.start, size.peak, size.end) == (1, 2, 1)
        counts = [n for _, n in size.changes]
        assert counts[0] == 1 and 2 in counts and counts[-1] == 1
        seconds = [t for t, _ in size.changes]
        assert seconds == sorted(seconds)


def test_a_client_of_an_existing_scheduler_is_of_kind_scheduler(client):
    with Client(client.scheduler.address) as other:
        assert cluster_kind(other) == "scheduler"


@pytest.mark.slow  # a local cluster started by the command
def test_summary_names_the_cluster_kind_and_its_size(tmp_path, capsys):
    write_volume(tmp_path / "in.ome.zarr", smooth_volume((8, 32, 32)), chunks=(8, 16, 16))
    model = make_model(tmp_path / "model")
    assert main(["restore", str(tmp_path / "in.ome.zarr"), str(tmp_path / "out.ome.zarr"), "--model", str(model),
                 "--workers", "2", "--dashboard", "127.0.0.1:0", "--json", "-q"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "out.ome.zarr" / "bigcare_summary.json").read_text())
    cluster = summary["cluster"]
    assert cluster["kind"] == "local" and cluster["workers"] == 2
    assert {k: cluster["size"][k] for k in ("start", "peak", "end")} == {"start": 2, "peak": 2, "end": 2}
    assert cluster["size"]["changes"] == [[0.0, 2]]
    assert "cluster: local, workers 2 at the start, 2 at most, 2 at the end" in out
    printed = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert printed["cluster"]["size"]["peak"] == 2


def test_result_of_a_given_client_has_the_size_too(tmp_path, client):
    data = np.arange(8 * 16 * 16, dtype=np.float32).reshape(8, 16, 16)
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(8, 8, 8))
    result = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", IdentityPredictor(), client=client,
                             progress=False, pyramid=False)
    assert result.cluster["kind"] == "local"
    assert (result.cluster["size"]["start"], result.cluster["size"]["end"]) == (2, 2)
