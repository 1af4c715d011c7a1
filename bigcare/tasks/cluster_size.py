"""The kind of a client's cluster and its size over a run: workers at the start, the most at once, at the end.

::

    start ── add-worker / remove-worker events of the scheduler ("all" topic) ──► end
      n0          the set of worker addresses, its largest size (peak)             n_end
                  and each change (seconds since the start, workers)

An adaptive cluster (SLURM jobs, Kubernetes pods) often starts a run with no worker at all
and grows while its jobs start; a killed job shows as a drop and its replacement as a rise.
"""

from __future__ import annotations

import contextlib
import time

__all__ = ["cluster_kind", "ClusterSize", "MAX_CHANGES"]

#: changes kept in the summary (a run on thousands of short-lived workers keeps its first ones)
MAX_CHANGES = 200

_KINDS = {"LocalCluster": "local", "LocalCUDACluster": "local-cuda", "SLURMCluster": "slurm",
          "KubeCluster": "kubernetes"}


def cluster_kind(client) -> str:
    """``local``, ``local-cuda``, ``slurm``, ``kubernetes`` for a cluster object bigcare knows,
    ``scheduler`` for a client of an existing scheduler, else the cluster's class name."""
    cluster = getattr(client, "cluster", None)
    if cluster is None:
        return "scheduler"
    name = type(cluster).__name__
    if name in _KINDS:
        return _KINDS[name]
    if getattr(cluster, "name", "") == "bigcare-local-cuda":  # built here without dask-cuda
        return "local-cuda"
    return name


def _worker_addresses(client) -> set[str]:
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:  # older distributed
        info = client.scheduler_info()
    return set(info.get("workers", {}))


class ClusterSize:
    """Count a client's workers while a run goes on (a context manager).

    Attributes
    ----------
    start, peak, end : int
        Workers when the run started, the most at once, when it ended.
    changes : list of (seconds, workers)
        Every change of the count, seconds since the start (at most ``MAX_CHANGES``).
    """

    def __init__(self, client):
        self.client = client
        self.start = self.peak = self.end = 0
        self.changes: list[tuple[float, int]] = []
        self._workers: set[str] = set()
        self._t0 = time.monotonic()
        self._subscribed = False

    def __enter__(self) -> ClusterSize:
        self._t0 = time.monotonic()
        with contextlib.suppress(Exception):  # a client without event streams still gets start and end
            self.client.subscribe_topic("all", self._event)
            self._subscribed = True
        self._workers |= _worker_addresses(self.client)
        self.start = self.peak = len(self._workers)
        self.changes = [(0.0, self.start)]
        return self

    def _event(self, event) -> None:
        _, msg = event
        if not isinstance(msg, dict) or msg.get("action") not in ("add-worker", "remove-worker"):
            return
        worker = str(msg.get("worker"))
        if msg["action"] == "add-worker":
            self._workers.add(worker)
        else:
            self._workers.discard(worker)
        self._record(len(self._workers))

    def _record(self, n: int) -> None:
        self.peak = max(self.peak, n)
        if self.changes and self.changes[-1][1] != n and len(self.changes) < MAX_CHANGES:
            self.changes.append((round(time.monotonic() - self._t0, 2), n))

    def __exit__(self, *exc) -> None:
        if self._subscribed:
            with contextlib.suppress(Exception):
                self.client.unsubscribe_topic("all")
        try:
            self._workers = _worker_addresses(self.client)
        except Exception:  # noqa: BLE001 - the scheduler is gone: the events' count stands
            pass
        self.end = len(self._workers)
        self._record(self.end)

    def as_dict(self) -> dict:
        """``{"start": n, "peak": n, "end": n, "changes": [[seconds, workers], ...]}``."""
        return {"start": self.start, "peak": self.peak, "end": self.end, "changes": [list(c) for c in self.changes]}
