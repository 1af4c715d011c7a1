"""The method sections of the training configuration: ``isotropic:`` (with its ``psf:``),
``self_supervised:``, ``projection:`` and ``upsampling:``. Kept apart from :mod:`bigcare.training.config`, which assembles them into
:class:`~bigcare.training.config.TrainConfig` and re-exports them, so each method's keys live
in one small place.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from bigcare.models.projection_arch import ProjectionNetConfig
from bigcare.schema import Schema

__all__ = ["IsotropicTrainConfig", "PSFConfig", "SelfSupervisedConfig", "ProjectionTrainConfig",
           "UpsamplingTrainConfig"]


class _Strict(Schema, validate_assignment=True):
    pass


class PSFConfig(_Strict):
    """The microscope's PSF, in the volume's physical units (e.g. micrometres)."""

    kind: Literal["gaussian", "widefield", "confocal", "lightsheet", "file"] = Field(
        description="gaussian (sigma_xy, sigma_z), widefield (na, wavelength, refractive_index), confocal "
        "(+ excitation_wavelength), lightsheet (+ sheet_na or sheet_sigma), file (path, voxel_size).")
    sigma_xy: float | None = Field(None, gt=0, description="Gaussian: lateral standard deviation.")
    sigma_z: Annotated[float, Field(gt=0)] | Literal["auto"] | None = Field(
        None, description="Gaussian: axial standard deviation, or auto: estimated from the volume itself "
        "(bigcare.training.isotropic.axial_blur_match: the axial sigma whose degraded lateral slices have "
        "the spectrum of its axial slices; recorded in the model's provenance).")
    na: float | None = Field(None, gt=0, description="Detection numerical aperture.")
    wavelength: float | None = Field(None, gt=0, description="Emission wavelength.")
    excitation_wavelength: float | None = Field(None, gt=0, description="Confocal: excitation wavelength.")
    refractive_index: float | None = Field(None, gt=0, description="Immersion refractive index.")
    sheet_na: float | None = Field(None, gt=0, description="Light sheet: illumination NA.")
    sheet_sigma: float | None = Field(None, gt=0, description="Light sheet: sheet profile standard deviation.")
    path: str | None = Field(None, description="File: measured PSF (TIFF or .npy, ZYX).")
    voxel_size: list[float] | None = Field(None, description="File: the PSF's voxel size [z, y, x].")

    @field_validator("sigma_z", mode="before")
    @classmethod
    def _number_or_auto(cls, value):
        if isinstance(value, str) and value != "auto":
            raise ValueError(f"expected a positive number or 'auto', got {value!r}")
        return value

    @model_validator(mode="after")
    def _auto(self):
        if self.sigma_z == "auto" and (self.kind != "gaussian" or self.sigma_xy is None):
            raise ValueError(f"sigma_z: auto estimates the axial sigma of a gaussian PSF from its sigma_xy; "
                             f"give kind: gaussian and sigma_xy (got kind {self.kind!r}, sigma_xy {self.sigma_xy})")
        return self


class IsotropicTrainConfig(_Strict):
    """Isotropic restoration: train a 2D network on the volume's own lateral slices."""

    psf: PSFConfig = Field(description="The PSF whose axial blur the lateral slices are given.")
    factor: float | None = Field(None, gt=1, description="Axial subsampling factor; default the first "
                                 "source's Z voxel size / X voxel size.")
    split: bool = Field(True, description="Blur with the split PSF (the axial blur beyond the lateral one "
                        "the slices already carry) rather than the full rotated PSF.")
    combine: Literal["mean", "geometric"] = Field("mean", description="How prediction combines its XZ "
                                                  "and YZ passes.")
    phase: Literal["continuous", "grid"] = Field("continuous", description="Where the subsampled rows of a "
                                                 "training slice fall: any sub-voxel phase, or whole-voxel "
                                                 "phases (as a volume's planes fall on the grid prediction "
                                                 "upsamples to).")
    noise: bool = Field(True, description="Give the subsampled rows back the noise the PSF blur averaged away "
                        "(measured on each patch), so training inputs are as noisy as the axial slices "
                        "(+3.2 dB in benchmarks/isotropic_ablation.py); false: the blurred patch as it is.")


class SelfSupervisedConfig(_Strict):
    """Self-supervised denoising from the noisy volumes alone (see :mod:`bigcare.training.blindspot`).

    ``n2v``: Noise2Void (random-neighbour replacement); ``n2v2``: N2V2 (median replacement,
    max-blur pooling and no top skip connection in the network, against N2V's checkerboard
    artefacts); ``structn2v``: structN2V, for noise correlated along ``struct_axis`` (a line of
    ``2 * struct_radius + 1`` voxels is hidden). The network gets no residual connection (the
    input voxel would be added back) and the loss defaults to MSE, whose minimiser is the mean.
    """

    method: Literal["n2v", "n2v2", "structn2v"] = Field(description="n2v, n2v2 or structn2v.")
    fraction: float = Field(0.002, gt=0, le=0.05, description="Share of voxels hidden per patch (N2V: about 0.2%).")
    radius: int = Field(5, ge=1, le=16, description="Half-width of the neighbourhood replacements come from.")
    replace: Literal["uniform", "median"] | None = Field(None, description="Replacement of a hidden voxel: a "
                                                          "random neighbour, or the neighbourhood's median; "
                                                          "default median for n2v2, uniform otherwise.")
    struct_axis: Literal["z", "y", "x"] | None = Field(None, description="structn2v: the axis the noise is "
                                                         "correlated along (required there, refused otherwise).")
    struct_radius: int = Field(2, ge=1, le=32, description="structn2v: voxels hidden on either side along struct_axis.")

    @model_validator(mode="after")
    def _struct(self):
        if self.method == "structn2v" and self.struct_axis is None:
            raise ValueError("structn2v needs struct_axis (z, y or x): the axis the noise is correlated along")
        if self.method != "structn2v" and self.struct_axis is not None:
            raise ValueError(f"struct_axis is for method structn2v, not {self.method}")
        return self

    def blindspot(self, ndim: int):
        """The :class:`~bigcare.training.blindspot.BlindSpot` of this section for ``ndim``-D patches."""
        from bigcare.training.blindspot import BlindSpot

        replace = self.replace or ("median" if self.method == "n2v2" else "uniform")
        axis = None if self.struct_axis is None else "zyx"[-ndim:].index(self.struct_axis)
        return BlindSpot(fraction=self.fraction, radius=self.radius, replace=replace, struct_axis=axis,
                         struct_radius=self.struct_radius if axis is not None else 0)


class ProjectionTrainConfig(_Strict):
    """Surface projection CARE (CARE Fig. 2): pairs of a ZYX stack (``input``) and a 2D YX image of its
    surface (``target``); ``data.patch_shape`` is the lateral ``[Y, X]`` patch, every patch spans the
    stack's whole Z. The projection sub-network (``network``) and the 2D CARE U-Net (``network:`` of
    the config) are trained jointly."""

    network: ProjectionNetConfig = Field(default_factory=ProjectionNetConfig,
                                         description="The 3D projection sub-network (CSBDeep's proj_* defaults).")


class UpsamplingTrainConfig(_Strict):
    """Upsampling CARE (CSBDeep's UpsamplingCARE): the sources are well-sampled volumes (no target);
    inputs are made from them by keeping every ``factor``-th plane and upsampling back with the
    node-aligned linear zoom prediction uses (:mod:`bigcare.blocks.zoom`)."""

    factor: int | None = Field(None, ge=2, le=16, description="Z subsampling factor; default the "
                               "restored volumes' voxel_size_z / the first source's Z voxel size.")
    voxel_size_z: float | None = Field(None, gt=0, description="Z voxel size of the volumes the model will "
                                       "restore (only to derive factor).")

    @model_validator(mode="after")
    def _one(self):
        if (self.factor is None) == (self.voxel_size_z is None):
            raise ValueError("give factor (an integer >= 2) or voxel_size_z (to divide by the source's Z voxel "
                             "size), one of them")
        return self
