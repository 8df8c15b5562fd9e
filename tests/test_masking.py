"""Per-block attentive masking against a numpy argsort reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimedi_jax.objective import masking

LAYOUTS = [masking.Layout(24, 3, 10), masking.Layout(0, 1, 16), masking.Layout(12, 0, 0)]


def _reference_keep(scores: np.ndarray, layout, ratio) -> np.ndarray:
    """Top `num_keep` per block by argsort, as sorted global indices."""
    blocks = [(0, layout.n3)] if layout.n3 else []
    blocks += [(layout.n3 + j * layout.n2, layout.n2) for j in range(layout.k)]
    rows = []
    for row in scores:
        kept = []
        for start, n in blocks:
            top = np.argsort(-row[start:start + n], kind="stable")[:masking.num_keep(n, ratio)]
            kept.extend(start + top)
        rows.append(np.sort(kept))
    return np.asarray(rows)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ratio", [0.5, 0.3, 1.0])
def test_keep_is_the_top_scored_tokens_of_each_block(layout, ratio):
    scores = np.random.default_rng(0).random((4, layout.num_tokens)).astype(np.float32)
    keep = masking.keep_indices(jnp.asarray(scores), layout, ratio)
    expected = _reference_keep(scores, layout, ratio)
    assert keep.dtype == jnp.int32 and keep.shape == expected.shape
    np.testing.assert_array_equal(keep, expected)


def test_blocks_are_masked_separately():
    # A 3D block with large scores must not take the 2D blocks' share.
    layout = masking.Layout(8, 2, 4)
    scores = np.concatenate([np.full((1, 8), 10.0) + np.arange(8), np.arange(8)[None] * 0.1], 1)
    keep = np.asarray(masking.keep_indices(jnp.asarray(scores, jnp.float32), layout, 0.5))[0]
    np.testing.assert_array_equal(keep, [4, 5, 6, 7, 10, 11, 14, 15])


def test_num_keep_is_static_and_bounded():
    assert masking.num_keep(196, 0.5) == 98
    assert masking.num_keep(512, 0.5) == 256
    assert masking.num_keep(3, 0.1) == 1
    assert masking.num_keep(5, 0.5) == 3  # round half up
    with pytest.raises(ValueError, match="keep_ratio"):
        masking.num_keep(10, 0.0)


def test_mask_is_the_complement_of_keep():
    layout = LAYOUTS[0]
    scores = jax.random.uniform(jax.random.key(0), (3, layout.num_tokens))
    keep = masking.keep_indices(scores, layout, 0.5)
    mask = np.asarray(masking.mask_from_keep(keep, layout.num_tokens))
    assert mask.shape == (3, layout.num_tokens) and mask.dtype == bool
    for b in range(3):
        np.testing.assert_array_equal(np.flatnonzero(~mask[b]), np.asarray(keep[b]))


def test_fixed_shapes_under_jit():
    layout = LAYOUTS[0]
    f = jax.jit(lambda s: masking.keep_indices(s, layout, 0.5))
    shapes = {f(jax.random.normal(jax.random.key(i), (2, layout.num_tokens))).shape
              for i in range(3)}
    assert shapes == {(2, 12 + 3 * 5)} and f._cache_size() == 1


def test_token_scores_modes():
    attn = jax.random.uniform(jax.random.key(0), (2, 30))
    np.testing.assert_array_equal(masking.token_scores("attentive", attn, jax.random.key(1)), attn)
    noise = masking.token_scores("random", attn, jax.random.key(1))
    assert noise.shape == attn.shape and not np.allclose(noise, attn)
    other = masking.token_scores("random", attn, jax.random.key(2))
    assert not np.allclose(noise, other)
    with pytest.raises(ValueError, match="masking.mode"):
        masking.token_scores("block", attn, jax.random.key(1))


def test_layout_from_vit_output_counts():
    assert masking.Layout.from_vit({"num_tokens_3d": 32, "num_tokens_2d": 48, "num_images": 3}) \
        == masking.Layout(32, 3, 16)
    assert masking.Layout.from_vit({"num_tokens_3d": 32, "num_tokens_2d": 0}) \
        == masking.Layout(32, 0, 0)
    with pytest.raises(ValueError, match="layout"):
        masking.keep_indices(jnp.zeros((1, 5)), masking.Layout(4, 0, 0), 0.5)
