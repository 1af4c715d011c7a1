"""OME-Zarr in and out, with no network code: importing it never loads torch.

- ``axes.py``: the axis table (x/y/z space, t time, c channel) and :class:`Axis`;
- ``urls.py``: local paths vs fsspec URLs, and the arguments zarr needs to reach them;
- ``volume.py``: :class:`Volume`, a lazily opened image (axes, levels, scale; no voxels);
- ``arrays.py``: the one per-process open-array cache tasks use;
- ``chunks.py``: region reads chunk by chunk (training patches, percentile samples);
- ``write.py``: images written metadata first; ``pyramid.py``: levels 1..n, blockwise;
- ``convert.py``: TIFF / OME-TIFF to OME-Zarr, streamed slab by slab.

The pyramid and the percentile reads run their tasks through :mod:`bigcare.tasks.runner`, which
imports nothing else of bigcare (so store/ stays below tasks/ in everything but that call).
"""
