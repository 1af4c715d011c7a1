"""Training data and training runs for surface projection CARE and upsampling CARE.

Projection pairs are a ZYX stack and a 2D YX image of its surface. :class:`ProjectionPatches`
draws lateral patch positions (seeded, foreground-aware on the 2D target, train and validation
from disjoint bands of rows) and reads, per patch, the stack's *whole Z* over the lateral box and
the target's box::

    stack (Z, Y, X) ──► x (1, Z, P, P)  every plane          target (Y, X) ──► y (1, P, P)
         rows:  | train band | val band | train band | ...   (a patch lies in bands of one kind)

Each image is normalized with its own percentiles (the model's ``pmin``/``pmax``, as prediction
normalizes the stack); lateral flips and rotations act on both alike. Patches are read lazily
from the stores, each once (kept in memory afterwards, up to ``CACHE_BYTES``); reads run in this
process, not on the cluster.

Upsampling pairs come from well-sampled volumes alone (:class:`ZSubsampling`): the sampler reads
a target patch a little deeper than the training patch, keeps every ``factor``-th plane,
upsamples back with :func:`bigcare.blocks.zoom.upsample_rows` (the interpolation prediction uses)
and crops both to the patch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bigcare.blocks.zoom import upsample_rows, zoom_length
from bigcare.errors import ConfigError, InputError
from bigcare.training.reads import augment
from bigcare.training.sources import Source

if TYPE_CHECKING:
    from bigcare.normalization import Normalizer
    from bigcare.store.volume import Volume
    from bigcare.training.config import TrainConfig
    from bigcare.training.trainer import TrainResult

__all__ = ["ProjectionPatches", "ZSubsampling", "check_method_config", "upsampling_factor", "train_projection"]

#: Patches kept in memory once read (bytes, inputs and targets together).
CACHE_BYTES = 2**30
#: Candidate positions tried per patch before a background patch is accepted.
FOREGROUND_TRIES = 20


def check_method_config(cfg: TrainConfig) -> None:
    """The cross-section rules of ``projection:`` and ``upsampling:`` (ValueError naming the key)."""
    from bigcare.models.projection_arch import projection_align

    data, which = cfg.data, "projection" if cfg.projection is not None else "upsampling"
    others = [k for k in ("isotropic", "self_supervised", "projection", "upsampling")
              if k != which and getattr(cfg, k) is not None]
    if others or cfg.training.method == "gan":
        raise ValueError(f"{which} and {others[0] if others else 'training.method gan'} are different methods: "
                         "give one of them")
    if cfg.training.ensemble > 1:
        raise ValueError(f"training.ensemble: {which} models train one member")
    if cfg.projection is not None:
        if len(data.patch_shape) != 2:
            raise ValueError(f"data.patch_shape: projection patches are lateral [Y, X] (every patch spans the "
                             f"stack's whole Z), got {data.patch_shape}")
        if any(s.target is None for s in data.sources):
            raise ValueError("projection training learns from (stack, 2D surface image) pairs: give every "
                             "data.sources entry an 'input' stack and a 'target' image")
        a = projection_align(cfg.projection.network, cfg.network)
        if any(p % a for p in data.patch_shape):
            raise ValueError(f"data.patch_shape {data.patch_shape} must be multiples of {a} (the lcm of both "
                             "sub-networks' pooling divisors)")
    else:
        if len(data.patch_shape) != 3:
            raise ValueError(f"data.patch_shape: upsampling CARE trains a 3D network on ZYX patches, got "
                             f"{data.patch_shape}")
        if any(s.target is not None or s.target_channel is not None for s in data.sources):
            raise ValueError("upsampling training makes its inputs from the sources: give data.sources without "
                             "'target'")


def upsampling_factor(cfg: TrainConfig, source: Source) -> int:
    """``upsampling.factor``, or the restored voxel_size_z over ``source``'s Z voxel size (a whole number)."""
    up = cfg.upsampling
    assert up is not None
    if up.factor is not None:
        return up.factor
    from bigcare.store.volume import open_volume

    volume = open_volume(source.input, storage_options=source.storage_options)
    scale = dict(zip(volume.axis_names, volume.scale))
    ratio = float(up.voxel_size_z or 0) / scale.get("z", 1.0)
    if round(ratio) < 2 or abs(ratio - round(ratio)) > 0.05:
        raise ConfigError(f"upsampling.voxel_size_z {up.voxel_size_z:g} / the Z voxel size {scale.get('z', 1.0):g} "
                          f"of {volume.url} is {ratio:g}; expected a whole number >= 2 (or give upsampling.factor)")
    return int(round(ratio))


@dataclass(frozen=True)
class ZSubsampling:
    """Upsampling CARE pairs from well-sampled ZYX patches: every ``factor``-th plane, upsampled back."""

    factor: int

    def read_shape(self, patch_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The target patch to read: Z ``ceil((P - 1) / f) * f + 1`` (its first and last plane kept)."""
        z = math.ceil((patch_shape[0] - 1) / self.factor) * self.factor + 1
        return (z, *patch_shape[1:])

    def pair(self, y: np.ndarray, patch_z: int) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of a batch ``y`` (N, C, Z_read, Y, X): x upsampled from ``y[:, :, ::f]``; both cropped."""
        coarse = y[:, :, ::self.factor]
        n = zoom_length(coarse.shape[2], self.factor)
        x = upsample_rows(coarse, 2, float(self.factor), 0, 0, n)
        return np.ascontiguousarray(x[:, :, :patch_z]), np.ascontiguousarray(y[:, :, :patch_z], dtype=np.float32)

    def batches(self, batches, patch_z: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Training pairs from a sampler's batches (their targets are used)."""
        for _, y in batches:
            yield self.pair(y, patch_z)


@dataclass
class _Pair:
    stack: Volume
    target: Volume
    channel: int | None
    norm_x: Normalizer
    norm_y: Normalizer
    threshold: float  # foreground: a target patch's maximum must exceed it


def _lateral(volume, what: str, index: int, allowed: Sequence[str]) -> tuple[int, int]:
    axes = "".join(volume.axis_names)
    if axes not in allowed:
        raise InputError(f"sources.{index}.{what}: {volume.url} has axes {axes.upper()!r}; projection training "
                         f"expects {' or '.join(a.upper() for a in allowed)}")
    return volume.shape[axes.index("y")], volume.shape[axes.index("x")]


class ProjectionPatches:
    """Seeded (stack, 2D target) patch pairs for projection training (see the module docstring).

    Parameters
    ----------
    sources : sequence of Source
        ``input``: a ZYX (or CZYX) stack; ``target``: a YX image of the same lateral shape.
    patch_shape : (int, int)
        Lateral patch ``(P_y, P_x)``.
    n_patches, validation_fraction, seed, batch_size, foreground_threshold, foreground_percentile, augment
        As for :class:`~bigcare.training.sampling.PatchSampler`.
    pmin, pmax : float
        Percentiles each image is normalized with.
    """

    def __init__(self, sources: Sequence[Source], patch_shape: Sequence[int], *, n_patches: int,
                 validation_fraction: float, seed: int = 0, batch_size: int = 16, pmin: float = 2.0,
                 pmax: float = 99.7, foreground_threshold: float = 0.4, foreground_percentile: float = 99.9,
                 augment: bool = True):
        from bigcare.normalization import volume_normalizer
        from bigcare.store.volume import check_finished, open_volume

        self.patch = (int(patch_shape[0]), int(patch_shape[1]))
        self.batch_size, self.seed, self.augment = batch_size, seed, augment
        self.pairs: list[_Pair] = []
        for i, src in enumerate(sources):
            if src.target is None:
                raise ConfigError(f"sources.{i}: projection training needs a 'target' (the 2D surface image)")
            stack = open_volume(src.input, storage_options=src.storage_options)
            target = open_volume(src.target, storage_options=src.storage_options)
            check_finished(stack)
            check_finished(target)
            lat = _lateral(stack, "input", i, ("zyx", "czyx"))
            if _lateral(target, "target", i, ("yx", "cyx")) != lat:
                raise InputError(f"sources.{i}: the stack {stack.url} is {lat[0]} x {lat[1]} (Y x X), the target "
                                 f"{target.url} is {target.shape}; expected the same lateral shape")
            if any(p > n for p, n in zip(self.patch, lat)):
                raise ConfigError(f"patch_shape {self.patch} is larger than sources.{i} ({stack.url}, Y x X {lat})")
            fg = max(volume_normalizer(target, 0.0, foreground_percentile).hi) if foreground_threshold > 0 else 0.0
            self.pairs.append(_Pair(stack, target, src.input_channel or 0 if stack.channel_axis is not None else None,
                                    volume_normalizer(stack, pmin, pmax), volume_normalizer(target, pmin, pmax),
                                    float(foreground_threshold * fg)))
        depths = {p.stack.shape[-3] for p in self.pairs}
        if len(depths) != 1:
            raise InputError(f"projection training stacks must have one depth (a batch is one array), got Z sizes "
                             f"{sorted(depths)}; crop them to a common Z around the surface")
        self.depth = depths.pop()
        n_val = max(1, round(n_patches * validation_fraction)) if validation_fraction > 0 else 0
        self._cache: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        rng = np.random.default_rng([seed, 23])
        self.val_positions = self._draw(n_val, "val", rng)
        self.train_positions = self._draw(n_patches - n_val, "train", rng)

    def _bands(self, i: int) -> np.ndarray:
        """Per band of P_y rows of image ``i``: True for validation (seeded, ~10% and at least one)."""
        rows = self.pairs[i].target.shape[-2]
        n = max(1, rows // self.patch[0])
        val = np.zeros(n, bool)
        if n >= 2:
            val[np.random.default_rng([self.seed, 29, i]).choice(n, max(1, round(0.1 * n)), replace=False)] = True
        return val

    def _draw(self, n: int, split: str, rng: np.random.Generator) -> np.ndarray:
        """``n`` positions (source, y, x) of ``split``: inside bands of that kind, foreground preferred."""
        py, px = self.patch
        areas = np.array([p.target.shape[-2] * p.target.shape[-1] for p in self.pairs], np.float64)
        out = []
        allowed = []
        for i, pair in enumerate(self.pairs):
            bands, rows = self._bands(i), pair.target.shape[-2]
            starts = np.arange(rows - py + 1)
            kind = [bands[min(len(bands) - 1, s // py):min(len(bands), (s + py - 1) // py + 1)] for s in starts]
            want = split == "val"
            allowed.append(starts[[bool(len(k)) and bool(np.all(k == want)) for k in kind]])
            if len(bands) < 2 and split == "val":  # one band: validation and training share it
                allowed[-1] = starts
        if n and not any(len(a) for a in allowed):
            raise ConfigError(f"no {split} patch of {self.patch} fits the images' {split} rows; use larger images or "
                              "a smaller data.patch_shape")
        p = areas * np.array([len(a) > 0 for a in allowed])
        for _ in range(n):
            i = int(rng.choice(len(self.pairs), p=p / p.sum()))
            cols = self.pairs[i].target.shape[-1] - px + 1
            for _ in range(FOREGROUND_TRIES):
                y, x = int(rng.choice(allowed[i])), int(rng.integers(0, cols))
                if self._read(i, y, x)[1].max() > self.pairs[i].threshold:
                    break
            out.append((i, y, x))
        return np.array(out, np.int64).reshape(-1, 3)

    def _read(self, i: int, y: int, x: int) -> tuple[np.ndarray, np.ndarray]:
        """The normalized (1, Z, P, P) stack patch and (1, P, P) target patch at ``(y, x)`` of pair ``i``."""
        key = (i, y, x)
        if key in self._cache:
            return self._cache[key]
        pair, (py, px) = self.pairs[i], self.patch
        lat = (slice(y, y + py), slice(x, x + px))
        s = pair.stack.array(0)
        xs = np.asarray(s[(slice(None),) + lat] if pair.channel is None else s[(pair.channel, slice(None)) + lat])
        t = pair.target.array(0)
        yt = np.asarray(t[lat] if t.ndim == 2 else t[(pair.channel or 0,) + lat])
        if not (np.isfinite(xs).all() and np.isfinite(yt).all()):
            raise InputError(f"sources.{i}: the training patch at y={y}, x={x} holds NaN/inf voxels; replace them first")
        value = (pair.norm_x.normalize(xs[None]), pair.norm_y.normalize(yt[None]))
        if sum(v.nbytes for v in value) * (len(self._cache) + 1) <= CACHE_BYTES:
            self._cache[key] = value
        return value

    def batches(self, split: str = "train", *, order_seed: int | None = None,
                epochs: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches ``(x (N, 1, Z, P, P), y (N, 1, P, P))``: training endless and augmented, validation in order."""
        from bigcare.training.sampling import batch_order

        positions = self.train_positions if split == "train" else self.val_positions
        codes = 8 if self.augment and self.patch[0] == self.patch[1] else 4 if self.augment else 1
        for idx, code in batch_order(len(positions), batch_size=self.batch_size,
                                     seed=self.seed if order_seed is None else order_seed,
                                     epochs=epochs, n_codes=codes, shuffle=split == "train"):
            pairs = [self._read(*(int(v) for v in positions[k])) for k in idx]
            yield (np.stack([augment(a, int(c)) for (a, _), c in zip(pairs, code)]).astype(np.float32),
                   np.stack([augment(b, int(c)) for (_, b), c in zip(pairs, code)]).astype(np.float32))

    @property
    def provenance(self) -> dict:
        """Sources, patch shape and counts (for the model folder's config)."""
        return {"sources": [{"input": p.stack.url, "target": p.target.url} for p in self.pairs],
                "patch_shape": [self.depth, *self.patch], "n_train": len(self.train_positions),
                "n_val": len(self.val_positions)}


def train_projection(cfg: TrainConfig, device: str, precision: str, progress: bool, provenance) -> TrainResult:
    """Train a projection model as ``cfg`` describes (called by :func:`bigcare.train`).

    ``provenance(cfg, data, device, precision)`` builds the model config's provenance.
    """
    import torch

    from bigcare.models.folder import ModelConfig, Normalization, ProjectionConfig
    from bigcare.models.projection import ProjectionCARENet
    from bigcare.training.trainer import fit

    data, opt, section = cfg.data, cfg.training, cfg.projection
    assert section is not None
    normalization = Normalization(pmin=sum(data.pmin_range) / 2, pmax=sum(data.pmax_range) / 2)
    patches = ProjectionPatches(data.sources, data.patch_shape, n_patches=data.n_patches,
                                validation_fraction=data.validation_fraction, seed=opt.seed,
                                batch_size=opt.batch_size, pmin=normalization.pmin, pmax=normalization.pmax,
                                foreground_threshold=data.foreground_threshold,
                                foreground_percentile=data.foreground_percentile, augment=data.augment)
    config = ModelConfig(kind="projection", axes="ZYX", architecture=cfg.network, normalization=normalization,
                         projection=ProjectionConfig(network=section.network),
                         provenance=provenance(cfg, patches.provenance, device, precision))
    torch.manual_seed(opt.seed)
    model = ProjectionCARENet(cfg.network, section.network)
    if progress:
        print(f"training a projection CARE network ({sum(p.numel() for p in model.parameters()):,} parameters) on "
              f"{len(patches.train_positions)} training / {len(patches.val_positions)} validation stacks of "
              f"{patches.depth} planes, {device} {precision}", flush=True)
    return fit(model, config, patches.batches("train"), validation=list(patches.batches("val", epochs=1)),  # type: ignore[arg-type]
               epochs=opt.epochs, steps_per_epoch=opt.steps_per_epoch, lr=opt.lr, lr_schedule=opt.lr_schedule,
               loss=opt.loss, device=device,
               precision=precision, model_dir=cfg.model_dir, resume=opt.resume, tensorboard=opt.tensorboard,
               seed=opt.seed, progress=progress)
