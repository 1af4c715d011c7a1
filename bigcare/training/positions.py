"""Where training patches go: foreground-aware, seeded, in disjoint train/validation regions.

Positions are drawn on a *coarse grid* of the target image, never on full-resolution data. One
coarse *cell* covers ``F`` full-resolution voxels along each axis (a pyramid level, reduced
further by a mean over ``G`` cells when that level is still larger than ``COARSE_CELLS``)::

    full res    |....|....|....|....|....|....|....|    patch starts s in [0, N - P]
    cells       |  0 |  1 |  2 |  3 |  4 |  5 |  6 |    cell c holds the starts cF .. cF + F - 1
    zones       |  zone 0 (T cells) |  zone 1 ...  |    each zone is train or validation
    patch            [s ........ s+P)                   start in cell c = s // F; the patch
                                                        touches cells c .. c + Kmax - 1 at most

- **Foreground** (CSBDeep's ``no_background_patches``): cell ``c`` is foreground when the
  maximum of the coarse target over the ``ceil(P / F)`` cells from ``c`` exceeds
  ``threshold * percentile(coarse target, percentile)``. ``threshold <= 0`` keeps every cell.
- **Split**: the cell grid is cut into zones of a few patch lengths; a seeded draw sends a
  fraction of the zones holding foreground to validation. A start is eligible for a split only
  when every cell its patch can touch (``Kmax = (F + P - 2) // F + 1`` cells from ``c``) lies
  in zones of that split, so train and validation footprints never overlap.
- **Draw**: starts are uniform over the eligible foreground starts of all sources together
  (a cell is drawn with probability proportional to its number of valid starts, then a start
  uniformly inside it).

Memory is a few arrays of the coarse grid's size per source, at most ``COARSE_CELLS`` cells
each. The coarse grid is re-read (not kept) when many sources together exceed that size.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bigcare.errors import ConfigError, InputError
from bigcare.store.chunks import ImageRef, region_reader
from bigcare.store.pyramid import mean_reduce
from bigcare.store.volume import Volume
from bigcare.tasks.runner import run_tasks

__all__ = ["COARSE_CELLS", "CoarseGrid", "Geometry", "Draw", "choose_coarse", "read_coarse",
           "draw_positions", "forward_max"]

#: Largest coarse grid (cells per source) the sampler holds; 4 Mi cells = 16 MiB of float32.
COARSE_CELLS = 2**22


@dataclass(frozen=True)
class CoarseGrid:
    """The coarse grid of one image: which level, and how many voxels a cell covers.

    Attributes
    ----------
    level : int
        Pyramid level read.
    extra : tuple of int
        Further mean-reduction of that level per non-channel axis (1 = none).
    factors : tuple of int
        Full-resolution voxels per cell along each non-channel axis (``F``).
    shape : tuple of int
        Cells along each non-channel axis, ``ceil(N / F)``.
    """

    level: int
    extra: tuple[int, ...]
    factors: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Geometry:
    """One source's non-channel axes as the draw sees them.

    Attributes
    ----------
    shape : tuple of int
        Full-resolution shape ``N`` (non-channel axes).
    footprint : tuple of int
        Patch extent ``P`` per axis (1 on axes the patch does not extend along).
    grid : CoarseGrid
        The coarse grid of the target.
    zone_unit : tuple of int
        Zone extent in voxels for one patch length (zones are 2-4 units).
    """

    shape: tuple[int, ...]
    footprint: tuple[int, ...]
    grid: CoarseGrid
    zone_unit: tuple[int, ...]

    def starts_per_cell(self) -> list[np.ndarray]:
        """Per axis, how many valid patch starts each cell holds."""
        out = []
        for n, p, f, m in zip(self.shape, self.footprint, self.grid.factors, self.grid.shape):
            last = n - p  # last valid start
            out.append(np.clip(last + 1 - np.arange(m) * f, 0, f).astype(np.float32))
        return out

    def reach(self) -> tuple[int, ...]:
        """``Kmax``: cells a patch starting in one cell can touch."""
        return tuple((f + p - 2) // f + 1 for f, p in zip(self.grid.factors, self.footprint))


def _level_factors(volume: Volume, level: int, axes: Sequence[int]) -> tuple[int, ...]:
    base, lv = volume.levels[0], volume.levels[level]
    out = []
    for i in axes:
        f = max(1, round(lv.scale[i] / base.scale[i])) if base.scale[i] > 0 else 1
        if lv.shape[i] not in (-(-base.shape[i] // f), base.shape[i] // f):
            f = max(1, round(base.shape[i] / lv.shape[i]))  # scale metadata disagrees: trust shapes
        out.append(f)
    return tuple(out)


def choose_coarse(volume: Volume, axes: Sequence[int], footprint: Sequence[int], spatial: Sequence[bool],
                  *, level: int | None = None, budget: int = COARSE_CELLS) -> CoarseGrid:
    """Pick the coarse grid of an image for patches of ``footprint``.

    Without ``level``: the coarsest pyramid level whose cells are at most half a patch along
    every patch axis (``F <= max(1, P // 2)``). If that level has more than ``budget`` cells, it
    is mean-reduced further, halving the axis with the most cells per patch first.

    Parameters
    ----------
    volume : Volume
        The (target) image.
    axes : sequence of int
        Array positions of its non-channel axes.
    footprint : sequence of int
        Patch extent per non-channel axis.
    spatial : sequence of bool
        Axes that may be coarsened (space axes; never time).
    level : int, optional
        Use this pyramid level instead of choosing.
    budget : int
        Most cells allowed.

    Returns
    -------
    CoarseGrid

    Raises
    ------
    ConfigError
        If ``level`` is not a level of the image.
    """
    shape = [volume.shape[i] for i in axes]
    if level is None:
        level = 0
        for k in range(1, len(volume.levels)):
            f = _level_factors(volume, k, axes)
            if all(fi <= max(1, p // 2) for fi, p, s in zip(f, footprint, spatial) if p > 1 or not s):
                level = k
    elif not (isinstance(level, (int, np.integer)) and 0 <= level < len(volume.levels)):
        raise ConfigError(f"coarse_level: {volume.url} has levels 0..{len(volume.levels) - 1}, got {level!r}")
    base = _level_factors(volume, level, axes)
    extra = [1] * len(axes)

    def cells() -> list[int]:
        return [-(-n // (b * e)) for n, b, e in zip(shape, base, extra)]

    while math.prod(cells()) > budget:
        m = cells()
        candidates = [i for i in range(len(axes)) if spatial[i] and m[i] > 1]
        if not candidates:
            break
        i = max(candidates, key=lambda i: (footprint[i] / (base[i] * extra[i]), m[i]))
        extra[i] *= 2
    factors = tuple(b * e for b, e in zip(base, extra))
    return CoarseGrid(level, tuple(extra), factors, tuple(cells()))


def _reduce_region(ref: ImageRef, start, size, extra, out_shape) -> tuple[tuple[int, ...], np.ndarray]:
    """Task: mean over ``extra``-sized cells of one region of a level (edge-padded at the end)."""
    block = region_reader(ref).read(ref.selection(start, size))
    block = block.reshape(size)
    return tuple(s // e for s, e in zip(start, extra)), mean_reduce(block, tuple(extra), tuple(out_shape), np.dtype(np.float32))


def read_coarse(ref: ImageRef, grid: CoarseGrid, full_shape: Sequence[int], *, client=None) -> np.ndarray:
    """The coarse grid of one image channel as float32 (non-channel axes only).

    ``ref`` names the pyramid level ``grid.level``. With no extra reduction the level is read
    whole (it has at most the budget's cells); otherwise one task per region of about a chunk
    reads and mean-reduces it, on the cluster when ``client`` is given, so memory stays at a
    few chunks per worker plus the small result.
    """
    level_shape = [n for i, n in enumerate(ref.level.shape) if i != ref.channel_axis]
    if all(e == 1 for e in grid.extra):
        sel = ref.selection([0] * len(level_shape), level_shape)
        coarse = np.asarray(region_reader(ref).read(sel)).reshape(level_shape).astype(np.float32)
    else:
        chunks = [c for i, c in enumerate(ref.level.chunks) if i != ref.channel_axis]
        step = [-(-c // e) * e for c, e in zip(chunks, grid.extra)]
        out_shape = [-(-n // e) for n, e in zip(level_shape, grid.extra)]
        coarse = np.empty(out_shape, np.float32)
        items = []
        for idx in np.ndindex(*[-(-n // s) for n, s in zip(level_shape, step)]):
            start = [i * s for i, s in zip(idx, step)]
            size = [min(s, n - a) for s, n, a in zip(step, level_shape, start)]
            items.append((ref, start, size, grid.extra, [-(-z // e) for z, e in zip(size, grid.extra)]))
        for origin, block in run_tasks(_reduce_region, items, client=client, in_flight=16, ordered=False):
            coarse[tuple(slice(o, o + b) for o, b in zip(origin, block.shape))] = block
    pad = [(0, m - c) for m, c in zip(grid.shape, coarse.shape)]
    if any(p for _, p in pad):  # a pyramid that floors its shapes: cover the last partial cells
        coarse = np.pad(coarse, pad, mode="edge")
    return coarse[tuple(slice(0, m) for m in grid.shape)]


# --- the draw ------------------------------------------------------------------------------------


def forward_max(a: np.ndarray, window: Sequence[int]) -> np.ndarray:
    """``out[c] = max(a[c : c + window])`` per axis (windows truncated at the end)."""
    out = a.copy()
    for axis, k in enumerate(window):
        w = 1
        while w < k:
            s = min(w, k - w)
            head = [slice(None)] * a.ndim
            tail = [slice(None)] * a.ndim
            head[axis], tail[axis] = slice(0, -s), slice(s, None)
            np.maximum(out[tuple(head)], out[tuple(tail)], out=out[tuple(head)])
            w += s
    return out


def _foreground(coarse: np.ndarray, geom: Geometry, threshold: float, percentile: float) -> np.ndarray:
    if threshold <= 0:
        return np.ones(coarse.shape, bool)
    reference = np.nanpercentile(coarse, percentile)
    k = tuple(-(-p // f) for p, f in zip(geom.footprint, geom.grid.factors))
    return forward_max(np.nan_to_num(coarse, nan=-np.inf), k) > threshold * reference


def _weights(geom: Geometry) -> np.ndarray:
    return functools.reduce(np.multiply.outer, geom.starts_per_cell())


def _zone_sums(a: np.ndarray, zones: Sequence[int]) -> np.ndarray:
    for axis, t in enumerate(zones):
        a = np.add.reduceat(a, np.arange(0, a.shape[axis], t), axis=axis)
    return a


def _zone_cells(geom: Geometry, k: int) -> tuple[int, ...]:
    return tuple(max(1, -(-k * u // f)) for u, f in zip(geom.zone_unit, geom.grid.factors))


@dataclass
class Draw:
    """The drawn positions and what the draw found.

    Attributes
    ----------
    train, val : numpy.ndarray of int64, shape (n, 1 + D)
        Column 0 the source index, then the start voxel along the non-channel axes,
        right-aligned; sources with fewer than D axes have -1 in the leading columns.
    per_source : list of dict
        ``n_train``, ``n_val``, ``foreground_fraction`` (of valid starts), ``coarse_level``,
        ``coarse_factors``, ``zone_shape`` (voxels).
    n_zones, n_val_zones : int
        Zones holding foreground, and those sent to validation.
    """

    train: np.ndarray
    val: np.ndarray
    per_source: list[dict]
    n_zones: int
    n_val_zones: int


def draw_positions(geoms: Sequence[Geometry], coarse: Callable[[int], np.ndarray], *, n_train: int, n_val: int,
                   threshold: float, percentile: float, seed: int, names: Sequence[str]) -> Draw:
    """Draw ``n_train`` training and ``n_val`` validation starts (see the module docstring).

    Parameters
    ----------
    geoms : sequence of Geometry
        One per source.
    coarse : callable
        ``coarse(i)`` returns source ``i``'s coarse target grid (float32, ``geoms[i].grid.shape``).
    n_train, n_val : int
        Numbers of positions.
    threshold, percentile : float
        Foreground rule.
    seed : int
        Seed of the draw.
    names : sequence of str
        Source names for error messages.

    Returns
    -------
    Draw

    Raises
    ------
    InputError
        If no source holds foreground, or too little of it for a disjoint validation split.
    """

    def rng(*key: int) -> np.random.Generator:  # one independent stream per purpose
        return np.random.default_rng([seed, *key])

    depth = max(len(g.shape) for g in geoms)
    zones = _zone_shapes(geoms, n_train, n_val)
    fg = _ForegroundRule(coarse, geoms, threshold, percentile)
    zone_fg, fg_fraction = _foreground_per_zone(geoms, zones, fg, names)
    offsets = np.cumsum([0] + [t.size for t in zone_fg])
    is_val_zone, n_fg_zones, n_val_zones = _validation_zones(zone_fg, offsets, n_train, n_val, rng(1),
                                                             geoms[0], zones[0], names)

    def candidates(i: int) -> tuple[np.ndarray, np.ndarray]:
        """Weights of the starts eligible for training and for validation in source ``i``."""
        g = geoms[i]
        fgw = _weights(g) * fg(i)
        labels = is_val_zone[offsets[i]:offsets[i + 1]].reshape(zone_fg[i].shape)
        val = labels[np.ix_(*[np.arange(m) // t for m, t in zip(g.grid.shape, zones[i])])]
        reach = g.reach()
        return fgw * ~forward_max(val, reach), fgw * ~forward_max(~val, reach)

    counts = _allocate(candidates, len(geoms), n_train, n_val, rng, names)
    drawn: list[list[np.ndarray]] = [[], []]
    for i, g in enumerate(geoms):
        if counts[i].any():
            for split, weights in enumerate(candidates(i)):
                if counts[i, split]:
                    drawn[split].append(_draw_starts(g, i, weights, int(counts[i, split]), depth, rng(3, i, split)))
    train, val = (np.concatenate(d) if d else np.zeros((0, 1 + depth), np.int64) for d in drawn)
    train = train[rng(4, 0).permutation(len(train))]
    val = val[rng(4, 1).permutation(len(val))]
    per_source = [{
        "n_train": int(counts[i, 0]), "n_val": int(counts[i, 1]),
        "foreground_fraction": round(fg_fraction[i], 6),
        "coarse_level": g.grid.level, "coarse_factors": list(g.grid.factors),
        "zone_shape": [int(t * f) for t, f in zip(zones[i], g.grid.factors)],
    } for i, g in enumerate(geoms)]
    return Draw(train, val, per_source, n_fg_zones, n_val_zones)


class _ForegroundRule:
    """``fg(i)``: the foreground cells of source ``i`` (recomputed: the coarse grid is not kept)."""

    def __init__(self, coarse: Callable[[int], np.ndarray], geoms: Sequence[Geometry], threshold: float,
                 percentile: float):
        self.coarse, self.geoms, self.threshold, self.percentile = coarse, geoms, threshold, percentile

    def __call__(self, i: int) -> np.ndarray:
        return _foreground(self.coarse(i), self.geoms[i], self.threshold, self.percentile)


def _zone_shapes(geoms: Sequence[Geometry], n_train: int, n_val: int) -> list[tuple[int, ...]]:
    """Zones of k patch lengths (in cells): k = 4 when there are enough of them, else down to 2."""
    k = 2
    if not n_val:
        return [_zone_cells(g, k) for g in geoms]
    needed = max(20, math.ceil(2 * (n_train + n_val) / n_val))  # validation gets >= 2 zones

    def count(zones) -> int:
        return sum(math.prod(-(-m // t) for m, t in zip(g.grid.shape, z)) for g, z in zip(geoms, zones))

    for k in (4, 3, 2):
        zones = [_zone_cells(g, k) for g in geoms]
        if count(zones) >= needed:
            return zones
    # Too few zones of the patch's physical size: on axes the patches do not span (Z of a
    # thin stack with 2D patches) zones become as thin as it takes, down to one plane; the
    # validation patches are then disjoint from the training ones, but neighbouring planes
    # are alike, so the validation loss is optimistic: said, not hidden.
    thin = []
    for g, z in zip(geoms, zones):
        thin.append(tuple(t if p > 1 or m == 1 else min(t, max(1, -(-m // min(m, needed))))
                          for m, t, p in zip(g.grid.shape, z, g.footprint)))
    if count(thin) > count(zones):
        warnings.warn(
            f"the sources are small for disjoint validation: zones of the patch's size give {count(zones)}; "
            f"along axes the patches do not span they are cut thinner (to {thin[0]} cells of the first source), "
            "so validation patches lie on other planes than training patches but near them: the validation loss "
            "is optimistic. More or larger volumes avoid it.", UserWarning, stacklevel=3)
        return thin
    return zones


def _foreground_per_zone(geoms: Sequence[Geometry], zones: Sequence[tuple[int, ...]], fg: _ForegroundRule,
                         names: Sequence[str]) -> tuple[list[np.ndarray], list[float]]:
    """Per source and zone, the foreground starts whose patches stay inside the zone (those a
    validation zone keeps whatever its neighbours are); and each source's foreground fraction."""
    zone_fg, fg_fraction, any_fg = [], [], False
    for i, g in enumerate(geoms):
        w = _weights(g)
        fgw = w * fg(i)
        total = float(fgw.sum(dtype=np.float64))
        any_fg = any_fg or total > 0
        fg_fraction.append(total / max(float(w.sum(dtype=np.float64)), 1.0))
        inside = []
        for m, t, kmax in zip(g.grid.shape, zones[i], g.reach()):
            c = np.arange(m)
            inside.append(np.minimum(c + kmax, m) <= np.minimum((c // t + 1) * t, m))
        zone_fg.append(_zone_sums(fgw * functools.reduce(np.multiply.outer, inside), zones[i]))
    if not any_fg:
        raise InputError(
            f"no foreground found in {', '.join(names)}: no patch position has a target maximum above "
            f"foreground_threshold={fg.threshold} x the {fg.percentile} percentile; lower foreground_threshold "
            "(0 samples uniformly) or check the target images"
        )
    return zone_fg, fg_fraction


def _validation_zones(zone_fg: list[np.ndarray], offsets: np.ndarray, n_train: int, n_val: int,
                      rng: np.random.Generator, geom0: Geometry, zone0: tuple[int, ...],
                      names: Sequence[str]) -> tuple[np.ndarray, int, int]:
    """A seeded choice of validation zones among the zones holding foreground (flat over sources)."""
    fg_zones = np.concatenate([np.flatnonzero(t) + o for t, o in zip(zone_fg, offsets)])
    is_val_zone = np.zeros(offsets[-1], bool)
    n_val_zones = 0
    if n_val:
        if len(fg_zones) < 2:
            raise InputError(
                f"cannot draw disjoint validation patches: {', '.join(names)} hold(s) foreground in only "
                f"{len(fg_zones)} zone of {tuple(int(t * f) for t, f in zip(zone0, geom0.grid.factors))} "
                "voxels; use larger or more volumes, a smaller patch_shape or a lower foreground_threshold"
            )
        n_val_zones = min(len(fg_zones) - 1, max(1, round(len(fg_zones) * n_val / (n_train + n_val))))
        is_val_zone[rng.choice(fg_zones, size=n_val_zones, replace=False)] = True
    return is_val_zone, int(len(fg_zones)), n_val_zones


def _allocate(candidates: Callable[[int], tuple[np.ndarray, np.ndarray]], n_sources: int, n_train: int, n_val: int,
              rng: Callable[..., np.random.Generator], names: Sequence[str]) -> np.ndarray:
    """Positions per source and split (multinomial in the eligible weight of each source)."""
    totals = np.array([[c.sum(dtype=np.float64) for c in candidates(i)] for i in range(n_sources)]).reshape(-1, 2)
    counts = np.zeros((n_sources, 2), np.int64)
    for split, n in ((0, n_train), (1, n_val)):
        if n == 0:
            continue
        if totals[:, split].sum() <= 0:
            what = "training" if split == 0 else "validation"
            raise InputError(
                f"no {what} positions: the {what} zones of {', '.join(names)} hold no foreground far enough "
                "from the other split's zones; use larger volumes, a smaller patch_shape or a lower "
                "foreground_threshold"
            )
        counts[:, split] = rng(2, split).multinomial(n, totals[:, split] / totals[:, split].sum())
    return counts


def _draw_starts(g: Geometry, i: int, weights: np.ndarray, n: int, depth: int, r: np.random.Generator) -> np.ndarray:
    """``n`` rows (source, start...): cells drawn by their eligible starts, then a start inside each."""
    cdf = np.cumsum(weights.ravel(), dtype=np.float64)
    cells = np.minimum(np.searchsorted(cdf, r.random(n) * cdf[-1], side="right"), cdf.size - 1)
    coords = np.unravel_index(cells, g.grid.shape)
    rows = np.full((n, 1 + depth), -1, np.int64)
    rows[:, 0] = i
    for a, (c, f, cnt) in enumerate(zip(coords, g.grid.factors, g.starts_per_cell())):
        rows[:, 1 + depth - len(g.shape) + a] = c * f + np.floor(r.random(n) * cnt[c]).astype(np.int64)
    return rows
