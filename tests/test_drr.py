"""DRR op (unimedi_jax/ops/drr.py): jax and numpy twins against float64 references."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimedi_jax.ops import drr as drr_lib


def _reference_drr(mu, axis, spacing):
    """exp(-sum mu * dl) ray by ray with explicit Python sums, in float64."""
    mu = np.moveaxis(np.asarray(mu, np.float64), axis, -1)
    out = np.empty(mu.shape[:-1])
    for index in itertools.product(*map(range, mu.shape[:-1])):
        out[index] = math.exp(-sum(float(v) * spacing for v in mu[index]))
    return out


@pytest.mark.parametrize("axis", [0, 1, 2, -2])
def test_drr_matches_float64_ray_sums(axis):
    rng = np.random.default_rng(axis + 7)
    mu = rng.uniform(0.0, 0.05, (3, 4, 5))
    expected = _reference_drr(mu, axis, 2.5)
    np.testing.assert_allclose(drr_lib.drr(mu, axis, 2.5, xp=np), expected, rtol=1e-13)
    jitted = jax.jit(drr_lib.drr, static_argnames="axis")
    got = jitted(jnp.asarray(mu, jnp.float32), axis=axis, spacing=2.5)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-6)
    twin = drr_lib.drr(mu.astype(np.float32), axis, 2.5, xp=np)
    np.testing.assert_allclose(np.asarray(got), twin, rtol=2e-6)


def test_drr_batched_and_water_slab():
    rng = np.random.default_rng(0)
    mu = rng.uniform(0.0, 0.03, (2, 3, 4, 5))  # leading batch dim, rays along H
    got = np.asarray(drr_lib.drr(jnp.asarray(mu, jnp.float32), spacing=1.5))
    assert got.shape == (2, 3, 5)
    for b in range(2):
        np.testing.assert_allclose(got[b], _reference_drr(mu[b], 1, 1.5), rtol=2e-6)
    # Beer-Lambert through 200 mm of water: I / I0 = exp(-mu_water * 200 mm).
    water = drr_lib.hu_to_mu(np.zeros((1, 40, 1)), xp=np)
    np.testing.assert_allclose(drr_lib.drr(water, spacing=5.0, xp=np), math.exp(-0.0193 * 200))


def test_hu_to_mu():
    hu = np.array([-1200.0, -1000.0, -850.0, 0.0, 40.0, 700.0, 1000.0])
    expected = [max(0.0, drr_lib.MU_WATER * (1 + h / 1000)) for h in hu]
    np.testing.assert_allclose(drr_lib.hu_to_mu(hu, xp=np), expected, rtol=1e-15)
    np.testing.assert_allclose(np.asarray(drr_lib.hu_to_mu(jnp.asarray(hu, jnp.float32))),
                               expected, rtol=1e-6, atol=1e-9)
    assert drr_lib.hu_to_mu(np.array(-1000.0), xp=np) == 0.0


@pytest.mark.parametrize("shape_in, shape_out", [
    ((5, 7), (12, 9)), ((12, 9), (5, 4)), ((8, 16), (8, 5)), ((6, 6), (6, 6)),
    ((32, 64), (72, 72))])
def test_resize_linear_matches_jax_image_resize(shape_in, shape_out):
    image = np.random.default_rng(1).normal(size=(2, *shape_in)).astype(np.float32)
    expected = np.asarray(jax.image.resize(image, (2, *shape_out), method="linear",
                                           antialias=True))
    np.testing.assert_allclose(drr_lib.resize_linear(image, shape_out, xp=np), expected,
                               rtol=1e-5, atol=1e-5)
    got = jax.jit(drr_lib.resize_linear, static_argnums=1)(jnp.asarray(image), shape_out)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_resize_weights_are_interpolation_weights():
    for n_in, n_out in [(5, 12), (12, 5), (7, 7)]:
        w = drr_lib.linear_resize_weights(n_in, n_out)
        assert w.shape == (n_out, n_in) and (w >= 0).all()
        np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-12)
        if n_out >= n_in:  # upsampling interpolates: a linear ramp maps onto itself (clamped)
            centres = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
            np.testing.assert_allclose(w @ np.arange(n_in), np.clip(centres, 0, n_in - 1),
                                       atol=1e-12)
