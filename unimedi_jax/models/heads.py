"""Projection heads for the CLIP space and the DINO head for self-distillation (DESIGN §4)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimedi_jax.models import layers

Array = jax.Array

# DINO initialises the MLP with trunc_normal(std=0.02) and zero biases (jax truncates at 2 std).
DINO_INIT_STD = 0.02
# torch.nn.Linear's default init U(-1/sqrt(fan_in), 1/sqrt(fan_in)), used by DINO's last layer.
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Projection(nn.Module):
    """Linear map without bias to the shared image-text space (CLIP): (..., D) -> (..., dim)."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return layers.Dense(self.dim, use_bias=False, dtype=self.dtype, name="proj")(x)


class DINOHead(nn.Module):
    """DINO projection head, shared by CLS and patch tokens: (..., D) -> (..., out_dim).

    MLP D -> hidden -> hidden -> bottleneck with GELU, L2 normalisation, then a weight-normalised
    linear layer without bias: column j of `last_layer/kernel` (bottleneck, out_dim) is used as
    the unit direction v_j/||v_j||, times the gain g_j. With `norm_last_layer` the gain is fixed
    at 1 (no parameter); otherwise `last_layer/scale` (out_dim,) learns, initialised at 1.
    """

    out_dim: int
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = dict(kernel_init=nn.initializers.truncated_normal(DINO_INIT_STD),
                    bias_init=nn.initializers.zeros, dtype=self.dtype)
        x = layers.gelu(layers.Dense(self.hidden_dim, name="mlp_0", **init)(x))
        x = layers.gelu(layers.Dense(self.hidden_dim, name="mlp_1", **init)(x))
        x = layers.l2_normalize(layers.Dense(self.bottleneck_dim, name="mlp_2", **init)(x))
        return _WeightNormLinear(self.out_dim, self.norm_last_layer, name="last_layer")(x)


class _WeightNormLinear(nn.Module):
    """y = x @ (g * v / ||v||) with v (in, out) normalised per output column (torch weight_norm)."""

    features: int
    fixed_gain: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        v = self.param("kernel", TORCH_LINEAR_INIT, (x.shape[-1], self.features))
        w = v / jnp.linalg.norm(v, axis=0, keepdims=True)
        if not self.fixed_gain:
            w = w * self.param("scale", nn.initializers.ones, (self.features,))
        # One 2D matmul: see layers.Dense.
        return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], self.features)
