"""A real single-host SLURM cluster for the tests (tests/slurm_cluster.sh), and a test copy of
cluster/slurm.yaml in which only the lines marked CHANGE differ.

The fixture installs slurm-wlm and munge when missing (apt-get; .ci/run does the same first)
and skips, with the reason, where they cannot be installed; daemons that are installed but do
not start fail the tests (with the end of their logs)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().with_name("slurm_cluster.sh")
SHIPPED = Path(__file__).resolve().parent.parent / "cluster" / "slurm.yaml"

#: The CHANGE lines of cluster/slurm.yaml for this machine: a CPU partition, 1-core jobs with
#: little memory (2 cores here), loopback (comm and HTTP), no GPU request, no modules, at most 2 jobs.
TEST_CHANGES = {
    "queue": "debug",
    "cores": "1",
    "memory": "2GiB",
    "walltime": '"00:30:00"',
    "interface": "lo",
    "--gres=gpu:1": '"--export=ALL"',  # (the default: jobs see SLURM_CONF and PATH)
    "module load cuda": '"echo no modules here"',
    "source $HOME/venvs/bigcare/bin/activate": '"echo bigcare is installed in this python"',
    "maximum_jobs": "2",
    ":0": '"127.0.0.1:0"',  # workers' HTTP servers on loopback, as everything the tests start
}


def slurm_test_config(path: Path, changes: dict[str, str] | None = None) -> Path:
    """Write a copy of cluster/slurm.yaml with the CHANGE lines set from ``changes``.

    A key is a ``key:`` of the YAML or a list item's text; each must name exactly one line, and
    that line must be marked CHANGE (the test that the shipped file needs nothing else).
    """
    changes = TEST_CHANGES if changes is None else changes
    lines = SHIPPED.read_text().splitlines(keepends=True)
    for key, value in changes.items():
        hits = [i for i, line in enumerate(lines)
                if re.match(rf"\s*{re.escape(key)}:", line) or re.match(rf'\s*- "{re.escape(key)}"', line)]
        assert len(hits) == 1, f"{key!r} names {len(hits)} line(s) of {SHIPPED}"
        line = lines[hits[0]]
        assert "# CHANGE" in line, f"{SHIPPED} line {hits[0] + 1} is not marked CHANGE: {line.strip()}"
        code, comment = line.split("#", 1)
        indent = code[: len(code) - len(code.lstrip())]
        new = f"{indent}{key}: {value}" if not code.lstrip().startswith("-") else f"{indent}- {value}"
        lines[hits[0]] = f"{new.ljust(len(code))} #{comment}"
    path.write_text("".join(lines))
    return path


@dataclass
class Slurm:
    """A running single-host SLURM cluster (``SLURM_CONF`` points at it while the fixture lives)."""

    folder: Path

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _run(self, *args: str) -> str:
        return subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=30,
                              check=True).stdout

    def squeue(self) -> list[tuple[str, str, str]]:
        """(job id, state, name) of the jobs in the queue."""
        out = self._run("squeue", "-h", "-o", "%i|%T|%j")
        return [tuple(line.split("|")) for line in out.splitlines() if line.strip()]  # type: ignore[misc]

    def finished(self) -> dict[str, dict[str, str]]:
        """Job id -> fields (JobState, Name, ...) of every job that ended (jobcomp/filetxt)."""
        path = self.folder / "jobcomp.txt"
        records = {}
        for line in path.read_text().splitlines() if path.exists() else []:
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            records[fields.get("JobId", "")] = fields
        return records

    def scancel(self, job: str) -> None:
        self._run("scancel", job)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n" + "".join(p.read_text().splitlines(keepends=True)[-20:])
                         for p in sorted((self.folder / "log").glob("*.log")))

    def wait_empty(self, timeout: float = 60) -> list:
        """Wait until no job is queued or running; return what is left then."""
        deadline = time.monotonic() + timeout
        while (left := self.squeue()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left


@pytest.fixture(scope="module", name="slurm")
def slurm_fixture(tmp_path_factory):
    """Start munge, slurmctld and slurmd for this module's tests; stop them afterwards."""
    install = subprocess.run(["bash", str(SCRIPT), "install"], capture_output=True, text=True, timeout=900)
    if install.returncode != 0:
        pytest.skip(f"no SLURM here: {install.stderr.strip() or 'slurm_cluster.sh install failed'}")
    folder = tmp_path_factory.mktemp("slurm")
    cluster = Slurm(folder)
    try:
        start = subprocess.run(["bash", str(SCRIPT), "start", str(folder)], capture_output=True, text=True, timeout=120)
        if start.returncode != 0:
            pytest.fail(f"SLURM is installed but did not start: {start.stderr.strip()}\n{cluster.logs()}")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLURM_CONF", str(cluster.conf))
            yield cluster
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], capture_output=True, timeout=120)
