"""The spine: one task runner, one open-array cache, one axis table, a light and typed public surface."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zarr

import bigcare
from bigcare.errors import BigcareError, ConfigError
from bigcare.tasks.runner import run_tasks
from conftest import make_model, write_volume

# --- the task runner ----------------------------------------------------------------------------


def _square(x):
    return x * x


class _Flaky:
    """Fails the first ``fails`` calls for each item, then returns it (thread-safe, local pool only)."""

    def __init__(self, fails: int):
        self.fails, self.calls, self.lock = fails, {}, threading.Lock()

    def __call__(self, x):
        with self.lock:
            self.calls[x] = self.calls.get(x, 0) + 1
            n = self.calls[x]
        if n <= self.fails:
            raise RuntimeError(f"item {x} attempt {n}")
        return x


def test_runner_yields_in_item_order_or_as_completed_on_a_local_pool():
    import concurrent.futures

    release = threading.Event()

    def first_waits(x):
        if x == 0:
            assert release.wait(10)
        return x * x

    items = [(i,) for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        unordered = run_tasks(first_waits, items, pool=pool, in_flight=4, ordered=False)
        early = next(unordered)  # item 0 is still running: another one comes first
        release.set()
        rest = list(unordered)
        assert early != 0 and sorted([early, *rest]) == [i * i for i in range(12)]
        assert list(run_tasks(first_waits, items, pool=pool, in_flight=4)) == [i * i for i in range(12)]


def test_runner_keeps_at_most_in_flight_tasks_and_submits_after_the_consumer_asks():
    running, peak, lock = [0], [0], threading.Lock()

    def task(x):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return x

    submitted = []
    gen = run_tasks(task, ((submitted.append(i) or i,) for i in range(20)), in_flight=3)
    assert next(gen) == 0
    assert len(submitted) == 3  # the next task is submitted only when the consumer asks again
    assert list(gen) == list(range(1, 20))
    assert peak[0] <= 3


def test_runner_retries_a_failing_item_then_reports_or_raises_its_error():
    once = _Flaky(fails=1)
    outs = list(run_tasks(once, [(i,) for i in range(5)], retries=1, outcomes=True))
    assert [o.result for o in outs] == list(range(5)) and all(o.ok and o.attempts == 2 for o in outs)
    always = _Flaky(fails=10)
    outs = list(run_tasks(always, [(7,)], retries=2, outcomes=True))
    (out,) = outs
    assert (out.item, out.result, out.attempts, out.ok) == ((7,), None, 3, False) and "attempt 3" in str(out.error)
    assert out.finished > 0
    with pytest.raises(RuntimeError, match="item 0 attempt 1"):
        list(run_tasks(_Flaky(fails=1), [(0,), (1,)]))


def test_runner_on_a_cluster_uses_keys_retries_and_counts(client):
    outs = list(run_tasks(_square, [(i,) for i in range(40)], client=client, in_flight=None, ordered=False,
                          key=lambda item: f"spine-square-{item[0]}", outcomes=True, count_rescheduled=True))
    assert sorted(o.result for o in outs) == [i * i for i in range(40)]
    assert all(o.ok and o.attempts == 1 and o.rescheduled == 0 for o in outs)
    ordered = list(run_tasks(_square, [(i,) for i in range(10)], client=client, in_flight=3))
    assert ordered == [i * i for i in range(10)]
    failed = list(run_tasks(_fail_on_three, [(i,) for i in range(5)], client=client, in_flight=None, ordered=False,
                            retries=1, outcomes=True, key=lambda item: f"spine-fail-{item[0]}"))
    bad = [o for o in failed if not o.ok]
    assert [o.item for o in bad] == [(3,)] and bad[0].attempts == 2 and "three" in str(bad[0].error)


def _slow_square(x):
    time.sleep(0.2)
    return x * x


def _bigcare_keys(dask_scheduler, prefix):
    return [str(k) for k in dask_scheduler.tasks if str(k).startswith(prefix)]


def test_closing_a_run_on_a_cluster_drops_its_tasks_still_in_flight(client):
    # 60 tasks of 0.2 s on a 2-worker cluster: most are queued when the consumer stops after one
    gen = run_tasks(_slow_square, [(i,) for i in range(60)], client=client, in_flight=None, ordered=False,
                    key=lambda item: f"spine-close-{item[0]}")
    assert next(gen) in {i * i for i in range(60)}
    assert len(client.run_on_scheduler(_bigcare_keys, prefix="spine-close-")) > 10
    gen.close()  # what a finaliser does too: must not wait on the cluster
    deadline = time.monotonic() + 30
    while client.run_on_scheduler(_bigcare_keys, prefix="spine-close-") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.run_on_scheduler(_bigcare_keys, prefix="spine-close-") == []


def _fail_on_three(x):
    if x == 3:
        raise ValueError("three is refused")
    return x


def _fail_once(x, marker_dir):
    """Fails the first attempt of every item (state in files: attempts run in other processes)."""
    import os

    marker = os.path.join(marker_dir, f"seen-{x}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError(f"first attempt of {x}")
    return x


def test_runner_retries_in_item_order_on_a_cluster(client, tmp_path):
    items = [(i, str(tmp_path)) for i in range(6)]
    assert list(run_tasks(_fail_once, items, client=client, in_flight=2, retries=1)) == list(range(6))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"seen-{i}" for i in range(6)]


# --- one cache, one axis table -----------------------------------------------------------------


def test_open_array_cache_reopens_an_array_recreated_under_another_token(tmp_path):
    from bigcare.store.arrays import open_array

    url = str(tmp_path / "g.zarr")
    zarr.create_array(store=url, name="a", shape=(4,), chunks=(4,), dtype="uint8")
    first = open_array(url, "a", "r+", token="run-1")
    assert open_array(url, "a", "r+", token="run-1") is first
    zarr.create_array(store=url, name="a", shape=(8,), chunks=(2,), dtype="float32", overwrite=True)
    again = open_array(url, "a", "r+", token="run-2")
    assert again is not first and again.shape == (8,) and again.dtype == np.float32


def test_the_axis_table_types_names_everywhere(tmp_path):
    from bigcare.blocks.layout import AxisLayout
    from bigcare.store.axes import Axis, default_axis_type

    assert [default_axis_type(a) for a in "tczyxq"] == ["time", "channel", "space", "space", "space", None]
    assert Axis.named("Z", "micrometer") == Axis("z", "space", "micrometer")
    assert Axis.named("c", "micrometer") == Axis("c", "channel", None)  # units only on space axes
    vol = write_volume(tmp_path / "v.zarr", np.zeros((2, 3, 8, 8), np.float32), axes="tcyx")
    assert [a.type for a in vol.axes] == ["time", "channel", "space", "space"]
    assert vol.channel_axis == 1 and vol.spatial_axes == "yx"
    layout = AxisLayout.build("tcyx", [a.kind for a in vol.axes], "yx", 3, 3, vol.shape, vol.url)
    assert layout.batch == "t" and layout.core == "tcyx"
    # metadata without types (NGFF 0.3 names, or types left out): the table types them
    assert [Axis(n).kind for n in "czyx"] == ["channel", "space", "space", "space"]


# --- the public surface -----------------------------------------------------------------------


def test_import_bigcare_and_info_load_neither_torch_nor_dask(tmp_path):
    write_volume(tmp_path / "v.zarr", np.zeros((4, 8, 8), np.uint16))
    code = ("import sys, bigcare; from bigcare.cli import main; main(['info', sys.argv[1]]); "
            "import bigcare.training.config, bigcare.models.architecture, bigcare.store.convert; "
            "print('heavy:', sorted(m for m in ('torch', 'dask', 'distributed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "v.zarr")], capture_output=True, text=True,
                         check=True).stdout
    assert "heavy: []" in out and "uint16" in out


def test_bigcare_restore_is_only_the_function():
    import importlib

    assert callable(bigcare.restore) and bigcare.restore.__module__ == "bigcare.runs.restore"
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("bigcare.restore")
    assert set(bigcare.__all__) <= set(dir(bigcare))


@pytest.mark.parametrize("kwargs, match", [
    ({"precision": "x"}, "precision must be one of 'auto', 'fp32', 'bf16', 'fp16', got 'x'"),
    ({"device": "gpu"}, "device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
])
def test_bad_precision_or_device_is_one_config_error_in_predict_and_restore(tmp_path, kwargs, match):
    model = make_model(tmp_path / "m", ndim=2)
    with pytest.raises(ConfigError, match=match):
        bigcare.predict(np.zeros((8, 8), np.float32), model, axes="yx", **kwargs)
    write_volume(tmp_path / "in.zarr", np.zeros((8, 8), np.float32), axes="yx")
    with pytest.raises(ConfigError, match=match):
        bigcare.restore(tmp_path / "in.zarr", tmp_path / "out.zarr", model, progress=False, **kwargs)
    assert not (tmp_path / "out.zarr").exists()


def test_schemas_raise_bigcare_errors_when_built_from_python():
    from bigcare.models import ModelConfig, UNetConfig

    with pytest.raises(ConfigError, match=r"UNetConfig: depth: Input should be less than or equal to 6 \(got 9\)"):
        UNetConfig(ndim=2, depth=9)
    with pytest.raises(BigcareError, match="ModelConfig: axes"):
        ModelConfig(axes="ZYX", architecture=UNetConfig(ndim=2))


def test_a_predictor_object_lacking_members_is_refused_by_name(tmp_path):
    class Half:
        spatial_axes, outputs = "yx", ("restored",)

        def predict(self, x, normalizer):
            return {"restored": x}

    write_volume(tmp_path / "in.zarr", np.zeros((8, 8), np.float32), axes="yx")
    with pytest.raises(ConfigError, match=r"model object Half is not a bigcare predictor: it lacks n_channel_in, "
                                          r"n_channel_out, halo, align, zoom, factor, fingerprint, pmin, pmax"):
        bigcare.restore(tmp_path / "in.zarr", tmp_path / "out.zarr", Half(), progress=False, device="cpu")


def test_old_cli_flags_still_work_and_say_what_replaces_them(tmp_path, capsys):
    from bigcare.cli import build_parser

    args = build_parser().parse_args(["restore", "a", "b", "--model", "m", "--block", "8,16,16", "--dtype", "uint16",
                                      "--model-on-shared-storage"])
    assert (args.block_shape, args.output_dtype, args.ship_model) == ((8, 16, 16), "uint16", False)
    err = capsys.readouterr().err
    for old, new in (("--block", "--block-shape"), ("--dtype", "--output-dtype"),
                     ("--model-on-shared-storage", "--no-ship-model")):
        assert f"bigcare: {old} is deprecated and will be removed; use {new}" in err
    args = build_parser().parse_args(["restore", "a", "b", "--model", "m", "--block-shape", "8,16,16",
                                      "--tile-shape", "8,8,8", "--no-pyramid"])
    assert (args.block_shape, args.tile_shape, args.pyramid, args.ship_model) == ((8, 16, 16), (8, 8, 8), False, True)
    assert capsys.readouterr().err == ""
