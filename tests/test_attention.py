"""models/layers.py: attention, exact GELU, 2D Dense, and the ViT patch embedding, each against
an independent reference (float64 numpy, `jax.nn.dot_product_attention`, `nn.Dense`, the
convolution they replace)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from unimedi_jax.models import layers
from unimedi_jax.models import vit as vit_lib

B, T, S, H, C = 2, 5, 7, 3, 4  # batch, queries, keys, heads, head size


def _normal(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _attention_f64(q, k, v, mask=None):
    """softmax(q k^T / sqrt(C)) v in float64 numpy; q (B, T, H, C), k, v (B, S, H, C)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bthc,bshc->bhts", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhts,bshc->bthc", e / e.sum(-1, keepdims=True), v)


@pytest.fixture(scope="module")
def qkv():
    return _normal(0, B, T, H, C), _normal(1, B, S, H, C), _normal(2, B, S, H, C)


# Key padding (B, 1, 1, S) as BERT's, and a full (B, H, T, S) mask; every query keeps a key.
KEY_PADDING = np.arange(S)[None, None, None, :] < np.array([S, 3])[:, None, None, None]
FULL_MASK = np.random.default_rng(3).random((B, H, T, S)) < 0.6
FULL_MASK[..., 0] = True


@pytest.mark.parametrize("mask", [None, KEY_PADDING, FULL_MASK], ids=["none", "keys", "full"])
def test_attention_matches_float64(qkv, mask):
    got = layers.dot_product_attention(*qkv, mask=mask, implementation="einsum")
    assert got.shape == (B, T, H, C) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _attention_f64(*qkv, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask", [None, KEY_PADDING], ids=["none", "keys"])
def test_attention_gradients_match_jax_kernel(qkv, mask):
    cotangent = _normal(4, B, T, H, C)

    def grads(implementation):
        f = lambda *a: layers.dot_product_attention(*a, mask=mask, implementation=implementation)
        return jax.vjp(f, *qkv)[1](cotangent)

    for got, want in zip(grads("einsum"), grads("xla")):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_masked_keys_do_not_influence_the_output(qkv):
    q, k, v = qkv
    noisy = v.copy()
    noisy[1, 3:] += 100.0  # keys 3.. of sample 1 are masked by KEY_PADDING
    a = layers.dot_product_attention(q, k, v, mask=KEY_PADDING, implementation="einsum")
    b = layers.dot_product_attention(q, k, noisy, mask=KEY_PADDING, implementation="einsum")
    np.testing.assert_array_equal(a, b)


def test_backend_default_and_unknown_implementation(qkv):
    assert jax.default_backend() == "cpu"
    np.testing.assert_array_equal(layers.dot_product_attention(*qkv),
                                  layers.dot_product_attention(*qkv, implementation="einsum"))
    with pytest.raises(ValueError, match="attention implementation 'flash'"):
        layers.dot_product_attention(*qkv, implementation="flash")


def test_bfloat16_attention_keeps_dtype_and_float32_softmax(qkv):
    half = [jnp.asarray(a, jnp.bfloat16) for a in qkv]
    got = layers.dot_product_attention(*half, implementation="einsum")
    assert got.dtype == jnp.bfloat16
    want = _attention_f64(*[np.asarray(a, np.float32) for a in half])
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2)


def test_gelu_matches_float64_erf():
    x = np.linspace(-12, 12, 24001, dtype=np.float32)
    x64 = x.astype(np.float64)
    want = 0.5 * x64 * (1 + erf(x64 / np.sqrt(2)))
    np.testing.assert_allclose(jax.jit(layers.gelu)(x), want, rtol=0, atol=2e-6)
    np.testing.assert_allclose(jax.jit(layers.gelu)(x), jax.nn.gelu(x, approximate=False),
                               rtol=0, atol=2e-6)
    # d/dx x Phi(x) = Phi(x) + x phi(x)
    slope = 0.5 * (1 + erf(x64 / np.sqrt(2))) + x64 * np.exp(-x64 ** 2 / 2) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(jax.jit(jax.vmap(jax.grad(layers.gelu)))(x), slope, rtol=0,
                               atol=2e-6)


def test_dense_is_flax_dense_on_any_rank():
    x = jnp.asarray(_normal(5, 2, 3, 4, 6))
    ours, ref = layers.Dense(5, name="d"), nn.Dense(5, name="d")
    params = ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref.init(jax.random.key(0), x))
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-6, atol=1e-6)
    cotangent = jnp.asarray(_normal(6, 2, 3, 4, 5))
    got = jax.vjp(lambda p: ours.apply(p, x), params)[1](cotangent)[0]
    want = jax.vjp(lambda p: ref.apply(p, x), params)[1](cotangent)[0]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial, patch", [((8, 12), (4, 3)), ((4, 8, 6), (2, 4, 3))],
                         ids=["2d", "3d"])
def test_patch_embed_is_the_strided_convolution(spatial, patch):
    x = jnp.asarray(_normal(7, 2, *spatial))
    embed = vit_lib.PatchEmbed(5, patch)
    params = embed.init(jax.random.key(0), x)["params"]
    params["bias"] = jnp.asarray(_normal(8, 5))
    conv = nn.Conv(5, kernel_size=patch, strides=patch, padding="VALID")
    conv_params = conv.init(jax.random.key(0), x[..., None])["params"]
    # Same parameters and the same initialisation as the convolution it replaces.
    assert jax.tree.map(jnp.shape, conv_params) == jax.tree.map(jnp.shape, params)
    np.testing.assert_array_equal(conv_params["kernel"], params["kernel"])
    tokens, grid = embed.apply({"params": params}, x)
    assert grid == tuple(s // p for s, p in zip(spatial, patch))

    # float64 reference: patch i (row-major over the grid) flattened in (p1, p2, ...) order.
    x64, w64 = np.asarray(x, np.float64), np.asarray(params["kernel"], np.float64).reshape(-1, 5)
    rows = []
    for index in np.ndindex(*grid):
        window = tuple(slice(i * p, (i + 1) * p) for i, p in zip(index, patch))
        rows.append(x64[(slice(None), *window)].reshape(2, -1))
    want = np.stack(rows, 1) @ w64 + np.asarray(params["bias"], np.float64)
    np.testing.assert_allclose(tokens, want, rtol=1e-5, atol=1e-5)
    conv_tokens = conv.apply({"params": params}, x[..., None]).reshape(2, -1, 5)
    np.testing.assert_allclose(tokens, conv_tokens, rtol=1e-5, atol=1e-5)

    cotangent = jnp.asarray(_normal(9, *tokens.shape))
    got = jax.vjp(lambda p: embed.apply({"params": p}, x)[0], params)[1](cotangent)[0]
    want = jax.vjp(lambda p: conv.apply({"params": p}, x[..., None]).reshape(tokens.shape),
                   params)[1](cotangent)[0]
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-4)


def test_vit_attention_implementations_agree():
    """The ViT's tokens and CLS attention rows (Eq. 1) are the same through the einsum
    attention and jax.nn.dot_product_attention."""
    kw = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8, patch_size_3d=(4, 8, 8),
              image_size=32, volume_size=(8, 32, 32))
    vol, img = jnp.asarray(_normal(10, 2, 8, 32, 32)), jnp.asarray(_normal(11, 2, 3, 32, 32))
    params = vit_lib.ViT(**kw).init(jax.random.key(0), volume=vol, images=img)["params"]
    outs = [vit_lib.ViT(**kw, attn_implementation=impl).apply({"params": params}, volume=vol,
                                                               images=img)
            for impl in ("einsum", "xla")]
    (cls_a, out_a), (cls_b, out_b) = outs
    np.testing.assert_allclose(cls_a, cls_b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_a["tokens"], out_b["tokens"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_a["cls_attn"], out_b["cls_attn"], rtol=1e-5, atol=1e-7)
