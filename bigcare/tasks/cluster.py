"""Naming a cluster: the same restore runs on a laptop, a GPU node, SLURM or Kubernetes.

::

    --scheduler tcp://host:8786 | tls://host:8786   an existing scheduler (left running)
    --cluster local        LocalCluster, separate worker processes, sized from the machine
    --cluster local-cuda   one worker per GPU, pinned by CUDA_VISIBLE_DEVICES, resource GPU=1
                           (dask-cuda's LocalCUDACluster when installed, else the same layout
                           built here from distributed's Nannies)
    --cluster slurm        dask-jobqueue SLURMCluster from a jobqueue YAML (cluster/slurm.yaml)
    --cluster kubernetes   dask-kubernetes operator cluster from a DaskCluster spec
                           (cluster/kubernetes.yaml)

Clusters started here are closed when the run ends. ``cluster/README.md`` says how each is
started and which settings a site must change.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

from bigcare.errors import ConfigError
from bigcare.tasks.hpc import (
    kubernetes_cluster,
    load_cluster_config,
    scale_cluster,
    slurm_cluster,
    validate_kubernetes_spec,
)
from bigcare.types import CLUSTER_KINDS

__all__ = ["CLUSTER_KINDS", "cluster_client", "make_cluster", "in_process_run", "forget_worker_state",
           "local_cluster_shape", "local_cuda_worker_spec",
           "load_cluster_config", "slurm_cluster", "kubernetes_cluster", "validate_kubernetes_spec",
           "tls_security", "add_cluster_arguments", "cluster_kwargs"]

_ADDRESS_PREFIXES = ("tcp://", "tls://", "inproc://", "ucx://")
#: Local clusters listen on loopback only: the dask dashboard has no authentication, and a
#: scheduler or worker reachable from other hosts would run whatever they send it.
LOOPBACK = "127.0.0.1"
DASHBOARD = f"{LOOPBACK}:8787"
#: Seconds to wait for an existing scheduler before saying it cannot be reached.
CONNECT_TIMEOUT_S = 10
#: A local worker gets at least this much memory: more workers than memory / this are reduced.
MIN_WORKER_MEMORY = 2 * 2**30
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def dashboard_address(dashboard: bool | str) -> str | None:
    """Where a cluster started here serves its dashboard: loopback (True), nowhere (False), or
    the given ``host:port``, which is warned about unless its host is loopback: the dask
    dashboard has no authentication."""
    if dashboard is True:
        return DASHBOARD
    if not dashboard:
        return None
    address = str(dashboard)
    host = address.rsplit(":", 1)[0] if ":" in address else address
    if host not in _LOOPBACK_HOSTS:
        print(f"bigcare: warning: the dask dashboard will listen on {address!r}, reachable from other hosts and "
              "without authentication (anyone who reaches it sees the cluster and its task names)",
              file=sys.stderr, flush=True)
    return address


SEMAPHORE_REGISTRY = "bigcare-sems-"


def _semaphores(directory: str) -> set[str]:
    try:
        return {n for n in os.listdir(directory) if n.startswith("sem.mp-")}
    except OSError:
        return set()


def register_semaphores(names: set[str], directory: str = "/dev/shm") -> None:
    """Record the semaphores a local cluster of this process created (``bigcare-sems-<pid>``)."""
    if names:
        with contextlib.suppress(OSError), open(os.path.join(directory, f"{SEMAPHORE_REGISTRY}{os.getpid()}"), "a") as f:
            f.write("".join(f"{n}\n" for n in sorted(names)))


_WATCHING = threading.Event()


def _watch_semaphores(known: set[str], directory: str = "/dev/shm", every_s: float = 2.0) -> None:
    """Record, every ``every_s`` while this process lives, the semaphores that appear after the
    cluster started (one daemon thread per process). Recording too many is harmless: a recorded
    semaphore that some process maps is never removed."""
    if _WATCHING.is_set():
        return
    _WATCHING.set()

    def watch() -> None:
        seen = set(known)
        while True:
            time.sleep(every_s)
            now = _semaphores(directory)
            register_semaphores(now - seen, directory)
            seen |= now

    threading.Thread(target=watch, name="bigcare-semaphores", daemon=True).start()


def remove_orphan_semaphores(directory: str = "/dev/shm") -> list[str]:
    """Remove the multiprocessing semaphores (``sem.mp-*``) of bigcare runs that were killed outright.

    A local cluster's nannies start their workers with semaphores that the multiprocessing
    resource tracker removes when the run ends; a run killed with its whole process group
    (kill -9) takes the tracker with it and leaves them (7 per worker). Each run records the
    ones its cluster created in ``bigcare-sems-<pid>``; a later run removes those of a pid that
    no longer runs, unless some process still maps one (compared by inode: the process that
    created a semaphore maps glibc's temporary file, since renamed to ``sem.mp-*``). Semaphores
    bigcare did not record are never touched. Returns the removed paths.
    """
    try:
        registries = [n for n in os.listdir(directory) if n.startswith(SEMAPHORE_REGISTRY)]
    except OSError:
        return []
    dead = []
    for name in registries:
        pid = name[len(SEMAPHORE_REGISTRY):]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            dead.append(name)
        except PermissionError:  # alive, another user's
            continue
    if not dead:
        return []
    mapped: set[int] = set()
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/maps") as f:
                mapped.update(int(line.split()[4]) for line in f if "/sem." in line)
        except (OSError, ValueError, IndexError):  # gone, or another user's (it cannot open our 0600 files)
            continue
    removed = []
    for registry in dead:
        path = os.path.join(directory, registry)
        try:
            with open(path) as f:
                names = [line.strip() for line in f if line.strip().startswith("sem.mp-")]
        except OSError:
            continue
        for sem in names:
            target = os.path.join(directory, sem)
            try:
                if os.stat(target).st_ino in mapped:
                    continue
                os.unlink(target)
                removed.append(target)
            except OSError:
                continue
        with contextlib.suppress(OSError):
            os.unlink(path)
    return removed


def _memory_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - unknown: no cap by memory
        return None


def local_cluster_shape(workers: int | None = None, cores: int | None = None,
                        memory: int | None = None) -> tuple[int, int]:
    """Workers and threads per worker for a local CPU cluster.

    One worker process with all cores by default: the U-Net call holds a per-process lock and
    gives torch every worker thread, while the worker's other threads read and write blocks,
    so I/O overlaps compute without oversubscribing the cores. More workers split the cores.

    Returns
    -------
    (workers, threads_per_worker)

    Raises
    ------
    ConfigError
        For fewer than one worker. More workers than cores, or than ``memory`` (bytes; default
        this machine's) holds at ``MIN_WORKER_MEMORY`` each, are reduced, with a line on stderr
        saying so.
    """
    if memory is None:
        memory = _memory_bytes()
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers is not None and (isinstance(workers, bool) or int(workers) != workers or workers < 1):
        raise ConfigError(f"workers must be a whole number >= 1, got {workers!r}")
    if workers is not None and workers > cores:
        print(f"bigcare: {workers} local workers requested, reduced to {cores} (the cores this process may use)",
              file=sys.stderr, flush=True)
        workers = cores
    if workers is not None and memory is not None and workers > max(1, memory // MIN_WORKER_MEMORY):
        fit = max(1, memory // MIN_WORKER_MEMORY)
        print(f"bigcare: {workers} local workers requested, reduced to {fit} ({memory / 2**30:.1f} GiB of memory "
              f"at {MIN_WORKER_MEMORY / 2**30:.0f} GiB per worker at least)", file=sys.stderr, flush=True)
        workers = fit
    workers = max(1, int(workers or 1))
    return workers, max(1, cores // workers)


def _gpu_ids() -> list[int]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(v) for v in visible.split(",") if v.strip().isdigit()]
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except Exception:
        return []


def local_cuda_worker_spec(devices: list[int], threads_per_worker: int = 1) -> dict:
    """SpecCluster worker specs: one Nanny per GPU, as dask-cuda's LocalCUDACluster lays them out.

    Worker ``gpu-d`` sees ``CUDA_VISIBLE_DEVICES`` rotated to start at ``d`` (so its
    ``cuda:0`` is GPU ``d``) and advertises the resource ``GPU=1``.
    """
    from distributed import Nanny

    if not devices:
        raise ConfigError("local-cuda: no GPU to start workers on; expected at least one CUDA device")
    spec = {}
    for k, d in enumerate(devices):
        rotated = devices[k:] + devices[:k]
        spec[f"gpu-{d}"] = {"cls": Nanny, "options": {
            "nthreads": threads_per_worker, "resources": {"GPU": 1}, "name": f"gpu-{d}", "host": LOOPBACK,
            "env": {"CUDA_VISIBLE_DEVICES": ",".join(map(str, rotated))},
        }}
    return spec


def _local_cuda_cluster(devices: list[int] | None, threads_per_worker: int | None, dashboard: bool | str):
    devices = list(devices) if devices is not None else _gpu_ids()
    if not devices:
        raise ConfigError(
            "--cluster local-cuda needs CUDA GPUs, found none (torch.cuda.device_count() is 0 and "
            "CUDA_VISIBLE_DEVICES is unset); use --cluster local on a CPU machine"
        )
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // len(devices))
    address = dashboard_address(dashboard)
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        from distributed import Scheduler, SpecCluster

        return SpecCluster(
            workers=local_cuda_worker_spec(devices, threads),
            scheduler={"cls": Scheduler, "options": {"dashboard_address": address, "host": LOOPBACK}},
            name="bigcare-local-cuda", silence_logs=40,
        )
    return LocalCUDACluster(CUDA_VISIBLE_DEVICES=devices, threads_per_worker=threads, resources={"GPU": 1},
                            dashboard_address=address, host=LOOPBACK, silence_logs=40)


def make_cluster(kind: str = "local", *, config=None, workers: int | None = None,
                 threads_per_worker: int | None = None, device: str = "cpu", dashboard: bool | str = True,
                 devices: list[int] | None = None, processes: bool = True):
    """Start a cluster of the named kind (not scaled yet for slurm / kubernetes).

    Parameters
    ----------
    kind : {"local", "local-cuda", "slurm", "kubernetes"}
    config : str or os.PathLike, optional
        Config file for slurm / kubernetes; default ``cluster/<kind>.yaml`` of a checkout.
    workers, threads_per_worker : int, optional
        Local cluster shape (see :func:`local_cluster_shape`).
    device : str
        ``"cpu"`` or ``"cuda[:N]"``; a local cluster for CUDA gives its workers ``GPU=1``.
    dashboard : bool or str
        Serve the dask dashboard on loopback (127.0.0.1:8787, or a free port), not at all
        (False), or at this ``host:port`` (another host than loopback is warned about: the
        dashboard has no authentication).
    devices : list of int, optional
        GPUs for local-cuda; default all visible ones.
    processes : bool
        ``local`` only: False runs one worker of threads inside this process (no worker
        process to start, no model to ship: what a run of one block wants, see
        :func:`in_process_run`); its dashboard serves only at an address given as ``dashboard``.

    Returns
    -------
    distributed.deploy.Cluster

    Raises
    ------
    ConfigError
        Unknown kind, missing package or GPUs, bad config file.
    """
    if kind not in CLUSTER_KINDS:
        raise ConfigError(f"cluster must be one of {', '.join(CLUSTER_KINDS)}, got {kind!r}")
    if kind == "local-cuda":
        return _local_cuda_cluster(devices, threads_per_worker, dashboard)
    if kind == "slurm":
        return slurm_cluster(load_cluster_config(config, "slurm"), dashboard=dashboard)
    if kind == "kubernetes":
        return kubernetes_cluster(load_cluster_config(config, "kubernetes"))
    from distributed import LocalCluster

    if not processes:
        _, threads = local_cluster_shape(1)
        # scheduler and worker talk over dask's inproc transport: no sockets besides their HTTP
        # servers (health and metrics routes, and the dashboard where one is asked for: see
        # in_process_dashboard). Without an address dask binds those on every interface (inproc
        # has no host to take one from): they get free loopback ports instead.
        address = dashboard_address(in_process_dashboard(dashboard))
        return LocalCluster(n_workers=1, threads_per_worker=threads_per_worker or threads, processes=False,
                            dashboard_address=address or f"{LOOPBACK}:0",
                            scheduler_kwargs={"dashboard": address is not None},
                            worker_dashboard_address=f"{LOOPBACK}:0", worker_class=_in_process_worker(),
                            resources={"GPU": 1} if str(device).startswith("cuda") else None, silence_logs=40)
    remove_orphan_semaphores()  # left by runs killed outright
    n, threads = local_cluster_shape(workers)
    before = _semaphores("/dev/shm")
    cluster = LocalCluster(
        n_workers=n, threads_per_worker=threads_per_worker or threads, processes=True,
        dashboard_address=dashboard_address(dashboard), host=LOOPBACK,
        resources={"GPU": 1} if str(device).startswith("cuda") else None, silence_logs=40,
    )
    register_semaphores(_semaphores("/dev/shm") - before)
    _watch_semaphores(before | _semaphores("/dev/shm"))  # the run makes a few more (model loading)
    return cluster


def tls_security(ca_file: str, cert: str, key: str | None = None):
    """A ``distributed.Security`` for a ``tls://`` scheduler (encryption required)."""
    from distributed import Security

    for what, path in (("CA file", ca_file), ("certificate", cert), ("key", key)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"TLS {what} {path} does not exist")
    return Security(tls_ca_file=ca_file, tls_client_cert=cert, tls_client_key=key, require_encryption=True)


@contextlib.contextmanager
def cluster_client(
    scheduler: str | None = None,
    *,
    cluster: str = "local",
    config=None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    device: str = "cpu",
    dashboard: bool | str = True,
    quiet: bool = False,
    security=None,
    processes: bool = True,
) -> Iterator:
    """Yield a ``distributed.Client``: to ``scheduler`` if given, else to a new cluster.

    Parameters
    ----------
    scheduler : str, optional
        Address of an existing scheduler (``tcp://host:8786`` or ``tls://``). It is left running.
    cluster : str
        Kind of cluster to start otherwise (see :func:`make_cluster`); closed afterwards.
    config : str or os.PathLike, optional
        Config file of a slurm / kubernetes cluster.
    workers, threads_per_worker, device, dashboard
        See :func:`make_cluster`.
    quiet : bool
        Do not print the cluster and its dashboard address.
    security : distributed.Security, optional
        TLS settings (see :func:`tls_security`).
    processes : bool
        See :func:`make_cluster`; an in-process cluster's worker state (models built, chunks
        cached) is forgotten when it closes, so the calling process does not keep it.
    """
    from distributed import Client

    if scheduler is not None:
        if not str(scheduler).startswith(_ADDRESS_PREFIXES):
            raise ConfigError(f"scheduler must be an address like tcp://host:8786, got {scheduler!r}")
        if str(scheduler).startswith("tls://") and security is None:
            raise ConfigError(f"scheduler {scheduler} uses TLS: give --tls-ca-file, --tls-cert and --tls-key")
        try:
            client = Client(scheduler, security=security, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"could not connect to the scheduler at {scheduler} within {CONNECT_TIMEOUT_S} s "
                              f"({type(exc).__name__}: {exc}); is it running and reachable?") from None
        try:
            if not quiet:
                print(f"bigcare: connected to {scheduler}; dashboard: {client.dashboard_link}", flush=True)
            yield client
        finally:
            client.close()
        return

    started = make_cluster(cluster, config=config, workers=workers, threads_per_worker=threads_per_worker,
                           device=device, dashboard=dashboard, processes=processes)
    try:
        scale_cluster(started, cluster, config)
        client = Client(started)
        try:
            if not quiet:
                info = client.scheduler_info()["workers"]
                threads = sum(w["nthreads"] for w in info.values())
                if not dashboard:
                    link = "(disabled)"
                elif processes or in_process_dashboard(dashboard):
                    link = client.dashboard_link
                else:
                    link = "(not served for one block in process; pass an address to serve it)"
                where = f"{len(info)} worker process(es)" if processes else "its worker in this process"
                print(f"bigcare: {cluster} cluster with {where}, {threads} thread(s); dashboard: {link}", flush=True)
            yield client
        finally:
            client.close()
    finally:
        started.close()
        if not processes:
            forget_worker_state()


def in_process_run(n_blocks: int, cluster: str, workers: int | None) -> bool:
    """Whether a run that starts its own cluster should run its worker in this process.

    A run of one block on a local cluster of the default shape: starting a worker process,
    importing torch there and shipping the model to it cost 4 s of a 64 x 256 x 256 run's 16 s
    on the project's 2-core VM (benchmarks/RESULTS.md), while one block gains nothing from a
    process of its own. Runs of more blocks keep worker processes: a nanny restarts a worker
    that dies or outgrows its memory, and the calling process (a notebook) is not at risk.
    """
    return n_blocks == 1 and cluster == "local" and workers is None


def _in_process_worker():
    """The worker class of an in-process cluster: a ``distributed.Worker`` whose HTTP server
    listens where LocalCluster says (loopback) without the bokeh pages that LocalCluster turns
    on along with that address (0.5 s to import, nothing to see for one block)."""
    from distributed import Worker

    class InProcessWorker(Worker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "dashboard": False})

    return InProcessWorker


def in_process_dashboard(dashboard: bool | str) -> bool | str:
    """The dashboard of a cluster whose worker runs in this process (one block): only where an
    address was given. The default (True) serves none: a one-block run shows one task, and
    starting the dashboard cost 0.36 s of a 14-s run on the project's VM (benchmarks/RESULTS.md)."""
    return dashboard if isinstance(dashboard, str) else False


def forget_worker_state() -> None:
    """Drop what workers of this process built or cached: predictors, shipped models, chunks."""
    from bigcare.predictors.base import forget_predictors
    from bigcare.store import chunkcache

    forget_predictors()
    chunkcache.clear()


def add_cluster_arguments(parser) -> None:
    """Add --cluster, --cluster-config, --scheduler, --workers and the TLS options to a parser."""
    g = parser.add_argument_group("cluster")
    g.add_argument("--cluster", default="local", choices=CLUSTER_KINDS,
                   help="cluster to start when no --scheduler is given [local]")
    g.add_argument("--cluster-config", default=None, metavar="FILE",
                   help="config of a slurm / kubernetes cluster [cluster/<kind>.yaml]")
    g.add_argument("--scheduler", default=None, help="address of an existing dask scheduler, e.g. tcp://host:8786")
    g.add_argument("--workers", type=int, default=None, help="local worker processes when no scheduler is given")
    g.add_argument("--dashboard", default=True, metavar="HOST:PORT",
                   help="serve the dask dashboard of a cluster started here at this address instead of "
                        "127.0.0.1:8787 (e.g. 0.0.0.0:8787; it has no authentication: warned); a one-block "
                        "run in this process serves one only when given this")
    g.add_argument("--tls-ca-file", default=None, help="CA certificate for a tls:// scheduler")
    g.add_argument("--tls-cert", default=None, help="client certificate for a tls:// scheduler")
    g.add_argument("--tls-key", default=None, help="client key for a tls:// scheduler")


def cluster_kwargs(args) -> dict:
    """The keyword arguments of :func:`bigcare.restore` that the cluster options set."""
    security = None
    if args.tls_ca_file or args.tls_cert:
        if not (args.tls_ca_file and args.tls_cert):
            raise ConfigError("TLS needs both --tls-ca-file and --tls-cert (and --tls-key unless the "
                              "certificate file holds the key)")
        security = tls_security(args.tls_ca_file, args.tls_cert, args.tls_key)
    return {"scheduler": args.scheduler, "cluster": args.cluster, "cluster_config": args.cluster_config,
            "workers": args.workers, "security": security, "dashboard": args.dashboard}
