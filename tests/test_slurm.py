"""`--cluster slurm` for real: a single-host SLURM cluster (munge, slurmctld, slurmd on
loopback, tests/slurm_cluster.sh), cluster/slurm.yaml with only its CHANGE lines changed,
dask-jobqueue submitting sbatch jobs whose workers connect back. Restore equals a local run bit
for bit, a job cancelled mid-run is replaced and the output is the same, train runs its patch
reads on SLURM workers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml
import zarr
from slurm_fixture import TEST_CHANGES, slurm_fixture, slurm_test_config  # noqa: F401 - the fixture "slurm"

import bigcare
from bigcare.tasks.block import MARKER
from conftest import listening, make_model, read, smooth_volume, write_volume

pytestmark = pytest.mark.slow  # SLURM daemons, jobs that each start python and import torch

BLOCK = (8, 32, 32)
#: longest a command here may take (2 cores: each job imports torch; the scancel test waits for a replacement)
COMMAND_TIMEOUT_S = 300


class QueueWatch:
    """Every (job, state) that squeue shows while a command runs, polled twice a second."""

    def __init__(self, slurm):
        self.slurm, self.seen, self._stop = slurm, {}, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            for job, state, name in self.slurm.squeue():
                self.seen.setdefault(job, set()).add((state, name))
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def running(self) -> list[str]:
        return sorted(j for j, s in self.seen.items() if any(state == "RUNNING" for state, _ in s))


def bigcare_command(args, slurm, cwd, **kwargs):
    """Run the bigcare command in a fresh process (as a user on a login node would)."""
    command = [sys.executable, "-c", "import sys; from bigcare.cli import main; sys.exit(main())", *map(str, args)]
    return subprocess.Popen(command, cwd=cwd, env=slurm.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def restore_args(tmp_path, config, out):
    return ["restore", tmp_path / "in.ome.zarr", tmp_path / out, "--model", tmp_path / "model", "--device", "cpu",
            "--block-shape", ",".join(map(str, BLOCK)), "--cluster", "slurm", "--cluster-config", config,
            "--dashboard", "127.0.0.1:0", "--json", "-q"]


def _finish(proc) -> str:
    out, err = proc.communicate(timeout=COMMAND_TIMEOUT_S)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    return out


def test_config_copy_changes_only_the_change_lines(tmp_path):
    config = slurm_test_config(tmp_path / "slurm.yaml")
    shipped = slurm_test_config(tmp_path / "same.yaml", {}).read_text().splitlines()
    changed = [(a, b) for a, b in zip(shipped, config.read_text().splitlines()) if a != b]
    assert len(changed) == len(TEST_CHANGES) and all("# CHANGE" in a for a, _ in changed)
    with pytest.raises(AssertionError, match="not marked CHANGE"):
        slurm_test_config(tmp_path / "bad.yaml", {"death-timeout": "5"})


def test_restore_on_slurm_jobs_equals_a_local_run(tmp_path, slurm, client):
    write_volume(tmp_path / "in.ome.zarr", smooth_volume((16, 64, 64)), chunks=BLOCK)
    make_model(tmp_path / "model")
    config = slurm_test_config(tmp_path / "slurm.yaml")
    with QueueWatch(slurm) as watch:
        out = _finish(bigcare_command(restore_args(tmp_path, config, "slurm.ome.zarr"), slurm, tmp_path))
    local = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "local.ome.zarr", tmp_path / "model", client=client,
                            block_shape=BLOCK, device="cpu", progress=False)
    np.testing.assert_array_equal(read(tmp_path / "slurm.ome.zarr"), read(tmp_path / "local.ome.zarr"))
    assert local.blocks_computed == 8
    # jobs were submitted and ran; when the command ended, none was left and SLURM recorded their end
    assert watch.running(), f"no job was seen running: {watch.seen}"
    assert all(name == "bigcare-worker" for states in watch.seen.values() for _, name in states)
    assert slurm.wait_empty() == []
    finished = slurm.finished()
    for job in watch.seen:
        assert finished[job]["JobState"] in ("CANCELLED", "COMPLETED"), finished[job]
    assert list((tmp_path / "bigcare-dask-logs").glob("bigcare-worker-*.err")), "no worker job log"
    summary = json.loads((tmp_path / "slurm.ome.zarr" / "bigcare_summary.json").read_text())
    assert summary["complete"] and summary["blocks"]["computed"] == 8
    size = summary["cluster"]["size"]
    assert summary["cluster"]["kind"] == "slurm" and 1 <= size["peak"] <= 2 and size["end"] >= 1
    assert "cluster: slurm, workers" in out


def _done_blocks(url) -> int:
    try:
        return int(np.count_nonzero(zarr.open_array(str(url), path=MARKER, mode="r")[...]))
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def _worker_listen_ips() -> set[str]:
    """The addresses that the dask workers of SLURM jobs on this machine listen on."""
    import psutil

    return {ip for ip, _ in listening(p for p in psutil.process_iter(["cmdline"])
                                      if "distributed.cli.dask_worker" in " ".join(p.info["cmdline"] or []))}


def test_a_job_cancelled_mid_run_is_replaced_and_the_output_is_the_same(tmp_path, slurm, client):
    write_volume(tmp_path / "in.ome.zarr", smooth_volume((32, 128, 128), seed=1), chunks=BLOCK)  # 64 blocks
    make_model(tmp_path / "model", n_filter_base=8, seed=2)  # ~0.2 s a block on one core
    config = slurm_test_config(tmp_path / "slurm.yaml")
    out_url = tmp_path / "slurm.ome.zarr"
    with QueueWatch(slurm) as watch:
        proc = bigcare_command(restore_args(tmp_path, config, "slurm.ome.zarr"), slurm, tmp_path)
        deadline, cancelled, listening = time.monotonic() + COMMAND_TIMEOUT_S, None, set()
        while cancelled is None and proc.poll() is None and time.monotonic() < deadline:
            running = [j for j, state, _ in slurm.squeue() if state == "RUNNING"]
            listening |= _worker_listen_ips()
            if running and 0 < _done_blocks(out_url) < 32:  # its worker is computing blocks
                cancelled = running[0]
                slurm.scancel(cancelled)
            time.sleep(0.2)
        out = _finish(proc)
    assert cancelled is not None, "the run ended before a job could be cancelled mid-run"
    assert listening == {"127.0.0.1"}, f"the job workers listened on {listening}: loopback only in tests"
    assert slurm.finished()[cancelled]["JobState"] == "CANCELLED"
    assert len(watch.seen) >= 2, f"no job replaced the cancelled one: {watch.seen}"
    summary = json.loads((out_url / "bigcare_summary.json").read_text())
    assert summary["complete"] and summary["blocks"]["computed"] == 64 and summary["failed_blocks"] == []
    counts = [n for _, n in summary["cluster"]["size"]["changes"]]
    assert any(b < a for a, b in zip(counts, counts[1:])), f"the lost worker is not in the size: {counts}"
    assert "cluster: slurm" in out
    bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "local.ome.zarr", tmp_path / "model", client=client,
                    block_shape=BLOCK, device="cpu", progress=False)
    np.testing.assert_array_equal(read(out_url), read(tmp_path / "local.ome.zarr"))
    assert slurm.wait_empty() == []


def test_train_reads_its_patches_on_slurm_workers(tmp_path, slurm):
    from bigcare.synth import write_pair

    write_pair(tmp_path / "in.ome.zarr", tmp_path / "gt.ome.zarr", (24, 64, 64), chunks=(12, 32, 32), photons=5, seed=0)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({
        "model_dir": str(tmp_path / "model"),
        "data": {"sources": [{"input": str(tmp_path / "in.ome.zarr"), "target": str(tmp_path / "gt.ome.zarr")}],
                 "patch_shape": [8, 32, 32], "n_patches": 16},
        "network": {"depth": 1, "n_filter_base": 4},
        "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4},
    }))
    config = slurm_test_config(tmp_path / "slurm.yaml")
    with QueueWatch(slurm) as watch:
        out = _finish(bigcare_command(["train", tmp_path / "train.yaml", "--cluster", "slurm", "--cluster-config", config,
                                       "--dashboard", "127.0.0.1:0"], slurm, tmp_path))
    assert "slurm cluster with" in out and "trained 1 epoch(s)" in out
    assert watch.running(), f"no job was seen running: {watch.seen}"
    assert (tmp_path / "model" / "best" / "model.safetensors").exists()
    assert slurm.wait_empty() == []
