"""Percentile normalization (CSBDeep's convention), and the one percentile sampler.

A volume is normalized per channel as ``(x - lo) / (hi - lo + eps)`` (:func:`normalize`, the one
routine every path uses: restoration, training patches, metrics), with ``lo``/``hi`` the
``pmin``/``pmax`` percentiles (default 1 / 99.8) of the channel; network outputs are mapped back
with the inverse. The statistics of a terabyte volume cannot be computed by loading it, so
:func:`percentile_table` (used by restoration *and* training, so the same image gets the same
percentiles in both) reads it with tasks that carry chunk coordinates:

- **exact** when the channel holds at most ``EXACT_LIMIT`` voxels (2**24, 64 MiB of float32):
  it is read in one go and ``numpy.nanpercentile`` runs on it;
- **sampled** otherwise: ``n_chunks`` distinct chunks are drawn at random (seeded, the same
  draw for the same image shape and chunks), each read by a task that returns a seeded random
  subset of at most ``sample_voxels / n_chunks`` of its voxels, and the percentiles of the
  pooled sample are taken. Reads cost ``n_chunks`` chunks, whatever the volume size. With the
  default 4 Mi voxels from 256 chunks, the rank error of a percentile from i.i.d. sampling is
  ``sqrt(q (1 - q) / n)``, about 2e-5 in quantile at q = 0.998; spatial correlation inside
  chunks makes the real error larger, which is why many chunks are drawn (measured in
  ``tests/test_normalize.py``: sampled and exact agree within 1% of ``hi - lo``).

A coarse pyramid level is deliberately not used: averaging shifts high percentiles down.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from bigcare.errors import InputError
from bigcare.store.chunks import ImageRef, region_reader
from bigcare.tasks.runner import run_tasks

__all__ = ["EPS", "EXACT_LIMIT", "normalize", "Normalizer", "percentile_table", "volume_normalizer",
           "array_normalizer"]

#: CSBDeep's ``normalize_mi_ma`` epsilon.
EPS = 1e-20
#: Up to this many voxels per channel, percentiles are exact.
EXACT_LIMIT = 2**24


def normalize(x: np.ndarray, lo, hi, *, eps: float = EPS, dtype=np.float32) -> np.ndarray:
    """``(x - lo) / (hi - lo + eps)`` in ``dtype`` (float32 by default; float64 for metrics).

    ``lo`` and ``hi`` are scalars or arrays that broadcast against ``x`` (per channel, per
    sample). This is the only normalization routine of bigcare.
    """
    lo = np.asarray(lo, dtype=dtype)
    out = np.subtract(x, lo, dtype=dtype)
    # a division, not a multiply by the reciprocal: restoration's numbers stay bit for bit what
    # they were (the multiply is 0.04 ms faster per batch of 16 16x64x64 patches, <1% of a read)
    out /= np.asarray(hi, dtype=dtype) - lo + dtype(eps)
    return out


@dataclass(frozen=True)
class Normalizer:
    """Per-channel affine normalization ``(x - lo) / (hi - lo)`` and its inverse.

    Attributes
    ----------
    lo, hi : tuple of float
        Low and high percentile values, one per input channel.
    pmin, pmax : float
        The percentiles they were computed at.
    method : str
        ``"exact"`` or ``"sampled"``; how the statistics were computed.
    """

    lo: tuple[float, ...]
    hi: tuple[float, ...]
    pmin: float = 1.0
    pmax: float = 99.8
    method: str = "exact"
    eps: float = EPS

    def _shape(self, values, ndim_spatial: int) -> np.ndarray:
        return np.asarray(values, dtype=np.float32).reshape((-1,) + (1,) * ndim_spatial)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Normalize ``x`` of shape (C, *spatial) to float32."""
        return normalize(x, self._shape(self.lo, x.ndim - 1), self._shape(self.hi, x.ndim - 1), eps=self.eps)

    def denormalize(self, y: np.ndarray) -> np.ndarray:
        """Map a network output of shape (C_out, *spatial) back to intensity units.

        Output channels take the statistics of the matching input channel; when the channel
        counts differ, every output channel takes the mean statistics over input channels.
        """
        lo, hi = np.asarray(self.lo, np.float32), np.asarray(self.hi, np.float32)
        if y.shape[0] != lo.size:
            lo, hi = np.full(y.shape[0], lo.mean(), np.float32), np.full(y.shape[0], hi.mean(), np.float32)
        lo, hi = self._shape(lo, y.ndim - 1), self._shape(hi, y.ndim - 1)
        return y * (hi - lo + self.eps) + lo

    def as_dict(self) -> dict:
        return {"lo": list(self.lo), "hi": list(self.hi), "pmin": self.pmin, "pmax": self.pmax, "method": self.method}

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        return cls(tuple(d["lo"]), tuple(d["hi"]), d["pmin"], d["pmax"], d["method"])


def _sample_regions(ref: ImageRef, regions, n: int) -> np.ndarray:
    """Task: for each (start, size, seed), a seeded random subset of at most ``n`` voxels, float32."""
    out = []
    for start, size, seed in regions:
        values = region_reader(ref).read(ref.selection(start, size)).ravel()
        if values.size > n:
            values = values[np.sort(np.random.default_rng(seed).choice(values.size, size=n, replace=False))]
        out.append(values.astype(np.float32))
    return np.concatenate(out)


def percentile_table(ref: ImageRef, percentiles, *, client=None, seed: int = 0,
                     n_chunks: int = 256, sample_voxels: int = 2**22,
                     nan_fill: float | None = None) -> tuple[np.ndarray, str]:
    """Percentiles of one channel of an image level, without a dask graph of the whole level.

    Exact when the channel holds at most ``EXACT_LIMIT`` voxels (read in one go); otherwise
    ``n_chunks`` distinct chunks are drawn at random (seeded) and each read by one task that
    returns a random subset of ``sample_voxels / n_chunks`` voxels (see the module docstring).
    Many percentiles cost one pass.

    Parameters
    ----------
    ref : ImageRef
        The image level and channel.
    percentiles : array-like of float
        Percentiles in [0, 100].
    client : distributed.Client, optional
        Runs the chunk reads; else a local thread pool.
    seed : int
        Seed of the chunk choice and the subsets.
    n_chunks, sample_voxels : int
        Sampling sizes for large images.
    nan_fill : float, optional
        NaN/inf voxels count as this value; by default they are refused.

    Returns
    -------
    (numpy.ndarray, str)
        The values at ``percentiles`` and ``"exact"`` or ``"sampled"``.

    Raises
    ------
    InputError
        If the sampled voxels hold no finite value, or any NaN/inf without ``nan_fill``.
    """
    shape = [n for i, n in enumerate(ref.level.shape) if i != ref.channel_axis]
    chunks = [c for i, c in enumerate(ref.level.chunks) if i != ref.channel_axis]
    if math.prod(shape) <= EXACT_LIMIT:
        values = region_reader(ref).read(ref.selection([0] * len(shape), shape)).ravel().astype(np.float32)
        method = "exact"
    else:
        grid = [-(-n // c) for n, c in zip(shape, chunks)]
        total, want = math.prod(grid), min(n_chunks, math.prod(grid))
        rng, picks = np.random.default_rng([seed, 9]), np.zeros(0, np.int64)
        while len(picks) < want:  # distinct chunks without a permutation of the whole grid
            picks = np.unique(np.concatenate([picks, rng.integers(0, total, size=2 * want)]))
        picks = rng.permutation(picks)[:want]
        regions = []
        for k, flat in enumerate(picks):
            start = [int(i) * c for i, c in zip(np.unravel_index(flat, grid), chunks)]
            regions.append((start, [min(c, n - a) for c, n, a in zip(chunks, shape, start)], seed + k))
        items = [(ref, regions[a:a + 8], max(1, sample_voxels // want)) for a in range(0, want, 8)]
        values = np.concatenate(list(run_tasks(_sample_regions, items, client=client, in_flight=8, ordered=False,
                                               desc="percentiles", unit="read")))
        method = "sampled"
    where = ref.url if ref.channel is None else f"channel {ref.channel} of {ref.url}"
    if nan_fill is not None:
        values = np.where(np.isfinite(values), values, np.float32(nan_fill))
    return _percentiles(values, percentiles, where), method


def volume_normalizer(volume, pmin: float = 1.0, pmax: float = 99.8, *, client=None,
                      nan_fill: float | None = None) -> Normalizer:
    """The :class:`Normalizer` of an opened volume: :func:`percentile_table` per channel.

    With ``nan_fill``, NaN/inf voxels count as that value (as the blocks will read them).

    Raises
    ------
    InputError
        If a channel holds no finite value (e.g. an all-NaN volume).
    """
    c = volume.channel_axis
    channels = [None] if c is None else list(range(volume.shape[c]))
    lo, hi, methods = [], [], set()
    for ch in channels:
        values, method = percentile_table(volume.ref(ch), [pmin, pmax], client=client, nan_fill=nan_fill)
        lo.append(float(values[0]))
        hi.append(float(values[1]))
        methods.add(method)
    return Normalizer(tuple(lo), tuple(hi), float(pmin), float(pmax), "sampled" if "sampled" in methods else "exact")


def array_normalizer(data: np.ndarray, channel_axis: int | None, pmin: float = 1.0, pmax: float = 99.8, *,
                     name: str = "the array") -> Normalizer:
    """The exact :class:`Normalizer` of an in-memory array (per channel along ``channel_axis``)."""
    data = np.asarray(data)
    planes = [data] if channel_axis is None else list(np.moveaxis(data, channel_axis, 0))
    lo, hi = [], []
    for k, plane in enumerate(planes):
        a, b = _percentiles(plane.ravel().astype(np.float32), [pmin, pmax],
                            f"channel {k} of {name}" if channel_axis is not None else name)
        lo.append(float(a))
        hi.append(float(b))
    return Normalizer(tuple(lo), tuple(hi), float(pmin), float(pmax), "exact")


def _percentiles(values: np.ndarray, percentiles, name: str) -> np.ndarray:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN input is reported below
        table = np.nanpercentile(values, percentiles) if values.size else np.full(len(percentiles), np.nan)
    if not np.all(np.isfinite(table)):
        raise InputError(f"{name} holds no finite values ({values.size} voxels read are all NaN/inf); "
                         "cannot normalize it")
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:  # one NaN poisons every prediction whose receptive field holds it
        raise InputError(f"{name} holds NaN/inf voxels ({bad} of the {values.size} read for its percentiles); "
                         "bigcare refuses them instead of spreading them: replace them with a number first, "
                         "or pass --nan-fill VALUE (nan_fill=)")
    return table
