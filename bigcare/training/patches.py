"""Random training patches from in-memory (input, target) pairs.

This is the small-data source used by the demo and tests: both arrays are held in memory.
Huge datasets use the lazy sampler instead, which yields batches of the same form.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from bigcare.errors import ConfigError, InputError
from bigcare.metrics import normalize_percentile

__all__ = ["ArrayPairSampler"]


class ArrayPairSampler:
    """Draw random aligned patches from pairs of arrays, CSBDeep-normalized.

    Each input array is normalized with percentiles ``(pmin, pmax)`` of itself and each target
    with the same percentiles of itself, as CSBDeep does for training pairs.

    Parameters
    ----------
    pairs : list of (numpy.ndarray, numpy.ndarray)
        Aligned (input, target) arrays of identical spatial shape, no channel axis.
    patch_shape : tuple of int
        Spatial patch shape.
    pmin, pmax : float
        Normalization percentiles.
    flips : bool
        Augment with random flips along the lateral (last two) axes.
    seed : int
        Seed of the patch positions and augmentations.
    """

    def __init__(self, pairs, patch_shape, *, pmin=1.0, pmax=99.8, flips=True, seed=0):
        self.pairs = [(normalize_percentile(x, pmin, pmax), normalize_percentile(y, pmin, pmax)) for x, y in pairs]
        self.patch_shape = tuple(patch_shape)
        for x, y in self.pairs:
            if x.shape != y.shape or x.ndim != len(self.patch_shape):
                raise InputError(f"pair shapes {x.shape} / {y.shape} do not fit patch shape {self.patch_shape}")
            if any(p > n for p, n in zip(self.patch_shape, x.shape)):
                raise ConfigError(f"patch shape {self.patch_shape} is larger than the array {x.shape}")
        self.flips = flips
        self.rng = np.random.default_rng(seed)

    def patch(self) -> tuple[np.ndarray, np.ndarray]:
        """One random (input, target) patch pair, float32, shape (1, *patch_shape)."""
        x, y = self.pairs[self.rng.integers(len(self.pairs))]
        start = [self.rng.integers(n - p + 1) for n, p in zip(x.shape, self.patch_shape)]
        sl = tuple(slice(s, s + p) for s, p in zip(start, self.patch_shape))
        px, py = x[sl], y[sl]
        if self.flips:
            for axis in (-1, -2):
                if self.rng.random() < 0.5:
                    px, py = np.flip(px, axis), np.flip(py, axis)
        return np.ascontiguousarray(px)[None], np.ascontiguousarray(py)[None]

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Endless stream of (input, target) batches, each (batch_size, 1, *patch_shape)."""
        while True:
            xs, ys = zip(*(self.patch() for _ in range(batch_size)))
            yield np.stack(xs), np.stack(ys)
