"""Slice scores (Eq. 2) and top-k slice selection against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimedi_jax.objective import selection

GRID = (8, 3, 4)  # (d, h, w) token grid
PD = 4  # slices per slab
B, K = 3, 3


def _volume(rng):
    d = GRID[0] * PD
    return rng.normal(size=(B, d, 16, 16)).astype(np.float32)


def test_slice_scores_match_numpy():
    rng = np.random.default_rng(0)
    attn = rng.random((B, np.prod(GRID))).astype(np.float32)
    expected = attn.astype(np.float64).reshape(B, GRID[0], -1).mean(-1)
    got = selection.slice_scores(jnp.asarray(attn), GRID)
    assert got.shape == (B, GRID[0])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Depth-major: token (i, j, l) sits at i*h*w + j*w + l.
    one = np.zeros((1, np.prod(GRID)), np.float32)
    one[0, 5 * 12 + 2 * 4 + 1] = 12.0
    np.testing.assert_allclose(selection.slice_scores(jnp.asarray(one), GRID)[0],
                               np.eye(GRID[0])[5], atol=1e-7)


def test_slice_scores_rejects_wrong_length():
    with pytest.raises(ValueError, match="3D grid"):
        selection.slice_scores(jnp.zeros((2, 10)), GRID)


def test_planted_attention_peak_selects_its_slab_center_slice():
    rng = np.random.default_rng(1)
    vol = _volume(rng)
    attn = rng.random((B, np.prod(GRID))).astype(np.float32) * 0.1
    planted = [6, 0, 3]
    attn.reshape(B, GRID[0], -1)[np.arange(B), planted] += 1.0  # a peak on one slab per sample
    scores = selection.slice_scores(jnp.asarray(attn), GRID)
    slices, idx = selection.select_slices(jnp.asarray(vol), scores, K, "center", PD)
    assert slices.shape == (B, K, 16, 16) and idx.shape == (B, K) and idx.dtype == jnp.int32
    np.testing.assert_array_equal(idx[:, 0], planted)
    expected_idx = np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :K]
    np.testing.assert_array_equal(idx, expected_idx)  # descending score order
    for b in range(B):
        for j in range(K):
            np.testing.assert_array_equal(slices[b, j], vol[b, expected_idx[b, j] * PD + PD // 2])


def test_mean_mode_is_the_slab_mean():
    rng = np.random.default_rng(2)
    vol = _volume(rng)
    scores = jnp.asarray(rng.random((B, GRID[0])), jnp.float32)
    slices, idx = selection.select_slices(jnp.asarray(vol), scores, K, "mean", PD)
    idx = np.asarray(idx)
    slabs = vol.astype(np.float64).reshape(B, GRID[0], PD, 16, 16).mean(2)
    expected = slabs[np.arange(B)[:, None], idx]
    np.testing.assert_allclose(slices, expected, rtol=1e-5, atol=1e-6)


def test_jitted_shapes_do_not_depend_on_values():
    f = jax.jit(lambda v, s: selection.select_slices(v, s, K, "center", PD))
    rng = np.random.default_rng(3)
    vol = jnp.asarray(_volume(rng))
    for seed in range(3):
        s = jnp.asarray(np.random.default_rng(seed).random((B, GRID[0])), jnp.float32)
        slices, idx = f(vol, s)
        assert slices.shape == (B, K, 16, 16) and idx.shape == (B, K)
    assert f._cache_size() == 1


def test_random_scores_give_distinct_uniform_subsets():
    picks = []
    for seed in range(20):
        s = selection.random_scores(jax.random.key(seed), (2, GRID[0]))
        _, idx = jax.lax.top_k(s, K)
        assert len(set(np.asarray(idx[0]).tolist())) == K
        picks.append(tuple(np.sort(np.asarray(idx[0]))))
    assert len(set(picks)) > 5  # different keys pick different slabs


def test_bad_arguments_raise():
    vol = jnp.zeros((1, GRID[0] * PD, 16, 16))
    scores = jnp.zeros((1, GRID[0]))
    with pytest.raises(ValueError, match="slice_mode"):
        selection.select_slices(vol, scores, K, "max", PD)
    with pytest.raises(ValueError, match="selection.k"):
        selection.select_slices(vol, scores, GRID[0] + 1, "center", PD)
    with pytest.raises(ValueError, match="patch depth"):
        selection.select_slices(vol, scores, K, "center", PD + 1)


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_volume_slab_scores_average_the_chosen_layers(layers):
    rng = np.random.default_rng(2)
    depth = 3
    stack = rng.random((depth, B, np.prod(GRID))).astype(np.float32)
    out = {"cls_attn": jnp.asarray(stack.mean(0)), "cls_attn_layers": jnp.asarray(stack),
           "grid_3d": GRID}
    used = stack.astype(np.float64) if layers == 0 else stack[-layers:].astype(np.float64)
    expected = used.mean(0).reshape(B, GRID[0], -1).mean(-1)
    np.testing.assert_allclose(selection.volume_slab_scores(out, layers), expected, rtol=1e-6)


def test_volume_slab_scores_rejects_more_layers_than_the_model_has():
    out = {"cls_attn": jnp.zeros((B, 96)), "cls_attn_layers": jnp.zeros((2, B, 96)),
           "grid_3d": GRID}
    with pytest.raises(ValueError, match="objective.selection.layers=3"):
        selection.volume_slab_scores(out, 3)
