"""Location-conditioned (hyper-parameterised) layers for DrasCLR (docs/DESIGN.md §4.9).

A conditional layer holds E expert weights and mixes them per sample from its anatomical
location, as the conditional convolution of DrasCLR (CondConv routing):

    r(loc) = sigmoid(loc @ R + c)              (E,) routing weights, independent per expert
    W(loc) = sum_e r_e(loc) W_e                (in, out)
    y      = x @ W(loc) + b                    (one bias shared by the experts)

computed without forming W per sample: y = (r ⊗ x) @ [W_1; ...; W_E], one (N, E*in) x (E*in,
out) matmul.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimedi_jax.models import layers
from unimedi_jax.models.heads import TORCH_LINEAR_INIT

Array = jax.Array
# torch.nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for each expert (E, in, out) on its own.
EXPERT_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-2,
                                               out_axis=-1, batch_axis=(0,))


class CondDense(nn.Module):
    """Dense layer whose kernel is mixed per sample from `num_experts` experts by its location.

    x (..., in), loc (..., L) -> (..., features). Params: `kernel` (E, in, features), `bias`
    (features,), `routing` (a Dense L -> E).
    """

    features: int
    num_experts: int
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, loc: Array) -> Array:
        e, d_in = self.num_experts, x.shape[-1]
        r = jax.nn.sigmoid(layers.Dense(e, kernel_init=TORCH_LINEAR_INIT, name="routing")(
            jnp.asarray(loc, jnp.float32)))  # (..., E) routing weights
        kernel = self.param("kernel", EXPERT_INIT, (e, d_in, self.features))
        x, kernel, r = nn.dtypes.promote_dtype(x, kernel, r, dtype=self.dtype)
        lead = x.shape[:-1]
        mixed = (r[..., :, None] * x[..., None, :]).reshape(-1, e * d_in)
        y = (mixed @ kernel.reshape(e * d_in, self.features)).reshape(*lead, self.features)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,)).astype(
                y.dtype)
        return y


class ConditionalHead(nn.Module):
    """DrasCLR's MLP projection head, location-conditioned: CondDense -> ReLU -> CondDense.

    x (..., width), loc (..., L) -> (..., dim) (not normalised).
    """

    hidden_dim: int
    dim: int
    num_experts: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, loc: Array) -> Array:
        x = CondDense(self.hidden_dim, self.num_experts, dtype=self.dtype, name="fc1")(x, loc)
        return CondDense(self.dim, self.num_experts, dtype=self.dtype, name="fc2")(
            jax.nn.relu(x), loc)
