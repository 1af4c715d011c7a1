"""What ``bigcare.predict`` adds to the bare forward pass (issue 20, item 2), and where it goes.

CSBDeep's default 3D CARE network (depth 2, 32 filters, 996,769 parameters, random weights) on a
uint16 region, one process, ``--threads`` torch threads. Per precision, interleaved rounds of:

- ``bare``: the prepared network alone (``FastModel``'s module under its inference/autocast
  context) on an input already normalized, float32, channels-last, on the device;
- ``predict``: what a block task runs, :func:`bigcare.predictors.base.predict_region` on the raw
  region (axis layout, normalization, padding, tensor and layout conversions, the network,
  crop, copy out, denormalization) and the cast to the float32 output.

and, once per precision, each stage of ``predict`` timed on its own (``stages``). The overhead is
``predict / bare - 1`` (median of the rounds).

    python benchmarks/predict_overhead.py [--shape 64 256 256] [--repeats 3] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def stages(pred, layout, data, normalizer) -> dict[str, float]:
    """Each step of predict_region / CAREPredictor.predict timed on its own (seconds)."""
    from bigcare.predictors.fastpath import _memory_format

    s: dict[str, float] = {}
    s["layout_to_core"], x = _timed(layout.to_core, data)
    s["normalize"], xn = _timed(normalizer.normalize, x)
    s["to_tensor"], tensor = _timed(lambda a: torch.from_numpy(np.ascontiguousarray(a[None], dtype=np.float32)), xn)
    run = pred._run
    s["to_channels_last"], xc = _timed(lambda t: t.contiguous(memory_format=_memory_format(t.dim())), tensor)
    with run._context():
        s["network"], raw = _timed(run._module, xc)
    s["output_float_contiguous"], out = _timed(lambda r: {k: v.float().contiguous() for k, v in r.items()}, raw)
    s["to_numpy_copy"], y = _timed(lambda o: {k: v.cpu().numpy().copy() for k, v in o.items()}, out)
    s["denormalize"], yd = _timed(lambda d: {k: pred.denormalize(k, v[0], normalizer) for k, v in d.items()}, y)
    s["layout_from_core_cast"], _ = _timed(lambda d: {k: layout.from_core(v).astype(np.float32, copy=False)
                                                      for k, v in d.items()}, yd)
    s["everything_but_network"] = sum(v for k, v in s.items() if k != "network")
    return s


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(64, 256, 256))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (the test suite runs it): no figures")
    args = p.parse_args(argv)
    from engine import make_volume, save_unet

    from bigcare.blocks.layout import AxisLayout
    from bigcare.normalization import array_normalizer
    from bigcare.predictors.base import load_predictor, predict_region
    from bigcare.predictors.fastpath import _memory_format

    shape = (16, 32, 32) if args.smoke else tuple(args.shape)
    repeats = 1 if args.smoke else args.repeats
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bigcare-overhead-"))
    model = save_unet(tmp / "model", n_filter_base=4 if args.smoke else 32)
    vol = make_volume(tmp / "v.ome.zarr", shape, shape)
    data = np.asarray(vol.array()[...])
    layout = AxisLayout("zyx", "zyx", 1)
    normalizer = array_normalizer(data, None, 1.0, 99.8, name="bench")
    load = [os.getloadavg()[0]]
    report: dict = {"shape": shape, "threads": args.threads, "torch": torch.__version__}
    for precision in args.precisions:
        pred = load_predictor(str(model), device="cpu", precision=precision)
        xn = torch.from_numpy(normalizer.normalize(data[None])[None].astype(np.float32))
        xc = xn.contiguous(memory_format=_memory_format(xn.dim()))
        run = pred._run

        def bare(run=run, xc=xc):
            with run._context():
                return run._module(xc)

        def full(pred=pred):
            return {k: v.astype(np.float32, copy=False) for k, v in predict_region(pred, layout, data, normalizer).items()}

        bare()
        full()  # warm-up (oneDNN primitives)
        times: dict[str, list[float]] = {"bare": [], "predict": []}
        for r in range(repeats):
            order = (("bare", bare), ("predict", full)) if r % 2 == 0 else (("predict", full), ("bare", bare))
            for name, fn in order:
                times[name].append(_timed(fn)[0])
        med = {k: statistics.median(v) for k, v in times.items()}
        report[precision] = {"seconds": times, "median": med, "overhead": med["predict"] / med["bare"] - 1,
                             "stages": stages(pred, layout, data, normalizer)}
        load.append(os.getloadavg()[0])
    report["load_1min"] = load
    for precision in args.precisions:
        r = report[precision]
        print(f"{precision}: bare {r['median']['bare']:.3f} s, predict {r['median']['predict']:.3f} s, "
              f"overhead {r['overhead']:+.1%}; stages: " +
              ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in r["stages"].items()))
    print(json.dumps(report, default=str))
    return report


if __name__ == "__main__":
    main()
