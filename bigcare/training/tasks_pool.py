"""The patch sampler's read task, how its results reach the client, and the task runner.

:func:`read_patches` is the task :class:`bigcare.training.sampling.PatchSampler` submits: it
reads a group of (input, target) patches, each in its own augmentation, and normalises each
with its own percentile values (or leaves that to the client). It works *chunk by chunk*, not
patch by patch: the chunks every patch of the task touches are collected per image first (one
plan for input and target when they are chunked alike), then each chunk is fetched and decoded
once and its overlap with every patch that touches it is copied straight into that patch's
place in the output, already augmented (the copy writes through the inverse flip/transpose
view of the output; no intermediate patch buffer)::

    patches of a task      chunks they touch        per chunk, in key order
    p0 [c1 c2 c5 c6]   ──►  c1: p0                ──►  fetch + decode c5 once,
    p1 [c5 c6 c9 c10]       c5: p0 p1 p3               copy its overlap into p0, p1, p3
    p3 [c5 ...]             ...

Decoding is most of a task's CPU time (a 16x64x64 patch touches about 8 chunks of each image),
so chunks shared by patches of one task are decoded once. How many are shared depends on how
densely the patches cover the images: a third of the decodes with tasks of 128 patches in the
throughput benchmark, whose patches concentrate on the foreground of a 0.5 GB pair; few on a
huge image. The result is the same, byte for byte, as reading each patch on its own.

Workers on the client's host write the patches of a task into a shared-memory slot
(:class:`ResultSlots`) instead of sending them through the cluster's sockets.

:func:`run_tasks` runs any task function over items, on a dask cluster or a thread pool.
"""

from __future__ import annotations

import concurrent.futures
import mmap
import os
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from bigcare.training.regions import ImageRef, region_reader, tune_malloc

__all__ = ["ReadPlan", "SourcePlan", "read_patches", "normalise", "augment", "unaugment", "run_tasks",
           "Slot", "InSlot", "ResultSlots", "EPS"]

EPS = 1e-20  # CSBDeep's normalize_mi_ma epsilon


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


def unaugment(patch: np.ndarray, code: int) -> np.ndarray:
    """The view ``v`` of ``patch`` with ``augment(v, code)`` equal to ``patch`` element for element.

    Writing a region into ``unaugment(out, code)`` leaves ``out`` holding the region augmented.
    """
    if code & 2:
        patch = patch[..., ::-1]
    if code & 1:
        patch = patch[..., ::-1, :]
    if code & 4:
        patch = np.swapaxes(patch, -1, -2)
    return patch


def read_patches(plan: ReadPlan, sources: np.ndarray, starts: np.ndarray, scaling: np.ndarray | None,
                 codes: np.ndarray, into: Slot | None = None) -> tuple[np.ndarray, np.ndarray] | InSlot:
    """Read, augment and (optionally) normalise a group of (input, target) patches: one dask task.

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
    into : Slot, optional
        With ``scaling=None``: write the patches into this shared-memory slot (see
        :class:`ResultSlots`) and return an :class:`InSlot` instead of the arrays; when the
        slot cannot be opened here (another host), the arrays are returned.

    Returns
    -------
    (x, y) : numpy.ndarray
        Each (n, 1, *patch_shape): float32 when normalised, else ``plan.dtypes``.
    """
    tune_malloc()
    shapes = ((len(sources), 1) + plan.patch_shape,) * 2
    sizes = [np.dtype(d).itemsize * int(np.prod(shapes[0])) for d in plan.dtypes]
    mm = None
    if into is not None and scaling is None and sum(sizes) <= into.nbytes:
        try:
            mm = _map(into.path, into.nbytes, populate=True)
        except (OSError, ValueError):  # not on the client's host: send the arrays
            mm = None
    if mm is None:
        x, y = (np.empty(shape, dtype) for shape, dtype in zip(shapes, plan.dtypes))
    else:
        x = np.ndarray(shapes[0], plan.dtypes[0], buffer=mm, offset=0)
        y = np.ndarray(shapes[1], plan.dtypes[1], buffer=mm, offset=sizes[0])
    _fill(plan, sources, starts, codes, x, y)
    if mm is not None:
        del x, y  # release the mapping's buffer before closing it
        mm.close()
        return InSlot(into, shapes, tuple(np.dtype(d).str for d in plan.dtypes))
    if scaling is None:
        return x, y
    return normalise(x, scaling[:, :2]), normalise(y, scaling[:, 2:])


def _fill(plan: ReadPlan, sources: np.ndarray, starts: np.ndarray, codes: np.ndarray, x: np.ndarray,
          y: np.ndarray) -> None:
    """Read the patches into ``x`` and ``y`` (``(n, 1, *patch_shape)`` each), augmented, chunk by chunk."""
    groups: dict[tuple, tuple[ImageRef, list, list]] = {}  # per array: its regions and where they go
    pending = []  # (buffer, destination) where a view could not be had (never expected)
    for i in range(len(sources)):
        src = plan.sources[int(sources[i])]
        start = starts[i, starts.shape[1] - len(src.footprint):]
        code = int(codes[i])
        for ref, out in ((src.input, x), (src.target, y)):
            sel = ref.selection(start, src.footprint)
            shape = tuple(s.stop - s.start for s in sel)
            dest = unaugment(out[i, 0], code)
            view = dest.reshape(shape)
            if not np.may_share_memory(view, out):
                view = np.empty(shape, out.dtype)
                pending.append((view, dest))
            group = groups.get(ref.key)  # input and target channels of one image share an array
            if group is None:
                group = groups[ref.key] = (ref, [], [])
            group[1].append(sel)
            group[2].append(view)
    plans: list[tuple[tuple, list, list]] = []  # (chunk shape, selections, plan): input and target often share one
    for ref, sels, views in groups.values():
        reader = region_reader(ref)
        plan = None
        if reader.fast:
            plan = next((p for c, s, p in plans if c == reader._chunks and s == sels), None)
            if plan is None:
                plan = reader.plan(sels)
                plans.append((reader._chunks, sels, plan))
        reader.read_many(sels, views, plan=plan)
    for view, dest in pending:
        dest[...] = view.reshape(dest.shape)


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


# --- task results through shared memory ---------------------------------------------------------

#: Where same-host result slots live (a tmpfs).
SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class Slot:
    """A shared-memory file a task may write its result into."""

    path: str
    nbytes: int


@dataclass(frozen=True)
class InSlot:
    """A task's (x, y) left in a slot: x at offset 0, y right after it."""

    slot: Slot
    shapes: tuple[tuple[int, ...], tuple[int, ...]]
    dtypes: tuple[str, str]


def _map(path: str, nbytes: int, *, populate: bool) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        if os.fstat(fd).st_size < nbytes:
            raise OSError(f"{path}: smaller than {nbytes} bytes")
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        return mmap.mmap(fd, nbytes, flags=flags)
    finally:
        os.close(fd)


def _probe(path: str, token: bytes) -> bool:
    """On a worker: whether it sees the client's slot file (same host, same /dev/shm)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(token)) == token
    except OSError:
        return False


def _unlink(paths) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except OSError:
            pass


class ResultSlots:
    """A ring of shared-memory files through which same-host workers hand task results over.

    A dask worker sends a task's result through a socket: for the sampler's raw patches that
    cost 0.5 ms of CPU per (input, target) pair between the worker and the client (measured,
    loopback TCP on 2 cores), a quarter of the whole read. When the workers run on the
    client's host, the sampler instead gives each task one of these files: the task maps it,
    reads the patches straight into it and returns an :class:`InSlot`; the client maps the
    same file and normalises from it. A slot is reused once the client has consumed its task:
    :func:`run_tasks` submits task ``k`` only after the consumer asked for the result after
    task ``k - window``'s, so the ring needs one slot per task in flight. Space is reserved
    when the files are made (``posix_fallocate``: a full tmpfs fails here, not with SIGBUS in
    a worker).

    The files, ``/dev/shm/bigcare-patches-<pid>-<random>-<k>`` (mode 0600), are removed by
    :meth:`close`, or when the object is collected or the process exits; a process killed
    outright leaves them behind.
    """

    def __init__(self, slots: list[Slot], maps: list[mmap.mmap]):
        self.slots = slots
        self._maps = {s.path: m for s, m in zip(slots, maps)}
        self._finalizer = weakref.finalize(self, _unlink, [s.path for s in slots])

    @classmethod
    def create(cls, client, n: int, nbytes: int) -> ResultSlots | None:
        """``n`` slots of ``nbytes`` when every worker of ``client`` can map them; else None."""
        if not os.path.isdir(SHM_DIR) or n < 1 or nbytes < 1:
            return None
        token = uuid.uuid4().hex
        paths = [os.path.join(SHM_DIR, f"bigcare-patches-{os.getpid()}-{token}-{k}") for k in range(n)]
        made, maps = [], []
        try:
            for p in paths:
                fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                made.append(p)
                try:
                    os.posix_fallocate(fd, 0, nbytes)
                finally:
                    os.close(fd)
                maps.append(_map(p, nbytes, populate=False))
            maps[0][:16] = token[:16].encode()
            seen = client.run(_probe, paths[0], token[:16].encode())
            if not seen or not all(seen.values()):
                raise OSError("the workers do not share this host's /dev/shm")
        except (OSError, ValueError, AttributeError):
            for m in maps:
                m.close()
            _unlink(made)
            return None
        return cls([Slot(p, nbytes) for p in paths], maps)

    def slot(self, k: int) -> Slot:
        """Slot of the ``k``-th task (round robin)."""
        return self.slots[k % len(self.slots)]

    def arrays(self, result: InSlot) -> tuple[np.ndarray, np.ndarray]:
        """The (x, y) a task left in its slot: views, valid until the slot is handed out again."""
        mm = self._maps[result.slot.path]
        x = np.ndarray(result.shapes[0], np.dtype(result.dtypes[0]), buffer=mm, offset=0)
        y = np.ndarray(result.shapes[1], np.dtype(result.dtypes[1]), buffer=mm, offset=x.nbytes)
        return x, y

    def close(self) -> None:
        """Unmap and remove the files (a mapping still viewed by an array is left to the collector)."""
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:
                pass
        self._maps = {}
        self._finalizer()


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
