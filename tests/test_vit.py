"""Mixed-dimension ViT: shapes, position tables, the CLS attention row, and timm parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimedi_jax.models import vit as vit_lib

TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8, patch_size_3d=(4, 8, 8),
            image_size=32, volume_size=(8, 32, 32))


def _init(model, **inputs):
    return model.init(jax.random.key(0), **inputs)["params"]


@pytest.fixture(scope="module")
def tiny():
    model = vit_lib.ViT(**TINY)
    vol = jax.random.normal(jax.random.key(1), (2, 8, 32, 32))
    img = jax.random.normal(jax.random.key(2), (2, 3, 32, 32))
    params = _init(model, volume=vol, images=img)
    return model, params, vol, img


def test_shapes_2d_3d_mixed(tiny):
    model, params, vol, img = tiny
    cls, out = model.apply({"params": params}, images=img[:, 0])
    assert cls.shape == (2, 32) and out["tokens"].shape == (2, 16, 32)
    assert out["cls_attn"].shape == (2, 16) and out["num_tokens_2d"] == 16
    cls, out = model.apply({"params": params}, volume=vol)
    assert out["tokens"].shape == (2, 2 * 4 * 4, 32) and out["grid_3d"] == (2, 4, 4)
    cls, out = model.apply({"params": params}, volume=vol, images=img)
    assert out["tokens"].shape == (2, 32 + 3 * 16, 32)
    assert (out["num_tokens_3d"], out["num_tokens_2d"]) == (32, 48)
    np.testing.assert_allclose(out["cls_attn"].sum(-1), 1.0, rtol=1e-5)


def test_keep_and_mask(tiny):
    model, params, vol, img = tiny
    keep = jnp.array([[0, 5, 40, 79], [3, 2, 1, 70]], jnp.int32)
    cls, out = model.apply({"params": params}, volume=vol, images=img, keep=keep)
    assert out["tokens"].shape == (2, 4, 32) and out["cls_attn"].shape == (2, 4)
    # Masking every token makes the output independent of the image content.
    mask = jnp.ones((2, 80), bool)
    a, _ = model.apply({"params": params}, volume=vol, images=img, mask=mask)
    b, _ = model.apply({"params": params}, volume=vol * 3 + 1, images=-img, mask=mask)
    np.testing.assert_allclose(a, b, atol=1e-6)
    c, _ = model.apply({"params": params}, volume=vol, images=img)
    assert np.abs(np.asarray(a - c)).max() > 1e-3


def test_keep_groups_equal_one_sequence_per_group(tiny):
    """keep (B, G, M): G sequences per sample from one patch embedding, equal to running each
    group as its own sample (the volume repeated, keep (B * G, M))."""
    model, params, vol, img = tiny
    keep = jnp.array([[[0, 5, 31, 79], [3, 2, 1, 70], [9, 9, 40, 41]],
                      [[79, 0, 12, 13], [6, 7, 8, 9], [50, 51, 52, 33]]], jnp.int32)
    cls, out = model.apply({"params": params}, volume=vol, images=img, keep=keep)
    ref_cls, ref = model.apply({"params": params}, volume=jnp.repeat(vol, 3, axis=0),
                               images=jnp.repeat(img, 3, axis=0), keep=keep.reshape(6, 4))
    assert cls.shape == (6, 32) and out["tokens"].shape == (6, 4, 32)
    np.testing.assert_allclose(cls, ref_cls, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["cls_attn"], ref["cls_attn"], rtol=1e-6, atol=1e-6)


def _linear_upsample(x, n):
    """x (m, ...) -> (n, ...), n >= m: linear interpolation at the half-pixel centres
    (i + 0.5) * m / n - 0.5 of the input grid, clamped to its ends."""
    m = x.shape[0]
    src = np.clip((np.arange(n) + 0.5) * m / n - 0.5, 0, m - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, m - 1)
    w = (src - lo).reshape((n,) + (1,) * (x.ndim - 1))
    return (1 - w) * x[lo] + w * x[hi]


def test_pos_embed_native_and_resized(tiny):
    model, params, vol, img = tiny
    pos = params["pos_embed_2d"]
    assert pos.shape == (1, 16, 32)
    np.testing.assert_array_equal(vit_lib.resize_pos_embed(pos, (4, 4), (4, 4)), pos)
    big = vit_lib.resize_pos_embed(pos, (4, 4), (8, 8))
    assert big.shape == (1, 64, 32)
    # Separable linear interpolation, half-pixel centres, edges clamped, in float64.
    want = np.asarray(pos, np.float64).reshape(4, 4, 32)
    for axis in (0, 1):
        want = np.moveaxis(_linear_upsample(np.moveaxis(want, axis, 0), 8), 0, axis)
    np.testing.assert_allclose(big.reshape(8, 8, 32), want, rtol=1e-5, atol=1e-6)
    mixed = vit_lib.resize_pos_embed(pos, (4, 4), (8, 4))  # one axis resized, one kept
    np.testing.assert_allclose(mixed.reshape(8, 4, 32),
                               _linear_upsample(np.asarray(pos, np.float64).reshape(4, 4, 32), 8),
                               rtol=1e-5, atol=1e-6)
    cls, out = model.apply({"params": params}, images=jnp.zeros((1, 64, 48)))
    assert out["grid_2d"] == (8, 6)


def test_indivisible_input_is_a_clear_error(tiny):
    model, params, vol, img = tiny
    with pytest.raises(ValueError, match=r"not divisible by the patch size"):
        model.apply({"params": params}, images=jnp.zeros((1, 30, 32)))


def test_cls_attention_matches_float64_reference(tiny):
    model, params, vol, img = tiny
    model = model.clone(intermediate_layers=(0,))
    cls, out = model.apply({"params": params}, volume=vol, images=img)

    # Recompute layer by layer in float64 numpy from the parameters.
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    _, states = model.apply({"params": params}, volume=vol, images=img,
                            capture_intermediates=True, mutable=["intermediates"])
    inter = states["intermediates"]
    h, c = 4, 8
    rows = []
    for i in range(model.depth):
        x = np.asarray(inter[f"blocks_{i}"]["norm1"]["__call__"][0], np.float64)  # (B, N, D)
        a = p[f"blocks_{i}"]["attn"]["qkv"]
        qkv = (x @ a["kernel"] + a["bias"]).reshape(x.shape[0], x.shape[1], 3, h, c)
        q, k = qkv[:, 0, 0], qkv[:, 1:, 1]  # (B, H, C), (B, N-1, H, C)
        logits = np.einsum("bhc,bnhc->bhn", q, k) / np.sqrt(c)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        rows.append((e / e.sum(-1, keepdims=True)).mean(1))
    np.testing.assert_allclose(out["cls_attn"], np.mean(rows, 0), rtol=1e-4, atol=1e-7)


def test_scan_and_remat_match_unrolled(tiny):
    model, params, vol, img = tiny
    ref, ref_out = model.apply({"params": params}, volume=vol, images=img)
    stacked = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    stacked["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                     *[params[f"blocks_{i}"] for i in range(model.depth)])
    for kw in (dict(scan=True), dict(scan=True, remat=True)):
        got, out = model.clone(**kw).apply({"params": stacked}, volume=vol, images=img)
        np.testing.assert_allclose(got, ref, atol=1e-5)
        np.testing.assert_allclose(out["cls_attn"], ref_out["cls_attn"], atol=1e-6)
    got, _ = model.clone(remat=True).apply({"params": params}, volume=vol, images=img)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
    model = vit_lib.ViT(**TINY, dtype=jnp.bfloat16)
    params = _init(model, images=jnp.zeros((1, 32, 32)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    cls, out = model.apply({"params": params}, images=jnp.ones((1, 32, 32)))
    assert out["tokens"].dtype == jnp.float32 or out["tokens"].dtype == jnp.bfloat16
    assert out["cls_attn"].dtype == jnp.float32


def test_2d_path_matches_timm():
    torch = pytest.importorskip("torch")
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    from unimedi_jax.export.vision import TIMM_3D_KEYS, timm_state_dict

    model = vit_lib.ViT(**TINY)
    params = _init(model, volume=jnp.zeros((1, 8, 32, 32)), images=jnp.zeros((1, 32, 32)))
    # Give every parameter non-trivial values so that a wrong mapping shows.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys)])
    images = np.random.default_rng(0).normal(size=(3, 32, 32)).astype(np.float32)
    cls, _ = model.apply({"params": params}, images=jnp.asarray(images))

    ref = timm_vit.VisionTransformer(
        img_size=32, patch_size=8, in_chans=1, num_classes=0, global_pool="token",
        embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, qkv_bias=True)
    sd = timm_state_dict(params, depth=2)
    missing, unexpected = ref.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in sd.items() if k not in TIMM_3D_KEYS},
        strict=True)
    assert not missing and not unexpected
    with torch.no_grad():
        got = ref.eval()(torch.from_numpy(images)[:, None]).numpy()
    np.testing.assert_allclose(got, np.asarray(cls), atol=1e-4, rtol=0)
