"""Attentive slice selection (paper §3.2, DESIGN §4.2): which slabs of a volume join its tokens.

The volume's 3D tokens form a (d, h, w) grid, depth-major; depth index i covers the slab of
`patch_depth` slices [i*pd, (i+1)*pd). A slab's score is the mean teacher CLS attention over
its h*w tokens (Eq. 2); the top-k slabs give k pseudo-2D images (the slab's centre slice or the
slab mean). All fixed-shape and jittable.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

SLICE_MODES = ("center", "mean")


def slice_scores(cls_attn: Array, grid: Sequence[int]) -> Array:
    """Eq. 2: cls_attn (B, d*h*w) over the 3D tokens, depth-major -> slab scores (B, d)."""
    d, h, w = grid
    if cls_attn.shape[-1] != d * h * w:
        raise ValueError(f"cls_attn has {cls_attn.shape[-1]} tokens, the 3D grid {tuple(grid)} "
                         f"has {d * h * w}")
    return cls_attn.reshape(cls_attn.shape[0], d, h * w).mean(axis=-1)


def volume_slab_scores(out: dict, layers: int = 0) -> Array:
    """Eq. 1-2 slab scores (B, d) of a ViT output on a volume alone (`vit.ViT` out dict): the CLS
    attention averaged over all layers (layers=0, the paper) or over the last `layers` only."""
    if layers == 0:
        return slice_scores(out["cls_attn"], out["grid_3d"])
    stack = out["cls_attn_layers"]
    if not 0 < layers <= stack.shape[0]:
        raise ValueError(f"objective.selection.layers={layers} is outside 0..{stack.shape[0]} "
                         "(0 = all layers)")
    return slice_scores(stack[-layers:].mean(axis=0), out["grid_3d"])


def random_scores(rng: Array, shape: Sequence[int]) -> Array:
    """Uniform scores: their top-k is a uniformly random k-subset (the `random` ablation)."""
    return jax.random.uniform(rng, tuple(shape))


def select_slices(volume: Array, scores: Array, k: int, mode: str = "center",
                  patch_depth: int = 1) -> tuple[Array, Array]:
    """Picks the k best-scored slabs of each volume as 2D images.

    volume (B, D, H, W); scores (B, d) with d = D // patch_depth.
    Returns slices (B, k, H, W) and slab indices (B, k) int32 in descending score order;
    slab i covers slices [i*patch_depth, (i+1)*patch_depth). mode "center" takes slice
    i*patch_depth + patch_depth//2, "mean" the mean over the slab.
    """
    b, depth = volume.shape[:2]
    if mode not in SLICE_MODES:
        raise ValueError(f"objective.selection.slice_mode={mode!r}; expected one of {SLICE_MODES}")
    if depth != scores.shape[1] * patch_depth:
        raise ValueError(f"volume depth {depth} != {scores.shape[1]} slab scores x patch depth "
                         f"{patch_depth}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"objective.selection.k={k} is outside 1..{scores.shape[1]} (slabs)")
    _, indices = jax.lax.top_k(scores, k)
    if mode == "center":
        slabs, at = volume, indices * patch_depth + patch_depth // 2
    else:
        slabs, at = volume.reshape(b, -1, patch_depth, *volume.shape[2:]).mean(axis=2), indices
    slices = jnp.take_along_axis(slabs, at[:, :, None, None], axis=1)
    return slices, indices.astype(jnp.int32)
