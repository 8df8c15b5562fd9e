"""Synthetic chest phantom: CT volumes with planted findings, DRR X-rays, and their reports.

Example `index` of a stream `seed` is a pure function of (seed, index): every random draw comes
from `np.random.default_rng([seed, index, stream])`, so a data source can generate unlimited
examples lazily, in any order, in any worker process. Pure numpy; no per-voxel Python loops.

Subject coordinates are in mm: z cranio-caudal (0 at the lung apex, increasing caudally), y
antero-posterior (0 at the body centre, increasing posteriorly), x right-left (0 at the midline,
increasing to the patient's left). Volumes are (D, H, W) = (z, y, x); X-rays are (rows, cols) =
(z, x), so, as on a radiograph, the patient's right is on the viewer's left.

A subject is drawn first (body, lungs, heart, spine, ribs, vessels, tissue intensities), then
the scan range (the CT's cranio-caudal offset and extent are jittered so that absolute depth
says little about where findings are), then findings spread uniformly over the visible lung
depth, then everything is painted into a uint8 tissue map that maps to HU by lookup.

Findings are local in depth: on CT each focal lesion is centred on one of the slabs of
`min_finding_slices` slices (the 3D patch depth), drawn uniformly, and is compact in depth, so
it fills one slab (three when deeper than a slab); X-ray lesions keep their full height
(the CT_* constants).
Cardiomegaly is a whole-organ finding, in `mask` and `labels` but not in `slice_has_finding`
(LOCAL_FINDINGS, MAX_FINDING_SLAB_FRACTION).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from unimedi_jax.ops import drr as drr_lib

LABEL_NAMES = ("nodule", "consolidation", "ground_glass", "effusion", "cardiomegaly")
NODULE, CONSOLIDATION, GROUND_GLASS, EFFUSION, CARDIOMEGALY = range(len(LABEL_NAMES))
# Findings with a place in depth: a CT's `slice_has_finding` marks the slices holding one of
# them. Cardiomegaly is a whole-organ finding: `mask` marks the enlarged heart (class 5) and
# `labels` name it, but its slices are not finding slices. The heart spans ~60% of the slabs of
# a default volume at a depth anatomy fixes, so with it the slice truth of a cardiomegaly case
# says where the heart is (which a fixed slab-position prior knows), not where a lesion is.
LOCAL_FINDINGS = (NODULE, CONSOLIDATION, GROUND_GLASS, EFFUSION)
# Design bound at the default options: over CT volumes with a finding slab, the mean share of
# slabs (min_finding_slices slices, grouped as eval/selection_eval.py `slab_truth` does) that
# hold a finding, i.e. the random baseline of slice-selection precision (tests/test_phantom.py).
# Focal lesions fill one slab, or three when deeper than a slab, at a depth drawn uniformly.
MAX_FINDING_SLAB_FRACTION = 0.3

# Tissue codes of the label map. Mask class of finding f is f + 1 (docs/CONTRACTS.md).
TISSUES = ("air", "fat", "soft_tissue", "lung", "heart", "bone", "vessel",
           "nodule", "consolidation", "ground_glass", "fluid")
(T_AIR, T_FAT, T_SOFT, T_LUNG, T_HEART, T_BONE, T_VESSEL,
 T_NODULE, T_CONSOLIDATION, T_GROUND_GLASS, T_FLUID) = range(len(TISSUES))

# HU range per tissue, one value drawn per subject. Standard CT attenuation tables (air -1000,
# fat -120..-80, muscle/blood 30..50, aerated lung -880..-820, cortical+trabecular bone as seen
# at ~6 mm voxels 600..800, transudate 0..20); lesions: solid nodule 20..60, consolidation
# -50..40 and ground glass -700..-500 (Fleischner glossary ranges); vessel: partial-volume mix
# of blood and lung in a voxel much wider than the vessel.
TISSUE_HU = np.array([
    (-1000, -1000), (-120, -80), (30, 50), (-880, -820), (30, 50), (600, 800), (-350, -150),
    (20, 60), (-50, 40), (-700, -500), (0, 20)], np.float32)
HU_MIN, HU_MAX = -1024, 3071  # 12-bit CT range stored as int16

# Anatomy of an adult chest (mm unless a fraction; CT anatomy norms). Each (lo, hi) is a
# uniform draw per subject.
BODY_HALF_WIDTH = (140.0, 175.0)
BODY_HALF_DEPTH = (95.0, 125.0)
FAT_THICKNESS = (8.0, 25.0)  # subcutaneous fat
CHEST_WALL = (12.0, 22.0)  # muscle and ribs between the fat and the pleura
LUNG_HALF_WIDTH = (0.38, 0.44)  # fraction of the pleural cavity's half width
LUNG_HALF_DEPTH = (0.8, 0.9)  # fraction of the pleural cavity's half depth
PLEURAL_GAP = 3.0  # between a lung and the cavity wall
LUNG_LENGTH = (220.0, 290.0)  # apex to the lowest point of the base
APEX_TAPER = 0.35  # fraction of lung length over which the cross-section reaches full size
DOME_HEIGHT = (15.0, 35.0)  # diaphragm dome above the costophrenic recesses
RIGHT_DOME_EXTRA = (5.0, 20.0)  # the right hemidiaphragm sits higher (liver)
RIB_THICKNESS = (6.0, 9.0)  # radial
RIB_HEIGHT = (8.0, 11.0)  # cranio-caudal
RIB_PERIOD = (21.0, 26.0)  # 12 ribs over the thorax
RIB_DESCENT = (0.3, 0.5)  # caudal drop of a rib per mm it runs anteriorly
RIB_EXTENT = 0.92  # the rib cage ends at this fraction of lung length (posteriorly)
SPINE_RADIUS = (16.0, 22.0)  # vertebral body
SPINE_DEPTH = 0.3  # spine centre behind the cavity, fraction of the posterior wall
HEART_RADII = ((45.0, 60.0), (38.0, 50.0), (45.0, 58.0))  # (z, y, x)
HEART_DEPTH = (0.45, 0.8)  # heart centre, fraction of lung length
HEART_FORWARD = (0.2, 0.35)  # heart centre in front of the midplane, fraction of cavity depth
HEART_LEFT = (10.0, 25.0)  # heart centre to the patient's left of the midline
CARDIOMEGALY_SCALE = ((1.05, 1.2), (1.1, 1.25), (1.3, 1.6))  # (z, y, x) enlargement
MODERATE_CARDIOMEGALY = 1.45  # lateral enlargement from which it is called moderate
VESSELS_PER_LUNG = (6, 10)
VESSEL_RADIUS = (1.5, 3.0)
HILUM = ((0.35, 0.45), -0.3, 0.55)  # vessel origin: depth (fraction of lung length), y
# (fraction of lung half depth from its centre), x (fraction of the lung centre's offset)
VESSEL_REACH = 0.9  # vessel ends lie within this fraction of the lung cross-section
VESSEL_TOP = 0.1  # and below this fraction of lung length

# Findings. In-plane sizes are clinical (times PhantomOptions.lesion_scale).
NODULE_DIAMETER = (4.0, 30.0)  # mm, log-uniform; Fleischner glossary: nodules are < 30 mm
NODULE_COUNT = (1 / 3, 1 / 3, 1 / 3)  # P(1, 2, 3 nodules)
NODULE_ELONGATION = (0.85, 1.15)  # per-axis radius factor
CONSOLIDATION_RADIUS = (12.0, 30.0)
GROUND_GLASS_RADIUS = (15.0, 35.0)
PATCH_COUNT = (0.5, 0.5)  # P(1, 2 patches) of consolidation / ground glass per subject
PATCH_SPREAD = 0.7  # a patch is 3 ellipsoids offset by up to this many radii
PATCH_PART_RADIUS = (0.5, 1.0)  # their radii, in patch radii
EFFUSION_THICKNESS = {"small": (10.0, 20.0), "moderate": (25.0, 40.0), "large": (45.0, 65.0)}
EFFUSION_EXTENT = (0.2, 0.45)  # cranio-caudal extent, fraction of lung length
BILATERAL_EFFUSION = 0.3  # share of effusions on both sides (at one level)
# CT only: findings local in depth (MAX_FINDING_SLAB_FRACTION). Fewer lesions per case, each
# centred on a slab (`_slab_centres`) and compact in depth, so that it fills one slab of
# `min_finding_slices` slices (a few when deeper). X-rays keep the lesions above: a radiograph
# has no slabs, and it shows the cranio-caudal axis in its plane, where their height keeps them
# visible at 64 px (with the CT lesions, the median X-ray mask area of a consolidation in the
# 64-px crop fell from 100 to 32 px, of an effusion from 245 to 76).
CT_NODULE_COUNT = (0.7, 0.2, 0.1)  # most nodule cases are solitary
CT_PATCH_COUNT = (0.8, 0.2)
# Depth radius of a patch part, in its in-plane radius, all parts at the patch's depth: a flat
# patch. Not clinical: at its clinical depth a patch alone touched ~2.4 of the 8 slabs of a
# default volume.
CT_PATCH_DEPTH = 0.5
# Cranio-caudal extent of the fluid band per severity, fraction of lung length (10-20, 15-30,
# 25-40 mm for a 255 mm lung). Not clinical: a free effusion layers along the posterior chest
# wall from the base upwards, the more fluid the higher; here severity is carried by the
# layer's thickness, and the band stays local in depth at any level (a basal band would lie in
# the bottom slabs of every scan that reaches the base, which absolute depth alone predicts).
CT_EFFUSION_EXTENT = {"small": (0.04, 0.08), "moderate": (0.06, 0.12), "large": (0.1, 0.16)}
FINDING_REACH = 0.85  # finding centres lie within this fraction of the lung cross-section
VOXEL_FLOOR = 0.75  # lesion cross-sections are at least this many in-plane voxels wide

# CT scan range, in lung lengths from the apex: its extent, and the span it lies in (drawn
# uniformly), so the lungs fill a varying part of the volume and may be cut at either end.
SCAN_EXTENT = (0.55, 1.05)
SCAN_SPAN = (-0.05, 1.0)
CT_FOV = (360.0, 440.0)  # reconstruction field of view, mm
# X-ray: a square field with the lungs taking this fraction of its height.
XRAY_LUNG_FRACTION = (0.62, 0.72)
XRAY_TOP_MARGIN = (0.1, 0.18)  # space above the apex, fraction of the field
XRAY_BODY_MARGIN = 1.05  # the field is at least this many body widths wide
XRAY_RAY_MARGIN = 1.1  # rays run through this many body depths
XRAY_WINDOW = 7.0  # attenuation (sum mu*dl) shown as white: ~360 mm of water


@dataclasses.dataclass(frozen=True)
class PhantomOptions:
    """What the phantom generates. `seed` is the base seed the builder and pipelines derive
    split seeds from (`split_seed`); `generate_*` take the split seed explicitly."""
    volume_size: tuple = (32, 64, 64)  # (D, H, W): 3D input of DESIGN.md at half in-plane size
    image_size: int = 72  # stored X-ray size S; training takes random 64 x 64 crops
    xray_render_size: int = 48  # in-plane size of the X-ray phantom, upsampled to image_size
    xray_depth_samples: int = 32  # voxels along each X-ray ray (antero-posterior)
    normal_fraction: float = 0.3  # share of examples without findings
    # Per finding in abnormal cases (LABEL_NAMES order); cardiomegaly ~10% overall, as in CheXpert.
    finding_probs: tuple = (0.5, 0.35, 0.35, 0.3, 0.15)
    ct_noise_hu: float = 20.0  # Gaussian CT noise, standard dose chest CT
    xray_noise: float = 0.01  # Gaussian noise on the [0, 1] radiograph
    min_finding_slices: int = 4  # = 3D patch depth (DESIGN.md section 2)
    # In-plane size factor of nodules, consolidation/ground-glass patches and effusion thickness
    # (depth extents are not scaled, so findings stay as local to slabs). 2: the default 64-px
    # slices (~6-mm pixels) resolve them, which a 400-step supervised ViT cannot at 1 (clinical
    # sizes; AUROC of consolidation 0.54 -> 0.67, effusion 0.69 -> 0.87 from CT; builder 1.1.0).
    lesion_scale: float = 2.0
    pair_drr_with_ct: bool = False  # X-ray i is the DRR of CT i (UniMiSS+)
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "volume_size", tuple(self.volume_size))
        object.__setattr__(self, "finding_probs", tuple(self.finding_probs))

        def need(ok, key, what):
            if not ok:
                raise ValueError(f"PhantomOptions.{key}={getattr(self, key)!r}: {what}")
        need(len(self.volume_size) == 3 and min(self.volume_size) >= 4, "volume_size",
             "needs three sizes (D, H, W), each >= 4")
        need(self.image_size >= 8, "image_size", "must be >= 8")
        need(self.xray_render_size >= 8, "xray_render_size", "must be >= 8")
        need(self.xray_depth_samples >= 4, "xray_depth_samples", "must be >= 4")
        need(0.0 <= self.normal_fraction <= 1.0, "normal_fraction", "must lie in [0, 1]")
        need(len(self.finding_probs) == len(LABEL_NAMES)
             and all(0.0 <= p <= 1.0 for p in self.finding_probs)
             and sum(self.finding_probs) > 0, "finding_probs",
             f"needs {len(LABEL_NAMES)} probabilities in [0, 1] ({LABEL_NAMES}), not all 0")
        need(self.ct_noise_hu >= 0, "ct_noise_hu", "must be >= 0")
        need(self.xray_noise >= 0, "xray_noise", "must be >= 0")
        need(1 <= self.min_finding_slices <= self.volume_size[0], "min_finding_slices",
             "must lie in [1, D]")
        need(self.lesion_scale > 0, "lesion_scale", "must be > 0")
        need(0 <= self.seed < 2**32, "seed", "must lie in [0, 2**32)")


SPLIT_INDEX = {"train": 0, "validation": 1, "test": 2}
# Default split sizes of a stored phantom (data_prep/phantom.py) and of a procedural evaluation
# split: the default build of both modalities stays under a minute on 2 cores (training draws
# unlimited pairs procedurally; the stored splits serve evaluation).
DEFAULT_EXAMPLES = {"ct": {"train": 1000, "validation": 200, "test": 200},
                    "xray": {"train": 2000, "validation": 400, "test": 400}}


def options_from(options: Mapping[str, Any]) -> PhantomOptions:
    """`PhantomOptions` of a mapping of its fields (a config's or a builder's options): None
    keeps a field's default, a list becomes a tuple; any other key is a ValueError."""
    known = {f.name for f in dataclasses.fields(PhantomOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"phantom: unknown option(s) {unknown}; known: {sorted(known)}")
    return PhantomOptions(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in options.items() if v is not None})


def split_sizes(modality: str, num_examples: Mapping[str, int | None] | None = None
                ) -> dict[str, int]:
    """Examples per split of `modality`: DEFAULT_EXAMPLES with `num_examples` (split -> count,
    None keeps the default) over it."""
    if modality not in DEFAULT_EXAMPLES:
        raise ValueError(f"phantom: modality {modality!r} is not one of {list(DEFAULT_EXAMPLES)}")
    counts = dict(DEFAULT_EXAMPLES[modality])
    for split, n in (num_examples or {}).items():
        if n is None:
            continue
        if split not in counts or int(n) < 0:
            raise ValueError(f"phantom: num_{split}={n!r}: needs a split of {list(counts)} "
                             "and a count >= 0")
        counts[split] = int(n)
    return counts


def split_seed(base_seed: int, split: str) -> int:
    """Seed of a split's stream: disjoint for every (base_seed < 2**32, split) pair."""
    if split not in SPLIT_INDEX:
        raise ValueError(f"Unknown split {split!r}; known: {list(SPLIT_INDEX)}")
    return base_seed + (SPLIT_INDEX[split] << 32)


# Random streams of one example.
_CT, _CT_NOISE, _XRAY, _XRAY_NOISE, _REPORT = range(5)


def _rng(seed, index, stream):
    return np.random.default_rng([seed, index, stream])


def _uniform(rng, bounds, size=None):
    return rng.uniform(bounds[0], bounds[1], size)


# ------------------------------------------------------------------------------------ geometry


@dataclasses.dataclass(frozen=True)
class Grid:
    """Voxel centres of a (D, H, W) volume: origin (centre of voxel 0, mm) + index * spacing."""
    origin: tuple
    spacing: tuple
    shape: tuple

    def box(self, lo, hi):
        """Slices of the voxels whose centres lie in [lo, hi] (per axis, mm), clipped."""
        out = []
        for o, s, n, a, b in zip(self.origin, self.spacing, self.shape, lo, hi):
            i0 = min(max(math.ceil((a - o) / s), 0), n)
            i1 = min(max(math.floor((b - o) / s) + 1, i0), n)
            out.append(slice(i0, i1))
        return tuple(out)

    def coords(self, box=None):
        """Broadcastable centre coordinates z (d,1,1), y (1,h,1), x (1,1,w) of `box` (mm)."""
        box = box or tuple(slice(0, n) for n in self.shape)
        axes = [o + s * np.arange(b.start, b.stop, dtype=np.float32)
                for o, s, b in zip(self.origin, self.spacing, box)]
        return (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])


@dataclasses.dataclass
class Subject:
    """Anatomy of one subject (mm) and its tissue intensities."""
    body: tuple  # half axes (y, x) of the skin
    muscle: tuple  # half axes (y, x) inside the subcutaneous fat
    cavity: tuple  # half axes (y, x) of the pleural cavity
    lungs: list  # right, left: dict(cy, cx, ry, rx, length, dome)
    heart_centre: np.ndarray  # (3,)
    heart_radii: np.ndarray  # (3,)
    enlargement: float  # lateral heart enlargement (1: normal size)
    spine: tuple  # (centre y, radius)
    ribs: dict
    vessels: list  # (start (3,), end (3,), radius)
    hu: np.ndarray  # (len(TISSUES),) HU per tissue

    @property
    def length(self):
        return max(lung["length"] for lung in self.lungs)


def _lung_scale(lung, z):
    """Cross-section scale of a lung at depth z: 0 at the apex, 1 from APEX_TAPER down."""
    t = np.asarray(z) / lung["length"]
    return np.sqrt(np.clip(t / APEX_TAPER, 0.0, 1.0)) * (t >= 0)


def _in_lung(lung, z, y, x):
    """Boolean (broadcast shape): point inside the lung (apex taper, domed base)."""
    q = ((y - lung["cy"]) / lung["ry"]) ** 2 + ((x - lung["cx"]) / lung["rx"]) ** 2
    f = _lung_scale(lung, z)
    return (q < f * f) & (z < lung["length"] - lung["dome"] * np.maximum(1.0 - q, 0.0))


def _sample_subject(rng, cardiomegaly):
    body = (_uniform(rng, BODY_HALF_DEPTH), _uniform(rng, BODY_HALF_WIDTH))
    fat, wall = _uniform(rng, FAT_THICKNESS), _uniform(rng, CHEST_WALL)
    muscle = (body[0] - fat, body[1] - fat)
    cavity = (muscle[0] - wall, muscle[1] - wall)
    length, dome = _uniform(rng, LUNG_LENGTH), _uniform(rng, DOME_HEIGHT)
    lungs = []
    for side, extra in ((-1, _uniform(rng, RIGHT_DOME_EXTRA)), (1, 0.0)):
        ry = cavity[0] * _uniform(rng, LUNG_HALF_DEPTH)
        rx = cavity[1] * _uniform(rng, LUNG_HALF_WIDTH)
        lungs.append(dict(cy=cavity[0] - ry - PLEURAL_GAP, cx=side * (cavity[1] - rx - PLEURAL_GAP),
                          ry=ry, rx=rx, length=length - extra, dome=dome + extra))
    heart_centre = np.array([length * _uniform(rng, HEART_DEPTH),
                             -cavity[0] * _uniform(rng, HEART_FORWARD), _uniform(rng, HEART_LEFT)])
    heart_radii = np.array([_uniform(rng, r) for r in HEART_RADII])
    enlargement = 1.0
    if cardiomegaly:
        scale = np.array([_uniform(rng, s) for s in CARDIOMEGALY_SCALE])
        heart_radii, enlargement = heart_radii * scale, float(scale[2])
    period = _uniform(rng, RIB_PERIOD)
    ribs = dict(thickness=_uniform(rng, RIB_THICKNESS), height=_uniform(rng, RIB_HEIGHT),
                period=period, descent=_uniform(rng, RIB_DESCENT), phase=rng.uniform(0, period))
    vessels = []
    for lung in lungs:
        hilum = np.array([lung["length"] * _uniform(rng, HILUM[0]),
                          lung["cy"] + HILUM[1] * lung["ry"], HILUM[2] * lung["cx"]])
        n = rng.integers(VESSELS_PER_LUNG[0], VESSELS_PER_LUNG[1] + 1)
        ends = _points_in_lung(rng, lung, n, (VESSEL_TOP * lung["length"], lung["length"]),
                               VESSEL_REACH)
        vessels += [(hilum, end, _uniform(rng, VESSEL_RADIUS)) for end in ends]
    spine = (cavity[0] + SPINE_DEPTH * (body[0] - cavity[0]), _uniform(rng, SPINE_RADIUS))
    hu = rng.uniform(TISSUE_HU[:, 0], TISSUE_HU[:, 1]).astype(np.float32)
    return Subject(body, muscle, cavity, lungs, heart_centre, heart_radii, enlargement, spine,
                   ribs, vessels, hu)


def _points_in_lung(rng, lung, n, z_range, reach, batch=32, tries=8):
    """Up to n points (m, 3) inside a lung: depth uniform over z_range, then a point within
    `reach` of that depth's cross-section, rejection-sampled (one vectorised batch per depth)
    against the domed base; fewer than n only where z_range holds (almost) no lung."""
    points = []
    for _ in range(n * tries):
        z = rng.uniform(z_range[0], z_range[1])
        f = _lung_scale(lung, z) * reach * np.sqrt(rng.uniform(0.0, 1.0, batch))
        angle = rng.uniform(0.0, 2 * np.pi, batch)
        y = lung["cy"] + lung["ry"] * f * np.sin(angle)
        x = lung["cx"] + lung["rx"] * f * np.cos(angle)
        ok = np.flatnonzero(_in_lung(lung, z, y, x))
        if len(ok):
            points.append((z, y[ok[0]], x[ok[0]]))
            if len(points) == n:
                break
    return np.array(points).reshape(-1, 3)


def _ct_grid(rng, subject, shape):
    length = subject.length
    extent = _uniform(rng, SCAN_EXTENT) * length
    z0 = rng.uniform(SCAN_SPAN[0] * length, SCAN_SPAN[1] * length - extent)
    fov = _uniform(rng, CT_FOV)
    return _centred_grid(shape, (extent / shape[0], fov / shape[1], fov / shape[2]), z0)


def _xray_grid(rng, subject, size, depth_samples):
    fov = max(subject.length / _uniform(rng, XRAY_LUNG_FRACTION),
              2 * XRAY_BODY_MARGIN * subject.body[1])
    spacing = (fov / size, 2 * XRAY_RAY_MARGIN * subject.body[0] / depth_samples, fov / size)
    top = -_uniform(rng, XRAY_TOP_MARGIN) * fov
    return _centred_grid((size, depth_samples, size), spacing, top)


def _centred_grid(shape, spacing, z_top):
    """Grid starting at depth z_top, centred on the body in y and x."""
    origin = (z_top + spacing[0] / 2,
              -(shape[1] - 1) / 2 * spacing[1], -(shape[2] - 1) / 2 * spacing[2])
    return Grid(origin, spacing, tuple(shape))


# ------------------------------------------------------------------------------------ findings


@dataclasses.dataclass
class Finding:
    """One planted lesion: ellipsoid parts (centre (3,), radii (3,)) or an effusion band."""
    kind: int  # index into LABEL_NAMES
    side: str  # "right" | "left" (cardiomegaly: "")
    depth: float  # centre depth as a fraction of its lung's length (location wording)
    parts: list = dataclasses.field(default_factory=list)
    size_mm: float = 0.0  # nodule diameter
    severity: str = ""  # effusion: small | moderate | large; cardiomegaly: mild | moderate
    band: tuple = ()  # effusion: (z0, z1, thickness)


def _choose_findings(rng, opts):
    """Bool (5,): which findings this example has (~normal_fraction of examples have none)."""
    present = np.zeros(len(LABEL_NAMES), bool)
    if rng.random() >= opts.normal_fraction:
        probs = np.asarray(opts.finding_probs, np.float64)
        present = rng.random(len(probs)) < probs
        if not present.any():
            present[rng.choice(len(probs), p=probs / probs.sum())] = True
    return present


def _sample_findings(rng, subject, present, zones, scale, slabs):
    """Findings of the present kinds, spread uniformly over depth.

    zones: (lo, hi) depth ranges (mm); each focal lesion (a nodule, a consolidation or
    ground-glass patch, an effusion band) is centred in one, drawn uniformly, within its lung.
    CT: the centres of the slabs of `min_finding_slices` slices (`_slab_centres`), so a lesion
    no deeper than a slab fills exactly that slab and every slab is equally likely; X-ray: the
    lung's depth. Bilateral effusions lie at one level.
    scale: `PhantomOptions.lesion_scale`, applied to the in-plane (y, x) lesion sizes.
    slabs: CT, with the CT_* lesion counts and depth extents.
    """
    findings = []
    in_plane = np.array([1.0, scale, scale])  # (z, y, x) factor of the lesion sizes

    def zone():
        return zones[int(rng.integers(len(zones)))]

    def place(kind, zone, side=None, **fields):
        side = int(rng.integers(2)) if side is None else side
        lung = subject.lungs[side]
        lo, hi = max(zone[0], 0.0), min(zone[1], lung["length"])
        centre = _points_in_lung(rng, lung, 1, (lo, hi), FINDING_REACH) if hi >= lo else ()
        if len(centre):
            findings.append(Finding(kind, ("right", "left")[side],
                                    centre[0][0] / lung["length"], **fields))
            return centre[0]
        return None

    if present[NODULE]:
        counts = CT_NODULE_COUNT if slabs else NODULE_COUNT
        for _ in range(1 + int(rng.choice(len(counts), p=counts))):
            d = float(np.exp(rng.uniform(*np.log(NODULE_DIAMETER))))
            centre = place(NODULE, zone(), size_mm=d)
            if centre is not None:
                findings[-1].parts = [(centre, d / 2 * _uniform(rng, NODULE_ELONGATION, 3)
                                                  * in_plane)]
    for kind, radius in ((CONSOLIDATION, CONSOLIDATION_RADIUS),
                         (GROUND_GLASS, GROUND_GLASS_RADIUS)):
        if present[kind]:
            counts = CT_PATCH_COUNT if slabs else PATCH_COUNT
            for _ in range(1 + int(rng.choice(len(counts), p=counts))):
                r = _uniform(rng, radius)
                offsets = rng.uniform(-PATCH_SPREAD, PATCH_SPREAD, (3, 3)) * r * in_plane
                offsets[0] = 0.0  # part 0 at the centre
                radii = r * _uniform(rng, PATCH_PART_RADIUS, (3, 3)) * in_plane
                if slabs:  # all parts at the patch's depth, flattened
                    offsets[:, 0] = 0.0
                    radii[:, 0] *= CT_PATCH_DEPTH
                centre = place(kind, zone())
                if centre is not None:
                    findings[-1].parts = [(centre + o, q) for o, q in zip(offsets, radii)]
    if present[EFFUSION]:
        severity = str(rng.choice(list(EFFUSION_THICKNESS)))
        extent = CT_EFFUSION_EXTENT[severity] if slabs else EFFUSION_EXTENT
        half = _uniform(rng, extent) * subject.length / 2
        thickness = _uniform(rng, EFFUSION_THICKNESS[severity]) * scale
        sides = (0, 1) if rng.random() < BILATERAL_EFFUSION else (int(rng.integers(2)),)
        level = zone()
        for side in sides:
            centre = place(EFFUSION, level, side, severity=severity)
            if centre is not None:
                findings[-1].band = (centre[0] - half, centre[0] + half, thickness)
                level = (centre[0], centre[0])  # the other side's fluid at the same level
    if present[CARDIOMEGALY]:
        findings.append(Finding(CARDIOMEGALY, "", 0.0,
                                severity="moderate" if subject.enlargement >= MODERATE_CARDIOMEGALY
                                else "mild"))
    return findings


# ----------------------------------------------------------------------------------- rendering


def _ellipsoid(grid, centre, radii, min_slices):
    """(box, local bool mask) of an ellipsoid. The depth radius is widened to min_slices / 2
    slices (centred on a slab centre, the ellipsoid then fills exactly that slab of min_slices
    slices), and each spanned slice holds a cross-section at least VOXEL_FLOOR voxels wide, so
    small lesions never vanish between voxel centres."""
    sz, sy, sx = grid.spacing
    rz = max(radii[0], min_slices / 2 * sz)
    floor = VOXEL_FLOOR * max(sy, sx) / min(radii[1], radii[2])
    reach = np.array([rz, radii[1] * max(floor, 1.0), radii[2] * max(floor, 1.0)])
    box = grid.box(centre - reach, centre + reach)
    z, y, x = grid.coords(box)
    tz = ((z - centre[0]) / rz) ** 2
    scale2 = np.where(tz < 1.0, np.maximum(1.0 - tz, floor * floor), -1.0)
    q = ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2
    return box, q < scale2


def _capsule(grid, a, b, radius):
    """(box, local bool mask) of the points within `radius` of segment a-b (a, b: (3,) mm)."""
    radius = max(radius, VOXEL_FLOOR * max(grid.spacing[1:]))
    box = grid.box(np.minimum(a, b) - radius, np.maximum(a, b) + radius)
    p = grid.coords(box)
    d = b - a
    t = sum((p[i] - a[i]) * d[i] for i in range(3)) / float(d @ d)
    t = np.clip(t, 0.0, 1.0)
    return box, sum((p[i] - a[i] - t * d[i]) ** 2 for i in range(3)) < radius * radius


def _paint(tissue, box, inside, code, where=None):
    """tissue[box][inside & (tissue in where)] = code; returns the number of voxels painted."""
    view = tissue[box]
    if where is not None:
        inside = inside & np.isin(view, where)
    view[inside] = code
    return int(np.count_nonzero(inside))


def _render(subject, findings, grid, min_slices):
    """Paints the subject into a uint8 tissue map (D, H, W); returns it, the finding mask
    (uint8, class = finding + 1) and the findings that left at least one voxel. Nodules are
    at least `min_slices` slices deep (a whole slab, centred on one); patches and effusion
    bands at least min(2, min_slices) (so one centred between two slices keeps both)."""
    tissue = np.full(grid.shape, T_AIR, np.uint8)
    z, y, x = grid.coords()
    for (ey, ex), code in ((subject.body, T_FAT), (subject.muscle, T_SOFT)):
        tissue[:, ((y / ey) ** 2 + (x / ex) ** 2)[0] < 1.0] = code
    cy, cx = subject.cavity

    ribs = subject.ribs
    t = ribs["thickness"]
    outer = (y / (cy + t)) ** 2 + (x / (cx + t)) ** 2
    ring_y, ring_x = np.nonzero(((outer < 1.0) & ((y / cy) ** 2 + (x / cx) ** 2 >= 1.0))[0])
    ry = y[0, ring_y, 0]
    z_rib = z[:, 0, :] + ribs["descent"] * (ry - cy) - ribs["phase"]  # (D, ring)
    on = (np.mod(z_rib, ribs["period"]) < ribs["height"]) & (z_rib > -ribs["period"]) & (
        z_rib < RIB_EXTENT * subject.length)
    tissue[:, ring_y, ring_x] = np.where(on, T_BONE, tissue[:, ring_y, ring_x])

    for lung in subject.lungs:
        reach = np.array([lung["length"], lung["ry"], lung["rx"]])
        centre = np.array([0.0, lung["cy"], lung["cx"]])
        box = grid.box(centre - reach * (0, 1, 1), centre + reach)
        _paint(tissue, box, _in_lung(lung, *grid.coords(box)), T_LUNG)
    for a, b, r in subject.vessels:
        _paint(tissue, *_capsule(grid, a, b, r), T_VESSEL, where=(T_LUNG,))
    _paint(tissue, *_ellipsoid(grid, subject.heart_centre, subject.heart_radii, 1), T_HEART)
    spine_y, spine_r = subject.spine
    tissue[:, ((y - spine_y) ** 2 + x ** 2)[0] < spine_r ** 2] = T_BONE

    kept, thin = [], min(2, min_slices)
    for f in findings:
        painted = 0
        if f.kind == EFFUSION:
            z0, z1, thick = f.band
            floor = thin / 2 * grid.spacing[0] - (z1 - z0) / 2
            z0, z1 = z0 - max(floor, 0.0), z1 + max(floor, 0.0)
            lung = subject.lungs[("right", "left").index(f.side)]
            box = grid.box((z0, lung["cy"] - lung["ry"], lung["cx"] - lung["rx"]),
                           (z1, lung["cy"] + lung["ry"], lung["cx"] + lung["rx"]))
            bz, byy, bxx = grid.coords(box)
            level = lung["cy"] + lung["ry"] * _lung_scale(lung, bz) - thick
            painted = _paint(tissue, box, np.broadcast_to(byy > level, tissue[box].shape),
                             T_FLUID, where=(T_LUNG, T_VESSEL))
        elif f.kind == CARDIOMEGALY:
            painted = int(np.count_nonzero(tissue == T_HEART))
        else:
            code, where = {NODULE: (T_NODULE, None),
                           CONSOLIDATION: (T_CONSOLIDATION, (T_LUNG, T_VESSEL)),
                           GROUND_GLASS: (T_GROUND_GLASS, (T_LUNG,))}[f.kind]
            depth = min_slices if f.kind == NODULE else thin
            for centre, radii in f.parts:
                painted += _paint(tissue, *_ellipsoid(grid, centre, radii, depth), code,
                                  where=where)
        if painted:
            kept.append(f)
    finding_of = np.zeros(len(TISSUES), np.uint8)
    for tissue_code, kind in ((T_NODULE, NODULE), (T_CONSOLIDATION, CONSOLIDATION),
                              (T_GROUND_GLASS, GROUND_GLASS), (T_FLUID, EFFUSION)):
        finding_of[tissue_code] = kind + 1
    if any(f.kind == CARDIOMEGALY for f in kept):
        finding_of[T_HEART] = CARDIOMEGALY + 1
    return tissue, finding_of[tissue], kept


# ------------------------------------------------------------------------------------- reports
#
# A report states every finding present (one sentence per kind), negates some absent ones and
# adds a few normal statements about other structures, so its labels follow exactly from the
# findings: a finding's words appear positively iff it is present (tests/test_phantom.py reads
# them back). Wording, negations and order vary per report; reports stay short enough for
# 64-token text encoders (the CPU config's max_length).

_LOBES = {"right": ((1 / 3, "upper"), (2 / 3, "middle"), (1.0, "lower")),
          "left": ((0.5, "upper"), (1.0, "lower"))}
_LOCATION = {
    "ct": ("{side} {lobe} lobe", "{lobe} lobe of the {side} lung"),
    "xray": ("{side} {zone} lung zone", "{side} {zone} zone", "{zone} {side} lung",
             "{side} {zone} lung"),
}
_ZONES = ((1 / 3, "upper"), (2 / 3, "mid"), (1.0, "lower"))
_POSITIVE = {
    NODULE: ("There is a {size} mm {adj}nodule in the {loc}.",
             "A {size}-mm {adj}pulmonary nodule is seen in the {loc}.",
             "{Loc} {adj}nodule measuring {size} mm.",
             "Noted is a {adj}nodule in the {loc}, measuring {size} mm.",
             "{Size} mm {adj}nodule in the {loc}.",
             "A {adj}nodule in the {loc} measures {size} mm.",
             "{Loc} {size} mm {adj}nodule.",
             "There is a {adj}pulmonary nodule in the {loc} ({size} mm)."),
    CONSOLIDATION: ("There is consolidation in the {loc}.",
                    "Focal consolidation is present in the {loc}.",
                    "Airspace consolidation involving the {loc}.",
                    "{Loc} consolidation, which may represent pneumonia.",
                    "Consolidation in the {loc}.",
                    "{Loc} airspace consolidation.",
                    "Dense consolidation is seen in the {loc}.",
                    "An area of consolidation in the {loc}."),
    GROUND_GLASS: ("There are ground-glass opacities in the {loc}.",
                   "Patchy ground-glass opacity in the {loc}.",
                   "Hazy ground glass attenuation is seen in the {loc}.",
                   "{Loc} ground-glass opacification.",
                   "Ground-glass opacity in the {loc}.",
                   "Focal ground-glass density in the {loc}.",
                   "An area of ground-glass opacity is noted in the {loc}.",
                   "{Loc} ground glass opacities."),
    EFFUSION: ("There is a {severity} {side} pleural effusion.",
               "{Severity} {side} pleural effusion.",
               "A {severity} {side} pleural effusion is present.",
               "{Side} pleural effusion, {severity} in size.",
               "{Severity} {side} effusion.",
               "There is pleural fluid on the {side}, {severity} in amount.",
               "{Severity} {side} pleural effusion is seen."),
    CARDIOMEGALY: ("The heart is enlarged.", "{Severity} cardiomegaly.",
                   "The cardiac silhouette is {severity}ly enlarged.", "Cardiomegaly.",
                   "The heart is {severity}ly enlarged.", "There is {severity} cardiomegaly.",
                   "Enlarged cardiac silhouette.", "Cardiomegaly is present."),
}
_BILATERAL_EFFUSIONS = ("There are {severity} bilateral pleural effusions.",
                        "{Severity} bilateral pleural effusions.",
                        "Bilateral pleural effusions, {severity} in size.",
                        "{Severity} bilateral effusions.",
                        "There is bilateral pleural fluid, {severity} in amount.",
                        "Bilateral {severity} pleural effusions are seen.")
_MANY_NODULES = ("Multiple pulmonary nodules, the largest measuring {size} mm in the {loc}.",
                 "There are {n} nodules, the largest in the {loc} measuring {size} mm.",
                 "{N} pulmonary nodules; the largest, in the {loc}, measures {size} mm.",
                 "Several nodules, up to {size} mm in the {loc}.")
_NUMBERS = {2: "two", 3: "three"}
_NODULE_ADJ = ("", "", "solid ", "noncalcified ", "well-circumscribed ", "round ")
_NEGATIVE = {
    NODULE: ("No pulmonary nodules.", "No suspicious pulmonary nodule is seen.",
             "There is no nodule or mass.", "No nodules.", "No pulmonary nodule or mass.",
             "There are no pulmonary nodules."),
    CONSOLIDATION: ("No focal consolidation.", "There is no consolidation.",
                    "No airspace consolidation is seen.", "No consolidation.",
                    "There is no focal airspace consolidation."),
    GROUND_GLASS: ("No ground-glass opacity.", "There are no ground-glass opacities.",
                   "No ground glass opacities are seen.", "No ground-glass opacification."),
    EFFUSION: ("No pleural effusion.", "There is no pleural effusion.",
               "No pleural effusion is seen.", "No pleural fluid.", "No effusion.",
               "There is no pleural fluid."),
    CARDIOMEGALY: ("Heart size is normal.", "The cardiac silhouette is within normal limits.",
                   "Normal heart size.", "No cardiomegaly.", "Heart size is within normal limits.",
                   "The heart is normal in size."),
}
# Absent findings negated together ("No consolidation or pleural effusion.").
_NEGATED_NOUN = {NODULE: ("pulmonary nodule", "nodule"),
                 CONSOLIDATION: ("focal consolidation", "consolidation"),
                 GROUND_GLASS: ("ground-glass opacity", "ground-glass opacities"),
                 EFFUSION: ("pleural effusion", "effusion"), CARDIOMEGALY: ("cardiomegaly",)}
_NEGATED_LIST = ("No {items}.", "There is no {items}.", "No evidence of {items}.")
# Normal statements on structures without a label; the clear-lung ones only in normal cases.
_OTHER = ("No pneumothorax.", "The mediastinum is unremarkable.", "Osseous structures intact.",
          "The trachea is midline.", "The central airways are patent.", "No lymphadenopathy.",
          "No acute osseous abnormality.", "The upper abdomen is unremarkable.")
_CLEAR = ("The lungs are clear.", "No acute cardiopulmonary abnormality.",
          "No acute intrathoracic process.", "Clear lungs.")
# An absent finding is stated as absent this often: radiology reports name only some pertinent
# negatives, and report labellers (CheXpert: positive / negative / uncertain / not mentioned)
# treat the rest as not mentioned. At 0.7 most reports were lists of negations.
NEGATION_PROBABILITY = 0.35
COMBINED_NEGATION = 0.5  # two or more negations share one sentence this often
MIN_SENTENCES = 3  # MGCA report cleaning keeps reports with >= 3 sentences
# Sentence order: findings first (positives, then negations); by anatomy (lungs, pleura,
# heart, then the rest), positives and negations mixed; or shuffled.
_ORDERS = ("findings first", "anatomical", "shuffled")
_REGION = {NODULE: 0, CONSOLIDATION: 0, GROUND_GLASS: 0, EFFUSION: 1, CARDIOMEGALY: 2}


def _bin(value, bins):
    return next(name for edge, name in bins if value <= edge)


def _location(template, f):
    return template.format(side=f.side, lobe=_bin(f.depth, _LOBES[f.side]),
                           zone=_bin(f.depth, _ZONES))


def _capitalised(text):
    return text[:1].upper() + text[1:]


def _fill(rng, templates, **fields):
    """A template drawn from `templates`, filled; {Key} is {key} capitalised. A location {loc}
    given as a function of the template (`_positive`) is called with it."""
    template = str(rng.choice(templates))
    if callable(fields.get("loc")):
        fields["loc"] = fields["loc"](template)
    fields.update({_capitalised(k): _capitalised(str(v)) for k, v in fields.items()})
    return template.format(**fields)


def _positive(rng, kind, group, modality):
    """One sentence stating the findings of one kind (group: kept findings of that kind)."""
    forms = _LOCATION[modality]
    form = str(rng.choice(forms))

    def loc(members):  # a sentence that opens with the location takes the short form
        return lambda template: " and the ".join(dict.fromkeys(
            _location(forms[0] if template.startswith("{Loc}") else form, f) for f in members))

    if kind == NODULE:
        big = max(group, key=lambda f: f.size_mm)
        fields = dict(size=max(int(round(big.size_mm)), 1), loc=loc([big]))
        if len(group) > 1:
            return _fill(rng, _MANY_NODULES, n=_NUMBERS.get(len(group), len(group)), **fields)
        return _fill(rng, _POSITIVE[NODULE], adj=str(rng.choice(_NODULE_ADJ)), **fields)
    if kind == EFFUSION:
        sides = sorted({f.side for f in group})
        severity = max((f.severity for f in group), key=list(EFFUSION_THICKNESS).index)
        if len(sides) > 1:
            return _fill(rng, _BILATERAL_EFFUSIONS, severity=severity)
        return _fill(rng, _POSITIVE[EFFUSION], side=sides[0], severity=severity)
    if kind == CARDIOMEGALY:
        return _fill(rng, _POSITIVE[CARDIOMEGALY], severity=group[0].severity)
    templates = _POSITIVE[kind]
    if len({_location(form, f) for f in group}) > 1:  # "in the A and the B"
        templates = [t for t in templates if "the {loc}" in t]
    return _fill(rng, templates, loc=loc(group))


def _negations(rng, absent):
    """(kind, sentence) pairs negating the `absent` kinds; two or more share one sentence
    COMBINED_NEGATION of the time."""
    if len(absent) >= 2 and rng.random() < COMBINED_NEGATION:
        nouns = [str(rng.choice(_NEGATED_NOUN[k])) for k in absent]
        items = ", ".join(nouns[:-1]) + " or " + nouns[-1]
        return [(absent[0], str(rng.choice(_NEGATED_LIST)).format(items=items))]
    return [(k, str(rng.choice(_NEGATIVE[k]))) for k in absent]


def make_report(rng, findings, modality):
    """Report text: the findings, negations of some absent ones, and normal statements."""
    kinds = [k for k in range(len(LABEL_NAMES)) if any(f.kind == k for f in findings)]
    stated = [(k, _positive(rng, k, [f for f in findings if f.kind == k], modality))
              for k in kinds]
    rng.shuffle(stated)
    absent = [k for k in range(len(LABEL_NAMES))
              if k not in kinds and rng.random() < NEGATION_PROBABILITY]
    stated += _negations(rng, [int(k) for k in rng.permutation(absent)])
    normal = list(_OTHER)
    rng.shuffle(normal)
    if not findings:
        normal.insert(0, str(rng.choice(_CLEAR)))
    normal = normal[:max(MIN_SENTENCES - len(stated), int(rng.integers(0, 2)), int(not findings))]
    order = _ORDERS[int(rng.integers(len(_ORDERS)))]
    if order == "anatomical":
        stated.sort(key=lambda pair: _REGION[pair[0]])  # stable: per region, positives first
    sentences = [sentence for _, sentence in stated]
    if order == "anatomical" and not findings:  # "The lungs are clear." leads
        sentences, normal = normal[:1] + sentences, normal[1:]
    sentences += normal
    if order == "shuffled":
        rng.shuffle(sentences)
    return " ".join(sentences)


# ------------------------------------------------------------------------------------ examples


@dataclasses.dataclass
class CTCase:
    """A rendered CT example with its ground truth (noise-free HU and tissue map included)."""
    volume: np.ndarray  # int16 (D, H, W) HU with noise
    hu: np.ndarray  # float32 (D, H, W) noise-free HU
    tissue: np.ndarray  # uint8 (D, H, W) codes into TISSUES
    mask: np.ndarray  # uint8 (D, H, W) finding class (label index + 1)
    findings: list
    grid: Grid


def _labels(mask):
    present = np.bincount(mask.ravel(), minlength=len(LABEL_NAMES) + 1)[1:] > 0
    return present.astype(np.float32)


def _slab_centres(grid, opts):
    """Depth zones of CT lesions: the centres of the slabs of min_finding_slices slices, so a
    small nodule (depth widened to that many slices by `_ellipsoid`) fills exactly one slab."""
    m, (z0, dz, n) = opts.min_finding_slices, (grid.origin[0], grid.spacing[0], grid.shape[0])
    centres = z0 + dz * (np.arange(0, n - m + 1, m) + (m - 1) / 2)
    return [(c, c) for c in centres]


def ct_case(seed: int, index: int, opts: PhantomOptions) -> CTCase:
    """Renders CT example `index` of stream `seed` with its ground truth."""
    rng = _rng(seed, index, _CT)
    present = _choose_findings(rng, opts)
    subject = _sample_subject(rng, present[CARDIOMEGALY])
    grid = _ct_grid(rng, subject, opts.volume_size)
    findings = _sample_findings(rng, subject, present, _slab_centres(grid, opts),
                                opts.lesion_scale, slabs=True)
    tissue, mask, findings = _render(subject, findings, grid, opts.min_finding_slices)
    hu = subject.hu[tissue]
    noise = _rng(seed, index, _CT_NOISE).standard_normal(hu.shape, dtype=np.float32)
    volume = np.clip(np.rint(hu + opts.ct_noise_hu * noise), HU_MIN, HU_MAX).astype(np.int16)
    return CTCase(volume, hu, tissue, mask, findings, grid)


def slice_has_finding(mask: np.ndarray) -> np.ndarray:
    """uint8 (D,): 1 where slice d of a CT finding mask (D, H, W) holds a LOCAL_FINDINGS class."""
    local = np.isin(mask, [kind + 1 for kind in LOCAL_FINDINGS])
    return local.any(axis=(1, 2)).astype(np.uint8)


def generate_ct(seed: int, index: int, opts: PhantomOptions) -> dict:
    """CT record (docs/CONTRACTS.md): id, report, labels float32 (5,), volume int16 (D, H, W),
    mask uint8 (D, H, W), slice_has_finding uint8 (D,) (`slice_has_finding`: the slices of
    focal findings; an enlarged heart is in `mask` and `labels` only, see LOCAL_FINDINGS)."""
    case = ct_case(seed, index, opts)
    return {
        "id": f"phantom-ct-{seed}-{index}",
        "report": make_report(_rng(seed, index, _REPORT), case.findings, "ct"),
        "labels": _labels(case.mask),
        "volume": case.volume,
        "mask": case.mask,
        "slice_has_finding": slice_has_finding(case.mask),
    }


def _nearest(image, size):
    """Nearest-neighbour resize of a 2D array to (size, size), half-pixel centres."""
    rows = ((np.arange(size) + 0.5) * image.shape[0] / size).astype(np.int64)
    cols = ((np.arange(size) + 0.5) * image.shape[1] / size).astype(np.int64)
    return image[rows[:, None], cols[None, :]]


def _radiograph(mu, ray_spacing, rng, opts):
    """uint8 (S, S) radiograph of an attenuation volume (D, H, W) seen along H: -log of the
    DRR transmission (bright = dense), windowed to [0, XRAY_WINDOW], resized, noised."""
    transmission = drr_lib.drr(mu, axis=1, spacing=ray_spacing, xp=np)
    shown = -np.log(transmission) / XRAY_WINDOW
    size = (opts.image_size, opts.image_size)
    shown = drr_lib.resize_linear(shown.astype(np.float32), size, xp=np)
    shown = shown + opts.xray_noise * rng.standard_normal(size, dtype=np.float32)
    return np.rint(np.clip(shown, 0.0, 1.0) * 255).astype(np.uint8)


def generate_xray(seed: int, index: int, opts: PhantomOptions) -> dict:
    """X-ray record (docs/CONTRACTS.md): id, report, labels float32 (5,), image uint8 (S, S),
    mask uint8 (S, S) = max of the 3D finding mask along each ray.

    By default the radiograph is the DRR of a separately drawn subject rendered on a film-like
    field (whole lungs, square, `xray_render_size` voxels wide, upsampled). With
    `pair_drr_with_ct` it is the DRR of CT example `index` of the same stream (same subject,
    findings and report), resampled from (D, W) to (S, S).
    """
    noise_rng = _rng(seed, index, _XRAY_NOISE)
    if opts.pair_drr_with_ct:
        case = ct_case(seed, index, opts)
        mu = drr_lib.hu_to_mu(case.volume.astype(np.float32), xp=np)
        mask3d, findings, grid, modality = case.mask, case.findings, case.grid, "ct"
        name = "drr"
    else:
        rng = _rng(seed, index, _XRAY)
        present = _choose_findings(rng, opts)
        subject = _sample_subject(rng, present[CARDIOMEGALY])
        grid = _xray_grid(rng, subject, opts.xray_render_size, opts.xray_depth_samples)
        findings = _sample_findings(rng, subject, present, [(0.0, subject.length)],
                                    opts.lesion_scale, slabs=False)
        tissue, mask3d, findings = _render(subject, findings, grid, 1)
        mu = drr_lib.hu_to_mu(subject.hu, xp=np)[tissue]
        modality, name = "xray", "xray"
    return {
        "id": f"phantom-{name}-{seed}-{index}",
        "report": make_report(_rng(seed, index, _REPORT), findings, modality),
        "labels": _labels(mask3d),
        "image": _radiograph(mu, grid.spacing[1], noise_rng, opts),
        "mask": _nearest(mask3d.max(axis=1), opts.image_size),
    }


def generate(modality: str, seed: int, index: int, opts: PhantomOptions) -> dict:
    """Record `index` of the `modality` ("ct" | "xray") stream of split seed `seed`."""
    if modality not in ("ct", "xray"):
        raise ValueError(f"phantom: modality {modality!r} is not 'ct' or 'xray'")
    return (generate_ct if modality == "ct" else generate_xray)(seed, index, opts)
