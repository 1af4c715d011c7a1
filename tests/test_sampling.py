"""The lazy patch sampler: positions, reads, normalization, augmentation, splits, errors."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import re
import sys

import fsspec
import numpy as np
import pytest
import zarr
from fsspec.implementations.local import LocalFileSystem
from pydantic import ValidationError
from scipy import ndimage

from bigcare.errors import ConfigError, InputError, format_validation_error
from bigcare.store.axes import Axis
from bigcare.store.chunks import RegionReader, tune_malloc
from bigcare.store.write import create_volume
from bigcare.tasks import slots as slots_module
from bigcare.training import positions as positions_module
from bigcare.training import reads
from bigcare.training import sampling as sampling_module
from bigcare.training.config import SamplingConfig
from bigcare.training.patchstore import PatchStore
from bigcare.training.reads import augment
from bigcare.training.sampling import PatchSampler, Source
from conftest import write_volume

PATCH = (8, 32, 32)
#: glibc's malloc, /proc/self/environ and /dev/shm: what the worker tuning and the result slots use.
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/dev/shm"),
                           reason="needs Linux (glibc malloc, /proc, /dev/shm)")


class CountingFileSystem(LocalFileSystem):
    """Local files behind ``countfile://`` URLs; records every file opened for reading."""

    protocol = ("countfile",)
    opened: list[str] = []

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            CountingFileSystem.opened.append(self._strip_protocol(path))
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("countfile", CountingFileSystem, clobber=True)


def blobs(shape, n, size, seed, value=1000):
    """Zeros with ``n`` bright boxes of ``size`` at seeded places (the known foreground)."""
    rng = np.random.default_rng(seed)
    y = np.zeros(shape, np.uint16)
    for _ in range(n):
        c = [rng.integers(0, s - k + 1) for s, k in zip(shape, size)]
        y[tuple(slice(a, a + k) for a, k in zip(c, size))] = value
    return y


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A (noisy input, blob target) pair, 3D, chunked (8, 32, 32), with a 3-level pyramid."""
    root = tmp_path_factory.mktemp("pair")
    target = blobs((16, 256, 256), 14, (8, 24, 24), seed=1)
    noisy = target + np.random.default_rng(2).poisson(100, target.shape).astype(np.uint16)
    write_volume(root / "x.zarr", noisy, chunks=(8, 32, 32))
    write_volume(root / "y.zarr", target, chunks=(8, 32, 32))
    return str(root / "x.zarr"), str(root / "y.zarr"), noisy, target


def boxes(positions, shape=PATCH):
    """Per position: the full-resolution footprint as slices (3D sources, no channels)."""
    return [tuple(slice(int(s), int(s) + p) for s, p in zip(row[1:], shape)) for row in positions]


def chunk_paths(url, positions, chunks):
    out = set()
    for box in boxes(positions):
        ranges = [range(b.start // c, (b.stop - 1) // c + 1) for b, c in zip(box, chunks)]
        out |= {f"{url}/0/c/" + "/".join(map(str, k)) for k in itertools.product(*ranges)}
    return out


# --- positions -------------------------------------------------------------------------------------


def test_positions_are_reproducible_from_the_seed(pair):
    x, y, _, _ = pair
    a = PatchSampler([(x, y)], PATCH, n_patches=300, seed=3)
    b = PatchSampler([(x, y)], PATCH, n_patches=300, seed=3)
    c = PatchSampler([(x, y)], PATCH, n_patches=300, seed=4)
    assert np.array_equal(a.train_positions, b.train_positions)
    assert np.array_equal(a.val_positions, b.val_positions)
    assert a.train_positions.shape == (270, 4) and a.val_positions.shape == (30, 4)
    assert not np.array_equal(a.train_positions, c.train_positions)


def test_sampling_reads_only_the_coarse_level_and_the_patch_chunks(pair):
    x, y, _, _ = pair
    ux, uy = "countfile://" + x, "countfile://" + y
    CountingFileSystem.opened.clear()
    sampler = PatchSampler([(ux, uy)], PATCH, n_patches=40, seed=0, batch_size=6)
    drawing = [p for p in CountingFileSystem.opened if "/c/" in p]  # chunks; metadata reads aside
    level = sampler.provenance["sources"][0]["coarse_level"]
    assert level > 0
    assert drawing and all(p.startswith(f"{y}/{level}/c/") for p in drawing), drawing  # the target's coarse level only

    _ = sampler.tables  # normalization statistics: a separate, explicit phase
    CountingFileSystem.opened.clear()
    for _ in sampler.batches("train", epochs=1):
        pass
    for _ in sampler.batches("val"):
        pass
    read = {p for p in CountingFileSystem.opened if "/c/" in p}
    positions = np.concatenate([sampler.train_positions, sampler.val_positions])  # 36 = 6 full batches
    expected = chunk_paths(x, positions, (8, 32, 32)) | chunk_paths(y, positions, (8, 32, 32))
    assert read == expected


def test_positions_fall_on_foreground_at_the_expected_rate(pair):
    x, y, _, target = pair
    # a start is foreground when its full-resolution footprint holds target signal
    touched = ndimage.maximum_filter(target, size=PATCH, origin=tuple(-(p // 2) for p in PATCH), mode="constant") > 0
    touched = touched[tuple(slice(0, n - p + 1) for n, p in zip(target.shape, PATCH))]

    def hit(sampler):
        return np.mean([touched[tuple(r[1:])] for r in sampler.train_positions])


    uniform = PatchSampler([(x, y)], PATCH, n_patches=2000, foreground_threshold=0, validation_fraction=0, seed=0)
    expected, n = touched.mean(), len(uniform.train_positions)
    assert 0.2 < expected < 0.6
    assert abs(hit(uniform) - expected) < 4 * np.sqrt(expected * (1 - expected) / n)

    aware = PatchSampler([(x, y)], PATCH, n_patches=2000, validation_fraction=0, seed=0)
    assert hit(aware) > 0.95
    assert 0.2 < aware.provenance["sources"][0]["foreground_fraction"] < 0.7


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_and_validation_footprints_are_disjoint(pair, seed):
    x, y, _, _ = pair
    sampler = PatchSampler([(x, y)], PATCH, n_patches=600, validation_fraction=0.2, seed=seed)
    assert len(sampler.val_positions) == 120
    train, val = np.zeros((16, 256, 256), bool), np.zeros((16, 256, 256), bool)
    for mask, pos in ((train, sampler.train_positions), (val, sampler.val_positions)):
        for box in boxes(pos):
            mask[box] = True
    assert val.sum() > 0 and train.sum() > 0
    assert not (train & val).any()


def test_sources_of_different_sizes_and_2d_patches_from_3d_volumes(tmp_path):
    big, small = blobs((8, 128, 128), 12, (4, 20, 20), 5), blobs((4, 64, 96), 3, (2, 20, 20), 6)
    for name, data in (("big", big), ("small", small)):
        write_volume(tmp_path / f"{name}.zarr", data, chunks=(4, 32, 32))
    sources = [(tmp_path / f"{n}.zarr", tmp_path / f"{n}.zarr") for n in ("big", "small")]
    sampler = PatchSampler(sources, (16, 16), n_patches=400, seed=0, batch_size=10)
    counts = np.bincount(sampler.train_positions[:, 0], minlength=2)
    assert counts.min() > 0 and counts[0] > counts[1]  # proportional to foreground positions
    assert sampler.train_positions.shape[1] == 4  # source, z, y, x: single Z slices
    x, y = next(sampler.batches())
    assert x.shape == y.shape == (10, 1, 16, 16)
    for row in sampler.train_positions:
        n = big.shape if row[0] == 0 else small.shape
        assert 0 <= row[1] < n[0] and 0 <= row[2] <= n[1] - 16 and 0 <= row[3] <= n[2] - 16


def test_coarse_grid_is_reduced_blockwise_when_no_level_is_small_enough(tmp_path, monkeypatch):
    target = blobs((16, 128, 128), 6, (8, 24, 24), 7)
    vol = write_volume(tmp_path / "y.zarr", target, chunks=(8, 32, 32))
    monkeypatch.setattr(sampling_module, "COARSE_CELLS", 512)
    sampler = PatchSampler([(vol.url, vol.url)], PATCH, n_patches=200, validation_fraction=0, seed=0)
    info = sampler.provenance["sources"][0]
    assert np.prod(info["coarse_factors"]) > 64  # coarser than any stored level (factor 4^3 at most)
    touched = ndimage.maximum_filter(target, size=PATCH, origin=tuple(-(p // 2) for p in PATCH), mode="constant") > 0
    assert np.mean([touched[tuple(r[1:])] for r in sampler.train_positions]) > 0.9

    grid = positions_module.choose_coarse(vol, (0, 1, 2), PATCH, (True,) * 3, level=0, budget=512)
    ref = vol.ref(None, 0)
    coarse = positions_module.read_coarse(ref, grid, target.shape)
    f = grid.factors
    manual = target.astype(np.float32).reshape(16 // f[0], f[0], 128 // f[1], f[1], 128 // f[2], f[2]).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(coarse, manual, rtol=1e-5)


# --- batches ---------------------------------------------------------------------------------------


def test_batches_are_normalized_float32_of_the_right_shape(pair):
    x, y, noisy, target = pair
    sampler = PatchSampler([(x, y)], PATCH, n_patches=64, seed=0, batch_size=8, augment=False)
    bx, by = next(sampler.batches())
    assert bx.shape == by.shape == (8, 1) + PATCH and bx.dtype == by.dtype == np.float32
    assert by.min() >= 0 and by.max() <= 1 + 1e-6 and by.max() > 0.99  # blobs of 1000 over zero background
    # each sample: (v - P_pmin) / (P_pmax - P_pmin) of its own image at its own percentiles
    first = np.random.default_rng([0, 6, 0]).permutation(len(sampler.train_positions))[:8]
    pmin, pmax = sampler._percentiles["train"][first].T
    assert np.all((1 <= pmin) & (pmin <= 3) & (99.5 <= pmax) & (pmax <= 99.9)) and np.ptp(pmin) > 0
    for k, i in enumerate(first):
        box = boxes(sampler.train_positions[[i]])[0]
        lo, hi = np.percentile(noisy, [pmin[k], pmax[k]])
        np.testing.assert_allclose(bx[k, 0], (noisy[box] - lo) / (hi - lo), atol=2e-3)


def test_augmentation_keeps_input_and_target_aligned(tmp_path, pair):
    _, _, _, target = pair
    base = target.astype(np.float32) + np.random.default_rng(0).poisson(50, target.shape)
    write_volume(tmp_path / "a.zarr", base.astype(np.uint16), chunks=(8, 64, 64))
    write_volume(tmp_path / "b.zarr", (2 * base + 10).astype(np.uint16), chunks=(8, 64, 64))
    pair_ab = [(tmp_path / "a.zarr", tmp_path / "b.zarr")]
    plain = PatchSampler(pair_ab, PATCH, n_patches=64, seed=0, augment=False)
    aug = PatchSampler(pair_ab, PATCH, n_patches=64, seed=0)
    assert aug.rotations
    (px, py), (ax, ay) = next(plain.batches()), next(aug.batches())
    # percentile normalization removes the affine map, so x and y agree voxel by voxel
    np.testing.assert_allclose(ax, ay, atol=1e-4)
    np.testing.assert_allclose(px, py, atol=1e-4)
    codes = [next(c for c in range(8) if np.array_equal(augment(p[0], c), a[0])) for p, a in zip(px, ax)]
    assert len(set(codes)) > 2 and any(c & 4 for c in codes)


def test_rotations_only_when_lateral_voxels_are_square(tmp_path, pair):
    _, _, _, target = pair
    write_volume(tmp_path / "t.zarr", target, chunks=(8, 64, 64), scale=(1.0, 0.5, 0.25))
    aniso = PatchSampler([(tmp_path / "t.zarr", tmp_path / "t.zarr")], PATCH, n_patches=64, seed=0)
    assert not aniso.rotations and aniso.provenance["augment"] == {"flips": True, "rotations": False}
    assert not PatchSampler([(tmp_path / "t.zarr", tmp_path / "t.zarr")], (8, 32, 16), n_patches=64).rotations
    plain = PatchSampler([(tmp_path / "t.zarr", tmp_path / "t.zarr")], PATCH, n_patches=64, seed=0, augment=False)
    for (px, _), (ax, _) in zip(plain.batches(epochs=1), aniso.batches(epochs=1)):
        for p, a in zip(px, ax):
            assert any(np.array_equal(augment(p[0], c), a[0]) for c in range(4))


def test_two_channel_image_gives_the_same_batches_as_the_pair(tmp_path, pair):
    x, y, noisy, target = pair
    both = np.stack([noisy, target])
    write_volume(tmp_path / "xy.zarr", both, axes="czyx", chunks=(2, 8, 32, 32))
    write_volume(tmp_path / "yx.zarr", both[::-1].copy(), axes="czyx", chunks=(1, 8, 32, 32))
    from_pair = PatchSampler([(x, y)], PATCH, n_patches=48, seed=0)
    for source in (str(tmp_path / "xy.zarr"), Source(str(tmp_path / "yx.zarr"), input_channel=1, target_channel=0),
                   {"input": str(tmp_path / "xy.zarr"), "input_channel": 0, "target_channel": 1}):
        sampler = PatchSampler([source], PATCH, n_patches=48, seed=0)
        assert np.array_equal(sampler.train_positions, from_pair.train_positions)
        for (a, b), (c, d) in zip(sampler.batches(epochs=1), from_pair.batches(epochs=1)):
            np.testing.assert_array_equal(a, c)
            np.testing.assert_array_equal(b, d)


def test_cluster_batches_equal_thread_pool_batches(client, pair):
    x, y, _, _ = pair
    local = PatchSampler([(x, y)], PATCH, n_patches=80, seed=0, batch_size=8)
    remote = PatchSampler([(x, y)], PATCH, n_patches=80, seed=0, batch_size=8, client=client, read_ahead=2)
    assert np.array_equal(local.train_positions, remote.train_positions)
    for (a, b), (c, d) in zip(itertools.islice(local.batches(), 12), itertools.islice(remote.batches(), 12)):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    assert len(list(remote.batches("val"))) == 1


@LINUX
def test_malloc_is_tuned_in_dask_workers_only(client):
    # workers start with MALLOC_TRIM_THRESHOLD_ (dask's nanny); this process got it in
    # os.environ from starting the cluster, but its malloc must keep its dynamic threshold
    assert set(client.run(tune_malloc).values()) == {True}
    assert "MALLOC_TRIM_THRESHOLD_" in os.environ
    assert tune_malloc() is False


def test_patch_store_streams_the_same_batches(tmp_path, pair):
    x, y, _, _ = pair
    sampler = PatchSampler([(x, y)], PATCH, n_patches=60, seed=0, batch_size=8)
    store = sampler.write_patch_store(tmp_path / "patches.zarr")
    sampler.write_patch_store(tmp_path / "patches.zarr", split="val")
    assert PatchStore(tmp_path / "patches.zarr").splits == {"train": 54, "val": 6}
    assert store.provenance["n_train"] == 54
    for split in ("train", "val"):
        for (a, b), (c, d) in zip(sampler.batches(split, epochs=2), store.batches(split, epochs=2)):
            np.testing.assert_array_equal(a, c)
            np.testing.assert_array_equal(b, d)
    with pytest.raises(Exception, match="already holds the 'train' split"):
        sampler.write_patch_store(tmp_path / "patches.zarr")


# --- region reads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["v3", "v2", "v3-sharded", "v3-big-endian-zstd"])
def test_region_reader_matches_zarr(tmp_path, layout):
    data = np.random.default_rng(0).integers(0, 60000, (2, 11, 37, 29)).astype(np.uint16)
    kwargs = {"zarr_format": 2} if layout == "v2" else {}
    if layout == "v3-sharded":
        kwargs["shards"] = (2, 8, 16, 16)
    if layout == "v3-big-endian-zstd":
        kwargs.update(compressors=zarr.codecs.ZstdCodec(), serializer=zarr.codecs.BytesCodec(endian="big"))
    arr = zarr.create_array(tmp_path / "a.zarr", shape=data.shape, chunks=(1, 4, 8, 8), dtype=np.uint16,
                            fill_value=7, **kwargs)
    arr[:, :8] = data[:, :8]  # chunks past z = 8 are never written: fill value
    data[:, 8:] = 7
    from bigcare.store.volume import Level

    level = Level("", data.shape, data.shape, np.dtype(np.uint16), (1.0,) * 4, (0.0,) * 4)
    reader = RegionReader(str(tmp_path / "a.zarr"), None, 2 if layout == "v2" else 3, level)
    assert reader.fast == (layout != "v3-sharded")
    rng = np.random.default_rng(1)
    for _ in range(20):
        a = [int(rng.integers(0, n)) for n in data.shape]
        b = [int(rng.integers(s + 1, n + 1)) for s, n in zip(a, data.shape)]
        sel = tuple(slice(s, e) for s, e in zip(a, b))
        np.testing.assert_array_equal(reader.read(sel), data[sel])


def test_read_patches_decodes_each_chunk_once_and_matches_patch_by_patch_reads(tmp_path, pair, monkeypatch):
    x, y, noisy, target = pair
    both = np.stack([noisy, target])
    write_volume(tmp_path / "xy.zarr", both, axes="czyx", chunks=(2, 8, 32, 32))  # one chunk holds both channels
    rng = np.random.default_rng(5)
    n = 48
    starts = np.stack([rng.integers(0, 3, n), rng.integers(0, 80, n), rng.integers(0, 80, n)], axis=1)  # dense: shared chunks
    codes = rng.integers(0, 8, n)
    for sources, expected in (([(x, y)], (noisy, target)), ([str(tmp_path / "xy.zarr")], (noisy, target))):
        sampler = PatchSampler(sources, PATCH, n_patches=20, seed=0)
        plan = sampler.read_plan
        fetched = []
        read_many = RegionReader.read_many
        monkeypatch.setattr(RegionReader, "read_many",
                            lambda self, *a, _got=fetched, _read=read_many, **k: _got.append(_read(self, *a, **k)) or _got[-1])
        bx, by = reads.read_patches(plan, np.zeros(n, int), starts, None, codes)
        monkeypatch.undo()
        for k in range(n):
            box = tuple(slice(int(s), int(s) + p) for s, p in zip(starts[k], PATCH))
            for batch, image in zip((bx, by), expected):
                np.testing.assert_array_equal(batch[k, 0], augment(image[box], int(codes[k])))
        touched = {c for s in starts for c in itertools.product(*[range(a // c, (a + p - 1) // c + 1)
                                                                   for a, p, c in zip(s, PATCH, (8, 32, 32))])}
        # every chunk fetched once per image: input and target, or once for both channels
        assert fetched == ([len(touched)] * 2 if len(sources[0]) == 2 else [len(touched)])
        assert sum(fetched) < 2 * sum(np.prod([(a + p - 1) // c - a // c + 1 for a, p, c in zip(s, PATCH, (8, 32, 32))])
                                      for s in starts)
        scaling = sampler.scaling("train", np.arange(len(sampler.train_positions)))[:1].repeat(n, 0)
        nx, ny = reads.read_patches(plan, np.zeros(n, int), starts, scaling, codes)
        np.testing.assert_array_equal(nx, reads.normalize_batch(bx, scaling[:, :2]))
        np.testing.assert_array_equal(ny, reads.normalize_batch(by, scaling[:, 2:]))


def test_unaugment_is_the_inverse_view_of_augment():
    a = np.arange(2 * 4 * 4).reshape(2, 4, 4)
    for code in range(8):
        out = np.zeros_like(a)
        view = reads.unaugment(out, code)
        assert np.shares_memory(view, out)
        view[...] = a
        np.testing.assert_array_equal(out, augment(a, code))


@LINUX
def test_cluster_results_come_through_shared_memory_and_the_slots_are_removed(client, pair, monkeypatch):
    import glob

    x, y, _, _ = pair
    monkeypatch.setattr(sampling_module, "TASK_PATCHES", 16)  # 2 batches per task: 15 tasks, each slot reused
    before = set(glob.glob("/dev/shm/bigcare-patches-*"))
    local = PatchSampler([(x, y)], PATCH, n_patches=80, seed=0, batch_size=8)
    remote = PatchSampler([(x, y)], PATCH, n_patches=80, seed=0, batch_size=8, client=client, read_ahead=2)
    kinds = []
    arrays = slots_module.ResultSlots.arrays
    monkeypatch.setattr(slots_module.ResultSlots, "arrays", lambda self, r: kinds.append("shm") or arrays(self, r))
    it = remote.batches()
    for (a, b), (c, d) in zip(itertools.islice(local.batches(), 30), itertools.islice(it, 30)):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    assert len(kinds) == 15  # every task came through a slot
    assert len(set(glob.glob("/dev/shm/bigcare-patches-*")) - before) == 3  # one per task in flight, each reused
    it.close()
    assert set(glob.glob("/dev/shm/bigcare-patches-*")) == before



def test_read_patches_into_a_slot_and_the_fallbacks(tmp_path, pair):
    x, y, _, _ = pair
    sampler = PatchSampler([(x, y)], PATCH, n_patches=40, seed=0)
    pos, codes = sampler.train_positions[:10], np.arange(10) % 8
    args = (sampler.read_plan, pos[:, 0], pos[:, 1:], None, codes)
    ex, ey = reads.read_patches(*args)

    class Client:  # what ResultSlots needs of a distributed.Client
        def __init__(self, sees):
            self.sees = sees

        def run(self, fn, *args):
            return {"w1": fn(*args), "w2": self.sees}

    assert slots_module.ResultSlots.create(Client(False), 2, ex.nbytes + ey.nbytes) is None  # a worker elsewhere
    slots = slots_module.ResultSlots.create(Client(True), 2, ex.nbytes + ey.nbytes)
    assert slots is not None
    result = reads.read_patches(*args, into=slots.slot(3))
    assert isinstance(result, slots_module.InSlot) and result.slot == slots.slots[1]
    gx, gy = slots.arrays(result)
    np.testing.assert_array_equal(gx, ex)
    np.testing.assert_array_equal(gy, ey)
    del gx, gy
    paths = [sl.path for sl in slots.slots]
    slots.close()
    assert not any(os.path.exists(p) for p in paths)
    # a slot this process cannot open (another host), or too small: the arrays come back
    (tmp_path / "small").write_bytes(bytes(16))
    for slot in (slots_module.Slot(str(tmp_path / "missing"), 1 << 30), slots_module.Slot(str(tmp_path / "small"), 16)):
        gx, gy = reads.read_patches(*args, into=slot)
        np.testing.assert_array_equal(gx, ex)
        np.testing.assert_array_equal(gy, ey)


# --- errors ----------------------------------------------------------------------------------------


def test_patch_larger_than_the_volume_is_a_config_error(pair):
    x, y, _, _ = pair
    with pytest.raises(ConfigError, match=r"patch_shape \(32, 32, 32\) is larger than .* along axis 'z': 32 > 16"):
        PatchSampler([(x, y)], (32, 32, 32), n_patches=10)


def test_mismatched_pair_shapes_are_an_input_error(tmp_path, pair):
    x, _, _, target = pair
    write_volume(tmp_path / "short.zarr", target[:, :200], chunks=(8, 32, 32))
    with pytest.raises(InputError, match=r"shape \(16, 256, 256\).*shape \(16, 200, 256\).*do not match"):
        PatchSampler([(x, tmp_path / "short.zarr")], PATCH, n_patches=10)


def test_channel_errors_name_the_channel(tmp_path, pair):
    x, y, noisy, target = pair
    write_volume(tmp_path / "c3.zarr", np.stack([noisy, target, target]), axes="czyx", chunks=(1, 8, 32, 32))
    c3 = str(tmp_path / "c3.zarr")
    with pytest.raises(ConfigError, match=r"target_channel=3 is out of range: .* has 3 channel\(s\), expected 0..2"):
        PatchSampler([Source(c3, input_channel=0, target_channel=3)], PATCH, n_patches=10)
    with pytest.raises(ConfigError, match=r"input_channel: .* has 3 channels; name the one to use"):
        PatchSampler([Source(c3, target_channel=1)], PATCH, n_patches=10)
    with pytest.raises(ConfigError, match=r"alone must hold input and target as two channels"):
        PatchSampler([x], PATCH, n_patches=10)
    with pytest.raises(ConfigError, match=r"input_channel=1: .* has no channel axis"):
        PatchSampler([Source(x, y, input_channel=1)], PATCH, n_patches=10)
    with pytest.raises(ConfigError, match=r"both 1; expected two different channels"):
        PatchSampler([Source(c3, input_channel=1, target_channel=1)], PATCH, n_patches=10)


def test_bad_parameters_are_config_errors(pair):
    x, y, _, _ = pair
    with pytest.raises(ConfigError, match=r"^sources\.0\.input: required key missing; "
                                          r"sources\.0\.inputs: unknown key \(not allowed\) \(got '.*x\.zarr'\)$"):
        PatchSampler([{"inputs": x}], PATCH, n_patches=10)
    with pytest.raises(ConfigError, match=r"^sources\.0: expected a Source, an image path .* \(got 7\)$"):
        PatchSampler([7], PATCH, n_patches=10)
    with pytest.raises(ConfigError, match=r"^sources: Input should be a valid list"):
        PatchSampler(x, PATCH, n_patches=10)
    with pytest.raises(ConfigError, match="patch_shape: expected 2 or 3 positive integers"):
        PatchSampler([(x, y)], (4, 8, 32, 32), n_patches=10)
    with pytest.raises(ConfigError, match=r"^validation_fraction: Input should be less than 1 \(got 1.5\)$"):
        PatchSampler([(x, y)], PATCH, n_patches=10, validation_fraction=1.5)
    with pytest.raises(ConfigError, match=r"pmin_range: expected two percentiles"):
        PatchSampler([(x, y)], PATCH, n_patches=10, pmin_range=(3, 1))
    with pytest.raises(ConfigError, match="coarse_level: .* has levels 0..2, got 5"):
        PatchSampler([(x, y)], PATCH, n_patches=10, coarse_level=5)
    with pytest.raises(InputError, match="no such file or directory"):
        PatchSampler([(x, x + "-missing")], PATCH, n_patches=10)
    with pytest.raises(ConfigError, match="split: expected 'train' or 'val', got 'test'"):
        next(PatchSampler([(x, y)], PATCH, n_patches=10).batches("test"))


def test_sampler_keywords_are_the_sampling_config():
    """One schema: every sampler parameter but the client is a SamplingConfig field, same default."""
    params = {name: p for name, p in inspect.signature(PatchSampler).parameters.items() if name != "client"}
    assert set(params) == set(SamplingConfig.model_fields)
    for name, field in SamplingConfig.model_fields.items():
        default = params[name].default
        if field.is_required():
            assert default is inspect.Parameter.empty, name
        else:
            assert default == field.default, name


def test_source_is_one_schema_for_paths_pairs_and_mappings(tmp_path):
    from pathlib import Path

    pair = Source("a.zarr", "b.zarr", input_channel=0)
    assert pair == Source.model_validate({"input": "a.zarr", "target": "b.zarr", "input_channel": 0})
    assert Source.model_validate(("a.zarr", "b.zarr")) == Source(input="a.zarr", target="b.zarr")
    assert Source.model_validate(Path("a.zarr")) == Source(Path("a.zarr")) == Source("a.zarr")
    assert Source(Path("a.zarr")).input == "a.zarr"
    with pytest.raises(ConfigError, match=r"^Source: input_channel: Input should be greater than or equal to 0 \(got -1\)$"):
        Source("a.zarr", input_channel=-1)
    with pytest.raises(ConfigError, match=r"^Source: inputs: unknown key \(not allowed\) \(got 'b.zarr'\)$"):
        Source("a.zarr", inputs="b.zarr")
    with pytest.raises(TypeError, match="both positionally and as a keyword"):
        Source("a.zarr", input="b.zarr")
    with pytest.raises(ValidationError, match="frozen"):
        pair.target = "c.zarr"
    secret = Source("a.zarr", storage_options={"key": "s3cr3t"})
    assert secret.storage_options == {"key": "s3cr3t"}
    assert "s3cr3t" not in repr(secret) and "storage_options" not in secret.model_dump()


def test_storage_options_are_never_recorded(pair):
    x, y, _, _ = pair
    sampler = PatchSampler([Source(x, y, storage_options={"key": "s3cr3t"})], PATCH, n_patches=10, seed=0)
    assert sampler.settings.sources[0].storage_options == {"key": "s3cr3t"}  # kept for reading
    record = json.dumps(sampler.provenance)
    assert x in record and "s3cr3t" not in record and "storage_options" not in record


@pytest.mark.parametrize("keywords, message", [
    ({"n_patches": 0}, r"^n_patches: Input should be greater than or equal to 1 \(got 0\)$"),
    ({"n_patches": 1}, r"^validation_fraction: leaves no training patch of n_patches=1 \(got 0.1\)$"),
    ({"foreground_threshold": 1.5}, r"^foreground_threshold: Input should be less than or equal to 1"),
    ({"foreground_percentile": 0}, r"^foreground_percentile: Input should be greater than 0"),
    ({"pmax_range": (2.0, 99.0)}, r"^pmax_range: expected percentiles above pmin_range \(1.0, 3.0\)"),
    ({"seed": -1}, r"^seed: Input should be greater than or equal to 0"),
    ({"batch_size": 0}, r"^batch_size: Input should be greater than or equal to 1"),
    ({"read_ahead": -1}, r"^read_ahead: Input should be greater than or equal to 0"),
    ({"coarse_level": -1}, r"^coarse_level: Input should be greater than or equal to 0"),
])
def test_sampler_limits_are_checked_before_any_read(keywords, message):
    with pytest.raises(ConfigError, match=message):
        PatchSampler([("missing-x.zarr", "missing-y.zarr")], PATCH, **{"n_patches": 10, **keywords})
    with pytest.raises(ValidationError) as err:
        SamplingConfig.model_validate({"sources": ["s.zarr"], "patch_shape": list(PATCH), "n_patches": 10, **keywords})
    assert re.match(message, format_validation_error(err.value))


def test_empty_target_is_an_input_error(tmp_path):
    vol = create_volume(tmp_path / "empty.zarr", shape=(16, 64, 64), dtype=np.uint16, chunks=(8, 32, 32),
                       axes=[Axis(a, "space") for a in "zyx"], scale=(1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="no foreground found"):
        PatchSampler([(vol.url, vol.url)], PATCH, n_patches=10)


def test_batch_order_visits_every_training_patch_once_per_epoch():
    from bigcare.training.sampling import batch_order

    batches = list(batch_order(36, batch_size=8, seed=0, epochs=2, n_codes=8, shuffle=True))
    assert [len(i) for i, _ in batches] == [8] * 9  # epochs run into each other: every batch full
    seen = np.concatenate([i for i, _ in batches])
    assert sorted(seen[:36]) == list(range(36)) and np.bincount(seen, minlength=36).tolist() == [2] * 36
    codes = np.concatenate([c for _, c in batches])
    assert set(codes) == set(range(8))
    val = list(batch_order(20, batch_size=8, seed=0, epochs=None, n_codes=8, shuffle=False))
    assert [i.tolist() for i, _ in val] == [list(range(8)), list(range(8, 16)), list(range(16, 20))]
    assert not any(c.any() for _, c in val)
