"""bigcare against CSBDeep + TensorFlow, side by side, interleaved (issue 20, item 3).

Needs a CSBDeep environment (not a bigcare dependency)::

    python3 -m venv V && V/bin/pip install csbdeep==0.8.2 tensorflow-cpu
    python benchmarks/vs_csbdeep.py --venv V [--shape 64 256 256] [--rounds 3]

CSBDeep's default 3D CARE network (``Config("ZYX")``: depth 2, 32 first filters, kernel 3,
996,769 parameters, random weights) predicts the uint16 volume in memory, untiled (``n_tiles``
with ``--n-tiles``), percentile normalization 1 / 99.8, after one warm-up call on a crop; bigcare
restores the same volume as an OME-Zarr file to file with ``bigcare.restore`` defaults (fresh
local cluster, pyramid, ``--backend auto``: OpenVINO on CPU where installed), the same
architecture, ``--precision fp32`` and ``auto`` (``--backends auto torch`` adds torch's), timed as the
whole call's ``wall_seconds`` (the local cluster's start, percentiles, model shipping, blocks,
pyramid) and, beside it, the blocks' own ``seconds``. Each variant runs in a fresh process; peak
RSS is VmHWM of that process plus, for bigcare, its worker's (none apart when a one-block run
ran its worker in the process). Variants rotate each round. ``--in-memory`` adds bigcare's network
alone on the whole volume in memory (``bigcare.predict`` from the model folder, in a fresh process,
no warm-up): the reference that file to file is held to for a volume that fits (item 2). Before
each variant the parent touches as much memory as that variant used (``prefault``; off with
``--no-prefault``): on a VM whose host takes freed memory back, first touches otherwise cost
seconds per GB at random.
Without ``--venv`` (or with ``--smoke``) only bigcare runs. Prints a table, then JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CSBDEEP = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from csbdeep.data import PadAndCropResizer, PercentileNormalizer
    from csbdeep.models import CARE, Config
    x = np.load(sys.argv[1]); n_tiles = json.loads(sys.argv[3])
    model = CARE(Config("ZYX", n_channel_in=1, n_channel_out=1), "bench", basedir=sys.argv[2])
    kw = dict(normalizer=PercentileNormalizer(1, 99.8), resizer=PadAndCropResizer())
    model.predict(x[:16, :64, :64], "ZYX", **kw)
    t = time.perf_counter()
    model.predict(x, "ZYX", n_tiles=n_tiles, **kw)
    s = time.perf_counter() - t
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    print(json.dumps({"seconds": s, "peak_rss_mb": int(hwm) / 1024, "params": model.keras_model.count_params()}))
""")

BIGCARE = textwrap.dedent("""
    import json, sys
    import bigcare
    r = bigcare.restore(sys.argv[1], sys.argv[2], sys.argv[3], precision=sys.argv[4], backend=sys.argv[5],
                        progress=False)
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    inproc = r.cluster.get("in_process", False)  # a one-block run: its worker was this process
    print(json.dumps({"seconds": r.wall_seconds, "blocks_seconds": r.seconds, "blocks": r.blocks_total,
                      "halo_overhead": r.halo_overhead, "precision": r.precision, "backend": r.backend,
                      "peak_rss_mb": int(hwm) / 1024 + (0 if inproc else r.peak_worker_rss_mb),
                      "client_rss_mb": int(hwm) / 1024, "worker_rss_mb": r.peak_worker_rss_mb, "in_process": inproc}))
""")

# bigcare's network alone on the whole volume in memory (issue 20, item 2's reference for a volume
# that fits): `bigcare.predict` from the model folder to the output array, in a fresh process
# like the rest (model loading, export and the first call included; no warm-up, no files)
BIGCARE_IN_MEMORY = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import bigcare
    x = np.load(sys.argv[1])
    t = time.perf_counter()
    y = bigcare.predict(x, sys.argv[3], axes="zyx", precision=sys.argv[4], backend=sys.argv[5])["restored"]
    s = time.perf_counter() - t
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    print(json.dumps({"seconds": s, "peak_rss_mb": int(hwm) / 1024, "shape": list(y.shape)}))
""")


def prefault(gigabytes: float) -> float:
    """Touch this much fresh memory and free it; returns the seconds it took.

    On the project's VM (virtio_balloon) memory freed for a while goes back to the host, and the
    next process to touch it pays 1.6-2.3 s per GB (0.12 s/GB right after another process freed
    it): a 3.4-GB CSBDeep call took 10 s or 20.6 s by that alone. Touching what the next variant
    will use just before it starts makes the rounds measure the tools instead of the host; a
    machine without a balloon pays nothing here."""
    import numpy as np

    t = time.perf_counter()
    block = np.ones(int(gigabytes * 2**30) // 8)
    del block
    return time.perf_counter() - t


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 2**20


def _run(cmd: list[str], prefault_gb: float = 0.0) -> dict:
    touched = prefault(prefault_gb) if prefault_gb > 0 else 0.0
    load = os.getloadavg()[0]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{cmd[0]} -c ... {' '.join(cmd[3:])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), load_before=load, prefault_s=touched)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", default=None, help="a venv with csbdeep==0.8.2 and tensorflow-cpu")
    p.add_argument("--shape", type=int, nargs=3, default=(64, 256, 256))
    p.add_argument("--n-tiles", type=int, nargs=3, default=None, help="CSBDeep's n_tiles (default: untiled)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precisions", nargs="+", default=["fp32", "auto"], help="bigcare precisions [fp32 auto]")
    p.add_argument("--backends", nargs="+", default=["auto"], choices=["auto", "torch"],
                   help="bigcare backends: auto (the default: OpenVINO on CPU where installed), torch [auto]")
    p.add_argument("--no-prefault", dest="prefault", action="store_false",
                   help="do not touch the next variant's memory before it starts (see prefault())")
    p.add_argument("--in-memory", action="store_true",
                   help="also bigcare.predict on the whole volume in memory, per precision and backend (item 2)")
    p.add_argument("--smoke", action="store_true", help="seconds, tiny sizes, bigcare only (the test suite runs it)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import numpy as np
    from engine import make_volume, save_unet

    shape = (16, 64, 64) if args.smoke else tuple(args.shape)
    rounds = 1 if args.smoke else args.rounds
    tmp = Path(tempfile.mkdtemp(prefix="bigcare-vs-csbdeep-"))
    vol = make_volume(tmp / "in.ome.zarr", shape, (shape[0], shape[1], max(1, shape[2] // 2)))
    np.save(tmp / "in.npy", np.asarray(vol.array()[...]))
    model = save_unet(tmp / "model", n_filter_base=4 if args.smoke else 32)
    # the defaults (backend auto: OpenVINO on CPU where installed), and torch's fp32 beside them
    variants = {f"bigcare {p}{'' if b == 'auto' else ' torch'}": [
        sys.executable, "-c", BIGCARE, str(tmp / "in.ome.zarr"), str(tmp / f"out_{p}_{b}"), str(model), p, b]
        for p, b in ((p, b) for p in args.precisions for b in args.backends)}
    if args.in_memory or args.smoke:
        variants |= {f"bigcare {p}{'' if b == 'auto' else ' torch'} in memory": [
            sys.executable, "-c", BIGCARE_IN_MEMORY, str(tmp / "in.npy"), "-", str(model), p, b]
            for p, b in ((p, b) for p in args.precisions for b in args.backends)}
    if args.venv and not args.smoke:
        variants = {"csbdeep": [str(Path(args.venv) / "bin" / "python"), "-c", CSBDEEP, str(tmp / "in.npy"),
                                str(tmp / "csbdeep"), json.dumps(args.n_tiles)], **variants}
    names = list(variants)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            cmd = list(variants[name])
            if name.startswith("bigcare") and cmd[4] != "-":  # a fresh output each round (the same one would resume: nothing to do)
                cmd[4] = f"{cmd[4]}_{r}.ome.zarr"
            # what this variant used last time (the first round: the largest use seen so far), within
            # 80% of the memory available now
            seen = [x["peak_rss_mb"] for x in runs[name]] or [x["peak_rss_mb"] for rows in runs.values() for x in rows]
            gb = min(max(seen or [4096]) / 1024, 0.8 * _available_gb()) if args.prefault and not args.smoke else 0.0
            runs[name].append(_run(cmd, gb))
    vox = int(np.prod(shape))
    table = {}
    for name, rows in runs.items():
        s = statistics.median(x["seconds"] for x in rows)
        blocks = statistics.median(x.get("blocks_seconds", x["seconds"]) for x in rows)
        table[name] = {"Mvox_s": vox / s / 1e6, "seconds_median": s, "blocks_Mvox_s": vox / blocks / 1e6,
                       "peak_rss_mb": max(x["peak_rss_mb"] for x in rows),
                       "loads": [round(x["load_before"], 2) for x in rows], "runs": rows}
    if "csbdeep" in table:
        for row in table.values():
            row["x_csbdeep"] = row["Mvox_s"] / table["csbdeep"]["Mvox_s"]
            row["rss_vs_csbdeep"] = row["peak_rss_mb"] / table["csbdeep"]["peak_rss_mb"]
    for name, row in table.items():
        print(f"{name:20s} {row['Mvox_s']:.3f} Mvox/s ({row.get('x_csbdeep', float('nan')):.2f}x CSBDeep; blocks only "
              f"{row['blocks_Mvox_s']:.3f}), "
              f"peak RSS {row['peak_rss_mb']:.0f} MB, loads {row['loads']}")
    report = {"shape": shape, "n_tiles": args.n_tiles, "rounds": rounds, "table": table}
    print(json.dumps(report, default=str))
    return report


if __name__ == "__main__":
    main()
