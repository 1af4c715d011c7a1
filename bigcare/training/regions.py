"""Small region reads straight from a zarr store, and the read task of the patch sampler.

A training patch is a small region (a few hundred kB) of a huge image. zarr decodes whole
chunks, and zarr-python's general indexing path costs about 0.25 ms of overhead per chunk; for
a 16x64x64 patch that touches 8 chunks on average this overhead is larger than the decoding
itself (3.3 vs 1.5 ms per patch, measured). So :class:`RegionReader` reads the chunks a region
touches itself, when the array allows it:

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

Decoded chunks go to buffers reused per thread (:class:`ChunkBuffers`) and, in dask workers,
glibc is told to keep reusing heap memory (:func:`tune_malloc`): fresh 128 kB allocations per
chunk cost more in page faults than the decoding.

:func:`read_patches` is the task the sampler submits: it reads a batch of (input, target)
patches, applies each one's augmentation and normalises it with its own percentile values.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from bigcare.volume import Level, _freeze, cached_array, is_url

__all__ = ["ImageRef", "RegionReader", "ChunkBuffers", "chunk_buffers", "tune_malloc", "ReadPlan", "SourcePlan",
           "read_patches", "normalise", "augment", "run_tasks"]

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


class ChunkBuffers:
    """Decoded chunks of one task, held in buffers that are reused from task to task.

    dask's nannies start workers with ``MALLOC_TRIM_THRESHOLD_`` set, which turns off glibc's
    dynamic mmap threshold: every allocation of 128 kB or more is then a fresh ``mmap`` whose
    pages fault in one by one, and a fresh array per decoded chunk made a worker spend more time
    in page faults than in decoding (2.8x the CPU per patch, measured). Decoding into buffers
    kept per thread avoids that. :meth:`reset` at the start of each task forgets the chunks (a
    store may change between tasks) but keeps the buffers.

    Parameters
    ----------
    capacity : int
        Decoded chunks kept at once (least recently used ones are overwritten).
    """

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._used: collections.OrderedDict = collections.OrderedDict()
        self._free: dict[int, list[np.ndarray]] = {}
        self._read = bytearray()

    def reset(self) -> None:
        """Forget every chunk; keep the buffers."""
        while self._used:
            _, buf = self._used.popitem()
            if buf is not None:
                self._free.setdefault(buf.nbytes, []).append(buf)

    def get(self, key):
        """The decoded chunk ``key`` (a byte buffer, or None for a missing chunk); KeyError if absent."""
        buf = self._used[key]
        self._used.move_to_end(key)
        return buf

    def put_missing(self, key) -> None:
        self._used[key] = None
        self._evict()

    def new(self, key, nbytes: int) -> np.ndarray:
        """A buffer of ``nbytes`` bytes registered as chunk ``key``."""
        self._evict()
        free = self._free.get(nbytes)
        buf = free.pop() if free else np.empty(nbytes, np.uint8)
        self._used[key] = buf
        return buf

    def read_buffer(self, nbytes: int) -> memoryview:
        """A scratch buffer for the raw (compressed) bytes of one chunk."""
        if len(self._read) < nbytes:
            self._read = bytearray(max(nbytes, 2 * len(self._read)))
        return memoryview(self._read)[:nbytes]

    def _evict(self) -> None:
        while len(self._used) >= self.capacity:
            _, old = self._used.popitem(last=False)
            if old is not None:
                self._free.setdefault(old.nbytes, []).append(old)


_LOCAL = threading.local()
_MALLOC_TUNED: bool | None = None

#: glibc's ``M_MMAP_THRESHOLD`` and ``M_TOP_PAD`` in processes started with ``MALLOC_TRIM_THRESHOLD_``.
MMAP_THRESHOLD = TOP_PAD = 4 << 20


def tune_malloc() -> bool:
    """Let glibc reuse heap memory for chunk decompression again, in dask worker processes.

    dask's nannies start workers with ``MALLOC_TRIM_THRESHOLD_=65536``. Setting any malloc
    threshold turns off glibc's dynamic mmap threshold, so every allocation of 128 kB or more
    becomes a fresh ``mmap``, and the low trim threshold hands the heap top back after every
    free. blosc and zstd allocate a scratch block (or a decompression context) of that size
    inside every chunk decompression, which then costs 33-65 page faults, 2-4x the
    decompression itself (measured on 128 kB chunks: blosc-lz4 86 vs 20 us, blosc-zstd 180 vs
    60 us; 2.8 vs 1.2 ms of CPU per 16x64x64 patch pair). Setting ``M_MMAP_THRESHOLD`` and
    ``M_TOP_PAD`` to 4 MiB serves those from the heap and keeps at most 4 MiB more of it per
    arena; the trim threshold (what dask set it for) is left alone. Runs once per process,
    only when that variable was set when the process started (``/proc/self/environ``: a
    process that starts a LocalCluster gets it in ``os.environ`` too, but its malloc keeps the
    dynamic threshold, which must not be switched off) and glibc is the C library; returns
    whether this process is tuned.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED is None:
        _MALLOC_TUNED = _tune_malloc()
    return _MALLOC_TUNED


def _tune_malloc() -> bool:
    try:
        with open("/proc/self/environ", "rb") as f:
            started_with = {item.split(b"=", 1)[0] for item in f.read().split(b"\0") if b"=" in item}
    except OSError:
        return False
    if b"MALLOC_TRIM_THRESHOLD_" not in started_with or b"MALLOC_MMAP_THRESHOLD_" in started_with:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD)) & bool(libc.mallopt(-2, TOP_PAD))  # M_MMAP_THRESHOLD, M_TOP_PAD
    except (OSError, AttributeError):  # not glibc
        return False


def chunk_buffers() -> ChunkBuffers:
    """This thread's :class:`ChunkBuffers`."""
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None:
        buffers = _LOCAL.buffers = ChunkBuffers()
    return buffers


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
        self._id = (url, level.path)
        if self.fast:
            self._stored, self._decoder = layout
            self._chunks = tuple(int(c) for c in self.array.chunks)
            self._nbytes = math.prod(self._chunks) * self._stored.itemsize
            self._fill = self.array.fill_value
            self._encode_key = self.array.metadata.encode_chunk_key
            if is_url(url):
                import fsspec

                self._fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
                self._prefix = f"{root.rstrip('/')}/{level.path}/"
            else:
                self._fs, self._prefix = None, os.path.join(url, level.path)

    def _fetch(self, key: str, buffers: ChunkBuffers):
        """The stored bytes of chunk ``key`` (a view of a scratch buffer for local files), or None."""
        try:
            if self._fs is not None:
                return self._fs.cat_file(self._prefix + key)
            with open(os.path.join(self._prefix, key), "rb", buffering=0) as f:
                view = buffers.read_buffer(os.fstat(f.fileno()).st_size)
                n = f.readinto(view)
                return view[:n]
        except FileNotFoundError:
            return None

    def _chunk(self, coords: tuple[int, ...], buffers: ChunkBuffers) -> np.ndarray | None:
        """Decoded chunk at ``coords`` (kept in ``buffers``), or None when never written (fill value)."""
        key = (self._id, coords)
        try:
            buf = buffers.get(key)
        except KeyError:
            raw = self._fetch(self._encode_key(coords), buffers)
            if raw is None:
                buffers.put_missing(key)
                return None
            buf = buffers.new(key, self._nbytes)
            if self._decoder is not None:
                decoded = self._decoder.decode(raw, out=buf)
                if decoded is not buf:  # a codec that ignores ``out``
                    buf[:] = np.frombuffer(decoded, np.uint8)
            elif len(raw) == self._nbytes:
                buf[:] = np.frombuffer(raw, np.uint8)
            else:
                raise OSError(f"chunk {coords} of {self._id} holds {len(raw)} bytes; expected {self._nbytes}")
        if buf is None:
            return None
        return buf.view(self._stored).reshape(self._chunks)

    def read(self, selection: tuple[slice, ...], out: np.ndarray | None = None,
             buffers: ChunkBuffers | None = None) -> np.ndarray:
        """Read ``selection`` (one slice per axis, inside the array).

        Parameters
        ----------
        selection : tuple of slice
            Contiguous box, ``start < stop`` on every axis.
        out : numpy.ndarray, optional
            Array of the box's shape to fill; a new one by default.
        buffers : ChunkBuffers, optional
            Decoded chunks shared between the reads of one task (the caller resets them when
            the task starts); by default this thread's, reset first.

        Returns
        -------
        numpy.ndarray
            The region in the array's native byte order (``out`` when given).
        """
        shape = tuple(s.stop - s.start for s in selection)
        if out is None:
            out = np.empty(shape, self.dtype)
        if not self.fast:
            out[...] = self.array[selection]
            return out
        if buffers is None:
            buffers = chunk_buffers()
            buffers.reset()
        starts = [s.start for s in selection]
        stops = [s.stop for s in selection]
        ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(starts, stops, self._chunks)]
        for coords in itertools.product(*ranges):
            chunk = self._chunk(coords, buffers)
            dst, src = [], []
            for k, a, b, c in zip(coords, starts, stops, self._chunks):
                lo, hi = max(a, k * c), min(b, (k + 1) * c)
                dst.append(slice(lo - a, hi - a))
                src.append(slice(lo - k * c, hi - k * c))
            out[tuple(dst)] = self._fill if chunk is None else chunk[tuple(src)]
        return out


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
    tune_malloc()
    n = len(sources)
    x = np.empty((n, 1) + plan.patch_shape, plan.dtypes[0])
    y = np.empty((n, 1) + plan.patch_shape, plan.dtypes[1])
    buffers = chunk_buffers()
    buffers.reset()
    scratch: dict = {}  # one patch-sized buffer per image type, reused for every patch
    for i in range(n):
        src = plan.sources[int(sources[i])]
        start = starts[i, starts.shape[1] - len(src.footprint):]
        for ref, out in ((src.input, x), (src.target, y)):
            sel = ref.selection(start, src.footprint)
            shape = tuple(s.stop - s.start for s in sel)
            tmp = scratch.get((shape, ref.level.dtype))
            if tmp is None:
                tmp = scratch[shape, ref.level.dtype] = np.empty(shape, ref.level.dtype)
            region_reader(ref).read(sel, tmp, buffers)
            out[i, 0] = augment(tmp.reshape(plan.patch_shape), int(codes[i]))
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
