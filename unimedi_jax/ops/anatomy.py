"""Anatomical locations of token-grid regions, read from the CT volume (docs/DESIGN.md §4.9).

DrasCLR conditions its network on where a patch lies in the anatomy. Here that location comes
from the normalised volume, jittably, with no atlas:

- body: voxels above `threshold` (about -500 HU, `hu_to_normalized`); air outside the body and
  the aerated lungs lie below it.
- inside: voxels between body voxels along both in-plane axes of their row (H and W), a
  per-row hull that fills the lungs' holes in the body outline.
- lung: below the threshold and inside the body.
- the bounding box of the chosen mask ("lung" or "body") per volume, and each region's centre
  normalised to [-1, 1] within it, (z, y, x) = (D, H, W).

A region is a block of `region` = (rd, rh, rw) tokens of the ViT's 3D token grid (`grid`, the
volume size over `patch` = the 3D patch size), given by its start (d, h, w) in tokens; its tokens
are listed in the ViT's depth-major order (docs/CONTRACTS.md). Coordinates are continuous voxel
coordinates in which voxel i spans [i, i + 1).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unimedi_jax.data.preprocess import CT_HU_MAX, CT_HU_MIN

Array = jax.Array
ROI_MASKS = ("lung", "body")  # objective.drasclr.roi
NEIGHBOUR_DIRECTIONS = np.array([[s * (a == i) for i in range(3)] for a in range(3)
                                 for s in (1, -1)], np.int32)  # (6, 3): +-1 along d, h, w
_OUTSIDE = -1e4  # score of a region or direction outside the ROI (still drawable as a fallback)
_OFF_GRID = -1e9  # score of a neighbour outside the token grid


def hu_to_normalized(hu: float) -> float:
    """A Hounsfield value on the scale of `data.preprocess.normalize_ct` (clipped, rescaled)."""
    hu = min(max(float(hu), CT_HU_MIN), CT_HU_MAX)
    return (hu - (CT_HU_MAX + CT_HU_MIN) / 2) / ((CT_HU_MAX - CT_HU_MIN) / 2)


def _between(mask: Array, axis: int) -> Array:
    """True where a True of `mask` lies at or before and at or after, along `axis`."""
    m = mask.astype(jnp.int32)
    before = jax.lax.cummax(m, axis=axis)
    after = jax.lax.cummax(m, axis=axis, reverse=True)
    return (before & after).astype(bool)


def masks(volume: Array, threshold: float) -> tuple[Array, Array]:
    """volume (B, D, H, W) normalised -> (body, lung) bool (B, D, H, W)."""
    body = volume > threshold
    inside = _between(body, 2) & _between(body, 3)
    return body, inside & ~body


def roi_mask(volume: Array, threshold: float, roi: str) -> Array:
    """The `roi` mask ("lung" | "body") of volume (B, D, H, W): bool, same shape."""
    if roi not in ROI_MASKS:
        raise ValueError(f"roi={roi!r}; expected one of {ROI_MASKS}")
    body, lung = masks(volume, threshold)
    return lung if roi == "lung" else body


def bounding_box(mask: Array) -> tuple[Array, Array]:
    """mask (B, D, H, W) bool -> lo, hi (B, 3) float32: the box [lo, hi) of its True voxels per
    axis (z, y, x); the whole axis where the mask is empty."""
    lo, hi = [], []
    for axis in (1, 2, 3):
        other = tuple(a for a in (1, 2, 3) if a != axis)
        occupied = jnp.any(mask, axis=other)  # (B, n)
        n = occupied.shape[1]
        found = jnp.any(occupied, axis=1)
        first = jnp.argmax(occupied, axis=1)
        last = n - 1 - jnp.argmax(occupied[:, ::-1], axis=1)
        lo.append(jnp.where(found, first, 0))
        hi.append(jnp.where(found, last + 1, n))
    return (jnp.stack(lo, axis=1).astype(jnp.float32), jnp.stack(hi, axis=1).astype(jnp.float32))


def num_starts(grid: Sequence[int], region: Sequence[int]) -> tuple[int, int, int]:
    """Start positions per axis of a region in the grid (a stride of one token)."""
    return tuple(int(g) - int(r) + 1 for g, r in zip(grid, region))


def region_fractions(mask: Array, patch: Sequence[int], region: Sequence[int]) -> Array:
    """Share of each region's voxels in the mask: mask (B, D, H, W) -> (B, *num_starts) float32."""
    b, d, h, w = mask.shape
    (pd, ph, pw), (rd, rh, rw) = patch, region
    tokens = mask.astype(jnp.float32).reshape(b, d // pd, pd, h // ph, ph, w // pw, pw)
    tokens = tokens.mean(axis=(2, 4, 6))  # (B, gd, gh, gw)
    window = jax.lax.reduce_window(tokens, 0.0, jax.lax.add, (1, rd, rh, rw), (1, 1, 1, 1),
                                   "VALID")
    return window / (rd * rh * rw)


def region_tokens(starts: Array, grid: Sequence[int], region: Sequence[int]) -> Array:
    """starts (..., 3) int token starts -> (..., rd*rh*rw) int32 indices into the ViT's 3D
    tokens, ascending (depth-major d, h, w)."""
    _, gh, gw = grid
    offsets = np.array([i * gh * gw + j * gw + k for i, j, k in
                        itertools.product(*(range(r) for r in region))], np.int32)
    first = starts[..., 0] * gh * gw + starts[..., 1] * gw + starts[..., 2]
    return (first[..., None] + offsets).astype(jnp.int32)


def region_centres(starts: Array, patch: Sequence[int], region: Sequence[int]) -> Array:
    """starts (..., 3) -> region centres (..., 3) float32 in voxel coordinates."""
    return (starts.astype(jnp.float32) + jnp.asarray(region, jnp.float32) / 2) * jnp.asarray(
        patch, jnp.float32)


def normalized_location(centres: Array, lo: Array, hi: Array) -> Array:
    """centres (B, ..., 3) in voxels, box lo, hi (B, 3) -> 2 (c - lo) / (hi - lo) - 1: -1 and 1
    at the box faces (values beyond for a centre outside the box)."""
    shape = (lo.shape[0],) + (1,) * (centres.ndim - 2) + (3,)
    lo, hi = lo.reshape(shape), hi.reshape(shape)
    return 2.0 * (centres - lo) / (hi - lo) - 1.0


def _unravel(flat: Array, starts_shape: Sequence[int]) -> Array:
    _, nh, nw = starts_shape
    return jnp.stack([flat // (nh * nw), (flat // nw) % nh, flat % nw], axis=-1).astype(jnp.int32)


def sample_regions(rng: Array, fractions: Array, num: int, min_fraction: float) -> Array:
    """`num` distinct regions per volume, uniform over those with at least `min_fraction` of
    their voxels in the ROI (regions below it only when too few reach it).

    fractions (B, nd, nh, nw) (`region_fractions`) -> starts (B, num, 3) int32.
    """
    b = fractions.shape[0]
    flat = fractions.reshape(b, -1)
    score = jnp.where(flat >= min_fraction, 0.0, _OUTSIDE + flat)
    score = score + jax.random.gumbel(rng, flat.shape)  # Gumbel top-k: sampling w/o replacement
    _, index = jax.lax.top_k(score, num)
    return _unravel(index, fractions.shape[1:])


def neighbour_regions(rng: Array, starts: Array, fractions: Array, shift: int, num: int,
                      min_fraction: float) -> Array:
    """`num` distinct neighbours of each region: its start moved by `shift` tokens along one of
    the six axis directions, uniform over the directions that stay on the grid and in the ROI
    (off-ROI ones only when too few are in it; off-grid ones never, see `min_neighbours`).

    starts (B, P, 3), fractions (B, nd, nh, nw) -> (B, P, num, 3) int32.
    """
    b, p, _ = starts.shape
    limit = jnp.asarray(fractions.shape[1:], jnp.int32) - 1
    moved = starts[:, :, None, :] + shift * jnp.asarray(NEIGHBOUR_DIRECTIONS)  # (B, P, 6, 3)
    on_grid = jnp.all((moved >= 0) & (moved <= limit), axis=-1)
    clipped = jnp.clip(moved, 0, limit)
    nd, nh, nw = fractions.shape[1:]
    flat = clipped[..., 0] * nh * nw + clipped[..., 1] * nw + clipped[..., 2]
    frac = jnp.take_along_axis(fractions.reshape(b, 1, -1), flat.reshape(b, 1, -1),
                               axis=2).reshape(flat.shape)
    score = jnp.where(on_grid, jnp.where(frac >= min_fraction, 0.0, _OUTSIDE), _OFF_GRID)
    score = score + jax.random.gumbel(rng, score.shape)
    _, pick = jax.lax.top_k(score, num)  # (B, P, num)
    return jnp.take_along_axis(clipped, pick[..., None], axis=2)


def min_neighbours(grid: Sequence[int], region: Sequence[int], shift: int) -> int:
    """The fewest on-grid neighbour directions over all region starts (host numpy)."""
    starts = np.stack(np.meshgrid(*(np.arange(n) for n in num_starts(grid, region)),
                                  indexing="ij"), axis=-1).reshape(-1, 1, 3)
    moved = starts + shift * NEIGHBOUR_DIRECTIONS
    limit = np.asarray(num_starts(grid, region)) - 1
    return int(np.all((moved >= 0) & (moved <= limit), axis=-1).sum(axis=1).min())
