"""Task results through shared memory: same-host workers hand large results over as files in /dev/shm.

A task whose worker runs on the client's host writes its (x, y) arrays into a *slot* (a
pre-made shared-memory file) and returns only an :class:`InSlot` naming it; the client maps
the file and reads them without a copy through the cluster's sockets.
"""

from __future__ import annotations

import mmap
import os
import uuid
import weakref
from dataclasses import dataclass

import numpy as np

__all__ = ["SHM_DIR", "Slot", "InSlot", "ResultSlots", "map_slot", "remove_orphans"]

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


def map_slot(path: str, nbytes: int, *, populate: bool) -> mmap.mmap:
    """Map a slot file (raises OSError when it is missing or too small)."""
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


def remove_orphans(directory: str | None = None) -> list[str]:
    """Remove slot files left by processes that no longer run (a sampler killed outright).

    Slot files are named ``bigcare-patches-<pid>-...``; a file whose pid is not alive is removed.
    Returns the removed paths.
    """
    directory = directory or SHM_DIR
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        parts = name.split("-")
        if not name.startswith("bigcare-patches-") or len(parts) < 3 or not parts[2].isdigit():
            continue
        pid = int(parts[2])
        try:
            os.kill(pid, 0)
            continue  # alive (or not ours to signal): keep
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        path = os.path.join(directory, name)
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


class ResultSlots:
    """A ring of shared-memory files through which same-host workers hand task results over.

    A dask worker sends a task's result through a socket: for the sampler's raw patches that
    cost 0.5 ms of CPU per (input, target) pair between the worker and the client (measured,
    loopback TCP on 2 cores), a quarter of the whole read. When the workers run on the
    client's host, the sampler instead gives each task one of these files: the task maps it,
    reads the patches straight into it and returns an :class:`InSlot`; the client maps the
    same file and normalizes from it. A slot is reused once the client has consumed its task:
    :func:`bigcare.tasks.runner.run_tasks` submits task ``k`` only after the consumer asked for the result after
    task ``k - in_flight``'s (an *ordered* run), so the ring needs one slot per task in flight. Space is reserved
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
        remove_orphans()
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
                maps.append(map_slot(p, nbytes, populate=False))
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
