"""Small region reads straight from a zarr store.

A training patch is a small region (a few hundred kB) of a huge image. zarr decodes whole
chunks, and zarr-python's general indexing path costs about 0.25 ms of overhead per chunk; for
a 16x64x64 patch that touches 8 chunks on average this overhead is larger than the decoding
itself (3.3 vs 1.5 ms per patch, measured). So :class:`RegionReader` reads the chunks a region
touches itself, when the array allows it:

- zarr v3 arrays whose codecs are ``bytes`` followed by at most one of blosc / zstd / gzip,
  zarr v2 arrays with no filters, C order and any numcodecs compressor: fetch each chunk's
  bytes (local file: open, fstat, one read into a reused buffer, close; ``fs.cat_file`` for
  fsspec URLs), decode with numcodecs into a reused buffer, copy the overlap into the output;
- anything else (sharded arrays, transposes, checksums, filters): ``zarr.Array[selection]``.

Both paths read exactly the chunks the regions touch; :meth:`RegionReader.read_many` reads many
regions and fetches and decodes each chunk they touch once, whatever number of them it serves::

    chunks   +--------+--------+--------+
             |     +--+--------+--+     |    the region (a patch) touches 2 x 3 chunks:
             |     |  region      |     |    each is fetched and decoded once per call,
             +-----+--+--------+--+-----+    the overlap copied into the output
             |     +--+--------+--+     |
             +--------+--------+--------+

Buffers are reused per thread (:class:`ChunkBuffers`) and, in dask workers, glibc is told to
keep reusing heap memory (:func:`tune_malloc`). The patch sampler's read task
(:mod:`bigcare.training.reads`) and the percentile sampler (:mod:`bigcare.normalization`) read
through this module.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from bigcare.store.arrays import level_token, open_array
from bigcare.store.urls import freeze, is_url
from bigcare.store.volume import Level

__all__ = ["ImageRef", "RegionReader", "ChunkBuffers", "chunk_buffers", "tune_malloc", "region_reader"]

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
            c = self.channel or 0
            sl.insert(self.channel_axis, slice(c, c + 1))
        return tuple(sl)

    @property
    def key(self) -> tuple:
        return (self.url, freeze(self.storage_options), self.zarr_format, self.level.path,
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
    """Scratch buffers of one thread for chunk reads: compressed bytes, decoded chunks.

    dask's nannies start workers with ``MALLOC_TRIM_THRESHOLD_`` set, which turns off glibc's
    dynamic mmap threshold: every allocation of 128 kB or more is then a fresh ``mmap`` whose
    pages fault in one by one, and a fresh array per decoded chunk made a worker spend more time
    in page faults than in decoding (2.8x the CPU per patch, measured). Reading and decoding
    into buffers kept per thread avoids that. A decoded chunk lives until the next chunk of the
    same size is decoded in the same thread: :meth:`RegionReader.read_many` uses it at once.
    """

    def __init__(self):
        self._read = bytearray()
        self._decoded: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def read_buffer(self, nbytes: int) -> memoryview:
        """A scratch buffer for the raw (compressed) bytes of one chunk."""
        if len(self._read) < nbytes:
            self._read = bytearray(max(nbytes, 2 * len(self._read)))
        return memoryview(self._read)[:nbytes]

    def decoded(self, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """A buffer for one decoded chunk: (its bytes, the same memory as a ``dtype`` array of ``shape``)."""
        key = (nbytes, dtype, shape)
        pair = self._decoded.get(key)
        if pair is None:
            flat = np.empty(nbytes, np.uint8)
            pair = self._decoded[key] = (flat, flat.view(dtype).reshape(shape))
        return pair


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


def _key_encoder(encode: Callable, ndim: int) -> Callable:
    """A faster equivalent of zarr's chunk key encoder (``prefix + sep.join(coords)``) when it is one."""
    probes = [tuple(range(11, 11 + ndim)), (0,) * ndim, tuple(range(ndim * 7 + 3, ndim * 6 + 3, -1))]
    sample = encode(probes[0])
    for sep in ("/", "."):
        tail = sep.join(map(str, probes[0]))
        if ndim and sample.endswith(tail):
            prefix = sample[:-len(tail)]

            def fast(coords, prefix=prefix, sep=sep):
                return prefix + sep.join(map(str, coords))

            if all(fast(p) == encode(p) for p in probes):
                return fast
    return encode


def _decoder_fn(decoder, nbytes: int) -> Callable:
    """``decode(raw, out)``: the chunk's stored bytes into ``out`` (a uint8 array of ``nbytes``)."""
    if decoder is None:
        def copy(raw, out):
            if len(raw) != nbytes:
                raise OSError(f"chunk holds {len(raw)} bytes; expected {nbytes}")
            out[:] = np.frombuffer(raw, np.uint8)
        return copy
    import numcodecs
    from numcodecs import blosc

    if type(decoder) is numcodecs.Blosc:  # the blosc header describes the rest: skip the codec's checks
        return blosc.decompress

    def generic(raw, out):
        decoded = decoder.decode(raw, out=out)
        if decoded is not out:  # a codec that ignores ``out``
            out[:] = np.frombuffer(decoded, np.uint8)
    return generic


class RegionReader:
    """Reads regions of one zarr array, decoding only the chunks the regions touch.

    Parameters
    ----------
    url, storage_options, zarr_format, level
        Where the array lives (see :class:`ImageRef`).
    """

    def __init__(self, url: str, storage_options: dict | None, zarr_format: int, level: Level):
        self.array = open_array(url, level.path, "r", storage_options, zarr_format=zarr_format, token=level_token(level))
        self.dtype = np.dtype(self.array.dtype)
        layout = _fast_layout(self.array)
        self.fast = layout is not None
        self._id = (url, level.path)
        if layout is not None:
            self._stored, decoder = layout
            self._chunks = tuple(int(c) for c in self.array.chunks)
            self._nbytes = math.prod(self._chunks) * self._stored.itemsize
            self._decode = _decoder_fn(decoder, self._nbytes)
            self._fill = self.array.fill_value
            self._encode_key = _key_encoder(self.array.metadata.encode_chunk_key, len(self._chunks))
            if is_url(url):
                import fsspec

                self._fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
                self._prefix = f"{root.rstrip('/')}/{level.path}/"
            else:
                self._fs, self._prefix = None, os.path.join(url, level.path, "")

    @property
    def chunks(self) -> tuple[int, ...]:
        """The array's chunk shape (the unit one fetch decodes)."""
        return tuple(int(c) for c in self.array.chunks)

    def _fetch(self, key: str, buffers: ChunkBuffers):
        """The stored bytes of chunk ``key`` (a view of a scratch buffer for local files), or None."""
        if self._fs is not None:
            try:
                return self._fs.cat_file(self._prefix + key)
            except FileNotFoundError:
                return None
        try:
            fd = os.open(self._prefix + key, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            view = buffers.read_buffer(size)
            got = os.readv(fd, (view,))
            while got < size:  # a short read (a signal, a network file system): go on
                n = os.readv(fd, (view[got:],))
                if n == 0:
                    break
                got += n
            return view[:got]
        finally:
            os.close(fd)

    def _chunk(self, coords: tuple[int, ...], buffers: ChunkBuffers) -> np.ndarray | None:
        """Decoded chunk at ``coords`` (valid until this thread decodes the next one), or None when never written."""
        raw = self._fetch(self._encode_key(coords), buffers)
        if raw is None:
            return None
        flat, chunk = buffers.decoded(self._nbytes, self._stored, self._chunks)
        try:
            self._decode(raw, flat)
        except OSError as e:
            raise OSError(f"chunk {coords} of {self._id}: {e}") from None
        return chunk

    def read(self, selection: tuple[slice, ...], out: np.ndarray | None = None,
             buffers: ChunkBuffers | None = None) -> np.ndarray:
        """Read ``selection`` (one slice per axis, inside the array).

        Parameters
        ----------
        selection : tuple of slice
            Contiguous box, ``start < stop`` on every axis.
        out : numpy.ndarray, optional
            Array of the box's shape to fill (any strides, e.g. a flipped view); a new one by
            default.
        buffers : ChunkBuffers, optional
            Scratch buffers; by default this thread's.

        Returns
        -------
        numpy.ndarray
            The region in the array's native byte order (``out`` when given).
        """
        if out is None:
            out = np.empty(tuple(s.stop - s.start for s in selection), self.dtype)
        self.read_many((selection,), (out,), buffers)
        return out

    def plan(self, selections: Sequence[tuple[slice, ...]]) -> list[tuple[tuple[int, ...], list]]:
        """The chunks ``selections`` touch, in key order, each with ``(k, dst, src)`` per region it overlaps.

        ``outs[k][dst] = chunk[src]`` copies the overlap. Depends only on the chunk shape, so
        arrays chunked alike can share a plan.
        """
        users: dict[tuple[int, ...], list] = {}
        for k, sel in enumerate(selections):
            per_axis = []
            for s, c in zip(sel, self._chunks):
                a, b = s.start, s.stop
                axis = []
                for i in range(a // c, (b - 1) // c + 1):
                    o = i * c
                    lo, hi = max(a, o), min(b, o + c)
                    axis.append((i, slice(lo - a, hi - a), slice(lo - o, hi - o)))
                per_axis.append(axis)
            for combo in itertools.product(*per_axis):
                coords, dst, src = zip(*combo)
                found = users.get(coords)
                if found is None:
                    users[coords] = [(k, dst, src)]
                else:
                    found.append((k, dst, src))
        return sorted(users.items())

    def read_many(self, selections: Sequence[tuple[slice, ...]], outs: Sequence[np.ndarray],
                  buffers: ChunkBuffers | None = None, plan: list | None = None) -> int:
        """Read several regions, fetching and decoding each chunk they touch once.

        The chunks are visited in key order, and each is copied into every region it overlaps
        (``outs[k]`` receives ``selections[k]``, converted to its data type).

        Parameters
        ----------
        selections, outs
            The regions (contiguous boxes inside the array) and arrays of their shapes to fill
            (any strides, e.g. flipped or transposed views).
        buffers : ChunkBuffers, optional
            Scratch buffers; by default this thread's.
        plan : list, optional
            :meth:`plan` of ``selections`` (by this reader or one with the same chunk shape).

        Returns
        -------
        int
            Chunks fetched (0 on the zarr path).
        """
        if not self.fast:
            for sel, out in zip(selections, outs):
                out[...] = self.array[sel]
            return 0
        if buffers is None:
            buffers = chunk_buffers()
        if plan is None:
            plan = self.plan(selections)
        for coords, uses in plan:
            chunk = self._chunk(coords, buffers)
            if chunk is None:
                for k, dst, _ in uses:
                    outs[k][dst] = self._fill
            else:
                for k, dst, src in uses:
                    outs[k][dst] = chunk[src]
        return len(plan)


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
