"""Naming a cluster: local-cuda's worker layout (run for real on CPU), the SLURM job script and
the Kubernetes spec from cluster/ (rendered and checked; a real SLURM in test_slurm.py, the
operator's CRD schemas in test_kubernetes.py), errors, and a TLS scheduler on loopback with
generated certificates."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from dask_procs import DaskProcesses
from distributed import Client
from tls_certs import make_tls_files

import bigcare
from bigcare.cli import main
from bigcare.errors import ConfigError
from bigcare.predictors.identity import IdentityPredictor
from bigcare.tasks.cluster import (
    cluster_client,
    load_cluster_config,
    make_cluster,
    slurm_cluster,
    validate_kubernetes_spec,
)
from conftest import listening, make_model, read, write_volume

CLUSTER_DIR = Path(__file__).resolve().parent.parent / "cluster"


def test_local_cuda_gives_each_worker_one_gpu_and_a_gpu_resource(tmp_path):
    data = (np.random.default_rng(0).random((8, 32, 32)) * 100).astype(np.float32)
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(4, 16, 16))
    # two "GPUs" on a CPU machine: the layout is real, the identity predictor never needs CUDA
    cluster = make_cluster("local-cuda", devices=[0, 1], threads_per_worker=1, dashboard=False)
    try:
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            visible = client.run(lambda: os.environ["CUDA_VISIBLE_DEVICES"])
            assert sorted(visible.values()) == ["0,1", "1,0"]  # each worker's cuda:0 is its own GPU
            workers = client.scheduler_info()["workers"].values()
            assert [w["resources"] for w in workers] == [{"GPU": 1}, {"GPU": 1}]
            result = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", IdentityPredictor(),
                                     client=client, device="cuda", progress=False, pyramid=False)
            assert result.blocks_computed == result.blocks_total
    finally:
        cluster.close()
    np.testing.assert_array_equal(np.asarray(zarr.open_array(str(tmp_path / "out.ome.zarr"), path="0")), data)


@pytest.mark.skipif(bool(os.environ.get("CUDA_VISIBLE_DEVICES")), reason="GPUs visible")
def test_local_cuda_without_gpus_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="local-cuda needs CUDA GPUs, found none"):
        make_cluster("local-cuda")


def test_slurm_job_script_from_the_shipped_config():
    config = load_cluster_config(CLUSTER_DIR / "slurm.yaml", "slurm")
    cluster = slurm_cluster(config)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#SBATCH -p gpu", "#SBATCH --gres=gpu:1", "#SBATCH -t 12:00:00", "#SBATCH --mem=64G",
                 "#SBATCH --cpus-per-task=8", "module load cuda", "--resources GPU=1", "--nthreads 8",
                 "--local-directory $TMPDIR"):
        assert line in script, f"{line!r} missing from\n{script}"
    assert "distributed.cli.dask_worker tcp://" in script
    assert config["bigcare"]["adapt"] == {"minimum_jobs": 1, "maximum_jobs": 16}


def test_slurm_with_tls_starts_a_tls_scheduler_and_gives_workers_certificates(tmp_path):
    config = copy.deepcopy(load_cluster_config(CLUSTER_DIR / "slurm.yaml", "slurm"))
    config["bigcare"].update({"tls": True, "shared-temp-directory": str(tmp_path / "tls")})
    cluster = slurm_cluster(config)
    try:
        script, address = cluster.job_script(), cluster.scheduler_address
    finally:
        cluster.close()
    assert address.startswith("tls://")
    assert "dask_worker tls://" in script and "--tls-ca-file" in script and "--tls-cert" in script


def test_slurm_config_errors_name_the_problem(tmp_path):
    bad = tmp_path / "slurm.yaml"
    bad.write_text("jobqueue: {slurm: {cores: 4}}\nbigcare: {adaptive: true}\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) bigcare.\['adaptive'\]"):
        slurm_cluster(load_cluster_config(bad, "slurm"))
    bad.write_text("jobqueue: {pbs: {cores: 4}}\n")
    with pytest.raises(ConfigError, match="expected a 'jobqueue: slurm:' mapping"):
        load_cluster_config(bad, "slurm")
    with pytest.raises(ConfigError, match="does not exist"):
        load_cluster_config(tmp_path / "missing.yaml", "slurm")


def test_kubernetes_spec_has_a_gpu_worker_group_and_an_autoscaler():
    docs = load_cluster_config(CLUSTER_DIR / "kubernetes.yaml", "kubernetes")
    spec, scaler = validate_kubernetes_spec(docs)
    worker = spec["spec"]["worker"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"  # a quantity: the CRD wants a string
    assert worker["args"][:2] == ["dask", "worker"] and "GPU=1" in worker["args"]
    ports = {p["name"]: p["port"] for p in spec["spec"]["scheduler"]["service"]["ports"]}
    assert ports == {"tcp-comm": 8786, "http-dashboard": 8787}
    assert (scaler["spec"]["cluster"], scaler["spec"]["minimum"], scaler["spec"]["maximum"]) == ("bigcare", 1, 8)


def test_kubernetes_spec_errors_name_the_key():
    docs = list(yaml.safe_load_all((CLUSTER_DIR / "kubernetes.yaml").read_text()))
    broken = copy.deepcopy(docs)
    del broken[0]["spec"]["worker"]["spec"]["containers"][0]["image"]
    with pytest.raises(ConfigError, match=r"spec.worker.spec.containers\[0\].image is required"):
        validate_kubernetes_spec(broken)
    broken = copy.deepcopy(docs)
    broken[1]["spec"]["cluster"] = "another"
    with pytest.raises(ConfigError, match="DaskAutoscaler needs spec.cluster"):
        validate_kubernetes_spec(broken)


def test_unknown_cluster_kind_and_bad_scheduler_address():
    with pytest.raises(ConfigError, match="cluster must be one of local, local-cuda, slurm, kubernetes"):
        make_cluster("yarn")
    with pytest.raises(ConfigError, match="scheduler must be an address like tcp://host:8786"):
        with cluster_client("localhost:8786"):
            pass


@pytest.mark.slow  # real dask scheduler and worker processes over TLS
def test_restore_through_a_tls_scheduler_with_generated_certificates(tmp_path, capsys):
    tls = make_tls_files(tmp_path / "certs")
    args = ["--tls-ca-file", tls["ca"], "--tls-cert", tls["cert"], "--tls-key", tls["key"]]
    procs = DaskProcesses(tmp_path / "dask", n_workers=1, protocol="tls", scheduler_args=args, worker_args=args)
    try:
        assert procs.address.startswith("tls://127.0.0.1:")
        data = np.random.default_rng(1).random((8, 32, 32)).astype(np.float32)
        write_volume(tmp_path / "in.ome.zarr", data, chunks=(8, 16, 16))
        model = make_model(tmp_path / "model")
        command = ["restore", str(tmp_path / "in.ome.zarr"), str(tmp_path / "out.ome.zarr"), "--model", str(model),
                   "--scheduler", procs.address]
        assert main(command) == 2  # no certificates: refused before anything is written
        assert "uses TLS: give --tls-ca-file" in capsys.readouterr().err
        assert not (tmp_path / "out.ome.zarr").exists()
        assert main(command + args) == 0
        assert f"connected to {procs.address}" in capsys.readouterr().out
    finally:
        procs.close()
    whole = bigcare.predict(data, model, axes="zyx")["restored"]
    np.testing.assert_allclose(np.asarray(zarr.open_array(str(tmp_path / "out.ome.zarr"), path="0")), whole,
                               atol=1e-5, rtol=0)


# --- a local run of one block runs its worker in this process ----------------------------------


def test_a_one_block_run_runs_in_process_and_equals_a_run_on_worker_processes(tmp_path, client):
    from bigcare.predictors import base

    data = np.random.default_rng(5).random((8, 32, 32)).astype(np.float32) * 100
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(8, 32, 32))
    model = make_model(tmp_path / "model")
    alone = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "alone.ome.zarr", model, precision="fp32",
                            progress=False, dashboard=False)
    assert alone.blocks_total == 1 and alone.cluster["in_process"] and alone.cluster["kind"] == "local"
    assert base._CACHE == {}  # the worker's models went with its cluster: the caller keeps none
    on_workers = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "workers.ome.zarr", model, precision="fp32",
                                 progress=False, client=client)
    assert not on_workers.cluster["in_process"]
    np.testing.assert_allclose(read(tmp_path / "alone.ome.zarr"), read(tmp_path / "workers.ome.zarr"), atol=1e-5)


def test_in_process_only_for_one_block_on_a_default_local_cluster():
    from bigcare.tasks.cluster import in_process_run

    assert in_process_run(1, "local", None)
    assert not in_process_run(2, "local", None)  # more blocks: worker processes (a nanny, memory limits)
    assert not in_process_run(1, "local", 2)  # worker processes asked for
    assert not in_process_run(1, "slurm", None)


def test_an_in_process_cluster_serves_its_dashboard_only_at_a_given_address():
    from bigcare.tasks.cluster import make_cluster

    for dashboard, served in ((True, False), (False, False), ("127.0.0.1:0", True)):
        cluster = make_cluster("local", dashboard=dashboard, processes=False)
        try:
            http = cluster.scheduler.http_server  # health and metrics routes, always there
            assert {s.getsockname()[0] for s in http._sockets.values()} == {"127.0.0.1"}, dashboard
            assert (requests_status(http.port) == 200) == served, dashboard
        finally:
            cluster.close()


def requests_status(port: int) -> int:
    """The HTTP status of the dashboard's /status page on a loopback port."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.parametrize("processes", [False, True])
def test_a_local_cluster_listens_on_loopback_only(processes):
    import os

    from bigcare.tasks.cluster import make_cluster

    for dashboard in (True, False):
        cluster = make_cluster("local", workers=1, dashboard=dashboard, processes=processes)
        try:
            ips = {ip for ip, _ in listening([os.getpid()])}  # this process and its worker processes
            assert ips == {"127.0.0.1"}, (processes, dashboard, ips)
        finally:
            cluster.close()


def test_an_in_process_run_says_why_it_serves_no_dashboard(capsys):
    from bigcare.tasks.cluster import cluster_client

    for dashboard, says in ((True, "not served for one block in process"), (False, "(disabled)"),
                            ("127.0.0.1:0", "http://")):
        with cluster_client(processes=False, dashboard=dashboard, quiet=False):
            pass
        out = capsys.readouterr().out
        assert "its worker in this process" in out and says in out, (dashboard, out)
