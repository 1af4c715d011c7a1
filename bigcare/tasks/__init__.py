"""Running work on a cluster: the one task runner, the block task, shared-memory slots, clusters.

- ``runner.py``: :func:`run_tasks`, for every kind of task (restore blocks, pyramid chunks,
  percentile samples, training patches) on a dask client or a local thread pool, with retries;
- ``block.py``: :class:`RunSpec` and :func:`run_block`, the restore task (read, predict, write);
- ``slots.py``: same-host results through /dev/shm instead of sockets;
- ``cluster.py``: starting or joining local, local-cuda, SLURM and Kubernetes clusters.
"""
