"""Deformable self-attention across the slices of a volume (docs/DESIGN.md §4.8).

A volume's n slice embeddings (B, n, C), in depth order, are assembled into a holistic feature
by Deformable DETR's attention in one dimension: each slice query predicts, per head, P
sampling offsets along the slice axis and P attention weights (softmax over the points); the
head's values are read by linear interpolation at (query position + offset), clamped to
[0, n - 1], and summed with those weights. The interpolation is written as a (n_query, n_key)
weight matrix per head, so the whole layer is dense einsums (n is small).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimedi_jax.models import layers

Array = jax.Array


def offset_bias_init(num_heads: int, num_points: int):
    """Initial sampling offsets (Deformable DETR's grid in 1D): head h looks forward (even h)
    or backward (odd h), point p at distance p + 1 slices."""
    sign = np.where(np.arange(num_heads) % 2 == 0, 1.0, -1.0)[:, None]
    grid = (sign * (np.arange(num_points) + 1.0)[None]).reshape(-1)

    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.asarray(grid, dtype).reshape(shape)

    return init


def interpolation_matrix(loc: Array, n: int) -> Array:
    """Linear-interpolation weights: loc (...,) positions in [0, n - 1] -> (..., n), row i puts
    1 - frac on floor(loc) and frac on floor(loc) + 1 (clamped to n - 1)."""
    lo = jnp.clip(jnp.floor(loc), 0, n - 1)
    frac = loc - lo
    hi = jnp.minimum(lo + 1, n - 1)
    keys = jnp.arange(n, dtype=loc.dtype)
    return ((1.0 - frac)[..., None] * (keys == lo[..., None])
            + frac[..., None] * (keys == hi[..., None]))


class DeformableSliceAttention(nn.Module):
    """x (B, n, C) -> (B, n, C). Parameters: `value`, `offsets`, `weights`, `out` (Dense).

    For query i, head h, point p: loc = clip(i + offsets(x_i)[h, p], 0, n - 1),
    a = softmax_p(weights(x_i)[h, :]), y_i[h] = sum_p a_p * interp(value(x)[:, h], loc).
    """

    num_heads: int
    num_points: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, n, c = x.shape
        h, p = self.num_heads, self.num_points
        if c % h:
            raise ValueError(f"width {c} is not divisible by num_heads {h}")
        xavier = dict(kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype)
        value = layers.Dense(c, name="value", **xavier)(x).reshape(b, n, h, c // h)
        # Deformable DETR: offsets and weights start at zero kernels, the offsets' bias on a grid.
        offsets = layers.Dense(h * p, kernel_init=nn.initializers.zeros,
                               bias_init=offset_bias_init(h, p), dtype=self.dtype,
                               name="offsets")(x).reshape(b, n, h, p).astype(jnp.float32)
        logits = layers.Dense(h * p, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                              name="weights")(x).reshape(b, n, h, p).astype(jnp.float32)
        attn = jax.nn.softmax(logits, axis=-1)
        loc = jnp.clip(jnp.arange(n, dtype=jnp.float32)[None, :, None, None] + offsets,
                       0.0, n - 1.0)
        # (B, n_query, H, P, n_key) -> summed over points: (B, H, n_query, n_key)
        mix = jnp.einsum("bqhp,bqhpk->bhqk", attn, interpolation_matrix(loc, n))
        y = jnp.einsum("bhqk,bkhc->bqhc", mix.astype(value.dtype), value).reshape(b, n, c)
        return layers.Dense(c, name="out", **xavier)(y)


class SliceTransformer(nn.Module):
    """Slice embeddings (B, n, C) -> (tokens (B, n, C), holistic (B, C)).

    A learned slice-position table is added, positions where `mask` (B, n) is True are first
    replaced by the learned mask embedding; then `depth` pre-norm layers of deformable
    attention and MLP (width mlp_dim), a final LayerNorm, and the mean over slices.
    """

    depth: int = 1
    num_heads: int = 4
    num_points: int = 4
    mlp_dim: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> tuple[Array, Array]:
        b, n, c = x.shape
        if mask is not None:
            token = self.param("mask_embed", nn.initializers.normal(0.02), (c,))
            x = jnp.where(mask[..., None], token.astype(x.dtype), x)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), (n, c)).astype(x.dtype)
        init = dict(kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype)
        for i in range(self.depth):
            y = nn.LayerNorm(epsilon=1e-6, name=f"norm1_{i}")(x)
            x = x + DeformableSliceAttention(self.num_heads, self.num_points, self.dtype,
                                             name=f"attn_{i}")(y)
            y = nn.LayerNorm(epsilon=1e-6, name=f"norm2_{i}")(x)
            y = layers.gelu(layers.Dense(self.mlp_dim, name=f"fc1_{i}", **init)(y))
            x = x + layers.Dense(c, name=f"fc2_{i}", **init)(y)
        x = nn.LayerNorm(epsilon=1e-6, name="norm")(x)
        return x, x.mean(axis=1)
