"""--skip-background: blocks reading nothing above a threshold are filled without the network."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bigcare
from tests.conftest import read, write_volume

BLOCK = (16, 32, 32)


def half_empty(rng, shape=(32, 64, 128)):
    """Noise at ~2 over the volume, bright structures only in its first 3/8 along X (the rest is background)."""
    data = rng.normal(2.0, 0.3, shape).astype(np.float32).clip(0, None)
    w = 3 * shape[2] // 8
    data[:, :, :w] += 10 * rng.random((shape[0], shape[1], w), dtype=np.float32)
    return data


def test_skipped_blocks_hold_the_constant_prediction_and_the_rest_is_the_full_run(tmp_path, client, model3d, rng):
    data = half_empty(rng)
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(16, 32, 32))
    bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "full.ome.zarr", model3d, client=client,
                    block_shape=BLOCK, precision="fp32", pyramid=False, progress=False)
    run = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "skip.ome.zarr", model3d, client=client,
                          block_shape=BLOCK, precision="fp32", pyramid=False, progress=False,
                          skip_background=5.0)
    plan = bigcare.runs.volume.plan_volume_run(str(tmp_path / "in.ome.zarr"), str(tmp_path / "x.ome.zarr"),
                                               bigcare.runs.models.resolve_model(model3d), block_shape=BLOCK).plan
    quiet = [b for b in plan if data[b.read_slices].max() <= 5.0]
    assert quiet and len(quiet) < len(plan)
    assert run.blocks_background == len(quiet) and run.blocks_computed == len(plan)
    assert run.background["fraction"] == pytest.approx(len(quiet) / len(plan))
    (fill,) = run.background["fill"].values()
    a, b = read(tmp_path / "full.ome.zarr"), read(tmp_path / "skip.ome.zarr")
    quiet_mask = np.zeros(data.shape, bool)
    for blk in quiet:
        quiet_mask[blk.write_slices] = True
        np.testing.assert_array_equal(b[blk.write_slices], np.float32(fill[0]))
    np.testing.assert_array_equal(a[~quiet_mask], b[~quiet_mask])  # the other blocks are the network's
    # the constant is what the network makes of the background: close to the full run there
    assert abs(float(np.median(a[quiet_mask])) - fill[0]) < 0.5 * float(a[quiet_mask].std() + 1e-3) + 0.05
    summary = json.loads((tmp_path / "skip.ome.zarr" / "bigcare_summary.json").read_text())
    assert summary["background"]["blocks_filled"] == len(quiet)


def test_a_volume_with_signal_everywhere_skips_nothing_and_the_option_is_off_by_default(tmp_path, client, model3d,
                                                                                           rng):
    data = (5 + 10 * rng.random((32, 64, 64), dtype=np.float32))
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(16, 32, 32))
    run = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "a.ome.zarr", model3d, client=client,
                          block_shape=BLOCK, precision="fp32", pyramid=False, progress=False, skip_background=5.5)
    assert run.blocks_background == 0 and run.background["blocks"] == 0
    off = bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "b.ome.zarr", model3d, client=client,
                          block_shape=BLOCK, precision="fp32", pyramid=False, progress=False)
    assert off.background == {} and off.blocks_background == 0
    np.testing.assert_array_equal(read(tmp_path / "a.ome.zarr"), read(tmp_path / "b.ome.zarr"))


def test_chunk_statistics_never_miss_a_lone_bright_voxel(tmp_path):
    from bigcare.runs.background import chunk_statistics
    from bigcare.store.volume import open_volume

    data = np.ones((16, 64, 64), np.uint16)
    data[3, 40, 17] = 900  # a mean-downsampled pyramid level would average it away
    write_volume(tmp_path / "in.ome.zarr", data, chunks=(8, 32, 32))
    maxima, sums, counts = chunk_statistics(open_volume(tmp_path / "in.ome.zarr"))
    assert maxima.shape == (2, 2, 2) and maxima[0, 1, 0] == 900 and (np.delete(maxima.ravel(), 2) == 1).all()
    assert counts.sum() == data.size and sums.sum() == data.sum()


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_a_bad_threshold_is_one_error_with_exit_2_and_nothing_written(tmp_path, capsys, model3d, rng, bad):
    from bigcare.cli import main

    write_volume(tmp_path / "in.ome.zarr", half_empty(rng, (16, 32, 32)))
    code = main(["restore", str(tmp_path / "in.ome.zarr"), str(tmp_path / "out.ome.zarr"), "--model", str(model3d),
                 "--skip-background", bad, "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--skip-background" in err and "Traceback" not in err
    assert not (tmp_path / "out.ome.zarr").exists()
    assert main(["plan", str(tmp_path / "in.ome.zarr"), str(tmp_path / "out.ome.zarr"), "--model", str(model3d),
                 "--skip-background", bad]) == 2
    with pytest.raises(bigcare.errors.ConfigError, match="finite number"):
        bigcare.restore(tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr", model3d, skip_background="x")


def test_a_batch_fills_the_background_blocks_of_each_volume(tmp_path, client, model3d, rng):
    from bigcare.runs.batch import restore_many

    for name, seed in (("a", 1), ("b", 2)):
        write_volume(tmp_path / f"{name}.ome.zarr", half_empty(np.random.default_rng(seed), (16, 32, 128)),
                     chunks=(16, 32, 32))
    results = restore_many([str(tmp_path / "a.ome.zarr"), str(tmp_path / "b.ome.zarr")], tmp_path / "out", model3d,
                           client=client, block_shape=(16, 32, 32), precision="fp32", pyramid=False,
                           progress=False, skip_background=5.0)
    for result in results:
        assert result.blocks_background == result.background["blocks"] > 0
        assert result.blocks_computed == result.blocks_total
