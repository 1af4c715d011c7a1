"""Faults of day-long runs: a worker killed mid-run, the whole run killed, blocks that fail
once or always. After each: output bit-identical to an undisturbed run, done markers that
agree with the data, and the summary counting what happened."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import cloudpickle
import numpy as np
import pytest
import zarr
from dask_procs import DaskProcesses
from distributed import Client

import bigcare
from bigcare.cli import main
from bigcare.predictors.identity import IdentityPredictor
from bigcare.tasks.block import MARKER
from conftest import make_model, read, smooth_volume, write_volume

BLOCK = (8, 32, 32)

pytestmark = pytest.mark.slow  # fault injection: kills workers and whole runs


def markers(url) -> np.ndarray:
    try:
        return np.asarray(zarr.open_array(store=str(url), path=MARKER, mode="r")[...])
    except Exception:  # not created yet
        return np.zeros(0, np.uint8)


def wait_for_markers(url, at_least: int, timeout: float = 120) -> np.ndarray:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = markers(url)
        if done.sum() >= at_least:
            return done
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} blocks finished within {timeout} s")


def wait_for_group_gone(pgid: int, timeout: float = 60) -> None:
    """Until no process of process group ``pgid`` is left (zombies count as gone)."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = []
        for p in psutil.process_iter(["status"]):
            try:
                if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes {alive} of the killed run are still alive after {timeout} s")


def assert_done_blocks_hold_final_data(out, reference, block=BLOCK):
    """Every block marked done holds exactly the reference's voxels (markers never lie)."""
    done = markers(out)
    data = read(out)
    for index in zip(*np.nonzero(done)):
        region = tuple(slice(i * b, (i + 1) * b) for i, b in zip(index, block))
        np.testing.assert_array_equal(data[region], reference[region], err_msg=f"block {index} marked done")
    return done


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    p = DaskProcesses(tmp_path_factory.mktemp("dask"), n_workers=2)
    yield p
    p.close()


def test_worker_killed_mid_run_completes_bit_identical(tmp_path, procs):
    # 96 blocks: a run of 24 could end between seeing a held block and the kill (OpenVINO runs
    # these tiny blocks in milliseconds)
    data = smooth_volume((32, 128, 192))
    write_volume(tmp_path / "in.ome.zarr", data, chunks=BLOCK)
    model = make_model(tmp_path / "model")
    with Client(procs.address, timeout=60) as c:
        c.wait_for_workers(2, timeout=60)
        reference = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "ref.ome.zarr", model, client=c,
                                    block_shape=BLOCK, progress=False)
        assert reference.rescheduled == 0 and reference.retries == 0
        pids = c.run(os.getpid)
        out, box = tmp_path / "out.ome.zarr", {}

        def run():
            try:
                box["result"] = bigcare.restore(tmp_path / "in.ome.zarr", out, model, client=c, block_shape=BLOCK,
                                                progress=False)
            except BaseException as exc:  # re-raised below
                box["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        done = wait_for_markers(out, 2)
        # kill on an observed event, not a timer: a worker the scheduler shows holding a block
        victim = None
        while victim is None:
            assert thread.is_alive(), "the run finished before a worker could be killed: make the volume larger"
            held = c.processing(workers=list(pids))
            victim = next((pids[a] for a, keys in held.items() if any(str(k).startswith("bigcare-block")
                                                                        for k in keys)), None)
        os.kill(victim, signal.SIGKILL)  # a worker process this test's cluster started
        thread.join(timeout=240)
        assert not thread.is_alive() and "error" not in box, box.get("error")
        result = box["result"]
        assert done.sum() < done.size, "the run finished before the kill: make the volume larger"
        assert result.blocks_computed == 96 and not result.failed
        assert result.rescheduled >= 1  # the killed worker's running blocks ran again elsewhere
        c.wait_for_workers(2, timeout=60)  # the nanny restarted the worker
        assert victim not in c.run(os.getpid).values()
    np.testing.assert_array_equal(read(out), read(tmp_path / "ref.ome.zarr"))
    assert markers(out).all()
    summary = json.loads((out / "bigcare_summary.json").read_text())
    assert summary["rescheduled"] == result.rescheduled and summary["complete"]


def test_whole_run_killed_then_rerun_recomputes_only_unfinished_blocks(tmp_path, client):
    # 192 blocks: killed after 3, most are far from done (OpenVINO runs these tiny blocks in
    # milliseconds: 48 of them could all finish between two polls of the markers)
    data = smooth_volume((16, 256, 384), seed=1)
    write_volume(tmp_path / "in.ome.zarr", data, chunks=BLOCK)
    model = make_model(tmp_path / "model")
    args = [str(tmp_path / "in.ome.zarr"), str(tmp_path / "out.ome.zarr"), "--model", str(model),
            "--block", ",".join(map(str, BLOCK))]
    bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "ref.ome.zarr", model, client=client, block_shape=BLOCK,
                    progress=False)
    reference = read(tmp_path / "ref.ome.zarr")
    # the whole run - client and its local cluster - in its own process group, killed at once
    run = subprocess.Popen([sys.executable, "-m", "bigcare.cli", "restore", *args, "--workers", "1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_markers(tmp_path / "out.ome.zarr", 3)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
        wait_for_group_gone(run.pid)  # every worker of the run is dead: no file changes after this
    done = assert_done_blocks_hold_final_data(tmp_path / "out.ome.zarr", reference)
    unfinished = int(done.size - done.sum())
    assert 0 < unfinished < done.size
    assert zarr.open_group(str(tmp_path / "out.ome.zarr"), mode="r").attrs["bigcare"]["complete"] is False
    result = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", model, client=client,
                             block_shape=BLOCK, progress=False)
    assert (result.blocks_computed, result.blocks_skipped) == (unfinished, done.size - unfinished)
    np.testing.assert_array_equal(read(tmp_path / "out.ome.zarr"), reference)
    assert markers(tmp_path / "out.ome.zarr").all()
    assert zarr.open_group(str(tmp_path / "out.ome.zarr"), mode="r").attrs["bigcare"]["complete"] is True


def test_failing_blocks_make_the_cli_exit_3_with_the_block_list(tmp_path, client, capsys):
    data = smooth_volume((16, 64, 128), seed=2)
    write_volume(tmp_path / "in.ome.zarr", data, chunks=BLOCK)
    model = make_model(tmp_path / "model")
    args = ["restore", str(tmp_path / "in.ome.zarr"), str(tmp_path / "out.ome.zarr"), "--model", str(model),
            "--block", ",".join(map(str, BLOCK)), "--scheduler", client.scheduler.address]
    assert main(args) == 0
    reference = read(tmp_path / "out.ome.zarr")
    # a later run finds one input chunk corrupt: the blocks that read it (x index 0 and 1 with
    # the halo) fail, deterministically; the others (x index 2 and 3) are written
    zarr.open_array(store=str(tmp_path / "out.ome.zarr"), path=MARKER, mode="r+")[...] = 0
    chunk = tmp_path / "in.ome.zarr" / "0" / "c" / "1" / "1" / "0"
    good = chunk.read_bytes()
    chunk.write_bytes(b"not a compressed chunk")
    assert main(args) == 3
    captured = capsys.readouterr()
    assert "8 of 16 block(s) failed" in captured.err and "(1, 1, 0), (1, 1, 1)" in captured.err
    assert "decompression" in captured.err.lower()
    summary = json.loads((tmp_path / "out.ome.zarr" / "bigcare_summary.json").read_text())
    failed = [tuple(f["block"]) for f in summary["failed_blocks"]]
    assert sorted(failed) == [(z, y, x) for z in (0, 1) for y in (0, 1) for x in (0, 1)]
    assert not summary["complete"]
    assert summary["retries"] == len(failed)  # each failing block was tried twice
    # one line per failed block on screen; the full worker tracebacks in the log beside the summary
    assert sum(line.startswith("block (") and " failed: " in line for line in captured.err.splitlines()) == len(failed)
    log = (tmp_path / "out.ome.zarr" / "bigcare_failures.log").read_text()
    assert summary["failure_log"].endswith("bigcare_failures.log") and log.count("=== block (") == len(failed)
    assert "Traceback" in log and "Traceback" not in captured.err
    assert summary["wall_seconds"] >= summary["seconds"]
    done = assert_done_blocks_hold_final_data(tmp_path / "out.ome.zarr", reference)
    assert {tuple(i) for i in zip(*np.nonzero(done == 0))} == set(failed)
    chunk.write_bytes(good)
    assert main(args) == 0
    assert f"restored {len(failed)} block(s) ({16 - len(failed)} already done, 0 failed)" in capsys.readouterr().out
    assert not (tmp_path / "out.ome.zarr" / "bigcare_failures.log").exists()  # the rerun finished them
    np.testing.assert_array_equal(read(tmp_path / "out.ome.zarr"), reference)


class FlakyPredictor(IdentityPredictor):
    """Fails the first time it sees a region (a flag file per region, shared by all workers)."""

    fingerprint = "flaky-v1"

    def __init__(self, flags):
        super().__init__("zyx")
        self.flags = str(flags)

    def predict(self, x, normalizer):
        flag = os.path.join(self.flags, hashlib.sha256(x.tobytes()).hexdigest())
        if not os.path.exists(flag):
            open(flag, "w").close()
            raise RuntimeError("transient failure (first attempt)")
        return super().predict(x, normalizer)


def test_a_block_that_fails_once_is_retried_and_counted(tmp_path, client):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this file
    data = (np.random.default_rng(3).random((16, 64, 64)) * 1000).astype(np.float32)
    write_volume(tmp_path / "in.ome.zarr", data, chunks=BLOCK)
    (tmp_path / "flags").mkdir()
    result = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", FlakyPredictor(tmp_path / "flags"),
                             client=client, block_shape=BLOCK, progress=False)
    assert (result.retries, result.blocks_computed, result.failed) == (8, 8, [])
    np.testing.assert_array_equal(read(tmp_path / "out.ome.zarr"), data)
    assert json.loads((tmp_path / "out.ome.zarr" / "bigcare_summary.json").read_text())["retries"] == 8


def test_run_killed_while_creating_outputs_starts_over(tmp_path, client):
    """Outputs whose done markers were never created (killed right after the metadata) hold no
    finished block: the next run replaces them instead of failing to resume."""
    import shutil

    data = smooth_volume((8, 32, 64), seed=4)
    write_volume(tmp_path / "in.ome.zarr", data, chunks=BLOCK)
    model = make_model(tmp_path / "model")
    kwargs = dict(client=client, block_shape=BLOCK, progress=False)
    bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", model, **kwargs)
    reference = read(tmp_path / "out.ome.zarr")
    shutil.rmtree(tmp_path / "out.ome.zarr" / MARKER)
    result = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", model, **kwargs)
    assert (result.blocks_computed, result.blocks_skipped) == (2, 0)
    np.testing.assert_array_equal(read(tmp_path / "out.ome.zarr"), reference)
