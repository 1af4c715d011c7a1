"""Literal aliases of bigcare's small vocabularies, and their checks (one error message each)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal, get_args

from bigcare.errors import ConfigError

__all__ = ["Precision", "NgffVersion", "DeviceKind", "ClusterKind", "PathLike", "Shape", "PRECISIONS",
           "NGFF_VERSIONS", "CLUSTER_KINDS", "check_choice", "check_device", "device_problem"]

#: Inference precision: ``auto`` (bf16 where the device computes it natively, else fp32; see
#: :func:`bigcare.predictors.fastpath.resolve_precision`), full float32, or autocast to bfloat16 / float16.
Precision = Literal["auto", "fp32", "bf16", "fp16"]
#: OME-NGFF version written: 0.5 (zarr v3) or 0.4 (zarr v2).
NgffVersion = Literal["0.5", "0.4"]
#: The kind of device a predictor runs on (``"cuda:N"`` names one GPU of kind ``"cuda"``).
DeviceKind = Literal["cpu", "cuda"]
#: Clusters bigcare can start.
ClusterKind = Literal["local", "local-cuda", "slurm", "kubernetes"]
#: A local path or an fsspec URL (``s3://bucket/a.ome.zarr``).
PathLike = str | os.PathLike[str]
#: A shape or a voxel count per axis.
Shape = Sequence[int]

PRECISIONS: tuple[str, ...] = get_args(Precision)
NGFF_VERSIONS: tuple[str, ...] = get_args(NgffVersion)
CLUSTER_KINDS: tuple[str, ...] = get_args(ClusterKind)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``; else ConfigError naming the argument and the value."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def device_problem(device: str) -> str | None:
    """None when torch can use ``device`` in this process, else why not (torch imported here)."""
    if not str(device).startswith("cuda"):
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return "CUDA is not available"
        index, count = torch.device(device).index or 0, torch.cuda.device_count()
        return None if index < count else f"it has {count} GPU(s)"
    except Exception as exc:  # noqa: BLE001 - any failure means the device is unusable here
        return f"{type(exc).__name__}: {exc}"


def check_device(device: object) -> str:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"``; else ConfigError naming the value (no torch needed)."""
    if isinstance(device, str):
        kind, _, index = device.partition(":")
        if kind == "cpu" and not index or kind == "cuda" and (not index or index.isdigit()):
            return device
    raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
