"""Lazy training patches from any number of OME-Zarr images, none of them ever loaded whole.

:class:`PatchSampler` never loads an image. Building it reads only the coarse grid of each
target (a pyramid level, see :mod:`bigcare.training.positions`) to draw seeded,
foreground-aware patch positions in disjoint train/validation regions. Streaming batches runs
one task per batch (:func:`bigcare.training.reads.read_patches`) on the cluster, or on a local
thread pool, with ``read_ahead`` batches in flight::

    sources ──► coarse target grids ──► positions (train | val) ──► batch tasks ──► (x, y)
     (pairs or     (pyramid level,        seeded, foreground,         read the patch   normalized,
      channels)     never level 0)        disjoint zones)             regions only     augmented

Normalization follows CSBDeep's training data generation: every image gets percentile values
(of its full-resolution level, computed lazily: exact when small, from a seeded subsample of
chunks when large) at a small table of percentiles spanning ``pmin_range`` and ``pmax_range``;
each sample draws ``pmin`` and ``pmax`` uniformly from the ranges, and its input and its target
are each mapped by ``(v - P_pmin) / (P_pmax - P_pmin + eps)`` with its own image's values
(interpolated in the table). The statistics are computed on first use (a batch, the provenance,
the patch store), never while drawing positions.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
from collections.abc import Generator, Iterator, Sequence
from typing import cast

import numpy as np

from bigcare.errors import ConfigError
from bigcare.normalization import percentile_table
from bigcare.tasks.runner import run_tasks
from bigcare.tasks.slots import InSlot, ResultSlots
from bigcare.training.config import SamplingConfig, validated
from bigcare.training.positions import COARSE_CELLS, Geometry, choose_coarse, draw_positions, read_coarse
from bigcare.training.reads import ReadPlan, SourcePlan, normalize_batch, read_patches
from bigcare.training.sources import Source, resolve

__all__ = ["Source", "PatchSampler", "batch_order"]

#: Percentiles per range end the normalization table holds (linearly spaced, interpolated).
TABLE_POINTS = 5
#: Patches per task at least (several batches): a cluster's per-task cost (several ms of client
#: CPU) is paid rarely, and the more patches a task reads the more chunks they share (decoded
#: once per task). 128 patch pairs of 16x64x64 uint16 are 32 MiB per task before normalization.
TASK_PATCHES = 128
#: Tasks in flight beyond one per worker thread (or ``read_ahead`` batches): a worker that is
#: done finds the next task waiting, even when the consumer waits on a slower, earlier task.
SPARE_TASKS = 1
#: Same-host workers hand results over through shared memory (False: always through the cluster).
SHARED_MEMORY = True
#: Coarse grids kept in memory while drawing (all sources together); more are re-read.
CACHE_CELLS = 2**24


def _interp(x: np.ndarray, grid: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Linear interpolation of each row of ``values`` (given at ``grid``) at its own ``x``."""
    if len(grid) == 1:
        return values[:, 0].copy()
    j = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, len(grid) - 2)
    t = np.clip((x - grid[j]) / (grid[j + 1] - grid[j]), 0.0, 1.0)
    rows = np.arange(len(x))
    return values[rows, j] * (1 - t) + values[rows, j + 1] * t


def batch_order(n: int, *, batch_size: int, seed: int, epochs: int | None, n_codes: int,
                shuffle: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Indices and augmentation codes of each batch over ``n`` patches.

    ``shuffle`` (training): every epoch is a seeded permutation with fresh augmentation codes
    in ``0 .. n_codes - 1``; epochs run into each other so every batch is full, and the tail
    that does not fill a batch after the last epoch is dropped; endless when ``epochs`` is None.
    Otherwise (validation): the stored order, code 0, the last batch possibly smaller, one pass
    when ``epochs`` is None.
    """
    if not shuffle:
        for _ in range(1 if epochs is None else epochs):
            for a in range(0, n, batch_size):
                idx = np.arange(a, min(a + batch_size, n))
                yield idx, np.zeros(len(idx), np.uint8)
        return
    if n == 0:
        return
    pending_idx, pending_codes = np.zeros(0, np.int64), np.zeros(0, np.uint8)
    epoch = 0
    while epochs is None or epoch < epochs:
        pending_idx = np.concatenate([pending_idx, np.random.default_rng([seed, 6, epoch]).permutation(n)])
        codes = np.random.default_rng([seed, 7, epoch]).integers(0, n_codes, size=n).astype(np.uint8)
        pending_codes = np.concatenate([pending_codes, codes])
        epoch += 1
        while len(pending_idx) >= batch_size:
            yield pending_idx[:batch_size], pending_codes[:batch_size]
            pending_idx, pending_codes = pending_idx[batch_size:], pending_codes[batch_size:]


class PatchSampler:
    """Seeded, foreground-aware training patches streamed lazily from OME-Zarr images.

    Every parameter but ``client`` is validated by :class:`bigcare.training.config.SamplingConfig`,
    the schema the YAML config of ``bigcare train`` uses too: same defaults, same limits, and a
    bad value raises one :class:`ConfigError` worded as YAML's, without its section
    (``sources.0.input_channel: ...`` here, ``data.sources.0.input_channel: ...`` there).

    Parameters
    ----------
    sources : sequence of Source, str, tuple or mapping
        Training sources of any sizes: a :class:`Source`; a path (one image whose channels 0
        and 1 are input and target); an ``(input, target)`` pair of paths; or a mapping of
        :class:`Source` fields (as in a YAML config).
    patch_shape : tuple of int
        ``(Y, X)`` or ``(Z, Y, X)``, matched to each image's last spatial axes. 2D patches from
        a 3D image are single Z slices; time points are sampled like positions.
    n_patches : int
        Training plus validation patches; at least one must be left for training.
    validation_fraction : float
        Share of the patches (at least one when > 0) drawn, as validation, from regions that no
        training patch touches (see :mod:`bigcare.training.positions`); in ``[0, 1)``, 0 drawing
        no validation patches.
    foreground_threshold, foreground_percentile : float
        CSBDeep's ``patch_filter`` rule on the coarse target: keep a position when the maximum
        over its patch exceeds ``foreground_threshold * percentile(target, foreground_percentile)``.
        ``foreground_threshold`` in ``[0, 1]`` (0 samples uniformly), ``foreground_percentile``
        in ``(0, 100]``.
    coarse_level : int, optional
        Pyramid level of the targets used to find foreground; by default the coarsest level with
        cells of at most half a patch (reduced further, blockwise, when still large).
    pmin_range, pmax_range : (float, float)
        Ranges of the per-sample normalization percentiles (CSBDeep: 1-3 and 99.5-99.9), each
        ``0 <= low <= high <= 100``, ``pmin_range`` below ``pmax_range``.
    augment : bool
        Random flips of Y and X per sample and epoch; also 90-degree rotations in the (Y, X)
        plane, but only when every source has equal Y and X voxel sizes and the patch is square
        in (Y, X) (otherwise a rotation would change the physical sampling). Never along Z.
    seed : int
        Seed (>= 0) of the positions, the per-sample percentiles, the epoch orders and augmentations.
    client : distributed.Client, optional
        Cluster that runs the reads; default a local thread pool.
    batch_size : int
        Patches per batch (>= 1).
    read_ahead : int
        Batches read ahead (>= 0) while the consumer works on the current one.

    Attributes
    ----------
    settings : SamplingConfig
        The validated parameters (sources as :class:`Source`).
    train_positions, val_positions : numpy.ndarray of int64, shape (n, 1 + D)
        Column 0 the source index, then the patch's start voxel along the source's
        non-channel axes (right-aligned; -1 in leading columns of sources with fewer axes).
        Read-only; reproducible from the seed.

    Raises
    ------
    ConfigError
        If a parameter is invalid: patch larger than an image, channel out of range, ...
    InputError
        If an image is missing or unreadable, a pair is not aligned, or no foreground is found.
    """

    def __init__(self, sources: Sequence[Source | str | tuple], patch_shape: tuple[int, ...], *,
                 n_patches: int = 2000, validation_fraction: float = 0.1,
                 foreground_threshold: float = 0.4, foreground_percentile: float = 99.9,
                 coarse_level: int | None = None, pmin_range=(1.0, 3.0), pmax_range=(99.5, 99.9),
                 augment: bool = True, seed: int = 0, client=None, batch_size: int = 16, read_ahead: int = 4):
        settings = validated(SamplingConfig, {
            "sources": sources, "patch_shape": patch_shape, "n_patches": n_patches,
            "validation_fraction": validation_fraction, "foreground_threshold": foreground_threshold,
            "foreground_percentile": foreground_percentile, "coarse_level": coarse_level,
            "pmin_range": pmin_range, "pmax_range": pmax_range, "augment": augment, "seed": seed,
            "batch_size": batch_size, "read_ahead": read_ahead,
        })
        patch_shape = tuple(settings.patch_shape)
        n_val = max(1, round(settings.n_patches * settings.validation_fraction)) if settings.validation_fraction > 0 else 0
        self.settings: SamplingConfig = settings
        self.patch_shape = patch_shape
        self.n_patches = settings.n_patches
        self.validation_fraction = settings.validation_fraction
        self.foreground_threshold = settings.foreground_threshold
        self.foreground_percentile = settings.foreground_percentile
        self.pmin_range, self.pmax_range = settings.pmin_range, settings.pmax_range
        self.seed = settings.seed
        self.client = client
        self.batch_size = settings.batch_size
        self.read_ahead = settings.read_ahead
        coarse_level = settings.coarse_level
        augment = settings.augment
        self._sources = [resolve(s, i, patch_shape) for i, s in enumerate(settings.sources)]
        self.rotations = augment and patch_shape[-1] == patch_shape[-2] and all(r.square_voxels for r in self._sources)
        self.augment = augment

        grids = [choose_coarse(r.target, r.axes, r.footprint, r.spatial, level=coarse_level, budget=COARSE_CELLS)
                 for r in self._sources]
        geoms = [Geometry(tuple(r.target.shape[i] for i in r.axes), r.footprint, g, r.zone_unit)
                 for r, g in zip(self._sources, grids)]
        cache: dict[int, np.ndarray] = {}

        def coarse(i: int) -> np.ndarray:
            if i in cache:
                return cache[i]
            r = self._sources[i]
            arr = read_coarse(r.target.ref(r.target_channel, grids[i].level), grids[i],
                              geoms[i].shape, client=client)
            if sum(a.size for a in cache.values()) + arr.size <= CACHE_CELLS:
                cache[i] = arr
            return arr

        self._draw = draw_positions(
            geoms, coarse, n_train=self.n_patches - n_val, n_val=n_val, threshold=self.foreground_threshold,
            percentile=self.foreground_percentile, seed=self.seed, names=[r.input.url for r in self._sources],
        )
        cache.clear()
        for a in (self._draw.train, self._draw.val):
            a.flags.writeable = False
        rng = np.random.default_rng([self.seed, 5])
        (lo_min, lo_max), (hi_min, hi_max) = self.pmin_range, self.pmax_range
        self._percentiles = {split: np.stack([rng.uniform(lo_min, lo_max, size=len(pos)),
                                              rng.uniform(hi_min, hi_max, size=len(pos))], axis=1)
                             for split, pos in (("train", self._draw.train), ("val", self._draw.val))}
        self._plan = ReadPlan(
            tuple(SourcePlan(r.input.ref(r.input_channel), r.target.ref(r.target_channel), r.footprint)
                  for r in self._sources),
            patch_shape,
            (np.result_type(*[r.input.dtype for r in self._sources]), np.result_type(*[r.target.dtype for r in self._sources])),
        )
        self._tables: list[dict] | None = None
        self._table_arrays: list[np.ndarray] | None = None
        self._plan_future = None

    # --- positions and statistics ----------------------------------------------------------------

    @property
    def train_positions(self) -> np.ndarray:
        """Training positions (see the class docstring)."""
        return self._draw.train

    @property
    def val_positions(self) -> np.ndarray:
        """Validation positions, from regions disjoint from every training patch."""
        return self._draw.val

    @property
    def axes(self) -> str:
        """Axes of a patch, CSBDeep style: ``"YX"`` or ``"ZYX"``."""
        return "ZYX"[3 - len(self.patch_shape):]

    def percentile_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """The percentiles of the per-image tables: (low ones, high ones)."""
        (lo_min, lo_max), (hi_min, hi_max) = self.pmin_range, self.pmax_range
        return (np.unique(np.round(np.linspace(lo_min, lo_max, TABLE_POINTS), 6)),
                np.unique(np.round(np.linspace(hi_min, hi_max, TABLE_POINTS), 6)))

    @property
    def tables(self) -> list[dict]:
        """Per source, the percentile tables of its input and target (computed on first use).

        Each is ``{"input": {"low": [...], "high": [...], "method": ...}, "target": {...}}``,
        values at :meth:`percentile_grid`.
        """
        if self._tables is None:
            lows, highs = self.percentile_grid()
            grid = np.concatenate([lows, highs])
            done: dict[tuple, dict] = {}
            tables = []
            for r in self._sources:
                entry = {}
                for role, vol, ch in (("input", r.input, r.input_channel), ("target", r.target, r.target_channel)):
                    ref = vol.ref(ch)
                    if ref.key + (ch,) not in done:
                        # the image's own statistics, not the sampler's seed: restoration samples them alike
                        values, method = percentile_table(ref, grid, client=self.client)
                        done[ref.key + (ch,)] = {"low": values[:len(lows)].tolist(), "high": values[len(lows):].tolist(),
                                                 "method": method}
                    entry[role] = done[ref.key + (ch,)]
                tables.append(entry)
            self._tables = tables
        return self._tables

    @property
    def read_plan(self) -> ReadPlan:
        """What every read task needs besides its positions (the sources' images, patch shape, dtypes)."""
        return self._plan

    def scaling(self, split: str, index: np.ndarray) -> np.ndarray:
        """``(lo_x, hi_x, lo_y, hi_y)`` of the positions ``index`` of a split, interpolated in the tables."""
        grids = self.percentile_grid()
        if self._table_arrays is None:  # (sources, grid points) per role and end
            self._table_arrays = [np.array([t[role][end] for t in self.tables], np.float64)
                                  for role in ("input", "target") for end in ("low", "high")]
        sources = self.positions(split)[index, 0]
        p = self._percentiles[split][index]
        out = np.empty((len(index), 4), np.float64)
        for k, table in enumerate(self._table_arrays):
            out[:, k] = _interp(p[:, k % 2], grids[k % 2], table[sources])
        return out

    def positions(self, split: str) -> np.ndarray:
        """The positions of ``split`` (``"train"`` or ``"val"``), read-only."""
        if split in ("train",):
            return self._draw.train
        if split in ("val", "validation"):
            return self._draw.val
        raise ConfigError(f"split: expected 'train' or 'val', got {split!r}")

    # --- streaming -------------------------------------------------------------------------------

    def batches(self, split: str = "train", *, epochs: int | None = None,
                order_seed: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream normalized (input, target) batches.

        Each task reads several batches (at least ``TASK_PATCHES`` patches: the per-task cost
        of a cluster is paid rarely, and chunks shared by patches of a task are decoded once).
        The tasks run on the cluster, or on a local thread pool without a client, and return
        the patches in the images' own data type (half the bytes of float32 for uint16); the
        normalization runs here, batch by batch. Workers on this host hand the patches over
        through shared memory (:class:`bigcare.tasks.slots.ResultSlots`), others
        through the cluster. At least one task per worker thread is in flight besides
        ``read_ahead`` batches. Either way the batches are identical and come in order.

        Parameters
        ----------
        split : {"train", "val"}
            Training batches are reshuffled and re-augmented every epoch (an epoch is one pass
            over ``train_positions``; passes run into each other, so every batch is full).
            Validation batches come in a fixed order, without augmentation, the last one
            possibly smaller.
        epochs : int, optional
            Passes over the positions; default endless for ``"train"``, one for ``"val"``.
        order_seed : int, optional
            Seed of the batch order and the augmentation codes; default ``seed``. Ensemble
            members differ in it alone: the positions and the train/validation split come from
            ``seed`` and stay the same.

        Yields
        ------
        (x, y) : numpy.ndarray
            float32, each ``(batch_size, 1, *patch_shape)``.
        """
        positions = self.positions(split)
        if epochs is not None and not (isinstance(epochs, (int, np.integer)) and epochs >= 0):
            raise ConfigError(f"epochs: expected None or an integer >= 0, got {epochs!r}")
        _ = self.tables  # statistics before the first task
        n_codes = 8 if self.rotations else 4 if self.augment else 1
        order = batch_order(len(positions), batch_size=self.batch_size,
                            seed=self.seed if order_seed is None else order_seed, epochs=epochs,
                            n_codes=n_codes, shuffle=split == "train")
        per_task = max(1, -(-TASK_PATCHES // self.batch_size))
        pending: collections.deque = collections.deque()  # (scaling, batch sizes) of the tasks in flight
        local = self.client is None
        items: Iterator[tuple]
        slots: ResultSlots | None = None

        def groups():
            while True:
                group = list(itertools.islice(order, per_task))
                if not group:
                    return
                idx = np.concatenate([g[0] for g in group])
                scaling = self.scaling(split, idx)
                pending.append((scaling, [len(g[0]) for g in group]))
                yield idx, scaling, np.concatenate([g[1] for g in group])

        if local:
            threads = os.cpu_count() or 1
            in_flight = max(-(-self.read_ahead // per_task), threads) + SPARE_TASKS
            items = ((self._plan, positions[idx, 0], positions[idx, 1:], None, codes) for idx, _, codes in groups())
            results = cast(Generator, run_tasks(read_patches, items, in_flight=in_flight, ordered=True))
        else:
            if self._plan_future is None:
                self._plan_future = self.client.scatter(self._plan, broadcast=True, hash=False)
            threads = sum(self.client.nthreads().values()) or 1  # keep every worker thread busy
            in_flight = max(-(-self.read_ahead // per_task), threads) + SPARE_TASKS
            nbytes = per_task * self.batch_size * math.prod(self.patch_shape) * sum(d.itemsize for d in self._plan.dtypes)
            slots = ResultSlots.create(self.client, in_flight, nbytes) if SHARED_MEMORY else None
            items = ((self._plan_future, positions[idx, 0], positions[idx, 1:], None, codes,
                      None if slots is None else slots.slot(k))
                     for k, (idx, _, codes) in enumerate(groups()))
            results = cast(Generator, run_tasks(read_patches, items, client=self.client, in_flight=in_flight, ordered=True))
        try:
            for result in results:
                x, y = slots.arrays(result) if slots is not None and isinstance(result, InSlot) else result
                del result
                scaling, sizes = pending.popleft()
                a = 0
                for n in sizes:
                    yield normalize_batch(x[a:a + n], scaling[a:a + n, :2]), normalize_batch(y[a:a + n], scaling[a:a + n, 2:])
                    a += n
                del x, y  # a slot is handed out again from here on
        finally:
            results.close()
            if slots is not None:
                slots.close()

    # --- records ---------------------------------------------------------------------------------

    @property
    def provenance(self) -> dict:
        """What the model config records about its training data (JSON-serialisable).

        Sources (paths, channels, shapes, patch counts, foreground fraction, coarse grid), patch
        shape and axes, counts, seed, the foreground rule, augmentation, and the normalization
        (percentile ranges and each image's percentile table). Computes the statistics when
        not done yet. Storage options are never included.
        """
        lows, highs = self.percentile_grid()
        return {
            "sampler": "bigcare.training.PatchSampler",
            "sources": [{
                "input": r.input.url, "target": None if r.source.target is None else r.target.url,
                "input_channel": r.input_channel, "target_channel": r.target_channel,
                "axes": r.names, "shape": [int(r.input.shape[i]) for i in r.axes], **extra,
            } for r, extra in zip(self._sources, self._draw.per_source)],
            "patch_shape": list(self.patch_shape), "axes": self.axes,
            "n_patches": self.n_patches, "n_train": len(self._draw.train), "n_val": len(self._draw.val),
            "validation_fraction": self.validation_fraction, "seed": self.seed,
            "foreground": {"threshold": self.foreground_threshold, "percentile": self.foreground_percentile},
            "split": {"zones_with_foreground": self._draw.n_zones, "validation_zones": self._draw.n_val_zones},
            "augment": {"flips": self.augment, "rotations": self.rotations},
            "normalization": {"pmin_range": list(self.pmin_range), "pmax_range": list(self.pmax_range),
                              "percentiles_low": lows.tolist(), "percentiles_high": highs.tolist(),
                              "sources": self.tables},
            "batch_size": self.batch_size,
        }

    def write_patch_store(self, url, *, split: str = "train", storage_options: dict | None = None,
                          overwrite: bool = False):
        """Read the patches of one split once and write them, raw (normalized when streamed), to a zarr patch store.

        See :class:`bigcare.training.patchstore.PatchStore`; training can then stream from it
        (``store.batches(...)``, same batches as :meth:`batches` apart from the augmentation
        draw). One task per group of patches writes its own rows; rows are stored one patch per
        chunk.
        """
        from bigcare.training.patchstore import write_store

        return write_store(self, url, split=split, storage_options=storage_options, overwrite=overwrite)
