"""Clusters of a site: SLURM through dask-jobqueue, Kubernetes through the dask-kubernetes operator.

::

    cluster/slurm.yaml ──► load_cluster_config ──► slurm_cluster ──► SLURMCluster ──► adapt(jobs)
      (jobqueue: slurm: + bigcare:)                (scheduler here,   workers = sbatch jobs)
    cluster/kubernetes.yaml ──► validate_kubernetes_spec ──► kubernetes_cluster ──► KubeCluster
      (DaskCluster + DaskAutoscaler)  (bigcare's rules, then the     (the operator makes the pods)
                                       operator's own CRD schemas)

Nothing is submitted or created until :func:`scale_cluster` (or the first ``KubeCluster``
call). ``cluster/README.md`` says what each config's CHANGE lines mean and what a real run on
a single-host SLURM cluster taught.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bigcare.errors import ConfigError

__all__ = ["load_cluster_config", "slurm_cluster", "validate_kubernetes_spec", "kubernetes_cluster",
           "crd_schema", "check_against_crds", "scale_cluster", "K8S_API"]

K8S_API = "kubernetes.dask.org/v1"


def load_cluster_config(path: str | os.PathLike | None, kind: str) -> Any:
    """Read a cluster config file (YAML): a jobqueue config for slurm, a spec for kubernetes.

    Raises
    ------
    ConfigError
        If the file is missing, not YAML, or not what ``kind`` expects.
    """
    import yaml

    if path is None:
        default = Path(__file__).resolve().parent.parent.parent / "cluster" / f"{kind}.yaml"
        if not default.is_file():
            raise ConfigError(f"--cluster {kind} needs --cluster-config FILE (see cluster/{kind}.yaml)")
        path = default
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cluster config {path} does not exist; expected a YAML file like cluster/{kind}.yaml")
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(f"cluster config {path} is not valid YAML: {exc}") from None
    if kind == "kubernetes":
        return docs
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise ConfigError(f"cluster config {path} must hold one YAML mapping, got {len(docs)} document(s)")
    cfg = docs[0]
    unknown = set(cfg) - {"jobqueue", "bigcare"}
    if unknown:
        raise ConfigError(f"cluster config {path}: unknown top-level key(s) {sorted(unknown)}; "
                          "expected 'jobqueue' (dask-jobqueue's own config) and 'bigcare'")
    if not isinstance(cfg.get("jobqueue", {}).get("slurm"), dict):
        raise ConfigError(f"cluster config {path}: expected a 'jobqueue: slurm:' mapping (dask-jobqueue's format)")
    return cfg


def slurm_cluster(config: dict, dashboard: bool | str = True):
    """A dask-jobqueue SLURMCluster from a config in dask-jobqueue's own format.

    ``config["jobqueue"]["slurm"]`` holds dask-jobqueue's keys (``queue``, ``cores``,
    ``memory``, ``walltime``, ``job-extra-directives``, ...); they are applied as dask config
    on top of dask-jobqueue's defaults, so the same block also works in
    ``~/.config/dask/jobqueue.yaml``. No job is submitted until the cluster is scaled.

    The scheduler's dashboard listens where ``dashboard`` says (loopback by default, as for a
    local cluster) unless the config's ``scheduler-options`` name a ``dashboard_address``:
    dask-jobqueue's own default is every interface of the login node, without authentication.
    """
    import dask

    from bigcare.tasks.cluster import LOOPBACK, dashboard_address

    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError("--cluster slurm needs dask-jobqueue: pip install 'bigcare[slurm]'") from None
    # dask-jobqueue reads its config lazily (also when jobs start), so the settings are kept
    # under a name of bigcare's own: the user's jobqueue.slurm config is left as it is
    merged = {**dask.config.get("jobqueue.slurm", {}), **config["jobqueue"]["slurm"]}
    dask.config.set({"jobqueue.bigcare-slurm": merged})
    ours = config.get("bigcare") or {}
    unknown = set(ours) - {"adapt", "tls", "shared-temp-directory"}
    if unknown:
        raise ConfigError(f"slurm config: unknown key(s) bigcare.{sorted(unknown)}; expected adapt, tls, "
                          "shared-temp-directory")
    address = dashboard_address(dashboard)
    scheduler_options = {"dashboard_address": address or f"{LOOPBACK}:0", "dashboard": address is not None,
                         **(merged.get("scheduler-options") or {})}
    kwargs: dict[str, Any] = {"scheduler_options": scheduler_options}
    if ours.get("tls"):
        from distributed import Security

        kwargs.update(security=Security.temporary(), protocol="tls://")
        if ours.get("shared-temp-directory"):
            shared = os.path.expanduser(os.path.expandvars(ours["shared-temp-directory"]))
            os.makedirs(shared, mode=0o700, exist_ok=True)
            kwargs["shared_temp_directory"] = shared
    return SLURMCluster(config_name="bigcare-slurm", **kwargs)


def validate_kubernetes_spec(docs: list) -> tuple[dict, dict | None]:
    """Check a DaskCluster spec (and an optional DaskAutoscaler); return both.

    bigcare's own rules first (an image for scheduler and workers, the scheduler's service, a
    worker count, an autoscaler naming the cluster), then, where dask-kubernetes is installed,
    the operator's CRD schemas (:func:`check_against_crds`).

    Raises
    ------
    ConfigError
        Naming the missing or wrong key.
    """
    cluster = [d for d in docs if isinstance(d, dict) and d.get("kind") == "DaskCluster"]
    scaler = [d for d in docs if isinstance(d, dict) and d.get("kind") == "DaskAutoscaler"]
    if len(cluster) != 1:
        raise ConfigError(f"kubernetes spec: expected exactly one 'kind: DaskCluster' document, found {len(cluster)}")
    spec = cluster[0]
    if spec.get("apiVersion") != K8S_API:
        raise ConfigError(f"kubernetes spec: apiVersion must be {K8S_API!r}, got {spec.get('apiVersion')!r}")
    if not (spec.get("metadata") or {}).get("name"):
        raise ConfigError("kubernetes spec: metadata.name is required")
    for part in ("worker", "scheduler"):
        pod = ((spec.get("spec") or {}).get(part) or {}).get("spec") or {}
        containers = pod.get("containers")
        if not containers or not isinstance(containers, list) or not containers[0].get("image"):
            raise ConfigError(f"kubernetes spec: spec.{part}.spec.containers[0].image is required")
    if "service" not in spec["spec"]["scheduler"]:
        raise ConfigError("kubernetes spec: spec.scheduler.service is required (the scheduler's ports)")
    worker = spec["spec"]["worker"]
    if not isinstance(worker.get("replicas", 0), int) or worker.get("replicas", 0) < 0:
        raise ConfigError(f"kubernetes spec: spec.worker.replicas must be a count, got {worker.get('replicas')!r}")
    if scaler:
        s = scaler[0].get("spec") or {}
        if s.get("cluster") != spec["metadata"]["name"] or not 0 <= s.get("minimum", 0) <= s.get("maximum", -1):
            raise ConfigError("kubernetes spec: DaskAutoscaler needs spec.cluster = the DaskCluster's name and "
                              f"0 <= minimum <= maximum, got {s}")
    try:
        import dask_kubernetes  # noqa: F401
    except ImportError:
        pass  # the structure above is checked; kubernetes_cluster says what to install
    else:
        from dask_kubernetes.exceptions import ValidationError
        from dask_kubernetes.operator.validation import validate_cluster_name

        try:
            validate_cluster_name(spec["metadata"]["name"])
        except ValidationError as exc:  # its str() is empty; the text is in .message
            raise ConfigError(f"kubernetes spec: metadata.name: {getattr(exc, 'message', exc)}") from None
        check_against_crds([spec] + scaler[:1])
    return spec, (scaler[0] if scaler else None)


def _crd_file(kind: str) -> Path:
    import dask_kubernetes

    # the helm chart's CRDs are the expanded ones the operator installs (customresources/ holds
    # templates with python:// references)
    root = Path(dask_kubernetes.__file__).parent / "operator" / "deployment" / "helm" / "dask-kubernetes-operator"
    return root / "crds" / f"{kind.lower()}.yaml"


def _strict(node: Any) -> Any:
    """An OpenAPI v3 schema node of a CRD as JSON schema, with unknown fields refused.

    Kubernetes prunes unknown fields (kubectl's default field validation, Strict, refuses
    them); ``nullable`` becomes a null type, ``x-kubernetes-int-or-string`` integer-or-string.
    """
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: (_strict(v) if k not in ("default", "example", "enum") else v) for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string"):
        out = {k: v for k, v in out.items() if k != "type"}
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_schema(kind: str) -> dict:
    """The JSON schema of a dask-kubernetes custom resource (``DaskCluster``, ``DaskAutoscaler``,
    ...), from the operator's CRD shipped inside the installed dask-kubernetes package (offline).

    Raises
    ------
    ConfigError
        When dask-kubernetes is not installed or holds no CRD of that kind.
    """
    import yaml

    try:
        path = _crd_file(kind)
    except ImportError:
        raise ConfigError("checking a kubernetes spec needs dask-kubernetes: pip install 'bigcare[kubernetes]'") from None
    if not path.is_file():
        raise ConfigError(f"the installed dask-kubernetes has no CRD for {kind} (looked for {path})")
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == K8S_API.rsplit("/", 1)[1])
    schema = _strict(version["schema"]["openAPIV3Schema"])
    # apiVersion, kind and metadata are Kubernetes' own, not in the CRD's schema
    schema.setdefault("properties", {}).update(
        apiVersion={"const": K8S_API}, kind={"const": kind},
        metadata={"type": "object", "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                                                   "labels": {"type": "object"}, "annotations": {"type": "object"}}})
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    return schema


def check_against_crds(docs: list[dict]) -> None:
    """Validate DaskCluster / DaskAutoscaler documents against the operator's CRD schemas.

    Raises
    ------
    ConfigError
        Naming the document, the path of the first wrong key and what the schema expected.
    """
    from jsonschema import Draft4Validator

    for doc in docs:
        validator = Draft4Validator(crd_schema(doc["kind"]))
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        if errors:
            first = errors[0]
            where = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in first.absolute_path).replace(".[", "[")
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise ConfigError(f"kubernetes spec: {doc['kind']} {where or '(top level)'}: {first.message}; "
                              f"checked against the dask-kubernetes operator's CRD schema{more}")


def kubernetes_cluster(docs: list):
    """A dask-kubernetes operator cluster (KubeCluster) from a DaskCluster spec.

    Raises
    ------
    ConfigError
        For a spec the operator would refuse, without dask-kubernetes, or when no Kubernetes
        API is reachable (no kubeconfig, no in-cluster service account).
    """
    spec, _ = validate_kubernetes_spec(docs)
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError:
        raise ConfigError("--cluster kubernetes needs dask-kubernetes: pip install 'bigcare[kubernetes]'; "
                          "or `kubectl apply -f` the spec and pass --scheduler") from None
    import kr8s

    name = spec["metadata"]["name"]
    try:
        kr8s.api()  # reads the kubeconfig (or the pod's service account) and asks the API its version
    except ValueError as exc:  # kr8s: "Unable to find valid credentials"
        raise ConfigError(f"--cluster kubernetes: no Kubernetes credentials ({exc}); set KUBECONFIG or run "
                          "where kubectl works, with the dask operator installed in the cluster") from None
    except Exception as exc:  # httpx: connection refused, TLS, timeouts
        raise ConfigError(f"--cluster kubernetes: the Kubernetes API of the kubeconfig is not reachable "
                          f"({type(exc).__name__}: {exc})") from None
    try:
        return KubeCluster(custom_cluster_spec=spec, shutdown_on_close=True, quiet=True)
    except Exception as exc:
        for unstarted in [c for c in KubeCluster._instances if c.name == name]:
            KubeCluster._instances.discard(unstarted)  # or its exit hook tries to delete it again
        if isinstance(exc, ConfigError | KeyboardInterrupt):
            raise
        raise ConfigError(f"--cluster kubernetes: could not create the DaskCluster {name!r} "
                          f"({type(exc).__name__}: {exc}); is the Kubernetes API reachable and the dask "
                          "operator installed in the cluster?") from None


def scale_cluster(cluster, kind: str, config) -> None:
    """Start adaptive scaling of a slurm (``bigcare.adapt`` jobs) or kubernetes
    (``DaskAutoscaler`` workers) cluster; other kinds are left as they are."""
    if kind == "slurm":
        adapt = (load_cluster_config(config, "slurm").get("bigcare") or {}).get("adapt") or {}
        cluster.adapt(minimum_jobs=adapt.get("minimum_jobs", 1), maximum_jobs=adapt.get("maximum_jobs", 8))
    elif kind == "kubernetes":
        _, scaler = validate_kubernetes_spec(load_cluster_config(config, "kubernetes"))
        if scaler:
            cluster.adapt(minimum=scaler["spec"]["minimum"], maximum=scaler["spec"]["maximum"])
