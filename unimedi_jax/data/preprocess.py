"""Intensity normalisation and centre cropping: the only module that knows image intensities.

Stored forms (docs/CONTRACTS.md): X-ray uint8 (..., S, S); CT int16 Hounsfield units (..., D, H, W).
Model inputs are float32 of the same layout. Every function here is numpy and accepts any
leading batch dimensions.

`preprocess_xray` / `preprocess_ct` are the whole inference-time preprocessing of a stored-form
image or volume (centre crop, then normalise); the evaluation pipeline calls the same functions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# X-ray: pixel / 255, then (x - mean) / std with mean = std = 0.5, i.e. the range [-1, 1]; the
# constants of MGCA's DataTransforms (`transforms.Normalize((0.5,)*3, (0.5,)*3)` after
# `ToTensor`), whose pretraining recipe UniMedI follows.
XRAY_FULL_SCALE = 255.0  # uint8 maximum
XRAY_MEAN = 0.5  # MGCA DataTransforms
XRAY_STD = 0.5  # MGCA DataTransforms

# CT: clip Hounsfield units to [-1000, 1000] (air to dense bone, covering lung and mediastinal
# windows; the design's fixed choice), then map that window linearly onto [-1, 1].
CT_HU_MIN = -1000.0  # air
CT_HU_MAX = 1000.0  # dense bone

Size = int | Sequence[int]


def normalize_xray(image: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W) -> float32 (..., H, W): (image / 255 - XRAY_MEAN) / XRAY_STD."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"normalize_xray expects a uint8 image, got {image.dtype}")
    scaled = image.astype(np.float32) / np.float32(XRAY_FULL_SCALE)
    return (scaled - np.float32(XRAY_MEAN)) / np.float32(XRAY_STD)


def normalize_ct(volume: np.ndarray) -> np.ndarray:
    """Integer HU (..., D, H, W) -> float32 in [-1, 1]: clip to [CT_HU_MIN, CT_HU_MAX], rescale."""
    volume = np.asarray(volume)
    if not np.issubdtype(volume.dtype, np.integer):
        raise TypeError(f"normalize_ct expects integer Hounsfield units, got {volume.dtype}")
    clipped = np.clip(volume.astype(np.float32), CT_HU_MIN, CT_HU_MAX)
    half_width = np.float32((CT_HU_MAX - CT_HU_MIN) / 2)
    centre = np.float32((CT_HU_MAX + CT_HU_MIN) / 2)
    return (clipped - centre) / half_width


def as_shape(size: Size, ndim: int) -> tuple[int, ...]:
    """An int (same size on every axis) or a sequence of `ndim` ints, as a tuple."""
    shape = (int(size),) * ndim if np.isscalar(size) else tuple(int(s) for s in size)
    if len(shape) != ndim or min(shape) <= 0:
        raise ValueError(f"Expected {ndim} positive sizes, got {size!r}")
    return shape


def center_offsets(shape: Sequence[int], size: Sequence[int]) -> tuple[int, ...]:
    """Start offsets of a centred `size` window in `shape`: floor((s - c) / 2) per axis."""
    if len(shape) != len(size) or any(c > s for s, c in zip(shape, size)):
        raise ValueError(f"Cannot crop {tuple(size)} out of {tuple(shape)}")
    return tuple((s - c) // 2 for s, c in zip(shape, size))


def crop(x: np.ndarray, offsets: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The window [offsets, offsets + size) of the trailing len(size) axes of x (a view)."""
    window = tuple(slice(o, o + c) for o, c in zip(offsets, size))
    return x[(Ellipsis, *window)]


def center_crop(x: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Centre window of shape `size` over the trailing len(size) axes of x (a view)."""
    x = np.asarray(x)
    if x.ndim < len(size):
        raise ValueError(f"Cannot crop {tuple(size)} out of an array of shape {x.shape}")
    return crop(x, center_offsets(x.shape[x.ndim - len(size):], size), size)


def preprocess_xray(image: np.ndarray, size: Size) -> np.ndarray:
    """Stored X-ray uint8 (..., S, S) -> float32 (..., size, size): centre crop, normalise."""
    return normalize_xray(center_crop(image, as_shape(size, 2)))


def preprocess_ct(volume: np.ndarray, size: Size) -> np.ndarray:
    """Stored CT int16 HU (..., D, H, W) -> float32 (..., *size): centre crop, normalise."""
    return normalize_ct(center_crop(volume, as_shape(size, 3)))
