"""What a run asks the cluster's workers before it writes anything: device, precision, memory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bigcare.errors import ConfigError
from bigcare.types import device_problem

if TYPE_CHECKING:
    from bigcare.runs.models import ModelRef

__all__ = ["check_device_on_workers", "cluster_devices", "precision_on_workers", "worker_memory"]


def check_device_on_workers(client, device: str, model: ModelRef) -> None:
    """ConfigError, before anything is written, when no worker can run a network on ``device``.

    Checked on the workers, not the client: a login node without a GPU may drive GPU workers.
    Predictor objects sent with the run (e.g. the identity) bring their own device handling.
    """
    if not str(device).startswith("cuda") or model.obj is not None:
        return
    answers = client.run(device_problem, device)
    if answers and all(a is not None for a in answers.values()):
        worker, why = next(iter(answers.items()))
        raise ConfigError(
            f"device {device!r} is not usable on any of the {len(answers)} worker(s) ({worker}: {why}); "
            "use --device cpu, or workers with GPUs; nothing was written"
        )


def precision_on_workers(client, device: str, precision: str, predictor=None) -> str:
    """What ``precision`` becomes on the cluster's workers: itself, or for ``auto`` what each
    worker's device resolves it to (``auto: bf16``, or ``auto: bf16 on 2 workers, fp32 on 1``);
    a predictor with a ``fixed_precision`` (a bioimage.io package) runs in that one."""
    fixed = getattr(predictor, "fixed_precision", None)
    if fixed:
        return f"{fixed} (the model runs in {fixed} whatever --precision says)" if precision != fixed else fixed
    if precision != "auto":
        return precision
    from bigcare.predictors.fastpath import resolve_precision

    try:
        answers = list(client.run(resolve_precision, precision, device).values())
    except Exception:  # noqa: BLE001 - a worker that cannot answer decides for itself when it computes
        answers = []
    if not answers:
        return "auto"
    counts = {p: answers.count(p) for p in sorted(set(answers))}
    if len(counts) == 1:
        return f"auto: {answers[0]}"
    return "auto: " + ", ".join(f"{p} on {n} worker{'s' * (n > 1)}" for p, n in counts.items())


def backend_on_workers(client, backend: str, device: str, precision: str, predictor=None) -> str:
    """What ``backend`` becomes on the cluster's workers: ``torch``, ``openvino``, or for a mixed
    cluster ``openvino on 2 workers, torch on 1`` (:func:`~bigcare.exchange.openvino.resolve_backend`
    run on each: whether openvino is installed there)."""
    config = getattr(predictor, "config", None)
    if backend == "torch" or config is None:
        return "torch"
    from bigcare.exchange.openvino import resolve_backend

    try:
        answers = list(client.run(resolve_backend, backend, device, precision, config).values())
    except Exception:  # noqa: BLE001 - a worker that cannot answer decides (or fails, naming why) when it computes
        answers = []
    if not answers:
        return backend
    counts = {b: answers.count(b) for b in sorted(set(answers))}
    if len(counts) == 1:
        return answers[0]
    return ", ".join(f"{b} on {n} worker{'s' * (n > 1)}" for b, n in counts.items())


def cluster_devices(client, device: str) -> int:
    """Devices a run spreads over: GPUs (``GPU`` worker resources) for CUDA, else workers."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values() if client is not None else []
    if str(device).startswith("cuda"):
        return max(1, int(sum(w.get("resources", {}).get("GPU", 0) for w in workers)))
    return max(1, len(workers))


def worker_memory(client) -> tuple[float | None, int]:
    """The smallest memory limit of the cluster's workers (bytes; None when unknown) and the most threads."""
    workers = list(client.scheduler_info(n_workers=-1)["workers"].values()) if client is not None else []
    limits = [w.get("memory_limit") or 0 for w in workers]
    return (min(limits) if limits and min(limits) > 0 else None), max([w.get("nthreads", 1) for w in workers] or [1])
