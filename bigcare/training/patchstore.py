"""Sampled patches written once to zarr, then streamed from there (optional).

Reading a patch from a huge image decodes every chunk it touches (about 8 for a patch the size
of a chunk); reading it from a patch store decodes exactly one. When the same patches are seen
for many epochs, writing them once pays off. Layout (zarr v3 group)::

    store.zarr/
      zarr.json            attrs["bigcare_patch_store"]: version, patch shape, batch size, seed,
                           augmentation, the sampler's provenance, and per split n + complete
      train/x, train/y     (n, 1, *patch_shape) in the images' data type, one patch per chunk,
                           not augmented, not normalized (half the bytes of float32 for uint16)
      train/scaling        float64 (n, 4): lo_x, hi_x, lo_y, hi_y of each patch's normalization
      train/positions      int64 (n, 1 + D): the sampler's positions, same row order
      val/...

The metadata and empty arrays are written first, then one task per group of rows reads its
patches and writes its own rows (no two tasks share a chunk), and the split is marked complete
last; a split that is not complete is refused when read. Streaming reads each patch's chunk
directly (:class:`bigcare.store.chunks.RegionReader`), augments and normalizes it exactly
as :meth:`PatchSampler.batches` does, so both give the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from bigcare.errors import ConfigError, InputError, OutputError
from bigcare.store.chunks import ImageRef, region_reader
from bigcare.store.urls import normalize_url, store_kwargs
from bigcare.store.volume import Level
from bigcare.tasks.runner import run_tasks
from bigcare.training.reads import normalize_batch, read_patches, unaugment

__all__ = ["PatchStore", "write_store"]

_KEY = "bigcare_patch_store"
_ROWS_PER_TASK = 64


def _split_name(split: str) -> str:
    if split == "train":
        return "train"
    if split in ("val", "validation"):
        return "val"
    raise ConfigError(f"split: expected 'train' or 'val', got {split!r}")


def _write_rows(plan, url: str, storage_options, split: str, first: int, sources, starts) -> int:
    """Task: read one group of patches (raw, not augmented) and write them as rows ``first ...``."""
    result = read_patches(plan, sources, starts, None, np.zeros(len(sources), np.uint8))
    assert isinstance(result, tuple)  # no slot given: the arrays come back
    x, y = result
    for name, data in (("x", x), ("y", y)):
        arr = zarr.open_array(path=f"{split}/{name}", mode="r+", zarr_format=3, **store_kwargs(url, storage_options))
        arr[first:first + len(data)] = data
    return len(sources)


def write_store(sampler, url, *, split: str = "train", storage_options: dict | None = None,
                overwrite: bool = False) -> PatchStore:
    """Write one split of ``sampler``'s patches to a patch store (see the module docstring).

    Parameters
    ----------
    sampler : PatchSampler
        The sampler whose positions and normalization are written.
    url : str or os.PathLike
        Local path or fsspec URL of the store; a store may hold both splits.
    split : {"train", "val"}
        Which positions.
    storage_options : dict, optional
        fsspec options for ``url``.
    overwrite : bool
        Replace this split if the store already holds it.

    Returns
    -------
    PatchStore

    Raises
    ------
    OutputError
        If ``url`` holds something that is not a patch store, or already holds ``split`` and
        ``overwrite`` is False.
    """
    positions = sampler.positions(split)
    split = _split_name(split)
    url = normalize_url(url)
    kwargs = store_kwargs(url, storage_options)
    try:
        group = zarr.open_group(mode="r+", zarr_format=3, **kwargs)
    except (FileNotFoundError, zarr.errors.BaseZarrError):
        group = None
    attrs: dict[str, Any] = dict(group.attrs) if group is not None else {}
    if group is not None and _KEY not in attrs:
        raise OutputError(f"{url}: exists and is not a bigcare patch store; refusing to write into it")
    if group is not None and split in attrs[_KEY].get("splits", {}) and not overwrite:
        raise OutputError(f"{url}: already holds the {split!r} split; pass overwrite=True to replace it")
    if group is None:
        try:
            group = zarr.open_group(mode="w-", zarr_format=3, **kwargs)
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
            raise OutputError(f"{url}: exists and is not a bigcare patch store; refusing to write into it") from None
    n, shape = len(positions), sampler.patch_shape
    meta: dict[str, Any] = dict(attrs.get(_KEY, {}))
    splits = {k: v for k, v in meta.get("splits", {}).items() if k != split}
    meta.update({"version": 1, "patch_shape": list(shape), "batch_size": sampler.batch_size, "seed": sampler.seed,
                 "augment": sampler.augment, "rotations": sampler.rotations, "provenance": sampler.provenance,
                 "splits": {**splits, split: {"n": n, "complete": False}}})
    group.attrs[_KEY] = meta
    for name, dtype in zip(("x", "y"), sampler.read_plan.dtypes):
        group.create_array(f"{split}/{name}", shape=(n, 1) + shape, chunks=(1, 1) + shape, dtype=dtype,
                           compressors=BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), overwrite=True)
    for name, data in (("positions", positions), ("scaling", sampler.scaling(split, np.arange(n)))):
        arr = group.create_array(f"{split}/{name}", shape=data.shape, chunks=(max(1, n),) + data.shape[1:],
                                 dtype=data.dtype, overwrite=True)
        if n:
            arr[...] = data
    plan = sampler.read_plan if sampler.client is None else sampler.client.scatter(sampler.read_plan, broadcast=True, hash=False)
    items = [(plan, url, storage_options, split, a, positions[a:a + _ROWS_PER_TASK, 0], positions[a:a + _ROWS_PER_TASK, 1:])
             for a in range(0, n, _ROWS_PER_TASK)]
    written = sum(run_tasks(_write_rows, items, client=sampler.client, in_flight=8, ordered=False))
    if written != n:
        raise OutputError(f"{url}: wrote {written} of {n} {split} patches")
    meta["splits"][split]["complete"] = True
    group.attrs[_KEY] = meta
    return PatchStore(url, storage_options=storage_options)


def _read_rows(refs: tuple[ImageRef, ImageRef], index: np.ndarray, codes: np.ndarray, scaling: np.ndarray):
    """Task: rows ``index`` of one split, augmented by ``codes`` and normalized."""
    out = []
    for ref, s in zip(refs, (scaling[:, :2], scaling[:, 2:])):
        reader = region_reader(ref)
        shape = ref.level.shape[1:]
        data = np.empty((len(index),) + shape, reader.dtype)
        full = tuple(slice(0, n) for n in shape)
        sels = [(slice(int(i), int(i) + 1),) + full for i in index]
        views = [unaugment(data[k, 0], int(code)).reshape((1,) + shape) for k, code in enumerate(codes)]
        reader.read_many(sels, views)  # each row straight into its augmented place
        out.append(normalize_batch(data, s))
    return tuple(out)


class PatchStore:
    """Stream batches from patches written by :meth:`PatchSampler.write_patch_store`.

    Parameters
    ----------
    url : str or os.PathLike
        The store.
    storage_options : dict, optional
        fsspec options.
    batch_size : int, optional
        Default: the sampler's.
    read_ahead : int
        Batches read ahead on a local thread pool.

    Raises
    ------
    InputError
        If ``url`` is not a patch store.
    """

    def __init__(self, url, *, storage_options: dict | None = None, batch_size: int | None = None, read_ahead: int = 4):
        self.url = normalize_url(url)
        self.storage_options = storage_options
        self._load()
        self.patch_shape = tuple(self._meta["patch_shape"])
        self.batch_size = int(batch_size or self._meta["batch_size"])
        self.read_ahead = int(read_ahead)

    def _load(self) -> zarr.Group:
        try:
            group = zarr.open_group(mode="r", zarr_format=3, **store_kwargs(self.url, self.storage_options))
        except (FileNotFoundError, zarr.errors.BaseZarrError):
            raise InputError(f"{self.url}: not a zarr group; expected a bigcare patch store") from None
        attrs: dict[str, Any] = dict(group.attrs)
        if _KEY not in attrs:
            raise InputError(f"{self.url}: zarr group without {_KEY!r} attributes; expected a bigcare patch store")
        self._meta: dict[str, Any] = dict(attrs[_KEY])
        return group

    @property
    def splits(self) -> dict[str, int]:
        """Complete splits and their numbers of patches."""
        return {k: v["n"] for k, v in self._meta["splits"].items() if v["complete"]}

    @property
    def provenance(self) -> dict:
        """The sampler's provenance at writing time."""
        return self._meta["provenance"]

    def batches(self, split: str = "train", *, epochs: int | None = None,
                order_seed: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (x, y) batches as :meth:`PatchSampler.batches` does (same order rules, values and
        ``order_seed``)."""
        from bigcare.training.sampling import batch_order

        name = _split_name(split)
        group = self._load()  # the store may have gained a split since it was opened
        if name not in self.splits:
            raise InputError(f"{self.url}: holds no complete {name!r} split (has {sorted(self.splits)})")
        refs = []
        for role in ("x", "y"):
            arr = group[f"{name}/{role}"]
            assert isinstance(arr, zarr.Array)
            level = Level(f"{name}/{role}", tuple(arr.shape), tuple(arr.chunks), np.dtype(arr.dtype),
                          (1.0,) * arr.ndim, (0.0,) * arr.ndim)
            refs.append(ImageRef(self.url, self.storage_options, 3, level, None, None))
        scaling = np.asarray(zarr.open_array(path=f"{name}/scaling", mode="r", zarr_format=3,
                                             **store_kwargs(self.url, self.storage_options))[...])
        n_codes = 8 if self._meta["rotations"] else 4 if self._meta["augment"] else 1
        items = ((tuple(refs), idx, codes, scaling[idx])
                 for idx, codes in batch_order(self.splits[name], batch_size=self.batch_size,
                                               seed=self._meta["seed"] if order_seed is None else order_seed,
                                               epochs=epochs, n_codes=n_codes, shuffle=name == "train"))
        yield from run_tasks(_read_rows, items, in_flight=self.read_ahead + 1, ordered=True)
