"""Segmentation decoders against PyTorch transcriptions (SETR-PUP as mmseg's SETRUPHead with
GroupNorm, UNETR as MONAI's UNETR), with the weights copied over."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import linen as nn

from unimedi_jax.eval import decoders

EPS = 1e-6  # flax GroupNorm epsilon


def t(x):
    return torch.tensor(np.asarray(x), dtype=torch.float64)


def conv(x, p, transposed=False):
    """Flax conv kernel (*k, in, out) applied in torch (channels first)."""
    ndim = x.ndim - 2
    w = t(p["kernel"]).permute(ndim + 1, ndim, *range(ndim))  # (out, in, *k)
    b = t(p["bias"]) if "bias" in p else None
    if transposed:  # kernel = stride: each input voxel writes one k-block
        # flax ConvTranspose (transpose_kernel=False) is torch's with the kernel flipped.
        w = w.transpose(0, 1).flip(list(range(2, 2 + ndim)))  # (in, out, *k)
        fn = F.conv_transpose2d if ndim == 2 else F.conv_transpose3d
        return fn(x, w, b, stride=tuple(p["kernel"].shape[:ndim]))
    fn = F.conv2d if ndim == 2 else F.conv3d
    return fn(x, w, b, padding=tuple(k // 2 for k in p["kernel"].shape[:ndim]))


def norm(x, p, groups):
    return F.group_norm(x, groups, t(p["scale"]), t(p["bias"]), eps=EPS)


def torch_setr(p, tokens, grid, patch):
    y = t(tokens).reshape(tokens.shape[0], *grid, -1)
    y = y.permute(0, y.ndim - 1, *range(1, y.ndim - 1))
    for s in range(decoders.num_stages(patch)):
        y = F.relu(norm(conv(y, p[f"conv_{s}"]), p[f"norm_{s}"], 4))
        mode = "bilinear" if y.ndim == 4 else "trilinear"
        y = F.interpolate(y, scale_factor=decoders.stage_strides(patch, s), mode=mode,
                          align_corners=False)
    return conv(y, p["classifier"])


def torch_res(x, p):
    """MONAI UnetResBlock with instance norm and LeakyReLU(0.01)."""
    c = p["conv1"]["kernel"].shape[-1]
    y = F.leaky_relu(norm(conv(x, p["conv1"]), p["norm1"], c), 0.01)
    y = norm(conv(y, p["conv2"]), p["norm2"], c)
    if "conv3" in p:
        x = norm(conv(x, p["conv3"]), p["norm3"], c)
    return F.leaky_relu(x + y, 0.01)


def torch_unetr(p, x, tokens, layers, grid):
    def as_grid(z):
        z = t(z).reshape(z.shape[0], *grid, -1)
        return z.permute(0, z.ndim - 1, *range(1, z.ndim - 1))

    skips = [torch_res(t(x)[:, None], p["encoder1"])]
    for i, z in enumerate(layers):
        y = conv(as_grid(z), p[f"encoder{i + 2}_up0"], transposed=True)
        for s in range(1, 3 - i):
            y = torch_res(conv(y, p[f"encoder{i + 2}_up{s}"], transposed=True),
                          p[f"encoder{i + 2}_block{s}"])
        skips.append(y)
    y = as_grid(tokens)
    for s, skip in enumerate(skips[::-1]):
        y = conv(y, p[f"decoder{5 - s}_up"], transposed=True)
        y = torch_res(torch.cat([y, skip], 1), p[f"decoder{5 - s}_block"])
    return conv(y, p["classifier"])


def random_params(dec, rng, *args):
    """Random params of the decoder's shapes, drawn in numpy (no initializer to compile):
    kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2)."""
    shapes = jax.eval_shape(lambda: dec.init(jax.random.key(0), *args))["params"]

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, 1 / np.sqrt(math.prod(leaf.shape[:-1])), leaf.shape)
        return (name == "scale") + rng.normal(0, 0.1, leaf.shape)

    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: draw(path, leaf).astype(np.float32), shapes)


def channels_last(y):
    return y.permute(0, *range(2, y.ndim), 1).numpy()


CASES = {"2d": ((2, 32, 32), (16, 16)), "3d": ((2, 16, 32, 32), (4, 16, 16))}


@pytest.mark.parametrize("case", CASES)
def test_setr_pup_matches_torch(case):
    shape, patch = CASES[case]
    grid = tuple(s // p for s, p in zip(shape[1:], patch))
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(shape[0], math.prod(grid), 24)).astype(np.float32)
    dec = decoders.SETRPUP(3, patch, channels=8, norm_groups=4)
    x = jnp.zeros(shape)
    params = random_params(dec, rng, x, tokens, [], grid)
    out = jax.jit(lambda p: dec.apply({"params": p}, x, tokens, [], grid))(params)
    assert out.shape == (*shape, 3)
    np.testing.assert_allclose(out, channels_last(torch_setr(params, tokens, grid, patch)),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_unetr_matches_torch(case):
    shape, patch = CASES[case]
    grid = tuple(s // p for s, p in zip(shape[1:], patch))
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape).astype(np.float32)
    tokens, *layers = [rng.normal(size=(shape[0], math.prod(grid), 24)).astype(np.float32)
                       for _ in range(4)]
    dec = decoders.UNETR(3, patch, depth=12, feature_size=4)
    assert dec.skip_layers == (2, 5, 8)  # UNETR: z3, z6, z9 of 12 blocks
    params = random_params(dec, rng, x, tokens, layers, grid)
    out = jax.jit(lambda p: dec.apply({"params": p}, x, tokens, layers, grid))(params)
    assert out.shape == (*shape, 3)
    np.testing.assert_allclose(out, channels_last(torch_unetr(params, x, tokens, layers, grid)),
                               rtol=1e-4, atol=1e-4)


def test_stage_schedule_and_checks():
    assert decoders.num_stages((4, 16, 16)) == 4
    assert [decoders.stage_strides((4, 16, 16), s) for s in range(4)] == [
        (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2)]
    assert decoders.unetr_skip_layers(2) == (0, 0, 1)
    with pytest.raises(ValueError, match="power-of-2"):
        decoders.num_stages((3, 16, 16))


@pytest.mark.parametrize("kernel", [(3, 3), (1, 1), (3, 3, 3), (5, 3, 1), (1, 1, 1)])
def test_conv_matches_torch_and_flax(kernel):
    """decoders.Conv (a 3D kernel as one 2D conv over stacked depth shifts) is torch's zero-
    padded conv in float64, and flax's nn.Conv(padding="SAME") with the same params."""
    rng = np.random.default_rng(len(kernel) * 10 + kernel[0])
    x = rng.normal(size=(2, *(5, 6, 7)[3 - len(kernel):], 3)).astype(np.float32)
    layer = decoders.Conv(4, kernel)
    params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32),
                          layer.init(jax.random.key(0), x))
    out = np.asarray(layer.apply(params, x))
    want = channels_last(conv(t(np.moveaxis(x, -1, 1)), params["params"]))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, nn.Conv(4, kernel, padding="SAME").apply(params, x),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strides", [(2, 2), (2, 2, 2), (1, 2, 2)])
def test_upsample_matches_torch_and_flax(strides):
    """decoders.Upsample (one matmul and an interleave) is torch's conv_transpose with the
    flipped kernel in float64, and flax's nn.ConvTranspose(kernel = stride, VALID)."""
    rng = np.random.default_rng(len(strides) * 10 + strides[0])
    x = rng.normal(size=(2, *(3, 4, 5)[3 - len(strides):], 3)).astype(np.float32)
    layer = decoders.Upsample(4, strides)
    params = layer.init(jax.random.key(0), x)
    out = np.asarray(layer.apply(params, x))
    assert out.shape == (2, *(n * s for n, s in zip(x.shape[1:-1], strides)), 4)
    want = channels_last(conv(t(np.moveaxis(x, -1, 1)), params["params"], transposed=True))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    native = nn.ConvTranspose(4, strides, strides=strides, padding="VALID", use_bias=False)
    np.testing.assert_allclose(out, native.apply(params, x), rtol=1e-5, atol=1e-5)


def test_conv_and_upsample_reject_bad_shapes():
    """An even kernel side, or an input whose rank does not match the kernel or strides, fails
    at once with the shapes named."""
    x3 = jnp.zeros((2, 4, 6, 6, 3))
    with pytest.raises(ValueError, match="odd sides"):
        decoders.Conv(4, (2, 3, 3)).init(jax.random.key(0), x3)
    with pytest.raises(ValueError, match=r"Conv kernel \(3, 3\) needs input .* got shape "
                                         r"\(2, 4, 6, 6, 3\)"):
        decoders.Conv(4, (3, 3)).init(jax.random.key(0), x3)
    with pytest.raises(ValueError, match=r"Upsample strides \(2, 2, 2\) needs input"):
        decoders.Upsample(4, (2, 2, 2)).init(jax.random.key(0), x3[:, 0])


class _Layers(nn.Module):
    """Every layer kind the decoders use."""

    @nn.compact
    def __call__(self, x):
        x = decoders.Upsample(32, (2, 2))(x)
        x = nn.GroupNorm(num_groups=4)(decoders.Conv(48, (3, 3))(x))
        return nn.GroupNorm(num_groups=None, group_size=1)(decoders.Conv(40, (1, 1))(x))


def test_init_params_matches_flax_init():
    """The numpy init draws what flax's default initializers draw: same tree, zero biases, unit
    norm scales, and kernels with the lecun_normal spread (variance 1 / fan_in, within 2 std)."""
    module, x = _Layers(), jnp.zeros((1, 4, 4, 64))
    ours = decoders.init_params(module, 0, x)
    theirs = module.init(jax.random.key(0), x)["params"]
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(theirs)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype
        if path[-1].key != "kernel":
            np.testing.assert_array_equal(a, b)
        else:
            std = 1 / np.sqrt(np.prod(a.shape[:-1]))
            assert a.std() == pytest.approx(std, rel=0.05)
            assert b.std() == pytest.approx(std, rel=0.05)
            assert np.abs(a).max() <= 2 * std / decoders.TRUNCATED_STD + 1e-7


def test_prior_logit():
    """sigmoid(prior_logit(pi)) = pi, RetinaNet's -log((1 - pi) / pi); pi outside (0, 1) fails."""
    for pi in (0.01, 0.3, 0.5, 0.9):
        b = decoders.prior_logit(pi)
        assert 1.0 / (1.0 + math.exp(-b)) == pytest.approx(pi, rel=1e-12)
    assert decoders.prior_logit(0.01) == pytest.approx(-math.log(99.0), rel=1e-15)
    for bad in (0.0, 1.0, -0.1, 2.0):
        with pytest.raises(ValueError, match="must lie in"):
            decoders.prior_logit(bad)
