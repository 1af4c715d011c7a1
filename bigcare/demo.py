"""`bigcare demo`: the main job end to end on synthetic data, on a local cluster.

1. write a synthetic noisy 3D volume and its clean version as OME-Zarr;
2. restore with the small CARE U-Net shipped with bigcare (trained on other synthetic pairs by
   ``examples/make_demo_model.py``), or with ``--train`` train one here for a short while;
3. restore the noisy volume block by block on a LocalCluster (progress bar, dashboard link);
4. print NRMSE / SSIM of input and restoration against the clean volume.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from bigcare.errors import OutputError
from bigcare.metrics import nrmse, ssim
from bigcare.models import UNet, UNetConfig
from bigcare.models.folder import ModelConfig
from bigcare.runs.restore import restore
from bigcare.store.axes import Axis
from bigcare.store.volume import open_volume
from bigcare.store.write import write_array
from bigcare.synth import degrade, phantom
from bigcare.training import ArrayPairSampler, fit

__all__ = ["run_demo"]

AXES_ZYX = tuple(Axis.named(a, "micrometer") for a in "zyx")
NOISE = dict(photons=6.0, background=0.1, read_noise=0.05)


#: The demo's pretrained model (config.json + model.safetensors), made by examples/make_demo_model.py.
DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"


def train_demo_model(model_dir: str | Path, *, epochs: int = 12, steps_per_epoch: int = 20, device: str = "cpu",
                     seed: int = 0, progress: bool = True, n_filter_base: int = 16, batch_size: int = 4) -> Path:
    """Train the demo's 3D CARE U-Net on synthetic pairs (never the demo's test volume).

    Returns ``model_dir`` (``best/`` and ``last/`` inside).
    """
    import torch

    # training pairs come from other synthetic volumes (never from the test volume)
    train_pairs = []
    for k in range(2):
        gt = phantom((32, 128, 128), seed=seed + 100 + k)
        train_pairs.append((degrade(gt, seed=seed + 200 + k, **NOISE), gt))
    sampler = ArrayPairSampler(train_pairs, (16, 64, 64), seed=seed)
    val_gt = phantom((32, 128, 128), seed=seed + 300)
    val_sampler = ArrayPairSampler([(degrade(val_gt, seed=seed + 301, **NOISE), val_gt)], (16, 64, 64), seed=seed + 1)
    validation = [next(val_sampler.batches(batch_size)) for _ in range(2)]
    arch = UNetConfig(ndim=3, depth=2, n_filter_base=n_filter_base)
    config = ModelConfig(axes="ZYX", architecture=arch, provenance={"data": "bigcare.synth demo pairs", "noise": NOISE,
                                                                      "patch_shape": [16, 64, 64]})
    torch.manual_seed(seed)
    model = UNet(arch)
    print(f"training a 3D CARE U-Net ({sum(p.numel() for p in model.parameters()):,} parameters) "
          f"for {epochs} x {steps_per_epoch} steps on {device}", flush=True)
    fit(model, config, sampler.batches(batch_size), validation=validation, epochs=epochs, steps_per_epoch=steps_per_epoch,
        device=device, model_dir=Path(model_dir), seed=seed, progress=progress)
    return Path(model_dir)


#: The file that says a folder is a demo's own (only such a folder is ever replaced).
MARKER = ".bigcare-demo"


def _clear_own_folder(out: Path) -> None:
    """Remove an earlier demo's folder; refuse (OutputError) any other folder that is not empty."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"demo output {out} exists and is not a folder; choose another --out")
    if (out / MARKER).is_file():
        shutil.rmtree(out)
    elif any(out.iterdir()):
        raise OutputError(
            f"demo output {out} is a folder bigcare's demo did not make (no {MARKER} in it) and it is not "
            "empty; nothing was touched: choose another --out, or an empty or new folder"
        )


def run_demo(
    out_dir: str | Path = "bigcare-demo",
    *,
    shape=(64, 256, 256),
    block=(64, 128, 128),
    epochs: int = 12,
    steps_per_epoch: int = 20,
    workers: int | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
    train: bool = False,
) -> dict:
    """Run the demo; returns the metrics it prints.

    Parameters
    ----------
    out_dir : path
        Folder for the volumes and the model: new, empty, or an earlier demo's (replaced);
        any other folder is refused.
    shape, block : tuple of int
        Test volume shape and block shape (Z, Y, X).
    epochs, steps_per_epoch : int
        Training length with ``train`` (defaults take about four CPU-minutes).
    train : bool
        Train a model here first (the full path); default: restore with the demo model shipped
        with bigcare (``bigcare/demo_model``, made by ``examples/make_demo_model.py``).
    workers : int, optional
        Local cluster worker processes.
    device : str, optional
        "cpu" or "cuda"; default CUDA when available.
    seed : int
        Seed of the synthetic data and the training.
    progress : bool
        Progress bars and per-epoch lines.

    Returns
    -------
    dict
        ``{"input": {"nrmse", "ssim"}, "restored": {"nrmse", "ssim"}, "seconds": {...}}``
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir)
    _clear_own_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by bigcare demo; the next demo run into this folder replaces it\n")
    timings = {}

    t = time.perf_counter()
    clean = phantom(shape, seed=seed)
    noisy = degrade(clean, seed=seed + 1, **NOISE)
    chunks = tuple(min(c, n) for c, n in zip((32, 128, 128), shape))
    write_array(out / "clean.ome.zarr", clean, chunks=chunks, scale=(1.0, 1.0, 1.0), axes=AXES_ZYX)
    write_array(out / "noisy.ome.zarr", noisy, chunks=chunks, scale=(1.0, 1.0, 1.0), axes=AXES_ZYX)
    timings["data"] = time.perf_counter() - t
    print(f"wrote {out / 'noisy.ome.zarr'} and {out / 'clean.ome.zarr'} {shape}", flush=True)

    t = time.perf_counter()
    if train:
        model_path = train_demo_model(out / "model", epochs=epochs, steps_per_epoch=steps_per_epoch, device=device,
                                      seed=seed, progress=progress) / "best"
    else:
        model_path = DEMO_MODEL
        print(f"using the demo model shipped with bigcare ({DEMO_MODEL}; bigcare demo --train trains one here)",
              flush=True)
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    run = restore(out / "noisy.ome.zarr", out / "restored.ome.zarr", model_path, block_shape=block,
                  device=device, workers=workers, progress=progress)
    timings["restore"] = time.perf_counter() - t
    restored = np.asarray(open_volume(out / "restored.ome.zarr").array(0)[...])

    metrics: dict = {
        "input": {"nrmse": nrmse(noisy, clean), "ssim": ssim(noisy, clean)},
        "restored": {"nrmse": nrmse(restored, clean), "ssim": ssim(restored, clean)},
        "seconds": timings,
        "restore_mvoxel_per_s": run.voxels_per_second / 1e6,
    }
    print(f"\nrestored {run.blocks_computed} blocks in {run.seconds:.1f} s "
          f"({metrics['restore_mvoxel_per_s']:.2f} Mvoxel/s, halo overhead {run.halo_overhead:.2f}x)")
    print(f"{'against the clean volume':<26}{'NRMSE':>8}{'SSIM':>8}")
    for name in ("input", "restored"):
        print(f"{name:<26}{metrics[name]['nrmse']:>8.4f}{metrics[name]['ssim']:>8.4f}")
    print(f"\noutputs in {out}/ (restored.ome.zarr{', model/best' if train else ''})")
    return metrics
