"""Block planning: the output grid, halos and crops.

Vocabulary (one meaning per word):

- a *chunk* is zarr's storage unit (or a shard, when the array is sharded);
- a *block* is a unit of work: one dask task computes one block;
- a block has a *write region* (the output voxels it owns, a whole number of output chunks)
  and a *read region* (the input voxels it needs: write region + halo, aligned and clipped);
- the *crop* is where the write region sits inside the prediction of the read region.

::

    volume axis ──────────────────────────────────────────────────────────►
                 ├──── read region ───────────────────────────────┤
                 │ halo* │        write region          │ halo*   │
                 │       ├──────────────────────────────┤         │
                 ▲       ▲                              ▲         ▲
      floor(w0-halo, a)  w0                             w1   ceil(w1+halo, a)
                                     (* clipped at the volume border)

The read region starts and ends on multiples of the alignment ``a`` (the network's pooling
divisor), so the pooling grid of a block coincides with the pooling grid of the whole volume
and a block's prediction equals the whole-volume prediction wherever the halo covers the
receptive field. Because no two write regions share a chunk, blocks write without locks.

Methods that change the grid (isotropic restoration upsamples Z) plan on the *output* grid and
carry a ``zoom`` factor per axis: the halo and the alignment then apply to the *window* (the
region of the upsampled grid the network sees), and the read region is the input rows that
window interpolates from (:func:`bigcare.blocks.zoom.source_range`). Without zoom the window is the
read region.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from bigcare.blocks.zoom import source_range, zoom_length
from bigcare.errors import ConfigError

__all__ = ["Block", "BlockPlan", "plan_blocks"]


@dataclass(frozen=True)
class Block:
    """One unit of work, described by coordinates only (never voxels).

    Attributes
    ----------
    index : tuple of int
        Position of the block in the block grid.
    write : tuple of (start, stop)
        The output region this block owns, per axis, in output voxels.
    read : tuple of (start, stop)
        The input region it reads, per axis, in input voxels (write region + halo, aligned,
        clipped to the volume).
    window : tuple of (start, stop), optional
        Only for plans with zoom: the region of the output grid the predictor sees (write
        region + halo, aligned, clipped); the read region is what it is interpolated from.
    """

    index: tuple[int, ...]
    write: tuple[tuple[int, int], ...]
    read: tuple[tuple[int, int], ...]
    window: tuple[tuple[int, int], ...] | None = None

    @property
    def predicted(self) -> tuple[tuple[int, int], ...]:
        """The region the predictor sees, in output voxels (the read region without zoom)."""
        return self.read if self.window is None else self.window

    @property
    def write_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.write)

    @property
    def read_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.read)

    @property
    def crop(self) -> tuple[slice, ...]:
        """Slices that cut the write region out of the prediction (of :attr:`predicted`)."""
        return tuple(slice(w0 - r0, w1 - r0) for (w0, w1), (r0, _) in zip(self.write, self.predicted))

    @property
    def write_voxels(self) -> int:
        return math.prod(b - a for a, b in self.write)

    @property
    def read_voxels(self) -> int:
        return math.prod(b - a for a, b in self.read)

    @property
    def predicted_voxels(self) -> int:
        return math.prod(b - a for a, b in self.predicted)


@dataclass(frozen=True)
class BlockPlan:
    """The block grid over a volume: shape, block shape, halo and alignment per axis.

    ``shape`` is the output grid. With ``zoom`` (output voxels per input voxel per axis, 1.0 for
    unchanged axes) the input grid is ``in_shape``; without, the two grids are the same. With
    ``tile_shape``, a block is predicted in tiles of at most that many written voxels
    (:meth:`tiles`).
    """

    shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    halo: tuple[int, ...]
    align: tuple[int, ...]
    zoom: tuple[float, ...] | None = None
    in_shape: tuple[int, ...] | None = None
    tile_shape: tuple[int, ...] | None = None

    @property
    def grid(self) -> tuple[int, ...]:
        """Number of blocks along each axis."""
        return tuple(math.ceil(n / b) for n, b in zip(self.shape, self.block_shape))

    def __len__(self) -> int:
        return math.prod(self.grid)

    def _regions(self, index, write) -> Block:
        """A block (or tile) owning ``write``: its window (aligned, with halo) and read region."""
        read, window = [], []
        zoom = self.zoom or (1.0,) * len(self.shape)
        in_shape = self.in_shape or self.shape
        for (w0, w1), n, h, a, f, m in zip(write, self.shape, self.halo, self.align, zoom, in_shape):
            r0 = max(0, (w0 - h) // a * a)
            r1 = min(n, -(-(w1 + h) // a) * a)
            window.append((r0, r1))
            read.append((r0, r1) if f == 1.0 else source_range(r0, r1, f, m))
        if self.zoom is None:
            return Block(tuple(index), tuple(write), tuple(read))
        return Block(tuple(index), tuple(write), tuple(read), tuple(window))

    def block(self, index: Sequence[int]) -> Block:
        """The block at grid position ``index``."""
        write = tuple((i * b, min(n, (i + 1) * b)) for i, n, b in zip(index, self.shape, self.block_shape))
        return self._regions(tuple(index), write)

    def tiles(self, block: Block) -> list[Block]:
        """The network calls of ``block``: sub-blocks of at most ``tile_shape`` written voxels.

        A block is one dask task; a tile is one call of the network. They differ only when the
        plan has a ``tile_shape`` smaller than ``block_shape`` (large clusters: tasks must be big
        enough for the scheduler, calls small enough for the device memory). Tiles carry the
        block's index; each has its own halo, aligned like a block's.
        """
        if self.tile_shape is None or all(t >= b - a for t, (a, b) in zip(self.tile_shape, block.write)):
            return [block]
        ranges = [[(a + k, min(b, a + k + t)) for k in range(0, b - a, t)]
                  for t, (a, b) in zip(self.tile_shape, block.write)]
        return [self._regions(block.index, write) for write in itertools.product(*ranges)]

    def __iter__(self) -> Iterator[Block]:
        for index in itertools.product(*(range(g) for g in self.grid)):
            yield self.block(index)

    @property
    def overhead(self) -> float:
        """Voxels predicted per voxel written, over the whole plan (>= 1): the recomputed halo.

        Computed per axis: a window's extent along one axis depends only on the block's and
        tile's position along that axis, so the sum over the grid is a product of per-axis sums
        (a million-block plan costs a few thousand window computations, not a million blocks).
        """
        total = 1
        for axis, (n, b, h, a) in enumerate(zip(self.shape, self.block_shape, self.halo, self.align)):
            t = b if self.tile_shape is None else self.tile_shape[axis]
            length = 0
            for w0 in range(0, n, b):
                for k in range(w0, min(n, w0 + b), t):
                    r0 = max(0, (k - h) // a * a)
                    length += min(n, -(-(min(n, w0 + b, k + t) + h) // a) * a) - r0
            total *= length
        return total / math.prod(self.shape)

    @property
    def calls(self) -> int:
        """Network calls of the whole plan (the tiles of every block), per axis like :attr:`overhead`."""
        total = 1
        for axis, (n, b) in enumerate(zip(self.shape, self.block_shape)):
            t = b if self.tile_shape is None else self.tile_shape[axis]
            total *= sum(-(-(min(n, w0 + b) - w0) // t) for w0 in range(0, n, b))
        return total

    def as_dict(self) -> dict:
        """JSON-friendly description, used in run keys and summaries."""
        d: dict[str, list] = {
            "shape": list(self.shape),
            "block_shape": list(self.block_shape),
            "halo": list(self.halo),
            "align": list(self.align),
        }
        if self.zoom is not None and self.in_shape is not None:
            d.update(zoom=list(self.zoom), in_shape=list(self.in_shape))
        if self.tile_shape is not None:
            d.update(tile_shape=list(self.tile_shape))
        return d


def plan_blocks(
    shape: Sequence[int],
    block_shape: Sequence[int],
    halo: Sequence[int],
    align: Sequence[int],
    chunks: Sequence[int] | None = None,
    zoom: Sequence[float] | None = None,
    tile_shape: Sequence[int] | None = None,
) -> BlockPlan:
    """Plan the blocks that cover a volume.

    Parameters
    ----------
    shape : sequence of int
        Shape of the input volume.
    block_shape : sequence of int
        Write-region shape per axis. Must be a whole number of ``chunks`` along every axis
        (clipped at the volume's end), so that no two blocks write the same chunk.
    halo : sequence of int
        Context per axis, in voxels, that each block reads beyond its write region.
    align : sequence of int
        Read regions start (and, away from the border, end) on multiples of this.
    chunks : sequence of int, optional
        The output's chunk (or shard) shape; checked against ``block_shape``.
    zoom : sequence of float, optional
        Output voxels per input voxel per axis (see :mod:`bigcare.blocks.zoom`); the output grid
        is then the zoomed one, and ``block_shape``, ``halo``, ``align`` and ``chunks`` are in
        output voxels.
    tile_shape : sequence of int, optional
        Largest write region of one network call; blocks larger than it are predicted in tiles
        (see :meth:`BlockPlan.tiles`). Default: one call per block.

    Returns
    -------
    BlockPlan

    Raises
    ------
    ConfigError
        If the lengths disagree, a size is not positive, or a block is not a whole number of
        chunks.
    """
    in_shape, block_shape = tuple(map(int, shape)), tuple(map(int, block_shape))
    halo, align = tuple(map(int, halo)), tuple(map(int, align))
    if zoom is not None:
        zoom = tuple(float(f) for f in zoom)
        if len(zoom) != len(in_shape) or any(not f > 0 for f in zoom):
            raise ConfigError(f"zoom must be one positive factor per axis of shape {in_shape}, got {zoom}")
        if all(f == 1.0 for f in zoom):
            zoom = None
    shape = in_shape if zoom is None else tuple(zoom_length(n, f) for n, f in zip(in_shape, zoom))
    for name, value in (("block_shape", block_shape), ("halo", halo), ("align", align)):
        if len(value) != len(shape):
            raise ConfigError(
                f"{name} has {len(value)} entries, expected {len(shape)} (one per axis of shape {shape})"
            )
    if any(b < 1 for b in block_shape) or any(a < 1 for a in align) or any(h < 0 for h in halo):
        raise ConfigError(
            f"block_shape and align must be positive and halo non-negative, got "
            f"block_shape={block_shape}, align={align}, halo={halo}"
        )
    block_shape = tuple(min(b, n) for b, n in zip(block_shape, shape))
    if chunks is not None:
        for axis, (b, c, n) in enumerate(zip(block_shape, chunks, shape)):
            if b % c and b != n:
                raise ConfigError(
                    f"block_shape {block_shape} is not a whole number of output chunks {tuple(chunks)} "
                    f"along axis {axis}; choose a multiple of {c}"
                )
    if tile_shape is not None:
        tile_shape = tuple(int(t) for t in tile_shape)
        if len(tile_shape) != len(shape) or min(tile_shape) < 1:
            raise ConfigError(f"tile_shape must be one positive size per axis of {shape}, got {tile_shape}")
        if all(t >= b for t, b in zip(tile_shape, block_shape)):
            tile_shape = None
    return BlockPlan(shape, block_shape, halo, align, zoom, None if zoom is None else in_shape, tile_shape)
