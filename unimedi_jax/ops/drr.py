"""Digitally reconstructed radiographs (DRR): Beer-Lambert ray sums through attenuation volumes.

Every function takes the array namespace `xp`: `jax.numpy` (the default; jittable) or `numpy`
(used inside data worker processes, where jax must not run after a fork). The code is the same
for both, so the two agree up to floating-point rounding.
"""

import numpy as np
import jax.numpy as jnp

# Linear attenuation coefficient of water at ~70 keV, the effective energy of a chest
# radiograph beam (NIST XCOM: 0.193 cm^-1), in 1/mm.
MU_WATER = 0.0193

# Views of a (..., D, H, W) volume (D cranio-caudal, H antero-posterior, W left-right): the axis
# the rays run along. Rays are parallel, so AP and PA give the same line integrals (they differ
# by the magnification of a divergent beam, not modelled; docs/DESIGN.md §4.7).
RAY_AXES = {"ap": -2, "pa": -2, "lateral": -1}


def hu_to_mu(hu, mu_water=MU_WATER, *, xp=jnp):
    """Hounsfield units -> linear attenuation (1/mm): mu = mu_water * (1 + HU / 1000), >= 0."""
    return xp.maximum(mu_water * (1.0 + hu / 1000.0), 0.0)


def line_integral(mu_volume, axis=-2, spacing=1.0, *, xp=jnp):
    """sum_i mu_i * dl along `axis` (the attenuation -log(I / I0) of each ray); arguments as
    `drr`."""
    return xp.sum(mu_volume, axis=axis) * spacing


def drr(mu_volume, axis=-2, spacing=1.0, *, xp=jnp):
    """Transmitted fraction I / I0 = exp(-sum_i mu_i * dl) of parallel rays along `axis`.

    Args:
        mu_volume: (..., D, H, W) attenuation in 1/mm (any leading batch dims).
        axis: the ray direction; -2 (H, antero-posterior) for the volumes of this project.
        spacing: voxel length dl along `axis`, in mm.
        xp: array namespace (`jax.numpy` or `numpy`).
    Returns:
        the transmission, the input shape without `axis`, values in (0, 1].
    """
    return xp.exp(-line_integral(mu_volume, axis, spacing, xp=xp))


def radiograph(mu_volume, projection, ray_length, window, shape, *, xp=jnp):
    """A radiograph's displayed intensity: -log(I / I0) / window, resized, clipped to [0, 1].

    Args:
        mu_volume: (..., D, H, W) attenuation in 1/mm.
        projection: a key of RAY_AXES ("ap" | "pa": rays along H, image (D, W); "lateral":
            along W, image (D, H)).
        ray_length: length of the volume along the rays in mm (the voxel length is
            ray_length / the axis size).
        window: attenuation shown as white (-log transmission; bright = dense).
        shape: (S, S) output size; the (D, W) or (D, H) projection is resized to it
            (`resize_linear`).
    Returns:
        (..., S, S) in [0, 1], float as `mu_volume`.
    """
    axis = RAY_AXES[projection]
    spacing = ray_length / mu_volume.shape[axis]
    shown = line_integral(mu_volume, axis, spacing, xp=xp) / window
    return xp.clip(resize_linear(shown, shape, xp=xp), 0.0, 1.0)


def linear_resize_weights(n_in, n_out):
    """(n_out, n_in) float64 row-stochastic matrix of linear resampling with half-pixel centres.

    Same weights as `jax.image.resize(..., method="linear", antialias=True)`: a triangle kernel,
    widened by n_in / n_out when downsampling, renormalised over the samples inside the image.
    """
    scale = n_out / n_in
    kernel_scale = min(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) / scale - 0.5
    dist = np.abs(np.arange(n_in)[None, :] - centres[:, None]) * kernel_scale
    weights = np.maximum(0.0, 1.0 - dist)
    return weights / weights.sum(axis=1, keepdims=True)


def resize_linear(image, shape, *, xp=jnp):
    """Resizes the last two axes of `image` (..., h, w) to `shape` = (H, W), linear (antialiased
    when downsampling)."""
    rows = xp.asarray(linear_resize_weights(image.shape[-2], shape[0]), dtype=image.dtype)
    cols = xp.asarray(linear_resize_weights(image.shape[-1], shape[1]), dtype=image.dtype)
    return xp.matmul(xp.matmul(rows, image), cols.T)
