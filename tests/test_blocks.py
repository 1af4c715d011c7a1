"""Block planning: coverage, alignment, halos, chunk alignment of writes."""


import math

import numpy as np
import pytest

from bigcare.blocks.plan import plan_blocks
from bigcare.blocks.sizing import default_block_shape, window_overhead
from bigcare.errors import ConfigError


@pytest.mark.parametrize("shape, block, halo, align", [
    ((37, 45, 51), (8, 16, 16), (12, 12, 12), (4, 4, 4)),
    ((5, 7), (2, 3), (3, 0), (2, 1)),
    ((100,), (100,), (40,), (8,)),
])
def test_write_regions_tile_the_volume_exactly_once(shape, block, halo, align):
    plan = plan_blocks(shape, block, halo, align)
    count = np.zeros(shape, np.int32)
    for b in plan:
        count[b.write_slices] += 1
    assert (count == 1).all()
    assert len(plan) == len(list(plan))


def test_read_regions_cover_halo_and_start_on_the_pooling_grid():
    shape, halo, align = (37, 45, 51), (12, 10, 12), (4, 2, 4)
    plan = plan_blocks(shape, (8, 16, 16), halo, align)
    for b in plan:
        for (w0, w1), (r0, r1), h, a, n in zip(b.write, b.read, halo, align, shape):
            assert r0 % a == 0
            assert r1 == n or r1 % a == 0
            assert r0 <= max(0, w0 - h) and r1 >= min(n, w1 + h)
            assert r0 > w0 - h - a and r1 < w1 + h + a  # no more than one alignment step extra
        crop = b.crop
        assert tuple(c.stop - c.start for c in crop) == tuple(w1 - w0 for w0, w1 in b.write)


def test_blocks_must_be_whole_chunks():
    with pytest.raises(ConfigError, match="not a whole number of output chunks"):
        plan_blocks((64, 64), (24, 32), (0, 0), (1, 1), chunks=(16, 16))
    # a block clipped to the volume is fine even if not a multiple
    plan_blocks((20, 64), (24, 32), (0, 0), (1, 1), chunks=(16, 16))


def test_plan_rejects_wrong_lengths():
    with pytest.raises(ConfigError, match="halo has 2 entries, expected 3"):
        plan_blocks((8, 8, 8), (4, 4, 4), (1, 1), (1, 1, 1))


def test_default_block_shape_grows_until_the_memory_cap_or_the_overhead_goal():
    shape, chunks, halo = (512, 2048, 2048), (32, 128, 128), (24, 24, 24)

    def window(b):
        return np.prod([min(n, x + 2 * h) for x, n, h in zip(b, shape, halo)])

    block = default_block_shape(shape, chunks, [True] * 3, halo, 2**22)
    assert all(b % c == 0 for b, c in zip(block, chunks))
    assert window(block) <= 2**22
    # stopped because of the cap: doubling any axis would exceed it
    for axis in range(3):
        grown = list(block)
        grown[axis] += chunks[axis] * max(1, block[axis] // chunks[axis])
        assert window(grown) > 2**22
    # with memory enough, it stops at the overhead goal
    big = default_block_shape(shape, chunks, [True] * 3, halo, 2**31)
    assert window_overhead(big, shape, halo) <= 1.15 < window_overhead(block, shape, halo)
    # a thin volume is taken whole along Z: no halo there at all
    thin = default_block_shape((64, 4096, 4096), (64, 128, 128), [True] * 3, halo, 2**27)
    assert thin[0] == 64 and window_overhead(thin, (64, 4096, 4096), halo) <= 1.15
    # non-spatial axes keep one chunk
    block = default_block_shape((3, 64, 512, 512), (1, 32, 128, 128), [False, True, True, True], (0, 8, 8, 8), 2**22)
    assert block[0] == 1


def test_min_voxels_makes_blocks_bigger_than_one_call():
    shape, chunks, halo = (1024, 4096, 4096), (64, 256, 256), (24, 24, 24)
    block = default_block_shape(shape, chunks, [True] * 3, halo, math.inf, min_voxels=2**29, overhead_goal=1.15)
    assert np.prod(block) >= 2**29


def test_large_clusters_get_big_blocks_predicted_in_memory_sized_tiles():
    from bigcare.blocks.sizing import min_block_voxels

    assert min_block_voxels(512, "cuda") == pytest.approx(8 * min_block_voxels(64, "cuda"), rel=1e-6)  # linear in GPUs
    need = min_block_voxels(512, "cuda")
    shape, chunks, halo = (4096, 16384, 16384), (64, 256, 256), (24, 24, 24)
    tile = default_block_shape(shape, chunks, [True] * 3, halo, 2**27)
    block = default_block_shape(shape, chunks, [True] * 3, halo, math.inf, min_voxels=need)
    plan = plan_blocks(shape, block, halo, (4, 4, 4), chunks, tile_shape=tile)
    first = next(iter(plan))
    assert len(plan.tiles(first)) > 1
    assert all(t.predicted_voxels <= 2**27 for t in plan.tiles(first))


def test_overhead_counts_read_voxels():
    plan = plan_blocks((64, 64), (32, 32), (8, 8), (1, 1))
    expected = sum(np.prod([r1 - r0 for r0, r1 in b.read]) for b in plan) / 64 ** 2
    assert plan.overhead == pytest.approx(expected)
    assert plan.overhead == pytest.approx((40 / 32) ** 2)


def test_tiles_partition_a_block_and_each_has_its_own_aligned_halo():
    plan = plan_blocks((37, 45, 51), (16, 32, 32), (6, 6, 6), (4, 4, 4), tile_shape=(8, 16, 12))
    assert plan.tile_shape == (8, 16, 12)
    count = np.zeros(plan.shape, np.int32)
    for b in plan:
        tiles = plan.tiles(b)
        for t in tiles:
            count[t.write_slices] += 1
            assert t.index == b.index
            for (w0, w1), (r0, r1), n in zip(t.write, t.read, plan.shape):
                assert r0 % 4 == 0 and r0 <= max(0, w0 - 6) and r1 >= min(n, w1 + 6)
        assert sum(t.write_voxels for t in tiles) == b.write_voxels
    assert (count == 1).all()
    untiled = plan_blocks((37, 45, 51), (16, 32, 32), (6, 6, 6), (4, 4, 4))
    assert plan.overhead > untiled.overhead  # every tile recomputes its own halo
    assert "tile_shape" in plan.as_dict() and "tile_shape" not in untiled.as_dict()


def test_tile_shape_covering_the_block_means_one_call():
    plan = plan_blocks((20, 20), (10, 10), (2, 2), (1, 1), tile_shape=(16, 16))
    assert plan.tile_shape is None and all(len(plan.tiles(b)) == 1 for b in plan)


def test_plan_overhead_equals_the_sum_over_every_block_and_tile():
    """The per-axis overhead formula is the brute-force sum over blocks and tiles."""
    import random

    rng = random.Random(1)
    for _ in range(200):
        nd = rng.choice([2, 3])
        shape = [rng.randint(1, 90) for _ in range(nd)]
        chunks = [rng.randint(1, 12) for _ in range(nd)]
        block = [c * rng.randint(1, 4) for c in chunks]
        tile = [rng.randint(1, 30) for _ in range(nd)] if rng.random() < 0.5 else None
        zoom = [rng.choice([2.0, 3.5])] + [1.0] * (nd - 1) if rng.random() < 0.3 else None
        plan = plan_blocks(shape, block, [rng.randint(0, 10) for _ in range(nd)],
                           [rng.choice([1, 2, 4, 8]) for _ in range(nd)], chunks, zoom=zoom, tile_shape=tile)
        brute = sum(t.predicted_voxels for b in plan for t in plan.tiles(b)) / math.prod(plan.shape)
        assert plan.overhead == pytest.approx(brute, rel=1e-12)


def test_the_call_size_follows_the_workers_memory_and_precision():
    from bigcare.blocks.sizing import CALL_VOXELS, call_voxels

    small = call_voxels("cpu", memory_limit=2 * 2**30, threads=2, precision="fp32", n_filter_base=32)
    assert small == CALL_VOXELS["cpu"]  # a 2 GiB worker keeps the floor
    big = call_voxels("cpu", memory_limit=128 * 2**30, threads=16, precision="fp32", n_filter_base=32)
    assert big > 8 * CALL_VOXELS["cpu"]
    # bf16 activations take about half the bytes: nearly twice the window (threads' reads take the same)
    two = call_voxels("cpu", memory_limit=128 * 2**30, threads=2, precision="fp32", n_filter_base=32)
    assert 1.7 < call_voxels("cpu", memory_limit=128 * 2**30, threads=2, precision="bf16", n_filter_base=32) / two < 2.1
    assert two > big  # every thread holds a read region and an output too
    assert call_voxels("cpu", memory_limit=128 * 2**30, threads=16, n_filter_base=8) > big  # a narrower net
    assert call_voxels("cpu", memory_limit=None, n_filter_base=32) == CALL_VOXELS["cpu"]  # unknown: the cap
    assert call_voxels("cuda", memory_limit=128 * 2**30, n_filter_base=32) == CALL_VOXELS["cuda"]
    # a big worker's window makes bigger default blocks with less recomputed halo
    shape, chunks, halo = (512, 2048, 2048), (64, 128, 128), (24, 24, 24)
    b_small = default_block_shape(shape, chunks, [True] * 3, halo, small)
    b_big = default_block_shape(shape, chunks, [True] * 3, halo, big)
    assert math.prod(b_big) > math.prod(b_small)
    assert window_overhead(b_big, shape, halo) < window_overhead(b_small, shape, halo)
