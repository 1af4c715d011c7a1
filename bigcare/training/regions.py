"""Small region reads straight from a zarr store, and the read task of the patch sampler.

A training patch is a small region (a few hundred kB) of a huge image. zarr decodes whole
chunks, and zarr-python's general indexing path costs about 0.3 ms of overhead per chunk; for a
16x64x64 patch that touches up to 8 chunks this overhead is larger than the decoding itself. So
:class:`RegionReader` reads the chunks a region touches itself, when the array allows it:

- zarr v3 arrays whose codecs are ``bytes`` followed by at most one of blosc / zstd / gzip,
  zarr v2 arrays with no filters, C order and any numcodecs compressor:
  fetch each chunk's bytes (a local file read, or ``fs.cat_file`` for fsspec URLs), decode
  with numcodecs, copy the intersection into the output;
- anything else (sharded arrays, transposes, checksums, filters): ``zarr.Array[selection]``.

Both paths read exactly the chunks the region touches. Geometry of one read::

    chunks   +--------+--------+--------+
             |     +--+--------+--+     |    the region (a patch) touches 2 x 3 chunks:
             |     |  region      |     |    each is fetched and decoded once per task,
             +-----+--+--------+--+-----+    the overlap copied into the output
             |     +--+--------+--+     |
             +--------+--------+--------+

:func:`read_patches` is the task the sampler submits: it reads a batch of (input, target)
patches, normalises each with its own percentile values and applies its augmentation.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from bigcare.volume import Level, _freeze, cached_array, is_url

__all__ = ["ImageRef", "RegionReader", "ReadPlan", "SourcePlan", "read_patches", "normalise", "augment", "run_tasks"]

EPS = 1e-20  # CSBDeep's normalize_mi_ma epsilon


@dataclass(frozen=True)
class ImageRef:
    """One channel of one pyramid level of an image: small, picklable, hashable.

    Attributes
    ----------
    url : str
        Image group (local absolute path or fsspec URL).
    storage_options : dict or None
        fsspec options (not part of the hash).
    zarr_format : int
        2 or 3.
    level : Level
        The pyramid level read.
    channel_axis : int or None
        Position of the channel axis in the array, None when the image has none.
    channel : int or None
        Channel read (None when there is no channel axis).
    """

    url: str
    storage_options: dict | None = field(hash=False, compare=False)
    zarr_format: int
    level: Level
    channel_axis: int | None
    channel: int | None

    def selection(self, start: Iterable[int], size: Iterable[int]) -> tuple[slice, ...]:
        """Slices over all array axes for a box given over the non-channel axes."""
        sl = [slice(int(s), int(s) + int(n)) for s, n in zip(start, size)]
        if self.channel_axis is not None:
            sl.insert(self.channel_axis, slice(self.channel, self.channel + 1))
        return tuple(sl)

    @property
    def key(self) -> tuple:
        return (self.url, _freeze(self.storage_options), self.zarr_format, self.level.path,
                self.level.shape, self.level.chunks, self.level.dtype.str)


# --- chunk-level reads ---------------------------------------------------------------------------


def _numcodec(codec):
    """The numcodecs codec that decodes what a zarr v3 bytes-to-bytes codec wrote, or None."""
    import numcodecs
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

    if isinstance(codec, BloscCodec):
        return numcodecs.Blosc()  # the blosc header describes the rest
    if isinstance(codec, ZstdCodec):
        return numcodecs.Zstd()
    if isinstance(codec, GzipCodec):
        return numcodecs.GZip()
    return None


def _fast_layout(arr) -> tuple[np.dtype, object] | None:
    """(stored dtype, decoder or None) when the chunks can be decoded directly; else None."""
    meta = arr.metadata
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in "biuf" or getattr(arr, "shards", None):
        return None
    if meta.zarr_format == 2:
        if meta.filters or meta.order != "C":
            return None
        stored = np.dtype(meta.to_dict()["dtype"])
        return stored, meta.compressor
    from zarr.codecs import BytesCodec

    codecs = list(meta.codecs)
    if not codecs or not isinstance(codecs[0], BytesCodec) or len(codecs) > 2:
        return None
    endian = codecs[0].endian
    stored = dtype.newbyteorder("<" if endian is None or endian.value == "little" else ">")
    if len(codecs) == 1:
        return stored, None
    decoder = _numcodec(codecs[1])
    return (stored, decoder) if decoder is not None else None


class RegionReader:
    """Reads regions of one zarr array, decoding only the chunks a region touches.

    Parameters
    ----------
    url, storage_options, zarr_format, level
        Where the array lives (see :class:`ImageRef`).
    """

    def __init__(self, url: str, storage_options: dict | None, zarr_format: int, level: Level):
        self.array = cached_array(url, level.path, storage_options, zarr_format, "r", level)
        self.dtype = np.dtype(self.array.dtype)
        layout = _fast_layout(self.array)
        self.fast = layout is not None
        if self.fast:
            self._stored, self._decoder = layout
            self._chunks = tuple(int(c) for c in self.array.chunks)
            self._fill = self.array.fill_value
            self._encode_key = self.array.metadata.encode_chunk_key
            if is_url(url):
                import fsspec

                fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
                prefix = f"{root.rstrip('/')}/{level.path}/"
                self._fetch = lambda key: _fs_bytes(fs, prefix + key)
            else:
                prefix = os.path.join(url, level.path)
                self._fetch = lambda key: _file_bytes(os.path.join(prefix, key))

    def _chunk(self, coords: tuple[int, ...]) -> np.ndarray | None:
        """Decoded chunk at ``coords``, or None when it was never written (fill value)."""
        buf = self._fetch(self._encode_key(coords))
        if buf is None:
            return None
        if self._decoder is not None:
            buf = self._decoder.decode(buf)
        chunk = np.frombuffer(buf, dtype=self._stored)
        if chunk.size != int(np.prod(self._chunks)):
            raise OSError(f"chunk {coords} decodes to {chunk.size} values; expected {self._chunks}")
        return chunk.reshape(self._chunks)

    def read(self, selection: tuple[slice, ...], cache: dict | None = None) -> np.ndarray:
        """Read ``selection`` (one slice per axis, inside the array) as a new array.

        Parameters
        ----------
        selection : tuple of slice
            Contiguous box, ``start < stop`` on every axis.
        cache : dict, optional
            Decoded chunks shared between the reads of one task (keys: chunk coordinates).

        Returns
        -------
        numpy.ndarray
            The region in the array's native byte order.
        """
        if not self.fast:
            return np.asarray(self.array[selection])
        starts = [s.start for s in selection]
        stops = [s.stop for s in selection]
        out = np.empty([b - a for a, b in zip(starts, stops)], dtype=self.dtype)
        ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(starts, stops, self._chunks)]
        for coords in itertools.product(*ranges):
            if cache is not None and coords in cache:
                chunk = cache[coords]
            else:
                chunk = self._chunk(coords)
                if cache is not None:
                    cache[coords] = chunk
            dst, src = [], []
            for k, a, b, c in zip(coords, starts, stops, self._chunks):
                lo, hi = max(a, k * c), min(b, (k + 1) * c)
                dst.append(slice(lo - a, hi - a))
                src.append(slice(lo - k * c, hi - k * c))
            out[tuple(dst)] = self._fill if chunk is None else chunk[tuple(src)]
        return out


def _file_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _fs_bytes(fs, path: str) -> bytes | None:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


_READERS: dict[tuple, RegionReader] = {}
_READERS_LOCK = threading.Lock()


def region_reader(ref: ImageRef) -> RegionReader:
    """The per-process :class:`RegionReader` of ``ref``'s array (opened once, then reused)."""
    key = ref.key
    with _READERS_LOCK:
        reader = _READERS.get(key)
    if reader is None:
        reader = RegionReader(ref.url, ref.storage_options, ref.zarr_format, ref.level)
        with _READERS_LOCK:
            if len(_READERS) >= 64:
                _READERS.clear()
            _READERS[key] = reader
    return reader


# --- the patch read task -------------------------------------------------------------------------


@dataclass(frozen=True)
class SourcePlan:
    """How to cut a patch out of one source: its two images and the patch box."""

    input: ImageRef
    target: ImageRef
    footprint: tuple[int, ...]  # extent along each non-channel axis (1 on axes the patch lacks)


@dataclass(frozen=True)
class ReadPlan:
    """Everything a read task needs besides its records; sent to each worker once."""

    sources: tuple[SourcePlan, ...]
    patch_shape: tuple[int, ...]
    dtypes: tuple[np.dtype, np.dtype]  # of the input and target patches before normalisation


def augment(patch: np.ndarray, code: int) -> np.ndarray:
    """Apply lateral augmentation ``code`` (a view, no copy).

    Bit 0 flips Y (axis -2), bit 1 flips X (axis -1), bit 2 swaps Y and X (with the flips,
    the 8 symmetries of a square: the 90-degree rotations and the mirrors).
    """
    if code & 4:
        patch = np.swapaxes(patch, -1, -2)
    if code & 1:
        patch = patch[..., ::-1, :]
    if code & 2:
        patch = patch[..., ::-1]
    return patch


def read_patches(plan: ReadPlan, sources: np.ndarray, starts: np.ndarray, scaling: np.ndarray | None,
                 codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Read, augment and (optionally) normalise a batch of (input, target) patches: one dask task.

    Parameters
    ----------
    plan : ReadPlan
        Sources and patch shape.
    sources : numpy.ndarray of int, shape (n,)
        Source index of each patch.
    starts : numpy.ndarray of int, shape (n, D)
        Start voxel along the non-channel axes, right-aligned (a source with d < D axes uses
        the last d columns).
    scaling : numpy.ndarray of float, shape (n, 4), or None
        ``lo_x, hi_x, lo_y, hi_y`` per patch (see :func:`normalise`). None returns the patches
        in the images' own data type (``plan.dtypes``), e.g. to halve what a cluster sends.
    codes : numpy.ndarray of int, shape (n,)
        Augmentation code per patch (see :func:`augment`).

    Returns
    -------
    (x, y) : numpy.ndarray
        Each (n, 1, *patch_shape): float32 when normalised, else ``plan.dtypes``.
    """
    n = len(sources)
    x = np.empty((n, 1) + plan.patch_shape, plan.dtypes[0])
    y = np.empty((n, 1) + plan.patch_shape, plan.dtypes[1])
    cache: dict = {}
    for i in range(n):
        src = plan.sources[int(sources[i])]
        start = starts[i, starts.shape[1] - len(src.footprint):]
        for ref, out in ((src.input, x), (src.target, y)):
            raw = region_reader(ref).read(ref.selection(start, src.footprint), cache.setdefault(ref.key, {}))
            out[i, 0] = augment(raw.reshape(plan.patch_shape), int(codes[i]))
    if scaling is None:
        return x, y
    return normalise(x, scaling[:, :2]), normalise(y, scaling[:, 2:])


def normalise(batch: np.ndarray, scaling: np.ndarray) -> np.ndarray:
    """``(v - lo) / (hi - lo + eps)`` per sample as float32 (CSBDeep's ``normalize_mi_ma``).

    Parameters
    ----------
    batch : numpy.ndarray
        (n, ...) patches of any real type.
    scaling : numpy.ndarray, shape (n, 2)
        ``lo, hi`` per sample.
    """
    shape = (len(batch),) + (1,) * (batch.ndim - 1)
    lo = scaling[:, 0].astype(np.float32).reshape(shape)
    scale = (1.0 / (scaling[:, 1] - scaling[:, 0] + EPS)).astype(np.float32).reshape(shape)
    out = np.subtract(batch, lo, dtype=np.float32)
    out *= scale
    return out


# --- running tasks -------------------------------------------------------------------------------


def run_tasks(fn: Callable, items: Iterable, *, client=None, window: int = 8, ordered: bool = True,
              pool: concurrent.futures.Executor | None = None) -> Iterator:
    """Run ``fn(*item)`` for each item with at most ``window`` tasks in flight; yield results.

    With ``client`` the tasks are dask futures (``client.submit(..., pure=False)``); else they
    run on ``pool`` (a thread pool made for the call when not given). ``ordered`` yields
    results in item order, otherwise as they complete. Closing the generator cancels what is
    still in flight.
    """
    own = pool is None and client is None
    if own:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    submit = (lambda item: client.submit(fn, *item, pure=False)) if client is not None else \
        (lambda item: pool.submit(fn, *item))
    todo, running = iter(items), []
    try:
        while True:
            for item in todo:
                running.append(submit(item))
                if len(running) >= window:
                    break
            if not running:
                return
            if ordered:
                fut = running.pop(0)
            elif client is not None:
                from distributed import wait

                done = wait(running, return_when="FIRST_COMPLETED").done
                fut = next(f for f in running if f in done)
                running.remove(fut)
            else:
                done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                fut = next(f for f in running if f in done)
                running.remove(fut)
            result = fut.result()
            del fut
            yield result
    finally:
        if client is not None and running:
            try:
                client.cancel(running)
            except RuntimeError:  # the client closed first: its futures went with it
                pass
        else:
            for fut in running:
                fut.cancel()
        if own:
            pool.shutdown(wait=True, cancel_futures=True)
