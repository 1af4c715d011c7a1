"""Train tiny CSBDeep CARE models with CSBDeep itself, and save their predictions: the reference
that ``tests/test_exchange_csbdeep.py`` holds bigcare's import to.

Made with csbdeep 0.8.2, tensorflow-cpu 2.21.0, keras 3.15.1, h5py 3.14.0, numpy 2.4.6
(Python 3.11, CPU). TensorFlow is not a dependency of bigcare or of its tests; run this in a
separate environment::

    python3 -m venv /tmp/csbvenv
    /tmp/csbvenv/bin/pip install csbdeep==0.8.2 tensorflow-cpu h5py
    /tmp/csbvenv/bin/python tests/data/make_csbdeep_models.py

It writes ``tests/data/csbdeep/<name>/`` for each model: CSBDeep's own ``config.json`` and
``weights_best.h5`` (as ``CARE.train`` left them), ``input.npy`` (a small raw image) and
``expected.npy`` (``CARE.predict(input, axes, PercentileNormalizer(2, 99.8))``, which CSBDeep leaves
normalised when the channel counts differ; probabilistic
models: ``expected_mean.npy`` and ``expected_scale.npy`` from ``predict_probabilistic``), and
``versions.json``. Inputs are sized to the pooling grid, so CSBDeep's symmetric reflect padding
(bigcare pads at the high end) does not enter the comparison.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402

OUT = pathlib.Path(__file__).parent / "csbdeep"

#: name -> (Config kwargs, input shape (spatial + channels), train patch spatial shape)
MODELS = {
    # CSBDeep's 2D defaults but 4 first filters: kernel 5, depth 2, residual, linear
    "care2d": (dict(axes="YX", unet_n_first=4), (32, 48, 1), (32, 32)),
    # probabilistic (Laplace): a second 1x1 conv with softplus + 1e-3 beside the mean; ReLU on the mean
    "care2d_prob_relu": (dict(axes="YX", probabilistic=True, unet_n_first=4, unet_kern_size=3, unet_n_depth=1,
                              unet_last_activation="relu"), (30, 44, 1), (32, 32)),
    # two channels in, one out: not residual (CSBDeep then leaves the output in normalised units)
    "care2d_2ch": (dict(axes="YXC", n_channel_in=2, n_channel_out=1, unet_n_first=4, unet_kern_size=3,
                        unet_n_depth=1), (24, 40, 2), (32, 32)),
    # 3D: kernel 3, depth 2 (CSBDeep's 3D defaults but 4 first filters)
    "care3d": (dict(axes="ZYX", unet_n_first=4), (8, 20, 28, 1), (16, 16, 16)),
    "care3d_prob": (dict(axes="ZYX", probabilistic=True, unet_n_first=2, unet_n_depth=1), (6, 16, 20, 1),
                    (8, 16, 16)),
}


def _pairs(rng, n, spatial, c_in, c_out):
    """Smooth blobs as targets, noisy copies as inputs (enough to move the weights off init)."""
    from scipy.ndimage import gaussian_filter

    y = gaussian_filter(rng.random((n, *spatial, c_out)), sigma=(0, *(2,) * len(spatial), 0))
    y = (y - y.min()) / (np.ptp(y) + 1e-9)
    x = np.concatenate([y + 0.3 * rng.standard_normal(y.shape) for _ in range(c_in)], axis=-1)[..., :c_in]
    return x.astype(np.float32), y.astype(np.float32)


def make(name: str, kwargs: dict, in_shape: tuple, patch: tuple) -> None:
    from csbdeep.data import PercentileNormalizer
    from csbdeep.models import CARE, Config

    rng = np.random.default_rng(zlib.crc32(name.encode()))
    c_in, c_out = kwargs.get("n_channel_in", 1), kwargs.get("n_channel_out", 1)
    config = Config(**kwargs, train_epochs=2, train_steps_per_epoch=3, train_batch_size=2,
                    train_tensorboard=False)
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    model = CARE(config, name, basedir=str(OUT))
    x, y = _pairs(rng, 8, patch, c_in, c_out)
    model.train(x[:6], y[:6], validation_data=(x[6:], y[6:]))
    for extra in ("weights_last.h5", "weights_now.h5"):
        (folder / extra).unlink(missing_ok=True)
    model = CARE(None, name, basedir=str(OUT))  # reload from disk: predict with what was saved

    image = (100 + 400 * rng.random(in_shape)).astype(np.float32)
    axes = kwargs["axes"].replace("C", "") + "C"
    if in_shape[-1] == 1:  # single channel: give CSBDeep the image without C, as users do
        image, axes = image[..., 0], axes.replace("C", "")
    np.save(folder / "input.npy", image)
    if kwargs.get("probabilistic"):
        prob = model.predict_probabilistic(image, axes, normalizer=PercentileNormalizer(2, 99.8))
        np.save(folder / "expected_mean.npy", prob.mean().astype(np.float32))
        np.save(folder / "expected_scale.npy", prob.scale().astype(np.float32))
    else:
        np.save(folder / "expected.npy", model.predict(image, axes, normalizer=PercentileNormalizer(2, 99.8)))
    import csbdeep
    import h5py
    import keras
    import tensorflow as tf

    versions = {"csbdeep": csbdeep.__version__, "tensorflow": tf.__version__, "keras": keras.__version__,
                "h5py": h5py.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
                "axes": axes, "normalizer": "PercentileNormalizer(2, 99.8)"}
    (folder / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    for junk in folder.glob("logs*"):
        shutil.rmtree(junk, ignore_errors=True)
    print(name, sorted(p.name for p in folder.iterdir()))


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name in sys.argv[1:] or MODELS:
        make(name, *MODELS[name])
