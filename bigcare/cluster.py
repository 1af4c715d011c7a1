"""Naming a cluster: a LocalCluster by default, or an existing scheduler by address."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from .errors import ConfigError

__all__ = ["cluster_client", "local_cluster_shape"]


def local_cluster_shape(n_workers: int | None = None, cores: int | None = None) -> tuple[int, int]:
    """Workers and threads per worker for a local CPU cluster.

    One worker process with all cores by default: the U-Net call holds a per-process lock and
    gives torch every worker thread, while the worker's other threads read and write blocks,
    so I/O overlaps compute without oversubscribing the cores. More workers split the cores.

    Returns
    -------
    (n_workers, threads_per_worker)
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n_workers = max(1, int(n_workers or 1))
    return n_workers, max(1, cores // n_workers)


@contextlib.contextmanager
def cluster_client(
    scheduler: str | None = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    device: str = "cpu",
    dashboard: bool = True,
    quiet: bool = False,
) -> Iterator:
    """Yield a ``distributed.Client``: to ``scheduler`` if given, else to a new LocalCluster.

    Parameters
    ----------
    scheduler : str, optional
        Address of an existing scheduler (``tcp://host:port``). The cluster is left running.
    n_workers, threads_per_worker : int, optional
        Local cluster shape (see :func:`local_cluster_shape`).
    device : str
        ``"cpu"`` or ``"cuda[:N]"``; a local CUDA cluster gives each worker a ``GPU`` resource.
    dashboard : bool
        Serve the dask dashboard (on port 8787, or a free one).
    quiet : bool
        Do not print the dashboard address.
    """
    from distributed import Client, LocalCluster

    if scheduler is not None:
        if not str(scheduler).startswith(("tcp://", "tls://", "inproc://", "ucx://")):
            raise ConfigError(f"scheduler must be an address like tcp://host:8786, got {scheduler!r}")
        client = Client(scheduler)
        try:
            if not quiet:
                print(f"bigcare: connected to {scheduler}; dashboard: {client.dashboard_link}", flush=True)
            yield client
        finally:
            client.close()
        return

    workers, threads = local_cluster_shape(n_workers)
    threads = threads_per_worker or threads
    resources = {"GPU": 1} if str(device).startswith("cuda") else None
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=threads,
        processes=True,
        dashboard_address=":8787" if dashboard else None,
        resources=resources,
        silence_logs=40,
    )
    client = Client(cluster)
    try:
        if not quiet:
            link = client.dashboard_link if dashboard else "(disabled)"
            print(f"bigcare: local cluster with {workers} worker process(es) x {threads} thread(s); "
                  f"dashboard: {link}", flush=True)
        yield client
    finally:
        client.close()
        cluster.close()
