"""Augmented views made inside a jitted step (docs/DESIGN.md §4.8): 2D images and 3D volumes.

The data pipeline gives one augmented view per sample; methods that compare views (Joint,
DrasCLR) draw the others here, per sample and without host round trips. `cfg` is the
`config.objective.views` ConfigDict:

- crop_scale (lo, hi): random resized crop. A fraction f ~ U(lo, hi) of the area (2D) or volume
  (3D) is kept, the same fraction f^(1/n) along each of the n cropped axes (no aspect jitter),
  at a uniform offset, resized back to the input size by linear interpolation
  (`jax.image.scale_and_translate`). (1, 1) is the identity.
- crop_depth (optional, default True): whether the 3D crop also crops along D; False crops
  (H, W) only, so slice d of two views lies at the same depth.
- flip: probability of a flip along W (the last axis).
- intensity (a, b): x * s + t with s ~ U(1 - a, 1 + a), t ~ U(-b, b); (0, 0) is off.
- noise_std: additive gaussian noise of that standard deviation (0 is off).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def crop_resize(x: Array, start: Array, frac: Array, axes: tuple[int, ...]) -> Array:
    """One sample x (*spatial): the crop [start * size, (start + frac) * size) along each of
    `axes` (start (len(axes),), frac scalar: fractions of the axis) resized back to x.shape by
    linear interpolation. Output pixel y along an axis of size L reads the input at
    start * L + (y + 1/2) * frac - 1/2."""
    sizes = jnp.asarray([x.shape[a] for a in axes], jnp.float32)
    scale = jnp.broadcast_to(1.0 / frac, (len(axes),)).astype(jnp.float32)
    translation = -start * sizes * scale
    y = jax.image.scale_and_translate(x, x.shape, axes, scale, translation,
                                      method="linear", antialias=False)
    return y.astype(x.dtype)


def _random_crop(rng: Array, x: Array, axes: tuple[int, ...], crop_scale) -> Array:
    """Random resized crop of one sample: kept fraction f ~ U(crop_scale), f^(1/len(axes)) per
    axis, start uniform in [0, 1 - that]."""
    lo, hi = (float(v) for v in crop_scale)
    r_f, r_o = jax.random.split(rng)
    frac = jax.random.uniform(r_f, (), minval=lo, maxval=hi) ** (1.0 / len(axes))
    start = jax.random.uniform(r_o, (len(axes),)) * (1.0 - frac)
    return crop_resize(x, start, frac, axes)


def _augment(rng: Array, x: Array, cfg, crop_axes: tuple[int, ...]) -> Array:
    """x (B, *spatial) -> (B, *spatial): crop, flip along W, intensity, noise; per sample."""
    b = x.shape[0]
    r_crop, r_flip, r_scale, r_shift, r_noise = jax.random.split(rng, 5)
    x = jax.vmap(lambda k, xi: _random_crop(k, xi, crop_axes, cfg.crop_scale))(
        jax.random.split(r_crop, b), x)
    per_sample = (b,) + (1,) * (x.ndim - 1)
    if cfg.flip > 0:
        flip = jax.random.bernoulli(r_flip, cfg.flip, per_sample)
        x = jnp.where(flip, jnp.flip(x, axis=-1), x)
    a, t = (float(v) for v in cfg.intensity)
    if a > 0:
        x = x * jax.random.uniform(r_scale, per_sample, x.dtype, 1.0 - a, 1.0 + a)
    if t > 0:
        x = x + jax.random.uniform(r_shift, per_sample, x.dtype, -t, t)
    if cfg.noise_std > 0:
        x = x + cfg.noise_std * jax.random.normal(r_noise, x.shape, x.dtype)
    return x


def augment_2d(rng: Array, images: Array, cfg) -> Array:
    """A random view of each image: images (B, S, S) -> (B, S, S)."""
    if images.ndim != 3:
        raise ValueError(f"augment_2d expects images (B, H, W), got shape {images.shape}")
    return _augment(rng, images, cfg, (0, 1))


def augment_3d(rng: Array, volumes: Array, cfg) -> Array:
    """A random view of each volume: volumes (B, D, H, W) -> (B, D, H, W)."""
    if volumes.ndim != 4:
        raise ValueError(f"augment_3d expects volumes (B, D, H, W), got shape {volumes.shape}")
    axes = (0, 1, 2) if cfg.get("crop_depth", True) else (1, 2)
    return _augment(rng, volumes, cfg, axes)
