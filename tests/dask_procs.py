"""A real multi-process dask cluster for tests: `dask scheduler` and `dask worker` subprocesses
on 127.0.0.1 (random free ports), as they would run on separate nodes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class DaskProcesses:
    """Start ``dask scheduler`` and ``n`` ``dask worker`` processes (each one thread, behind a
    nanny that restarts it if it dies); ``close()`` ends exactly the processes started here."""

    def __init__(self, workdir: Path, n_workers: int = 2, *, scheduler_args=(), worker_args=(), protocol="tcp"):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.scheduler_file = self.workdir / "scheduler.json"
        self.procs: list[subprocess.Popen] = []
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.env = env
        self.logs = []
        # --no-dashboard leaves the HTTP server (health, metrics) on every interface unless it is given an address
        self._start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--dashboard-address",
                     "127.0.0.1:0", "--protocol", protocol,
                     "--scheduler-file", str(self.scheduler_file), *scheduler_args], "scheduler")
        deadline = time.time() + 60
        while not self.scheduler_file.exists() or not self.scheduler_file.read_text().strip():
            if time.time() > deadline or self.procs[0].poll() is not None:
                self.close()
                raise RuntimeError(f"dask scheduler did not start: {self.log('scheduler')}")
            time.sleep(0.1)
        time.sleep(0.2)
        self.address = json.loads(self.scheduler_file.read_text())["address"]
        for i in range(n_workers):
            self.add_worker(f"w{i}", worker_args)

    def _start(self, args, name):
        log = open(self.workdir / f"{name}.log", "w")
        self.logs.append(log)
        # workers run in their own folder: they must not rely on the client's working directory
        cwd = self.workdir / name
        cwd.mkdir(exist_ok=True)
        self.procs.append(subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=log, stderr=subprocess.STDOUT,
                                           env=self.env, cwd=cwd, start_new_session=True))

    def add_worker(self, name: str, worker_args=()):
        self._start(["worker", self.address, "--nthreads", "1", "--nworkers", "1", "--host", "127.0.0.1",
                     "--no-dashboard", "--dashboard-address", "127.0.0.1:0", "--name", name, "--death-timeout", "60", *worker_args], name)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def close(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)  # the process group of this one process we started
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        for log in self.logs:
            log.close()
