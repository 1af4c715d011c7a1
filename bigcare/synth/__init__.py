"""Synthetic fluorescence data: clean structures and their simulated acquisition.

::

    structures.py  Tubules, Granules        sub-diffraction ground truth, seeded per cell
    write.py       Nuclei                   the nuclei/membrane phantom as a structure
        |  clean(structures, region)        -> target
        v
    acquire.py     Background, Microscope   Perlin-like background, PSF (make_psf from
                                            bigcare.psf), downsampling, Poisson + Gaussian noise
        |  acquire(structures, microscope, region) -> noisy input
        v
    write.py       write_synthetic          OME-Zarr pairs of any size, chunk by chunk
    space.py                                regions, cells, counter-based randomness
    nuclei.py      phantom, degrade, write_pair   the original in-memory phantom and camera

Every generator but the nuclei phantom is blockwise: a block generated alone equals the same
region of the whole generated volume, so training sets of any size can be written without
holding them (:mod:`bigcare.synth.space` says how).
"""

from bigcare.synth.acquire import Background, Microscope, acquire, clean, make_psf
from bigcare.synth.nuclei import degrade, phantom, write_pair
from bigcare.synth.structures import Granules, Tubules
from bigcare.synth.write import Nuclei, structures_of, write_synthetic

__all__ = ["phantom", "degrade", "write_pair", "Tubules", "Granules", "Nuclei", "Background", "Microscope",
           "clean", "acquire", "make_psf", "structures_of", "write_synthetic"]
