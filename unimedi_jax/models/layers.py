"""Layers shared by the ViT, the BERT text encoder and the heads, written for fast XLA code.

- `Dense`: `flax.linen.Dense` that multiplies 2D: (..., D) is flattened to (N, D) first. Same
  parameters and math; on XLA:CPU the weight gradient of a 3D (B, T, D) Dense otherwise comes
  out as a transpose and a transposed-operand matmul, together 2.5-3x slower than the 2D one.
- `gelu`: the exact (erf) GELU in the form PyTorch and Hugging Face compute it.
- `dot_product_attention`: softmax attention, heads-major einsums on CPU (faster there than
  `jax.nn.dot_product_attention`'s grouped layout), `jax.nn.dot_product_attention` elsewhere or
  when an implementation is named ("xla", "cudnn").
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Mesh axes the batch is split over (train/sharding.py builds the mesh with both).
BATCH_AXES = ("data", "fsdp")
# Values of `implementation`: None picks by backend; "einsum" is this module's attention;
# the others go to jax.nn.dot_product_attention.
ATTENTION_IMPLEMENTATIONS = (None, "einsum", "xla", "cudnn")
# Logit of a masked key: jax.nn.dot_product_attention's own (-0.7 x the float32 maximum).
MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)
L2_EPS = 1e-12  # torch.nn.functional.normalize's epsilon


class Dense(nn.Dense):
    """`nn.Dense` on (..., D) inputs computed as one (N, D) x (D, F) matmul: (..., D) -> (..., F)."""

    def __call__(self, inputs: Array) -> Array:
        if inputs.ndim <= 2:
            return super().__call__(inputs)
        y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
        return y.reshape(*inputs.shape[:-1], y.shape[-1])


def l2_normalize(x: Array, eps: float = L2_EPS) -> Array:
    """x / max(||x||, eps) along the last axis, in float32 (as torch.nn.functional.normalize)."""
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def gelu(x: Array) -> Array:
    """Exact GELU x * Phi(x) = x/2 (1 + erf(x / sqrt 2)) (torch.nn.GELU, Hugging Face "gelu").

    The same function as `jax.nn.gelu(x, approximate=False)`, which goes through erfc: on
    XLA:CPU this form runs 2.3x faster forward and 1.2-1.6x faster forward + backward.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(math.sqrt(0.5), x.dtype)))


def _einsum_attention(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
    """Heads-major attention with float32 logits, normalised after the value product.

    softmax(l) v = (exp(l - max l) v) / sum exp(l - max l): the division runs over the (T, C)
    output instead of the (T, S) weights, and the 1/sqrt(C) scale over q instead of the logits
    (XLA:CPU otherwise materialises that scalar as a (B, H, T, S) operand); the whole train
    step runs 4-5% faster (docs/BENCHMARKS.md §6). The max is a constant of the softmax, so no
    gradient flows through it.
    """
    q = q * np.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # (B, H, T, C)
    logits = jnp.einsum("bhtc,bhsc->bhts", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, MASKED_LOGIT)
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    out = jnp.einsum("bhts,bhsc->bhtc", weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    out = out / weights.sum(axis=-1, keepdims=True)
    return jnp.swapaxes(out.astype(v.dtype), 1, 2)


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None = None,
                          implementation: str | None = None) -> Array:
    """softmax(q k^T / sqrt(C)) v: q (B, T, H, C), k and v (B, S, H, C) -> (B, T, H, C).

    mask: bool, broadcastable to (B, H, T, S), True where a query attends to a key.
    implementation: one of ATTENTION_IMPLEMENTATIONS; None takes "einsum" on the CPU backend
    and jax.nn.dot_product_attention's default elsewhere.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; expected one of "
                         f"{ATTENTION_IMPLEMENTATIONS}")
    if implementation == "einsum" or (implementation is None and jax.default_backend() == "cpu"):
        return _einsum_attention(q, k, v, mask)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
