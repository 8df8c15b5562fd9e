"""Files in, model inputs out: a CT or X-ray file on disk -> the exact input of the encoder.

    recipe = scans.Recipe.from_config(config)    # a run's preprocessing (inference.Encoder.recipe)
    x = scans.read_ct("scan.nii.gz", recipe)      # float32 (D, H, W), normalised
    x = scans.read_xray("cxr.png", recipe)        # float32 (S, S), normalised

Two steps, each the one that training data takes:
1. file -> stored form, as the data builders store it (`data_prep.readers.stored_ct` /
   `stored_xray`, which data_prep/records.py calls too): CT in the contract axis order
   (docs/CONTRACTS.md), HU clipped to the builder's window, resized to the stored size; an
   X-ray's longer side resized to the stored side and zero-padded to a square;
2. stored form -> model input, as the evaluation pipeline: centre crop to the encoder's input
   size, normalise (`data.preprocess.preprocess_ct` / `preprocess_xray`).

Readable: NIfTI, NRRD, MetaImage, a DICOM series folder, a folder of slice images (CT); PNG,
JPG, BMP, TIFF, a single DICOM radiograph (X-ray). `native_slabs` maps slabs of a CT model input
back to slice ranges of the original file, in the file's own axis order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from data_prep import readers
from unimedi_jax.data import preprocess

MODALITIES = ("ct", "xray")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A run's preprocessing of files: stored sizes (the builder's), model input sizes (the
    centre crop of the stored form) and the CT HU window clipped before resizing."""

    ct_stored_size: tuple[int, int, int]
    ct_size: tuple[int, int, int]
    xray_stored_size: int
    xray_size: int
    hu_window: tuple[float, float] = readers.DEFAULT_HU_WINDOW

    def __post_init__(self):
        for name, stored, size, ndim in (("ct", self.ct_stored_size, self.ct_size, 3),
                                         ("xray", self.xray_stored_size, self.xray_size, 2)):
            stored, size = preprocess.as_shape(stored, ndim), preprocess.as_shape(size, ndim)
            if any(c > s for s, c in zip(stored, size)):
                raise ValueError(f"{name}: the model input {size} does not fit in the stored "
                                 f"size {stored}")
        lo, hi = (float(v) for v in self.hu_window)
        if not lo < hi:
            raise ValueError(f"hu_window must be (low, high) with low < high, got "
                             f"{self.hu_window}")

    @classmethod
    def from_config(cls, config, xray_size: int | None = None,
                    ct_size: Sequence[int] | None = None) -> Recipe:
        """The recipe of a run config: `config.data.{ct,xray}.stored_size`, the builder's HU
        window (`config.data.ct.options.hu_window`, else data_prep's default), and the model
        input sizes `xray_size` / `ct_size` (default: `config.data.*.crop_size`)."""
        if "data" not in config:
            raise ValueError("the run config has no 'data' section: its file preprocessing "
                             "is unknown")
        ct, xray = config.data.ct, config.data.xray
        window = (ct.get("options") or {}).get("hu_window", readers.DEFAULT_HU_WINDOW)
        return cls(ct_stored_size=preprocess.as_shape(ct.stored_size, 3),
                   ct_size=preprocess.as_shape(ct.crop_size if ct_size is None else ct_size, 3),
                   xray_stored_size=int(xray.stored_size),
                   xray_size=int(xray.crop_size if xray_size is None else xray_size),
                   hu_window=tuple(float(v) for v in window))


@dataclasses.dataclass(frozen=True)
class NativeSlab:
    """A slab of a CT model input as slices of the original file.

    `slab`: its index in the model input (it covers input slices [slab*pd, (slab+1)*pd), pd =
    the 3D patch depth); `score`: its slice score (Eq. 2); `start`, `stop`: the native slices
    [start, stop) along the file's voxel axis `axis` behind it (readers.DepthLayout); `files`:
    the slice files of a folder input in that range (empty for single files).
    """

    slab: int
    score: float
    start: int
    stop: int
    axis: int
    files: tuple[str, ...] = ()


def modality_of(path: str | Path) -> str:
    """"ct" or "xray" from the file type (`readers.infer_modality`); ValueError if unknown."""
    modality = readers.infer_modality(path)
    if modality is None:
        raise ValueError(f"{path}: cannot tell CT from X-ray by the file type (expected a "
                         f"folder, {', '.join(readers.VOLUME_SUFFIXES)} for CT, "
                         f"{', '.join(readers.IMAGE_SUFFIXES + readers.DICOM_SUFFIXES)} for "
                         "X-rays)")
    return modality


def read_ct_layout(path: str | Path, recipe: Recipe) -> tuple[np.ndarray, readers.DepthLayout]:
    """A CT file -> (model input float32 `recipe.ct_size` (D, H, W), the file's DepthLayout)."""
    stored, layout = readers.stored_ct(path, recipe.ct_stored_size, window=recipe.hu_window)
    return preprocess.preprocess_ct(stored, recipe.ct_size), layout


def read_ct(path: str | Path, recipe: Recipe) -> np.ndarray:
    """A CT file -> model input float32 (D, H, W) = `recipe.ct_size`."""
    return read_ct_layout(path, recipe)[0]


def read_xray(path: str | Path, recipe: Recipe) -> np.ndarray:
    """An X-ray file -> model input float32 (S, S), S = `recipe.xray_size`."""
    stored, _ = readers.stored_xray(path, recipe.xray_stored_size)
    return preprocess.preprocess_xray(stored, recipe.xray_size)


def read(path: str | Path, recipe: Recipe, modality: str | None = None
         ) -> tuple[str, np.ndarray]:
    """(modality, model input) of a file; `modality` None: told by the file type."""
    modality = modality_of(path) if modality is None else modality
    if modality not in MODALITIES:
        raise ValueError(f"{path}: unknown modality {modality!r}; expected ct or xray")
    return modality, (read_ct if modality == "ct" else read_xray)(path, recipe)


def native_slabs(layout: readers.DepthLayout, recipe: Recipe, slabs: Sequence[int],
                 scores: Sequence[float], patch_depth: int) -> list[NativeSlab]:
    """Slabs of a model input (indices, their scores) -> NativeSlab ranges of the file.

    Slab i covers input slices [i*pd, (i+1)*pd), i.e. stored slices shifted by the centre
    crop's depth offset, which `layout.native_range` maps through the depth resize and the
    reorientation back to the file's own slices.
    """
    offset = preprocess.center_offsets(recipe.ct_stored_size, recipe.ct_size)[0]
    out = []
    for slab, score in zip(slabs, scores):
        slab = int(slab)
        start = offset + slab * patch_depth
        stop = start + patch_depth
        if slab < 0 or stop > offset + recipe.ct_size[0]:
            raise ValueError(f"slab {slab} lies outside a depth-{recipe.ct_size[0]} input of "
                             f"patch depth {patch_depth}")
        lo, hi = layout.native_range(start, stop, recipe.ct_stored_size[0])
        out.append(NativeSlab(slab, float(score), lo, hi, layout.axis,
                              layout.files[lo:hi] if layout.files else ()))
    return out
