"""Model-only throughput of CARE's default 3D U-Net per execution path.

CSBDeep's default 3D CARE net (depth 2, 32 filters, kernel 3, ~1 M parameters, random weights)
on a 64x256x256 float32 volume in one piece (CSBDeep + TensorFlow: 0.57 Mvoxel/s at 3.5 GiB peak
RSS on this 2-core machine) and on a typical engine block read region (112x208x208), through
:func:`bigcare.predictors.fastpath.prepare_model`:

    fp32 plain | fp32 channels_last (+oneDNN for every conv) | fp32 channels_last + compile
    bf16 plain | bf16 channels_last | bf16 channels_last + compile   (+ fp16 channels_last on CUDA)

compile = torch.compile(dynamic=False), with inductor freezing on CPU. ``--variants`` also takes
"fp32 compile", "bf16 compile" (no channels_last) and "fp32 cl torch-conv" (channels_last, the
conv algorithm left to torch).

Timings are taken in one process, variants interleaved (order rotated every round), medians of
``--repeats`` rounds after one warm-up call (compilation happens there and is reported as
"compile s": first call minus the median call). Mvoxel per CPU-second (process CPU time over all
its threads) is printed too: it depends less on what else runs on a shared machine. Errors are
against fp32 plain on the same input: relative L2 and max abs / max |reference|. Peak RSS of
each variant is measured in a fresh process (VmHWM, see :func:`vm_hwm_mb`; import, model,
input, prepare, one call; compiling variants include compilation, not inductor's compile
workers); on CUDA the peak allocated GPU memory too. ONNX Runtime / OpenVINO are timed only if installed (they
are not on the project machine).

    python benchmarks/cpu_paths.py                    # ~10 min on 2 cores
    python benchmarks/cpu_paths.py --quick            # small shapes, 2 rounds, ~3 min
    python benchmarks/cpu_paths.py --threads-check    # also 1 process x 2 threads vs 2 x 1
    python benchmarks/cpu_paths.py --device cuda      # same variants on a GPU

Figures are printed last; the last line is JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

#: name -> (precision, channels_last, compile)
VARIANTS = {
    "fp32 plain": ("fp32", False, False),
    "fp32 channels_last": ("fp32", True, False),
    "fp32 cl+compile": ("fp32", True, True),
    "bf16 plain": ("bf16", False, False),
    "bf16 channels_last": ("bf16", True, False),
    "bf16 cl+compile": ("bf16", True, True),
}
CUDA_EXTRA = {"fp16 channels_last": ("fp16", True, False)}
#: selectable with --variants
OTHER = {"fp32 compile": ("fp32", False, True), "bf16 compile": ("bf16", False, True),
         "fp32 cl torch-conv": ("fp32", True, False)}
CSBDEEP = {"Mvox_s": 0.57, "peak_rss_gib": 3.5}


def build_model(seed=0):
    from bigcare.models import UNet, UNetConfig

    torch.manual_seed(seed)
    return UNet(UNetConfig(ndim=3)).eval()


def prepare(model, name, device, variants):
    from bigcare.predictors.fastpath import prepare_model

    precision, cl, comp = variants[name]
    # "plain" is today's CAREPredictor call; "torch-conv" leaves the conv choice to torch
    onednn = False if ("plain" in name or "torch-conv" in name) else None
    return prepare_model(model, device=device, precision=precision, channels_last=cl, compile=comp,
                         onednn_conv=onednn, compile_min_calls=1)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(f, x, device):
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    y = f(x)
    sync(device)
    return time.perf_counter() - t, time.process_time() - c, y


def input_volume(shape, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((1, 1) + tuple(shape), generator=g).to(device)


def errors(y, ref):
    y, ref = y["restored"].float().cpu(), ref["restored"].float().cpu()
    rel_l2 = float((y - ref).norm() / ref.norm())
    return rel_l2, float((y - ref).abs().max() / ref.abs().max())


def bench_shape(shape, args, variants):
    """Interleaved timings of every variant on one input shape."""
    model = build_model()
    x = input_volume(shape, args.device)
    vox = x.numel()
    fs, first = {}, {}
    warm = input_volume((16, 64, 64), args.device)
    for name in variants:
        fs[name] = prepare(model, name, args.device, variants)
        if variants[name][2]:  # compiles for this shape
            first[name] = timed(fs[name], x, args.device)[0]
            print(f"  {shape} {name}: first call {first[name]:.1f} s", flush=True)
        else:
            fs[name](warm)  # oneDNN / cuDNN initialisation
    ref = fs["fp32 plain"](x)
    wall = {n: [] for n in variants}
    cpu = {n: [] for n in variants}
    err = {}
    names = list(variants)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            w, c, y = timed(fs[name], x, args.device)
            wall[name].append(w)
            cpu[name].append(c)
            err[name] = errors(y, ref)
            del y
        print(f"  round {r + 1}/{args.repeats} done ({os.getloadavg()[0]:.1f} load)", flush=True)
    rows = {}
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        rows[name] = {"median_s": w, "Mvox_s": vox / w / 1e6, "Mvox_per_cpu_s": vox / c / 1e6,
                      "all_s": [round(v, 2) for v in wall[name]],
                      "compile_s": max(0.0, first[name] - w) if name in first else 0.0,
                      "paths": fs[name].paths, "rel_l2": err[name][0], "max_rel": err[name][1]}
    base = rows["fp32 plain"]["median_s"]
    for row in rows.values():
        row["speedup_vs_fp32_plain"] = base / row["median_s"]
    return {"shape": list(shape), "voxels": vox, "rows": rows}


def vm_hwm_mb():
    """Peak RSS of this process's address space (VmHWM). Not ``ru_maxrss``: Linux carries the
    parent's peak over fork+exec into it (a child of a 700 MB parent reports >= 700 MB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(args):
    """One fresh process: model, input, prepare, one call; peak RSS as JSON on stdout."""
    model = build_model()
    x = input_volume(args.shape, args.device)
    base = vm_hwm_mb()
    f = prepare(model, args.rss_child, args.device, {**VARIANTS, **CUDA_EXTRA, **OTHER})
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    f(x)
    sync(args.device)
    out = {"variant": args.rss_child, "seconds": time.perf_counter() - t, "base_rss_mb": base,
           "peak_rss_mb": vm_hwm_mb(), "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def run_child(argv, threads, stdin=None):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, *argv, "--threads", str(threads)]
    return subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def child_json(proc):
    out, err = proc.communicate()
    if proc.returncode:
        return {"error": (err or out).strip().splitlines()[-1:]}
    return json.loads(out.strip().splitlines()[-1])


def bench_rss(shape, args, variants):
    rows = {}
    for name in variants:
        argv = ["--rss-child", name, "--shape", *map(str, shape), "--device", args.device]
        rows[name] = child_json(run_child(argv, args.threads))
        print(f"  rss {name}: {rows[name]}", flush=True)
    return rows


def time_child(args):
    """Fresh process: `--repeats` timed calls of one variant (after a warm-up); JSON stdout."""
    f = prepare(build_model(), args.time_child, args.device, {**VARIANTS, **OTHER})
    x = input_volume(args.shape, args.device)
    f(x)
    print("ready", flush=True)
    sys.stdin.readline()  # the parent starts all children's timing together
    t = time.perf_counter()
    for _ in range(args.repeats):
        f(x)
    print(json.dumps({"seconds": time.perf_counter() - t, "voxels": x.numel() * args.repeats}))


def threads_check(shape, args):
    """Aggregate Mvoxel/s: 1 process x 2 threads vs 2 processes x 1 thread, interleaved."""
    res = {"1x2": [], "2x1": []}
    for r in range(args.repeats):
        for layout, (procs, threads) in (("1x2", (1, 2)), ("2x1", (2, 1))):
            argv = ["--time-child", args.threads_variant, "--shape", *map(str, shape), "--repeats", "2"]
            ps = [run_child(argv, threads, stdin=subprocess.PIPE) for _ in range(procs)]
            for p in ps:
                assert p.stdout.readline().strip() == "ready"
            t = time.perf_counter()
            for p in ps:
                p.stdin.write("go\n")
                p.stdin.flush()
            outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in ps]
            wall = time.perf_counter() - t
            res[layout].append(sum(o["voxels"] for o in outs) / wall / 1e6)
        print(f"  threads round {r + 1}: {res['1x2'][-1]:.3f} vs {res['2x1'][-1]:.3f} Mvox/s", flush=True)
    return {k: statistics.median(v) for k, v in res.items()} | {"all": res, "variant": args.threads_variant}


def table(result, rss):
    lines = [f"{'variant':<20} {'shape':<14} {'Mvox/s':>7} {'x fp32':>6} {'Mvox/cpu-s':>10} "
             f"{'compile s':>9} {'rel L2':>8} {'max rel':>8} {'peak RSS':>9}"]
    for part in result:
        for name, row in part["rows"].items():
            r = rss.get(name, {}) if part is result[0] else {}
            peak = f"{r['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in r else ""
            lines.append(f"{name:<20} {'x'.join(map(str, part['shape'])):<14} {row['Mvox_s']:>7.3f} "
                         f"{row['speedup_vs_fp32_plain']:>6.2f} {row['Mvox_per_cpu_s']:>10.3f} "
                         f"{row['compile_s']:>9.1f} {row['rel_l2']:>8.1e} {row['max_rel']:>8.1e} {peak:>9}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="32x128x128 and 56x104x104, 2 rounds")
    p.add_argument("--smoke", action="store_true", help="seconds: 16x64x64, two eager variants, one round, no RSS")
    p.add_argument("--volume", type=int, nargs=3, default=(64, 256, 256))
    p.add_argument("--block", type=int, nargs=3, default=(112, 208, 208))
    p.add_argument("--variants", nargs="+", default=None, help="subset of variant names")
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--no-block", action="store_true", help="time the volume shape only")
    p.add_argument("--threads-check", action="store_true")
    p.add_argument("--threads-variant", default="bf16 channels_last")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    p.add_argument("--time-child", help=argparse.SUPPRESS)
    p.add_argument("--shape", type=int, nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_child:
        return rss_child(args)
    if args.time_child:
        return time_child(args)
    if args.quick:
        args.volume, args.block, args.repeats = (32, 128, 128), (56, 104, 104), min(args.repeats, 2)
    if args.smoke:  # a rename breaks the test suite, not a measurement months later
        args.volume, args.repeats, args.no_block, args.no_rss = (16, 64, 64), 1, True, True
        args.variants = args.variants or ["bf16 channels_last"]
    variants = dict(VARIANTS, **(CUDA_EXTRA if args.device.startswith("cuda") else {}))
    if args.variants:
        every = {**VARIANTS, **CUDA_EXTRA, **OTHER}
        variants = {n: every[n] for n in ["fp32 plain"] + [v for v in args.variants if v != "fp32 plain"]}
    runtimes = {m: importlib.util.find_spec(m) is not None for m in ("onnxruntime", "openvino")}
    load0 = os.getloadavg()
    shapes = [tuple(args.volume)] + ([] if args.no_block else [tuple(args.block)])
    result = [bench_shape(s, args, variants) for s in shapes]
    rss = {} if args.no_rss else bench_rss(tuple(args.volume), args, variants)
    threads = threads_check(tuple(args.block), args) if args.threads_check else None
    info = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
            "torch": torch.__version__, "device": args.device, "threads": args.threads,
            "load_before_after": [load0[0], os.getloadavg()[0]], "runtimes_installed": runtimes,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "date": time.strftime("%Y-%m-%d")}
    print("\n" + table(result, rss))
    v = result[0]["rows"]
    for name in v:
        peak = rss.get(name, {}).get("peak_rss_mb")
        share = f", peak RSS {peak / 1024:.2f} GiB = {peak / 1024 / CSBDEEP['peak_rss_gib']:.0%} of CSBDeep's" \
            if peak else ""
        print(f"{name}: {v[name]['Mvox_s'] / CSBDEEP['Mvox_s']:.2f}x CSBDeep's 0.57 Mvoxel/s{share}")
    if threads:
        print(f"threads ({threads['variant']}, block): 1 proc x 2 threads {threads['1x2']:.3f} Mvox/s, "
              f"2 procs x 1 thread {threads['2x1']:.3f} Mvox/s")
    print("ONNX Runtime / OpenVINO installed:", runtimes, "(not timed when absent)")
    print(json.dumps({"info": info, "shapes": result, "rss": rss, "threads": threads}, default=str))


if __name__ == "__main__":
    main()
