"""Per-example Grain transforms from stored records to normalised, cropped model inputs.

Training (`RandomAugment`, a `grain.transforms.RandomMap`): random crop from the stored size to
the crop size, left-right flip, a small rotation/scale in the (H, W) plane, intensity jitter.
Evaluation (`CenterCrop`, a `grain.transforms.Map`): centre crop and normalise only, through
`preprocess.preprocess_xray` / `preprocess_ct`. One code path serves X-rays (H, W) and volumes
(D, H, W); the last axis is left-right (docs/CONTRACTS.md), so both flip it. Geometry applied to
the image is applied to `mask` too (nearest neighbour), and the depth crop of a volume to its
`slice_has_finding` row. Randomness comes only from the generator Grain passes in, which Grain
seeds from the pipeline seed and the element index, so outputs are deterministic by seed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import grain
import numpy as np
from scipy import ndimage

from unimedi_jax.data import preprocess


@dataclasses.dataclass(frozen=True)
class Modality:
    """How one modality is stored: record field, spatial rank, stored dtype, intensity functions."""

    key: str
    ndim: int
    dtype: type
    normalize: Callable[[np.ndarray], np.ndarray]
    preprocess: Callable[[np.ndarray, Any], np.ndarray]

    @property
    def background(self) -> float:
        """Normalised value of the stored dtype's minimum (X-ray zero padding, CT air)."""
        return float(self.normalize(np.array(np.iinfo(self.dtype).min, self.dtype)))


MODALITIES = {
    "xray": Modality("image", 2, np.uint8, preprocess.normalize_xray, preprocess.preprocess_xray),
    "ct": Modality("volume", 3, np.int16, preprocess.normalize_ct, preprocess.preprocess_ct),
}


def modality(name: str) -> Modality:
    if name not in MODALITIES:
        raise ValueError(f"Unknown modality {name!r}; expected one of {sorted(MODALITIES)}")
    return MODALITIES[name]


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
    """Training augmentation; every draw is uniform. Defaults switch everything but the crop off."""

    flip_prob: float = 0.0  # probability of mirroring the left-right (last) axis
    max_rotation_deg: float = 0.0  # rotation angle in [-max, max] degrees, in the (H, W) plane
    scale_range: tuple[float, float] = (1.0, 1.0)  # in-plane magnification factor range
    intensity_scale: float = 0.0  # normalised intensities times a gain in [1 - a, 1 + a]
    intensity_shift: float = 0.0  # plus an offset in [-b, b] (normalised units)
    crop_jitter: int | None = None  # crop offsets at most this many voxels from the centre
                                    #   crop's, per axis (None: anywhere; 0: the centre crop)

    def __post_init__(self):
        lo, hi = self.scale_range
        if not (0.0 <= self.flip_prob <= 1.0 and self.max_rotation_deg >= 0 and 0 < lo <= hi
                and 0 <= self.intensity_scale < 1 and self.intensity_shift >= 0
                and (self.crop_jitter is None or self.crop_jitter >= 0)):
            raise ValueError(f"Invalid augmentation options {self}")


# No flip by default: reports state laterality ("left lower lobe"), which a mirror image would
# contradict (MGCA's pretraining transform does not flip either); label-only fine-tuning may
# enable it (the paper's 3D classification uses "randomflip").
# X-ray: rotation up to 10 degrees (MoCo-CXR chest X-ray augmentation, arXiv:2010.05352) and
# scale +-10% (albumentations ShiftScaleRotate scale_limit=0.1, the paper's 2D segmentation).
XRAY_AUGMENT = AugmentOptions(max_rotation_deg=10.0, scale_range=(0.9, 1.1))
# CT: a small brightness/contrast jitter (the paper lists brightness and contrast for 3D
# fine-tuning; 10% is this project's choice). No affine, so voxels stay on the stored grid.
CT_AUGMENT = AugmentOptions(intensity_scale=0.1, intensity_shift=0.1)
DEFAULT_AUGMENT = {"xray": XRAY_AUGMENT, "ct": CT_AUGMENT}


def augment_options(fields, key: str) -> AugmentOptions | None:
    """`AugmentOptions` from a config mapping of some of its fields (the others off), or None
    (the modality's `DEFAULT_AUGMENT`) for None; errors name the config `key`."""
    if fields is None:
        return None
    fields = dict(fields)
    known = [f.name for f in dataclasses.fields(AugmentOptions)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"{key}: unknown augmentation fields {unknown}; choose from {known}")
    if "scale_range" in fields:
        fields["scale_range"] = tuple(fields["scale_range"])
    try:
        return AugmentOptions(**fields)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def window(
    x: np.ndarray,
    offsets: Sequence[int],
    size: Sequence[int],
    *,
    flip: bool = False,
    angle_deg: float = 0.0,
    scale: float = 1.0,
    order: int = 1,
    cval: float = 0.0,
) -> np.ndarray:
    """The `size` window of x (ndim == len(size)) starting at `offsets`, rotated and scaled.

    The content is rotated by `angle_deg` (counter-clockwise as displayed, row 0 at the top) and
    magnified by `scale` about the window centre, in the plane of the last two axes, sampling
    the whole of x: output point o reads x at c_in + M (o - c_out) / scale with
    M = [[cos, sin], [-sin, cos]], c_out the window centre and c_in = offsets + c_out (spline
    `order`, `cval` outside x). Without rotation or scaling this is exact slicing. `flip` then
    mirrors the last axis.
    """
    size = tuple(size)
    if angle_deg == 0.0 and scale == 1.0:
        out = preprocess.crop(x, offsets, size)
    else:
        if x.ndim != len(size):
            raise ValueError(f"Expected a {len(size)}-d array, got shape {x.shape}")
        theta = np.deg2rad(angle_deg)
        matrix = np.eye(len(size))
        matrix[-2:, -2:] = np.array([[np.cos(theta), np.sin(theta)],
                                     [-np.sin(theta), np.cos(theta)]]) / scale
        centre_out = (np.array(size) - 1) / 2
        shift = np.asarray(offsets) + centre_out - matrix @ centre_out
        out = ndimage.affine_transform(x, matrix, shift, output_shape=size, order=order,
                                       mode="constant", cval=cval)
    return np.flip(out, -1) if flip else out


def _with_geometry(element: dict, m: Modality, image: np.ndarray, offsets, size,
                   **geometry) -> dict:
    """`element` with the transformed image, and the same geometry applied to mask/slice rows."""
    out = dict(element)
    out[m.key] = image
    if "mask" in element:
        out["mask"] = window(element["mask"], offsets, size, order=0, cval=0, **geometry)
    if m.ndim == 3 and "slice_has_finding" in element:
        out["slice_has_finding"] = element["slice_has_finding"][offsets[0]:offsets[0] + size[0]]
    return out


class RandomAugment(grain.transforms.RandomMap):
    """Training view: record with stored image/volume -> normalised float32 random crop.

    Draws, in order: crop offsets (uniform over every valid start, or within `crop_jitter` of
    the centre crop's), flip, angle, scale, gain, offset. The image field becomes float32 `crop_size`; other fields pass through.
    """

    def __init__(self, modality_name: str, crop_size, options: AugmentOptions | None = None):
        self.modality = modality(modality_name)
        self.crop_size = preprocess.as_shape(crop_size, self.modality.ndim)
        self.options = DEFAULT_AUGMENT[modality_name] if options is None else options

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        m, o, size = self.modality, self.options, self.crop_size
        raw = element[m.key]
        if any(c > s for s, c in zip(raw.shape, size)):
            raise ValueError(f"Cannot crop {size} out of {m.key!r} of shape {raw.shape}")
        centre, jitter = preprocess.center_offsets(raw.shape, size), o.crop_jitter
        offsets = tuple(
            int(rng.integers(0, s - c + 1)) if jitter is None
            else int(rng.integers(max(0, z - jitter), min(s - c, z + jitter) + 1))
            for s, c, z in zip(raw.shape, size, centre))
        geometry = dict(
            flip=bool(rng.random() < o.flip_prob),
            angle_deg=float(rng.uniform(-o.max_rotation_deg, o.max_rotation_deg)),
            scale=float(rng.uniform(*o.scale_range)),
        )
        gain = np.float32(rng.uniform(1 - o.intensity_scale, 1 + o.intensity_scale))
        shift = np.float32(rng.uniform(-o.intensity_shift, o.intensity_shift))
        image = window(m.normalize(raw), offsets, size, order=1, cval=m.background, **geometry)
        return _with_geometry(element, m, image * gain + shift, offsets, size, **geometry)


class CenterCrop(grain.transforms.Map):
    """Evaluation view: `preprocess_xray` / `preprocess_ct` of the stored image at `crop_size`."""

    def __init__(self, modality_name: str, crop_size):
        self.modality = modality(modality_name)
        self.crop_size = preprocess.as_shape(crop_size, self.modality.ndim)

    def map(self, element: dict) -> dict:
        m, size = self.modality, self.crop_size
        raw = element[m.key]
        offsets = preprocess.center_offsets(raw.shape, size)
        return _with_geometry(element, m, m.preprocess(raw, size), offsets, size)
