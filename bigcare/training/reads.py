"""The patch sampler's read task, how its results reach the client, and the task runner.

:func:`read_patches` is the task :class:`bigcare.training.sampling.PatchSampler` submits: it
reads a group of (input, target) patches, each in its own augmentation, and normalizes each
with its own percentile values (or leaves that to the client). It works *chunk by chunk*, not
patch by patch: the chunks every patch of the task touches are collected per image first (one
plan for input and target when they are chunked alike), then each chunk is fetched and decoded
once and its overlap with every patch that touches it is copied straight into that patch's
place in the output, already augmented (the copy writes through the inverse flip/transpose
view of the output; no intermediate patch buffer)::

    patches of a task      chunks they touch        per chunk, in key order
    p0 [c1 c2 c5 c6]   ──►  c1: p0                ──►  fetch + decode c5 once,
    p1 [c5 c6 c9 c10]       c5: p0 p1 p3               copy its overlap into p0, p1, p3
    p3 [c5 ...]             ...

Decoding is most of a task's CPU time (a 16x64x64 patch touches about 8 chunks of each image),
so chunks shared by patches of one task are decoded once. How many are shared depends on how
densely the patches cover the images: a third of the decodes with tasks of 128 patches in the
throughput benchmark, whose patches concentrate on the foreground of a 0.5 GB pair; few on a
huge image. The result is the same, byte for byte, as reading each patch on its own.

Workers on the client's host write the patches of a task into a shared-memory slot
(:class:`bigcare.tasks.slots.ResultSlots`) instead of sending them through the cluster's sockets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bigcare.errors import InputError
from bigcare.normalization import normalize
from bigcare.store.chunks import ImageRef, region_reader, tune_malloc
from bigcare.tasks.slots import InSlot, Slot, map_slot

__all__ = ["ReadPlan", "SourcePlan", "read_patches", "normalize_batch", "augment", "unaugment"]


@dataclass(frozen=True)
class SourcePlan:
    """How to cut a patch out of one source: its two images and the patch box."""

    input: ImageRef
    target: ImageRef
    footprint: tuple[int, ...]  # extent along each non-channel axis (1 on axes the patch lacks)


@dataclass(frozen=True)
class ReadPlan:
    """Everything a read task needs besides its records; sent to each worker once."""

    sources: tuple[SourcePlan, ...]
    patch_shape: tuple[int, ...]
    dtypes: tuple[np.dtype, np.dtype]  # of the input and target patches before normalization


def augment(patch: np.ndarray, code: int) -> np.ndarray:
    """Apply lateral augmentation ``code`` (a view, no copy).

    Bit 0 flips Y (axis -2), bit 1 flips X (axis -1), bit 2 swaps Y and X (with the flips,
    the 8 symmetries of a square: the 90-degree rotations and the mirrors).
    """
    if code & 4:
        patch = np.swapaxes(patch, -1, -2)
    if code & 1:
        patch = patch[..., ::-1, :]
    if code & 2:
        patch = patch[..., ::-1]
    return patch


def unaugment(patch: np.ndarray, code: int) -> np.ndarray:
    """The view ``v`` of ``patch`` with ``augment(v, code)`` equal to ``patch`` element for element.

    Writing a region into ``unaugment(out, code)`` leaves ``out`` holding the region augmented.
    """
    if code & 2:
        patch = patch[..., ::-1]
    if code & 1:
        patch = patch[..., ::-1, :]
    if code & 4:
        patch = np.swapaxes(patch, -1, -2)
    return patch


def read_patches(plan: ReadPlan, sources: np.ndarray, starts: np.ndarray, scaling: np.ndarray | None,
                 codes: np.ndarray, into: Slot | None = None) -> tuple[np.ndarray, np.ndarray] | InSlot:
    """Read, augment and (optionally) normalize a group of (input, target) patches: one dask task.

    Parameters
    ----------
    plan : ReadPlan
        Sources and patch shape.
    sources : numpy.ndarray of int, shape (n,)
        Source index of each patch.
    starts : numpy.ndarray of int, shape (n, D)
        Start voxel along the non-channel axes, right-aligned (a source with d < D axes uses
        the last d columns).
    scaling : numpy.ndarray of float, shape (n, 4), or None
        ``lo_x, hi_x, lo_y, hi_y`` per patch (see :func:`normalize_batch`). None returns the patches
        in the images' own data type (``plan.dtypes``), e.g. to halve what a cluster sends.
    codes : numpy.ndarray of int, shape (n,)
        Augmentation code per patch (see :func:`augment`).
    into : Slot, optional
        With ``scaling=None``: write the patches into this shared-memory slot (see
        :class:`ResultSlots`) and return an :class:`InSlot` instead of the arrays; when the
        slot cannot be opened here (another host), the arrays are returned.

    Returns
    -------
    (x, y) : numpy.ndarray
        Each (n, 1, *patch_shape): float32 when normalized, else ``plan.dtypes``.
    """
    tune_malloc()
    shapes = ((len(sources), 1) + plan.patch_shape,) * 2
    sizes = [np.dtype(d).itemsize * int(np.prod(shapes[0])) for d in plan.dtypes]
    mm = None
    if into is not None and scaling is None and sum(sizes) <= into.nbytes:
        try:
            mm = map_slot(into.path, into.nbytes, populate=True)
        except (OSError, ValueError):  # not on the client's host: send the arrays
            mm = None
    if mm is None:
        x, y = (np.empty(shape, dtype) for shape, dtype in zip(shapes, plan.dtypes))
    else:
        x = np.ndarray(shapes[0], plan.dtypes[0], buffer=mm, offset=0)
        y = np.ndarray(shapes[1], plan.dtypes[1], buffer=mm, offset=sizes[0])
    _fill(plan, sources, starts, codes, x, y)
    if mm is not None and into is not None:
        del x, y  # release the mapping's buffer before closing it
        mm.close()
        return InSlot(into, shapes, (np.dtype(plan.dtypes[0]).str, np.dtype(plan.dtypes[1]).str))
    if scaling is None:
        return x, y
    return normalize_batch(x, scaling[:, :2]), normalize_batch(y, scaling[:, 2:])


def _fill(plan: ReadPlan, sources: np.ndarray, starts: np.ndarray, codes: np.ndarray, x: np.ndarray,
          y: np.ndarray) -> None:
    """Read the patches into ``x`` and ``y`` (``(n, 1, *patch_shape)`` each), augmented, chunk by chunk."""
    groups: dict[tuple, tuple[ImageRef, list, list]] = {}  # per array: its regions and where they go
    pending = []  # (buffer, destination) where a view could not be had (never expected)
    for i in range(len(sources)):
        src = plan.sources[int(sources[i])]
        start = starts[i, starts.shape[1] - len(src.footprint):]
        code = int(codes[i])
        for ref, out in ((src.input, x), (src.target, y)):
            sel = ref.selection(start, src.footprint)
            shape = tuple(s.stop - s.start for s in sel)
            dest = unaugment(out[i, 0], code)
            view = dest.reshape(shape)
            if not np.may_share_memory(view, out):
                view = np.empty(shape, out.dtype)
                pending.append((view, dest))
            group = groups.get(ref.key)  # input and target channels of one image share an array
            if group is None:
                group = groups[ref.key] = (ref, [], [])
            group[1].append(sel)
            group[2].append(view)
    plans: list[tuple[tuple, list, list]] = []  # (chunk shape, selections, plan): input and target often share one
    for ref, sels, views in groups.values():
        reader = region_reader(ref)
        chunk_plan = None
        if reader.fast:
            chunk_plan = next((p for c, s, p in plans if c == reader.chunks and s == sels), None)
            if chunk_plan is None:
                chunk_plan = reader.plan(sels)
                plans.append((reader.chunks, sels, chunk_plan))
        reader.read_many(sels, views, plan=chunk_plan)
    for view, dest in pending:
        dest[...] = view.reshape(dest.shape)
    for out, which in ((x, "input"), (y, "target")):
        if out.dtype.kind in "fc" and not np.isfinite(out).all():  # one NaN makes every loss after it NaN
            i = int(np.nonzero(~np.isfinite(out).reshape(len(out), -1).all(axis=1))[0][0])
            src = plan.sources[int(sources[i])]
            ref = src.input if which == "input" else src.target
            at = tuple(int(v) for v in starts[i, starts.shape[1] - len(src.footprint):])
            raise InputError(f"{ref.url}: the training {which} holds NaN/inf voxels in the patch at {at} "
                             f"(extent {tuple(src.footprint)}); bigcare does not train on them: replace them with "
                             "a number first")


def normalize_batch(batch: np.ndarray, scaling: np.ndarray) -> np.ndarray:
    """Each sample of ``batch`` normalized with its own ``lo, hi`` (``scaling``, shape (n, 2)).

    :func:`bigcare.normalization.normalize` with per-sample values, as float32.
    """
    shape = (len(batch),) + (1,) * (batch.ndim - 1)
    return normalize(batch, scaling[:, 0].reshape(shape), scaling[:, 1].reshape(shape))
