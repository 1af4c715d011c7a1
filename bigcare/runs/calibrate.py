"""Calibration of probabilistic models and ensembles on held-out pairs (CARE Fig. 5e, Suppl. Note 3).

::

    pairs (input, ground truth) ──► predict (read whole: give crops) ──► per member mu_k, b_k
      in normalized units: mu, b by the input's percentiles, y by the ground truth's own (as training)
      ──► coverage: share of voxels with y inside the central interval, at levels 10% .. 90%
      ──► ECE = mean over the levels of |coverage - level|
      ──► recalibrate (optional): one factor s for every scale, stored where restore reads it
            one Laplace model: s = mean(|y - mu| / b)  (the closed-form minimiser of the NLL in s)
            an ensemble:       s minimising the mixture NLL (golden-section search on log s)
      ──► calibration.json + calibration.png (coverage against level, before / after) in the model folder

A curve on the diagonal means the intervals hold what they claim; below it, they are too narrow.
The readouts are only as good as these pairs: use data like the data you restore.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from datetime import UTC, datetime

import numpy as np

from bigcare.errors import ConfigError, ModelError
from bigcare.types import PathLike

__all__ = ["LEVELS", "coverage", "expected_calibration_error", "fit_scale_factor", "calibrate"]

#: the central interval levels of the accuracy/confidence curve
LEVELS = tuple(round(0.1 * k, 1) for k in range(1, 10))


def _quantile_width(level: float) -> float:
    """Half-width of a Laplace's central ``level`` interval, in units of its scale: -log(1 - level)."""
    return -math.log1p(-level)


def coverage(mu: np.ndarray, b: np.ndarray, y: np.ndarray, levels=LEVELS) -> np.ndarray:
    """Share of ``y`` inside the central interval of the (mixture of) Laplace distributions, per level.

    Parameters
    ----------
    mu, b : numpy.ndarray
        (M, V) means and scales of M members (M = 1: one probabilistic model).
    y : numpy.ndarray
        (V,) observed values (the ground truth), in the same units.
    levels : sequence of float
        Interval levels in (0, 1).

    Returns
    -------
    numpy.ndarray
        Coverage per level.
    """
    mu, b, y = np.atleast_2d(mu), np.atleast_2d(b), np.asarray(y).ravel()
    if len(mu) == 1:  # a Laplace's interval is mu -+ b log(1 / (1 - level))
        r = np.abs(y - mu[0]) / b[0]
        return np.array([np.mean(r <= _quantile_width(a)) for a in levels])
    import torch

    from bigcare.predictors.mixture import mixture_interval

    tm, tb = torch.from_numpy(mu.astype(np.float32)), torch.from_numpy(b.astype(np.float32))
    out = []
    for a in levels:
        lower, upper = mixture_interval(tm, tb, a)
        out.append(np.mean((y >= lower.numpy()) & (y <= upper.numpy())))
    return np.array(out)


def expected_calibration_error(levels, cov) -> float:
    """Mean absolute gap between the coverage and the nominal level over the levels (0: calibrated)."""
    return float(np.mean(np.abs(np.asarray(cov) - np.asarray(levels))))


def _mixture_nll(mu: np.ndarray, b: np.ndarray, y: np.ndarray) -> float:
    from scipy.special import logsumexp

    logs = -np.log(2 * b) - np.abs(y - mu) / b
    return float(-np.mean(logsumexp(logs, axis=0) - np.log(len(mu))))


def fit_scale_factor(mu: np.ndarray, b: np.ndarray, y: np.ndarray) -> float:
    """The factor ``s`` for every scale that minimises the (mixture) Laplace NLL of ``y``.

    One member: the closed form ``s = mean(|y - mu| / b)``. Several: a golden-section search on
    ``log s`` in [-4, 4] (the mixture NLL has no closed form; it is smooth and, in practice,
    unimodal in ``log s``).
    """
    mu, b, y = np.atleast_2d(mu), np.atleast_2d(b), np.asarray(y).ravel()
    if len(mu) == 1:
        return float(np.mean(np.abs(y - mu[0]) / b[0]))
    lo, hi = -4.0, 4.0
    g = (math.sqrt(5) - 1) / 2
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = _mixture_nll(mu, b * math.exp(c), y), _mixture_nll(mu, b * math.exp(d), y)
    for _ in range(60):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = _mixture_nll(mu, b * math.exp(c), y)
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = _mixture_nll(mu, b * math.exp(d), y)
    return float(math.exp((lo + hi) / 2))


class _Members:
    """The members' means and scales of a (single or ensemble) predictor as outputs mu0, b0, mu1, ..."""

    def __init__(self, predictor):
        from bigcare.predictors.base import MEMBERS
        from bigcare.predictors.ensemble import EnsemblePredictor, _scale_head

        for name in MEMBERS:
            setattr(self, name, getattr(predictor, name))
        self.members = predictor.members if isinstance(predictor, EnsemblePredictor) else [predictor]
        # an ensemble's recalibration multiplies every member's scale (a single model's is inside it)
        self.factor = predictor.scale_factor if isinstance(predictor, EnsemblePredictor) else 1.0
        self.heads = [_scale_head(m, "the model") for m in self.members]
        self.outputs = tuple(f"{p}{k}" for k in range(len(self.members)) for p in ("mu", "b"))

    def predict(self, x, normalizer):
        out = {}
        for k, (member, (mean, scale)) in enumerate(zip(self.members, self.heads)):
            got = member.predict(x, normalizer)
            out[f"mu{k}"], out[f"b{k}"] = got[mean], got[scale] * np.float32(self.factor)
        return out


def _predictor(model, device: str, precision):
    from bigcare.predictors.base import load_predictor
    from bigcare.predictors.ensemble import ensemble_paths, resolve_ensemble

    if len(ensemble_paths(model) or ()) > 1:
        return resolve_ensemble(model, ship_model=False).spec.predictor(device, precision)
    from bigcare.models.folder import model_hash

    one = model[0] if isinstance(model, (list, tuple)) else model
    return load_predictor(str(one), device=device, precision=precision, expected_hash=model_hash(one))


def _pair_values(predictor, members: _Members, input: str, truth: str):
    """(mu, b, y) of one pair in normalized units, all voxels: (M, V), (M, V), (V,)."""
    from bigcare.blocks.layout import AxisLayout
    from bigcare.blocks.zoom import volume_zoom, zoom_region
    from bigcare.normalization import array_normalizer
    from bigcare.predictors.base import predict_region
    from bigcare.store.volume import open_volume

    vin, vgt = open_volume(input), open_volume(truth)
    data = np.asarray(vin.array(0)[...])  # read whole: calibration pairs are held-out crops
    gt = np.asarray(vgt.array(0)[...], dtype=np.float32)
    axes = "".join(vin.axis_names)
    layout = AxisLayout.build(axes, [a.kind for a in vin.axes], predictor.spatial_axes, predictor.n_channel_in,
                              predictor.n_channel_out, data.shape, vin.url, drop=getattr(predictor, "drop_axes", ""))
    c = axes.find("c")
    normalizer = array_normalizer(data, c if c >= 0 else None, predictor.pmin, predictor.pmax, name=vin.url)
    out = predict_region(members, layout, zoom_region(data, volume_zoom(predictor, layout)), normalizer)  # type: ignore[arg-type]
    shape = out["mu0"].shape
    if gt.shape != shape:
        raise ConfigError(f"ground truth {vgt.url} has shape {gt.shape}, the prediction of {vin.url} has {shape}: "
                          "give pairs of the same grid (for isotropic models: the ground truth on the restored grid)")
    y = array_normalizer(gt, c if c >= 0 else None, predictor.pmin, predictor.pmax, name=vgt.url)
    yn = y.normalize(gt[None] if c < 0 else np.moveaxis(gt, c, 0)).ravel()
    lo, hi = float(np.mean(normalizer.lo)), float(np.mean(normalizer.hi))
    span = hi - lo + normalizer.eps
    n = len(members.members)
    mu = np.stack([((out[f"mu{k}"] - lo) / span).ravel() for k in range(n)])
    b = np.stack([(out[f"b{k}"] / span).ravel() for k in range(n)])
    return mu, b, yn


def calibrate(model: PathLike | list[PathLike], pairs: list[tuple[PathLike, PathLike]], *, recalibrate: bool = False,
              device: str = "cpu", precision="fp32", levels=LEVELS, plot: bool = True) -> dict:
    """Measure (and optionally fit) the calibration of a probabilistic model or an ensemble.

    Parameters
    ----------
    model : path or list of paths
        A probabilistic model folder (``loss: laplace``), an ensemble folder, or member folders.
    pairs : list of (input, ground truth)
        Held-out OME-Zarr pairs, each read whole (give crops of a manageable size), the ground
        truth on the prediction's grid.
    recalibrate : bool
        Fit one scale factor and store it (``config.json``'s ``calibration`` or ``ensemble.json``'s
        ``scale_factor``); every later restore applies it. Needs a model or ensemble folder.
    device, precision
        Where the prediction runs.
    levels : sequence of float
        Central interval levels of the curve (default 10% .. 90%).
    plot : bool
        Draw ``calibration.png`` beside ``calibration.json``.

    Returns
    -------
    dict
        ``levels``, ``coverage``, ``ece`` (and ``scale_factor``, ``coverage_after``, ``ece_after``
        when recalibrating), ``voxels``, ``pairs``, ``json`` / ``png`` paths.

    Raises
    ------
    ModelError
        For a model without a Laplace scale head.
    ConfigError
        For no pairs, or a pair whose ground truth is on another grid.
    """
    if not pairs:
        raise ConfigError("calibrate needs at least one (input, ground truth) pair (--data IN GT ...)")
    predictor = _predictor(model, device, precision)
    members = _Members(predictor)
    values = [_pair_values(predictor, members, str(i), str(g)) for i, g in pairs]
    mu = np.concatenate([v[0] for v in values], axis=1)
    b = np.concatenate([v[1] for v in values], axis=1)
    y = np.concatenate([v[2] for v in values])
    levels = [float(a) for a in levels]
    cov = coverage(mu, b, y, levels)
    report: dict = {"levels": levels, "coverage": cov.tolist(), "ece": expected_calibration_error(levels, cov),
                    "voxels": int(y.size), "members": len(mu), "pairs": [[str(i), str(g)] for i, g in pairs],
                    "date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "mean_interval_width_90": _width(mu, b, 0.9)}
    folder = _folder(model)
    if recalibrate:
        if folder is None:
            raise ConfigError("--recalibrate stores the factor in a model or ensemble folder: give one folder, not "
                              "a list of members")
        s = fit_scale_factor(mu, b, y)
        after = coverage(mu, b * s, y, levels)
        report.update(scale_factor=s, coverage_after=after.tolist(), ece_after=expected_calibration_error(levels, after),
                      mean_interval_width_90_after=_width(mu, b * s, 0.9))
        report["stored_scale_factor"] = _store(folder, s, report["pairs"])
    if folder is not None:
        path = pathlib.Path(folder) / "calibration.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        report["json"] = str(path)
        if plot:
            report["png"] = str(_plot(report, pathlib.Path(folder) / "calibration.png"))
    return report


def _width(mu: np.ndarray, b: np.ndarray, level: float) -> float:
    """Mean width of the central ``level`` interval (normalized units)."""
    if len(mu) == 1:
        return float(np.mean(2 * b[0] * _quantile_width(level)))
    import torch

    from bigcare.predictors.mixture import mixture_interval

    lower, upper = mixture_interval(torch.from_numpy(mu.astype(np.float32)), torch.from_numpy(b.astype(np.float32)),
                                    level)
    return float((upper - lower).mean())


def _folder(model) -> str | None:
    if isinstance(model, (list, tuple)):
        return os.fspath(model[0]) if len(model) == 1 else None
    return os.fspath(model)


def _store(folder: str, s: float, pairs: list) -> float:
    """Multiply the folder's stored factor by ``s`` (the predictions already carried the old one)."""
    from bigcare.models.ensemble import is_ensemble, load_ensemble, save_ensemble
    from bigcare.models.folder import CONFIG_NAME, Calibration, load_config

    if is_ensemble(folder):
        config = load_ensemble(folder)
        config = config.model_copy(update={"scale_factor": config.scale_factor * s})
        save_ensemble(folder, config)
        return config.scale_factor
    model_config = load_config(folder)
    old = model_config.calibration.scale_factor if model_config.calibration is not None else 1.0
    updated = model_config.model_copy(update={"calibration": Calibration(scale_factor=old * s, pairs=pairs)})
    file = pathlib.Path(folder) / CONFIG_NAME
    tmp = file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(updated.model_dump(mode="json"), indent=2) + "\n")
    os.replace(tmp, file)
    if updated.calibration is None:  # pragma: no cover - for mypy
        raise ModelError("calibration was not stored")
    return updated.calibration.scale_factor


def _plot(report: dict, path: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=100)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="calibrated")
    ax.plot(report["levels"], report["coverage"], "o-", label=f"measured (ECE {report['ece']:.3f})")
    if "coverage_after" in report:
        ax.plot(report["levels"], report["coverage_after"], "s-",
                label=f"recalibrated x{report['scale_factor']:.3g} (ECE {report['ece_after']:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="interval level (confidence)", ylabel="coverage (accuracy)",
           title=f"calibration on {report['voxels']:,} voxels")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
