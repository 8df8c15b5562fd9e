"""In-step augmented views (unimedi_jax/ops/views.py, docs/DESIGN.md §4.8)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unimedi_jax.ops import views

FAST = {"xla_backend_optimization_level": 0}


def cfg(**kw):
    base = dict(crop_scale=(1.0, 1.0), flip=0.0, intensity=(0.0, 0.0), noise_std=0.0)
    return ml_collections.ConfigDict({**base, **kw})


def aug(fn, key, x, c):
    """`fn` (views.augment_2d or _3d) with config c, jitted: one compile, not one per op."""
    return jax.jit(lambda k, x: fn(k, x, c), compiler_options=FAST)(key, x)


def data(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


DEFAULT = cfg(crop_scale=(0.5, 1.0), flip=0.5, intensity=(0.2, 0.2), noise_std=0.05)


def test_shapes_and_dtype():
    x2, x3 = data((3, 16, 16)), data((2, 8, 16, 16))
    y2 = aug(views.augment_2d, jax.random.key(0), x2, DEFAULT)
    y3 = aug(views.augment_3d, jax.random.key(0), x3, DEFAULT)
    assert y2.shape == x2.shape and y2.dtype == jnp.float32
    assert y3.shape == x3.shape and y3.dtype == jnp.float32
    with pytest.raises(ValueError):
        views.augment_2d(jax.random.key(0), x3, DEFAULT)


@pytest.mark.parametrize("crop_depth", [True, False])
def test_neutral_config_is_the_identity(crop_depth):
    x2, x3 = data((3, 16, 16)), data((2, 8, 16, 16))
    np.testing.assert_allclose(aug(views.augment_2d, jax.random.key(1), x2, cfg()), x2, atol=1e-6)
    c = cfg(crop_depth=crop_depth)
    np.testing.assert_allclose(aug(views.augment_3d, jax.random.key(1), x3, c), x3, atol=1e-6)


def test_flip_along_w_is_exact():
    x2, x3 = data((3, 16, 12)), data((2, 4, 6, 10))
    np.testing.assert_array_equal(aug(views.augment_2d, jax.random.key(2), x2, cfg(flip=1.0)),
                                  x2[..., ::-1])
    np.testing.assert_array_equal(aug(views.augment_3d, jax.random.key(2), x3, cfg(flip=1.0)),
                                  x3[..., ::-1])
    # p = 0.5: each sample is either itself or its mirror, and both occur over 32 samples.
    x = data((32, 8, 8))
    y = np.asarray(aug(views.augment_2d, jax.random.key(3), x, cfg(flip=0.5)))
    same = np.all(y == x, axis=(1, 2))
    mirrored = np.all(y == x[..., ::-1], axis=(1, 2))
    assert np.all(same | mirrored) and same.any() and mirrored.any()


def test_intensity_is_an_affine_map_per_sample():
    x = data((8, 8, 8))
    y = np.asarray(aug(views.augment_2d, jax.random.key(4), x, cfg(intensity=(0.2, 0.0))))
    ratio = y / x
    np.testing.assert_allclose(ratio, ratio[:, :1, :1] * np.ones_like(ratio), rtol=1e-5)
    assert np.all((ratio[:, 0, 0] >= 0.8) & (ratio[:, 0, 0] <= 1.2))
    assert np.ptp(ratio[:, 0, 0]) > 0.01  # samples differ
    y = np.asarray(aug(views.augment_2d, jax.random.key(4), x, cfg(intensity=(0.0, 0.3))))
    shift = (y - x).reshape(8, -1)
    np.testing.assert_allclose(shift, shift[:, :1] * np.ones_like(shift), atol=1e-5)
    assert np.all(np.abs(shift[:, 0]) <= 0.3)


def test_noise_has_the_configured_scale():
    x = np.zeros((4, 32, 32), np.float32)
    y = np.asarray(aug(views.augment_2d, jax.random.key(5), x, cfg(noise_std=0.1)))
    assert 0.09 < y.std() < 0.11


def test_crop_resize_matches_linear_interpolation_of_a_ramp():
    """A linear ramp stays linear: interior output pixels equal the ramp at
    start * L + (y + 1/2) * frac - 1/2 (float64 reference)."""
    s = 16
    ii, jj = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    x = (ii + 2.0 * jj).astype(np.float32)
    start, frac = np.array([0.25, 0.1]), 0.6
    y = np.asarray(views.crop_resize(jnp.asarray(x), jnp.asarray(start, jnp.float32),
                                     jnp.float32(frac), (0, 1)))
    pos = start[:, None] * s + (np.arange(s)[None] + 0.5) * frac - 0.5  # (2, L)
    ref = pos[0][:, None] + 2.0 * pos[1][None, :]
    inside = ((pos[0] >= 0) & (pos[0] <= s - 1))[:, None] & ((pos[1] >= 0) & (pos[1] <= s - 1))
    assert inside.sum() > 150
    np.testing.assert_allclose(y[inside], ref[inside], atol=1e-4)
    # The crop zooms in: the output's range is frac of the input's.
    assert np.ptp(y) < 0.7 * np.ptp(x)


def test_crop_depth_false_keeps_every_slice_depth():
    """With crop_depth False a volume constant within each slice keeps its slice values."""
    depth_values = np.arange(8, dtype=np.float32)
    x = np.broadcast_to(depth_values[None, :, None, None], (2, 8, 16, 16)).copy()
    c = cfg(crop_scale=(0.3, 0.5), crop_depth=False)
    np.testing.assert_allclose(aug(views.augment_3d, jax.random.key(6), x, c), x, atol=1e-5)
    c = cfg(crop_scale=(0.3, 0.5), crop_depth=True)
    assert not np.allclose(aug(views.augment_3d, jax.random.key(6), x, c), x, atol=1e-3)


def test_keys_give_different_views_and_the_same_key_the_same():
    x2, x3 = data((3, 16, 16)), data((2, 8, 16, 16))
    f2 = jax.jit(lambda k, x: views.augment_2d(k, x, DEFAULT), compiler_options=FAST)
    f3 = jax.jit(lambda k, x: views.augment_3d(k, x, DEFAULT), compiler_options=FAST)
    for f, x in ((f2, x2), (f3, x3)):
        a, b = f(jax.random.key(7), x), f(jax.random.key(8), x)
        assert not np.allclose(a, b, atol=1e-2)
        np.testing.assert_array_equal(a, f(jax.random.key(7), x))
        # Per sample: two samples of one call do not share their transform.
        same_input = np.broadcast_to(x[:1], x.shape)
        y = np.asarray(f(jax.random.key(9), same_input))
        assert not np.allclose(y[0], y[1], atol=1e-2)
