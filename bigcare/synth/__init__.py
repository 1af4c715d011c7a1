"""Synthetic fluorescence data: clean structures and their simulated acquisition.

- ``nuclei.py``: nuclei-like blobs and membranes (:func:`phantom`), a simple camera
  (:func:`degrade`) and an in-memory OME-Zarr pair writer (:func:`write_pair`).
"""

from bigcare.synth.nuclei import degrade, phantom, write_pair

__all__ = ["phantom", "degrade", "write_pair"]
