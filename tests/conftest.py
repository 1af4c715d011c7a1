"""Shared fixtures: a real LocalCluster with separate worker processes, tiny models, tiny volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def client():
    """A real dask cluster: two worker processes, one thread each, no dashboard."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=40)
    with Client(cluster) as c:
        yield c
    cluster.close()


def make_model(path, *, ndim=3, depth=2, n_filter_base=4, kernel_size=None, n_in=1, n_out=1, heads=None, seed=0,
               isotropic=None):
    """Save a tiny random U-Net as a model folder and return its path.

    ``isotropic``: a dict of :class:`~bigcare.models.IsotropicConfig` fields makes it a 2D
    isotropic-restoration model.
    """
    from bigcare.models import Head, IsotropicConfig, UNet, UNetConfig, save_model
    from bigcare.models.folder import ModelConfig

    kwargs = {} if heads is None else {"heads": [Head(**h) for h in heads]}
    arch = UNetConfig(ndim=ndim, depth=depth, n_filter_base=n_filter_base, kernel_size=kernel_size,
                      n_channel_in=n_in, n_channel_out=n_out, residual=n_in == n_out, **kwargs)
    torch.manual_seed(seed)
    model = UNet(arch)
    # random init leaves the output tiny next to the residual; scale the last layers so that
    # the network's own contribution is visible in comparisons
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    extra = {} if isotropic is None else {"kind": "isotropic", "isotropic": IsotropicConfig(**isotropic)}
    save_model(path, model, ModelConfig(axes="ZYX" if ndim == 3 else "YX", architecture=arch, **extra))
    return path


@pytest.fixture
def model3d(tmp_path):
    return make_model(tmp_path / "model3d", ndim=3)


@pytest.fixture
def model2d(tmp_path):
    return make_model(tmp_path / "model2d", ndim=2)


def write_volume(url, data, *, axes="zyx", chunks=None, scale=None, ngff_version="0.5"):
    """Write ``data`` as an OME-Zarr image (level 0 plus pyramid) and return the Volume."""
    from bigcare.store.axes import Axis
    from bigcare.store.write import write_array

    ax = tuple(Axis.named(a, "micrometer") for a in axes)
    scale = scale or tuple(1.0 if a in "ct" else 0.5 for a in axes)
    return write_array(url, data, chunks=chunks or data.shape, scale=scale, axes=ax, ngff_version=ngff_version)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def smooth_volume(shape, seed=0):
    """A smooth random float32 volume (values ~0-4): the networks' output differs visibly from it."""
    import scipy.ndimage as ndi

    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.random(shape, dtype=np.float32), 1.5).astype(np.float32) * 4


def read(url, path="0"):
    """The whole array ``path`` of the zarr group at ``url``."""
    import zarr

    return np.asarray(zarr.open_array(store=str(url), path=path, mode="r")[...])


def builds(client) -> dict:
    """Networks built from sent models, per worker process."""
    from bigcare.predictors import shipping

    return client.run(lambda: shipping.BUILDS["count"])


def listening(roots) -> set[tuple[str, int]]:
    """The (address, port) pairs that these processes (psutil.Process or pids) and their children
    listen on."""
    import psutil

    found: set[tuple[str, int]] = set()
    for root in roots:
        try:
            root = root if isinstance(root, psutil.Process) else psutil.Process(root)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:  # ended meanwhile
            continue
        for p in procs:
            try:
                found |= {(c.laddr.ip, c.laddr.port) for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
            except psutil.Error:
                pass
    return found
