"""The per-worker cache of decoded input chunks: same voxels as a direct read, each chunk decoded once."""

from __future__ import annotations

import numpy as np
import zarr

from bigcare.store import chunkcache


def test_regions_read_through_the_cache_equal_direct_reads_and_neighbours_decode_each_chunk_once(tmp_path, rng):
    data = rng.integers(0, 60000, (23, 37, 41), dtype=np.uint16)
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=data.shape, chunks=(5, 8, 16), dtype="uint16")
    arr[...] = data
    chunkcache.clear()
    before = dict(chunkcache.STATS)
    regions = [((0, 11), (3, 30), (0, 41)), ((4, 23), (0, 37), (9, 33)), ((4, 23), (0, 37), (9, 33)),
               ((7, 8), (36, 37), (40, 41))]
    for region in regions:
        got = chunkcache.read_region(arr, region, "t")
        np.testing.assert_array_equal(got, data[tuple(slice(a, b) for a, b in region)])
    decoded = chunkcache.STATS["decoded"] - before["decoded"]
    assert decoded <= 5 * 5 * 3  # every chunk of the array at most once, though the regions overlap
    assert chunkcache.STATS["hits"] > before["hits"]
    # another token (another run) never sees this run's chunks
    arr[...] = data + 1
    got = chunkcache.read_region(arr, regions[0], "u")
    np.testing.assert_array_equal(got, data[tuple(slice(a, b) for a, b in regions[0])] + 1)
