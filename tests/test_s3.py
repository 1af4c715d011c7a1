"""Object storage: input and output on an S3-compatible server (moto's, on 127.0.0.1), reached
through s3:// URLs with storage options or the standard AWS_* environment variables."""

from __future__ import annotations

import json
import logging

import fsspec
import numpy as np
import pytest
import zarr

import bigcare
from bigcare.cli import main
from bigcare.errors import OutputError
from conftest import make_model, smooth_volume

BLOCK = (8, 32, 32)
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bigcare-test", "AWS_SECRET_ACCESS_KEY": "bigcare-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}

pytestmark = pytest.mark.slow  # a real S3-compatible server on loopback


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free port of 127.0.0.1, with one bucket."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = {"key": CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
               "endpoint_url": endpoint}
    fsspec.filesystem("s3", **options).mkdir("bigcare-test")
    yield endpoint, options
    server.stop()


def write_s3_volume(url, data, options):
    from bigcare.store.axes import Axis
    from bigcare.store.write import write_array

    axes = tuple(Axis(a, "space", "micrometer") for a in "zyx")
    return write_array(url, data, chunks=BLOCK, scale=(2.0, 0.5, 0.5), axes=axes, storage_options=options)


def read(url, options=None, path="0"):
    return np.asarray(zarr.open_array(store=str(url), path=path, mode="r", storage_options=options)[...])


def test_restore_from_and_to_s3_with_storage_options(tmp_path, client, s3_server):
    _, options = s3_server
    data = smooth_volume((16, 64, 64))
    src, dst = "s3://bigcare-test/opts/in.ome.zarr", "s3://bigcare-test/opts/out.ome.zarr"
    write_s3_volume(src, data, options)
    model = make_model(tmp_path / "model")
    kwargs = dict(client=client, block_shape=BLOCK, progress=False, storage_options=options,
                  output_storage_options=options)
    result = bigcare.restore(src, dst, model, **kwargs)
    assert result.blocks_computed == 8
    # the same as restoring a local copy
    local_in = tmp_path / "in.ome.zarr"
    from conftest import write_volume

    write_volume(local_in, data, chunks=BLOCK, scale=(2.0, 0.5, 0.5))
    bigcare.restore(local_in, tmp_path / "out.ome.zarr", model, client=client, block_shape=BLOCK, progress=False)
    np.testing.assert_array_equal(read(dst, options), read(tmp_path / "out.ome.zarr"))
    out = bigcare.open_volume(dst, storage_options=options)
    assert out.scale == (2.0, 0.5, 0.5) and out.attrs["bigcare"]["complete"]
    assert [lv.shape for lv in out.levels] == [lv.shape for lv in bigcare.open_volume(tmp_path / "out.ome.zarr").levels]
    fs = fsspec.filesystem("s3", **options)
    summary = json.loads(fs.cat("bigcare-test/opts/out.ome.zarr/bigcare_summary.json"))
    assert summary["output"] == dst and summary["blocks"]["computed"] == 8
    # resume: nothing left to do
    assert bigcare.restore(src, dst, model, **kwargs).blocks_computed == 0
    # another model: refused, then replaced on overwrite (the old objects are deleted first)
    other = make_model(tmp_path / "other", seed=1)
    with pytest.raises(OutputError, match="different run"):
        bigcare.restore(src, dst, other, **kwargs)
    replaced = bigcare.restore(src, dst, other, overwrite=True, **kwargs)
    assert replaced.blocks_computed == 8
    assert not np.array_equal(read(dst, options), read(tmp_path / "out.ome.zarr"))


def test_an_s3_path_that_is_not_ours_is_never_touched(tmp_path, client, s3_server):
    _, options = s3_server
    fs = fsspec.filesystem("s3", **options)
    fs.pipe("bigcare-test/foreign/out.ome.zarr/notes.txt", b"keep me")
    src = "s3://bigcare-test/foreign/in.ome.zarr"
    write_s3_volume(src, smooth_volume((8, 32, 32)), options)
    with pytest.raises(OutputError, match="not written by bigcare"):
        bigcare.restore(src, "s3://bigcare-test/foreign/out.ome.zarr", make_model(tmp_path / "m"), client=client,
                        overwrite=True, storage_options=options, output_storage_options=options, progress=False)
    assert fs.cat("bigcare-test/foreign/out.ome.zarr/notes.txt") == b"keep me"


def test_cli_batch_on_s3_with_credentials_from_the_environment(tmp_path, s3_server, monkeypatch, capsys):
    endpoint, options = s3_server
    for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(name, value)  # the CLI's local cluster workers inherit these
    volumes = {name: smooth_volume((8, 32, 64), seed=k) for k, name in enumerate(("a", "b"))}
    for name, data in volumes.items():
        write_s3_volume(f"s3://bigcare-test/env/scans/{name}.ome.zarr", data, options)
    model = make_model(tmp_path / "model")
    code = main(["restore", "s3://bigcare-test/env/scans/*.ome.zarr", "--output-dir", "s3://bigcare-test/env/out",
                 "--model", str(model), "--block", ",".join(map(str, BLOCK)), "--workers", "1"])
    assert code == 0, capsys.readouterr().err
    fs = fsspec.filesystem("s3", **options)
    batch = json.loads(fs.cat("bigcare-test/env/out/bigcare_batch_summary.json"))
    assert batch["volumes"] == 2 and batch["complete"] and batch["blocks_computed"] == 4
    for name, data in volumes.items():
        url = f"s3://bigcare-test/env/out/{name}.ome.zarr"
        whole = bigcare.predict(data, model, axes="zyx")["restored"]
        np.testing.assert_allclose(read(url, options), whole, atol=1e-5, rtol=0)
        assert json.loads(fs.cat(f"bigcare-test/env/out/{name}.ome.zarr/bigcare_summary.json"))["complete"]
