"""Time to start a run over a huge, mostly missing volume (issue 11, item 11).

A 4096 x 32768 x 32768 uint16 image (64 x 256 x 256 chunks, one chunk written) is planned with
the identity predictor into 64 x 256 x 256 blocks: 1,048,576 blocks. Prints the seconds of each
stage before the first block task (plan, percentile pass, output creation, the first 100
blocks of the queue) and this process's peak memory; then the same for a resume with 1,000
blocks marked done (the done markers listed, not read).

    python benchmarks/sparse_start.py [workdir] [--smoke]

``--smoke`` (the test suite runs it): a 256 x 2048 x 2048 volume, 100 blocks marked done.
"""

from __future__ import annotations

import itertools
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from bigcare.predictors.identity import IdentityPredictor
from bigcare.runs.models import resolve_model
from bigcare.runs.volume import measure_volume_run, plan_volume_run, start_volume_run
from bigcare.store.axes import Axis
from bigcare.store.write import create_volume
from bigcare.tasks.block import MARKER


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stages(src: Path, out: Path) -> dict[str, float]:
    ref = resolve_model(IdentityPredictor())
    t = [time.perf_counter()]
    run = plan_volume_run(src, out, ref, block_shape=(64, 256, 256), device="cpu")
    t.append(time.perf_counter())
    measure_volume_run(run)
    t.append(time.perf_counter())
    start_volume_run(run)
    t.append(time.perf_counter())
    first = list(itertools.islice(run.pending(), 100))
    t.append(time.perf_counter())
    assert len(first) == 100
    names = ["plan", "percentiles", "outputs + done markers", "first 100 blocks"]
    return {"state": run.state, "blocks": len(run.plan), "to do": run.n_todo,
            **{n: b - a for n, a, b in zip(names, t, t[1:])}, "total": t[-1] - t[0]}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    smoke = "--smoke" in argv
    argv = [a for a in argv if a != "--smoke"]
    root = Path(argv[0] if argv else tempfile.mkdtemp(prefix="bigcare-sparse-"))
    src, out = root / "huge.ome.zarr", root / "out.ome.zarr"
    shape = (256, 2048, 2048) if smoke else (4096, 32768, 32768)
    volume = create_volume(src, shape=shape, dtype="uint16", chunks=(64, 256, 256),
                           axes=[Axis.named(a) for a in "zyx"], scale=(1.0, 1.0, 1.0), overwrite=True)
    volume.array(0, mode="r+")[:64, :256, :256] = np.random.default_rng(0).integers(0, 1000, (64, 256, 256))
    print("fresh :", stages(src, out), f"peak {peak_mb():.0f} MB")
    marker = zarr.open_array(store=str(out), path=MARKER, mode="r+")
    if smoke:
        marker[:1, :4, :25] = 1  # 100 blocks done
    else:
        marker[:1, :8, :125] = 1  # 1,000 blocks done
    print("resume:", stages(src, out), f"peak {peak_mb():.0f} MB")


if __name__ == "__main__":
    main()
