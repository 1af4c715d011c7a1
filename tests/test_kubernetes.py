"""cluster/kubernetes.yaml against the dask-kubernetes operator's own CRD schemas (from the
installed package, offline), the cluster object built through dask-kubernetes' Python API as
far as it goes without a Kubernetes cluster, and the worker image's Containerfile against
pyproject.toml. No Kubernetes API and no container build here."""

from __future__ import annotations

import copy
import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

from bigcare.errors import ConfigError
from bigcare.tasks.hpc import check_against_crds, crd_schema, kubernetes_cluster, load_cluster_config, validate_kubernetes_spec

dask_kubernetes = pytest.importorskip("dask_kubernetes", reason="dask-kubernetes (the test extra) is not installed")

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "cluster" / "kubernetes.yaml"


def docs():
    return load_cluster_config(SPEC, "kubernetes")


def test_shipped_spec_passes_the_operators_crd_schemas():
    spec, scaler = validate_kubernetes_spec(docs())  # bigcare's rules, then the CRDs
    check_against_crds([spec, scaler])
    schema = crd_schema("DaskCluster")
    # the schema is the operator's (worker pod spec, scheduler service), with unknown keys refused
    assert "containers" in schema["properties"]["spec"]["properties"]["worker"]["properties"]["spec"]["properties"]
    assert schema["properties"]["spec"]["additionalProperties"] is False


@pytest.mark.parametrize("change, message", [
    (lambda d: d[0]["spec"]["worker"]["spec"].update(tolerationz=[]),
     r"DaskCluster spec.worker.spec: Additional properties are not allowed \('tolerationz' was unexpected\)"),
    (lambda d: d[0]["spec"]["worker"]["spec"]["containers"][0]["ports"][0].update(containerPort="8788"),
     r"containers\[0\].ports\[0\].containerPort: '8788' is not of type 'integer'"),
    (lambda d: d[0]["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"].update({"nvidia.com/gpu": 1}),
     r"limits.nvidia.com/gpu: 1 is not of type 'string'"),
    (lambda d: d[0]["spec"]["scheduler"]["service"]["ports"][0].update(port="8786"),
     r"spec.scheduler.service.ports\[0\].port: '8786' is not of type 'integer'"),
    (lambda d: d[1]["spec"].update(maximum=8.5), r"DaskAutoscaler spec.maximum: 8.5 is not of type 'integer'"),
    (lambda d: d[1]["spec"].update(maxmum=8), r"DaskAutoscaler spec: Additional properties are not allowed"),
])
def test_a_spec_the_operator_would_refuse_is_refused_naming_the_key(change, message):
    broken = copy.deepcopy(docs())
    change(broken)
    with pytest.raises(ConfigError, match=message):
        validate_kubernetes_spec(broken)


def test_spec_agrees_with_what_dask_kubernetes_generates():
    from dask_kubernetes.operator import make_cluster_spec

    spec, _ = validate_kubernetes_spec(docs())
    made = make_cluster_spec(name=spec["metadata"]["name"], image="any")
    # the operator labels the scheduler pod as its own generated spec selects it
    assert spec["spec"]["scheduler"]["service"]["selector"] == made["spec"]["scheduler"]["service"]["selector"]
    ours = {p["name"]: (p["port"], p["targetPort"]) for p in spec["spec"]["scheduler"]["service"]["ports"]}
    theirs = {p["name"]: (p["port"], p["targetPort"]) for p in made["spec"]["scheduler"]["service"]["ports"]}
    assert ours == theirs
    assert [c["name"] for c in spec["spec"]["worker"]["spec"]["containers"]] == ["worker"]


def test_spec_commands_exist_in_distributed():
    # dask-kubernetes' own generated spec still says dask-worker / dask-scheduler, commands that
    # distributed no longer installs; the spec uses `dask worker` / `dask scheduler`
    spec, _ = validate_kubernetes_spec(docs())
    subcommands = {e.name for e in entry_points(group="dask_cli")}
    scripts = {e.name for e in entry_points(group="console_scripts")}
    for part in ("worker", "scheduler"):
        args = spec["spec"][part]["spec"]["containers"][0]["args"]
        assert args[0] in scripts and args[1] in subcommands, args


def test_cluster_object_is_built_through_dask_kubernetes_without_an_api():
    import asyncio

    from dask_kubernetes.operator import KubeCluster
    from tornado.ioloop import IOLoop

    spec, _ = validate_kubernetes_spec(docs())

    async def build():
        # made inside a running loop and not awaited: constructed (the name checked against
        # Kubernetes' rules, the spec kept) but not started, so no API is contacted
        cluster = KubeCluster(custom_cluster_spec=spec, asynchronous=True, loop=IOLoop.current(),
                              shutdown_on_close=True, quiet=True)
        try:
            return cluster.name, cluster.status.name, cluster._custom_cluster_spec is spec
        finally:
            KubeCluster._instances.discard(cluster)  # never started: nothing for its exit hook to delete

    assert asyncio.run(build()) == ("bigcare", "created", True)
    bad = copy.deepcopy(spec)
    bad["metadata"]["name"] = "Bigcare_GPU"
    from dask_kubernetes.exceptions import ValidationError

    with pytest.raises(ValidationError):  # dask-kubernetes refuses it (with an empty str())...
        asyncio.run(_build_named(bad))
    with pytest.raises(ConfigError, match="metadata.name: The DaskCluster Bigcare_GPU is invalid: a lowercase RFC 1123"):
        validate_kubernetes_spec([bad])  # ...bigcare says why, before anything starts


async def _build_named(spec):
    from dask_kubernetes.operator import KubeCluster
    from tornado.ioloop import IOLoop

    KubeCluster(custom_cluster_spec=spec, asynchronous=True, loop=IOLoop.current(), quiet=True)


def test_without_credentials_or_api_the_error_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="no Kubernetes credentials"):
        kubernetes_cluster(docs())
    config = tmp_path / "kubeconfig"  # an API on a loopback port where nothing listens
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "here",
        "clusters": [{"name": "here", "cluster": {"server": "https://127.0.0.1:9"}}],
        "contexts": [{"name": "here", "context": {"cluster": "here", "user": "me"}}],
        "users": [{"name": "me", "user": {"token": "none"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(config))
    with pytest.raises(ConfigError, match="Kubernetes API of the kubeconfig is not reachable"):
        kubernetes_cluster(docs())


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.+-]*)", text))


def test_containerfile_pins_match_pyproject():
    from packaging.requirements import Requirement
    from packaging.version import Version

    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    text = (ROOT / "cluster" / "Containerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms and all(":" in f and not f.endswith(":latest") for f in froms), froms  # a pinned base
    python = re.search(r"python:(\d+\.\d+)", froms[0])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert python and Version(python.group(1) + ".0") in Requirement(f"python{project['requires-python']}").specifier
    pins = _pins(text)
    assert "torch" in pins, "the Containerfile pins torch"
    deps = {Requirement(d).name.lower(): Requirement(d) for d in project["dependencies"]}
    for name, version in pins.items():
        if name.lower() in deps:
            assert Version(version) in deps[name.lower()].specifier, f"{name}=={version} outside {deps[name.lower()]}"
    assert re.search(r"pip install[^\n]*[\s\"']/src\[", text), "bigcare itself is installed from the build context"
    # the commands of cluster/kubernetes.yaml are what the image runs
    spec, _ = validate_kubernetes_spec(docs())
    assert "dask" in text and spec["spec"]["worker"]["spec"]["containers"][0]["args"][0] == "dask"
