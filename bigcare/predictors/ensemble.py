"""An ensemble of probabilistic models on one region: every member in one pass, their mixture out.

::

    region ──► member 1 .. M (CARE or isotropic, each built once per worker process)
                 mean mu_k, scale b_k  (intensity units, each (C, *spatial))
           ──► mixture (bigcare.predictors.mixture, torch, on the members' device)
                 mean, lower, upper (central ``interval``), disagreement D in [0, 1]

Members must be probabilistic (a head of kind scale: Laplace training, ``loss: laplace``). A
member without one is refused with a ModelError, rather than given a scale fitted on validation
data: a fitted global scale would say nothing about *which* voxels are uncertain, and the
disagreement would then measure only the spread of the means. Members must share their axes,
channels, normalization percentiles and (isotropic models) zoom, so that they see the same
normalized region; their halos may differ (the ensemble takes the largest, on a grid every
member's pooling divides).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bigcare.errors import ModelError
from bigcare.normalization import Normalizer
from bigcare.types import Precision

__all__ = ["EnsemblePredictor", "EnsembleSpec", "OUTPUTS", "check_interval"]

#: the outputs of an ensemble restore, in order
OUTPUTS = ("mean", "lower", "upper", "disagreement")


def check_interval(level: float) -> float:
    """``level`` as a float in (0, 1), else ModelError naming it."""
    try:
        value = float(level)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 < value < 1:
        from bigcare.errors import ConfigError

        raise ConfigError(f"interval (--interval) must be a level in (0, 1) such as 0.9, got {level!r}")
    return value


def _scale_head(member, label: str) -> tuple[str, str]:
    kinds = getattr(member, "kinds", None) or getattr(getattr(member, "net", None), "kinds", None) or {}
    scales = [n for n, k in kinds.items() if k == "scale"]
    means = [n for n, k in kinds.items() if k == "intensity"]
    if not scales or not means:
        raise ModelError(f"ensemble member {label} has no Laplace scale head (outputs {list(member.outputs)}): an "
                         "ensemble's interval and disagreement need probabilistic members; train them with "
                         "training: {loss: laplace}")
    return means[0], scales[0]


class EnsemblePredictor:
    """The mixture of M probabilistic predictors.

    Parameters
    ----------
    members : list of Predictor
        At least two, each with a mean (intensity) and a scale head.
    labels : list of str
        Where each member came from (for messages).
    interval : float
        Central interval level of the ``lower`` / ``upper`` outputs (default 0.9).
    scale_factor : float
        Recalibration of every member's scale (``bigcare calibrate --recalibrate``).
    """

    def __init__(self, members: list, labels: list[str], *, interval: float = 0.9, scale_factor: float = 1.0):
        if len(members) < 2:
            raise ModelError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = members
        self.heads = [_scale_head(m, label) for m, label in zip(members, labels)]
        first = members[0]
        for name in ("spatial_axes", "n_channel_in", "n_channel_out", "pmin", "pmax", "zoom", "factor"):
            values = [getattr(m, name) for m in members]
            if any(v != values[0] for v in values):
                raise ModelError(f"ensemble members differ in {name} ({', '.join(f'{label}: {v}' for label, v in zip(labels, values))}); "
                                 "members must share axes, channels, normalization and zoom")
        self.spatial_axes = first.spatial_axes
        self.n_channel_in, self.n_channel_out = first.n_channel_in, first.n_channel_out
        self.pmin, self.pmax, self.zoom, self.factor = first.pmin, first.pmax, first.zoom, first.factor
        self.align = tuple(math.lcm(*a) for a in zip(*(m.align for m in members)))
        self.halo = tuple(-(-max(h) // a) * a for h, a in zip(zip(*(m.halo for m in members)), self.align))
        self.outputs = OUTPUTS
        self.kinds = {"mean": "intensity", "lower": "intensity", "upper": "intensity", "disagreement": "raw"}
        self.interval = check_interval(interval)
        self.scale_factor = float(scale_factor)
        self.fingerprint = ""
        net = getattr(first, "net", first)
        self.device = getattr(net, "device", "cpu")

    def member_outputs(self, x: np.ndarray, normalizer: Normalizer) -> tuple[np.ndarray, np.ndarray]:
        """Means and (recalibrated) scales of every member, each (M, C, *spatial), intensity units."""
        mus, bs = [], []
        for member, (mean, scale) in zip(self.members, self.heads):
            out = member.predict(x, normalizer)
            mus.append(out[mean])
            bs.append(out[scale] * np.float32(self.scale_factor))
        return np.stack(mus), np.stack(bs)

    def predict(self, x: np.ndarray, normalizer: Normalizer) -> dict[str, np.ndarray]:
        """Restore region ``x`` (C, *spatial): mixture mean, interval bounds and disagreement."""
        import torch

        from bigcare.predictors.mixture import disagreement, mixture_interval, mixture_mean

        mu, b = self.member_outputs(x, normalizer)
        shape = mu.shape[1:]
        with torch.inference_mode():
            # float32: every voxel is computed on its own (blockwise == whole volume up to rounding), and
            # float64 costs 8x on CPU
            tm = torch.from_numpy(np.ascontiguousarray(mu.reshape(len(mu), -1))).to(self.device)
            tb = torch.from_numpy(np.maximum(b, 1e-12).reshape(len(b), -1)).to(self.device)
            lower, upper = mixture_interval(tm, tb, self.interval)
            out = {"mean": mixture_mean(tm), "lower": lower, "upper": upper, "disagreement": disagreement(tm, tb)}
            return {k: v.float().cpu().numpy().reshape(shape) for k, v in out.items()}


@dataclass(frozen=True)
class EnsembleSpec:
    """How a worker builds an ensemble: its members (folder path, or None when sent; and hash).

    Small and picklable; travels in the run spec. Each member is built once per worker process
    (the same per-process cache single models use), and so is the ensemble around them.
    """

    members: tuple[tuple[str | None, str], ...]
    interval: float = 0.9
    scale_factor: float = 1.0

    def predictor(self, device: str, precision: Precision) -> EnsemblePredictor:
        """The ensemble predictor of this process (built on first use)."""
        from bigcare.predictors.base import cached_predictor, load_predictor
        from bigcare.predictors.shipping import shipped_predictor

        def member(path: str | None, mhash: str):
            if path is None:
                return shipped_predictor(mhash, device, precision)
            return load_predictor(path, device=device, precision=precision, expected_hash=mhash)

        # members first, each through the cache (its lock is not re-entrant: not inside build())
        members = [member(p, h) for p, h in self.members]
        labels = [p or h[:16] for p, h in self.members]

        def build():
            return EnsemblePredictor(members, labels, interval=self.interval, scale_factor=self.scale_factor)

        key = ("ensemble", self.members, self.interval, self.scale_factor, device, precision)
        return cached_predictor(key, build)  # type: ignore[return-value]


def ensemble_paths(model) -> list[str] | None:
    """The member folders ``model`` stands for: a list of two or more folders, or an ensemble
    folder (with ``ensemble.json``); None for anything else (one model)."""
    import os

    from bigcare.models.ensemble import ensemble_members, is_ensemble

    if isinstance(model, (list, tuple)):
        paths = [os.fspath(m) for m in model]
        if len(paths) == 1:
            return ensemble_paths(paths[0])
        return paths
    if isinstance(model, (str, os.PathLike)) and is_ensemble(model):
        return ensemble_members(model)
    return None


@dataclass
class ResolvedEnsemble:
    """An ensemble as the client sees it: its predictor (on CPU), identity, worker spec and bytes."""

    predictor: EnsemblePredictor
    hash: str
    spec: EnsembleSpec
    payloads: list
    label: str


def resolve_ensemble(model, *, ship_model: bool = True, interval: float = 0.9) -> ResolvedEnsemble:
    """Load an ensemble (member folders or an ensemble folder) on the client and say how workers get it.

    Raises
    ------
    ModelError
        For a member that is missing, invalid or not probabilistic, or members that differ in
        axes, channels, normalization or zoom.
    """
    import os

    from bigcare.models.ensemble import ensemble_hash, is_ensemble, load_ensemble
    from bigcare.models.folder import model_hash
    from bigcare.predictors.base import load_predictor
    from bigcare.predictors.shipping import ModelPayload

    paths = ensemble_paths(model)
    if paths is None:
        raise ModelError(f"{model} is not an ensemble (an ensemble folder with ensemble.json, or two or more models)")
    folder = model if isinstance(model, (str, os.PathLike)) and is_ensemble(model) else None
    scale_factor = load_ensemble(folder).scale_factor if folder is not None else 1.0
    hashes = [model_hash(p) for p in paths]
    members = [load_predictor(p, device="cpu", precision="fp32", expected_hash=h) for p, h in zip(paths, hashes)]
    predictor = EnsemblePredictor(members, paths, interval=interval, scale_factor=scale_factor)
    payloads = [ModelPayload.from_folder(p) for p in paths] if ship_model else []
    spec = EnsembleSpec(tuple((None if ship_model else p, h) for p, h in zip(paths, hashes)),
                        interval=predictor.interval, scale_factor=scale_factor)
    label = str(folder) if folder is not None else "ensemble of " + ", ".join(paths)
    return ResolvedEnsemble(predictor, ensemble_hash(hashes, scale_factor, predictor.interval), spec, payloads, label)


#: D thresholds the run summary counts voxels above
D_THRESHOLDS = (0.1, 0.25, 0.5)


def block_reliability(outputs: dict[str, np.ndarray], kinds: dict[str, str], interval: float = 0.9) -> dict | None:
    """Sums over one block's written outputs for the run summary (None for a model without readouts).

    An ensemble: voxels, sum of its interval width (``upper - lower``), sum of D and the count of
    voxels with D above each of :data:`D_THRESHOLDS`. A single probabilistic model: voxels and
    the sum of its 90% interval width, ``2 b log 10``.
    """
    if "disagreement" in outputs and "lower" in outputs and "upper" in outputs:
        d = outputs["disagreement"]
        width = outputs["upper"].astype(np.float64) - outputs["lower"]
        return {"voxels": int(d.size), "interval": interval, "width_sum": float(width.sum()),
                "d_sum": float(d.sum(dtype=np.float64)), "d_above": [int(np.count_nonzero(d > t)) for t in D_THRESHOLDS]}
    scales = [n for n, k in kinds.items() if k == "scale" and n in outputs]
    if scales:
        b = outputs[scales[0]]
        return {"voxels": int(b.size), "interval": 0.9, "width_sum": float(2 * math.log(10) * b.sum(dtype=np.float64))}
    return None


def merge_reliability(total: dict, block: dict | None) -> None:
    """Add one block's :func:`block_reliability` into a run's running sums (in place)."""
    if not block:
        return
    for key, value in block.items():
        if key == "interval":
            total[key] = value
        elif isinstance(value, list):
            total[key] = [a + b for a, b in zip(total.get(key, [0] * len(value)), value)]
        else:
            total[key] = total.get(key, 0) + value


def reliability_summary(total: dict) -> dict:
    """The summary's ``reliability`` entry from the run's sums: mean interval width, mean D and the
    fraction of voxels above each D threshold (over the blocks this run computed)."""
    if not total.get("voxels"):
        return {}
    n = total["voxels"]
    out = {"voxels": n, "interval": total.get("interval", 0.9), "mean_interval_width": total["width_sum"] / n}
    if "d_sum" in total:
        out["mean_disagreement"] = total["d_sum"] / n
        out["fraction_disagreement_above"] = {str(t): c / n for t, c in zip(D_THRESHOLDS, total["d_above"])}
    return out
