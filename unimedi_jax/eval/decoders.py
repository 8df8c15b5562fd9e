"""Segmentation decoders on the ViT's tokens, for 2D (H, W) and 3D (D, H, W) alike.

Both take the token grid (the ViT's patch grid) and bring it back to the input size in
`num_stages(patch)` x2 stages, log2 of the largest patch side; an axis with a smaller patch
side (e.g. depth 4 of a (4, 16, 16) patch) doubles only in the first log2(side) stages
(`stage_strides`).

- `SETRPUP` (SETR progressive upsampling, Zheng et al. 2021; mmseg `SETRUPHead`): the final
  tokens as a grid, then per stage conv3 + norm + ReLU and a x2 (bi/tri)linear upsampling, then
  a 1x1 conv to the classes. Norm is GroupNorm: no running statistics to carry (mmseg: SyncBN);
  the classifier dropout is left out.
- `UNETR` (Hatamizadeh et al. 2022; MONAI `UNETR`, instance norm and LeakyReLU residual blocks):
  skip features from the input and from three intermediate layers (z3, z6, z9 of 12: indices
  `unetr_skip_layers(depth)`), each brought up by transposed convs, and a decoder that upsamples
  the final tokens through them.

Inputs: `x` (B, *spatial) the model input, `tokens` (B, N, C) the final-norm patch tokens,
`layers` the intermediate token states the decoder asked for (`skip_layers`), `grid` the token
grid. Output: logits (B, *spatial, num_classes).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

Array = jax.Array

LEAKY_SLOPE = 0.01  # MONAI UnetResBlock: LeakyReLU(negative_slope=0.01)


# flax's lecun_normal: truncated to +-2 standard deviations, rescaled to variance 1 / fan_in.
TRUNCATION = 2.0
TRUNCATED_STD = 0.87962566103423978  # std of N(0, 1) truncated to [-2, 2]


def init_params(decoder: nn.Module, seed: int, *args) -> dict:
    """The decoder's params for inputs `args`, drawn in numpy from the distributions of flax's
    defaults (kernels lecun_normal over fan_in = prod(kernel shape[:-1]), biases 0, norm scales
    1): the same init as `decoder.init`, without compiling ~30 random-number kernels (seconds
    each on CPU)."""
    shapes = jax.eval_shape(lambda: decoder.init(jax.random.key(0), *args))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            std = 1.0 / math.sqrt(math.prod(leaf.shape[:-1])) / TRUNCATED_STD
            values = stats.truncnorm.rvs(-TRUNCATION, TRUNCATION, size=leaf.shape,
                                         random_state=rng) * std
        elif name in ("bias", "scale"):
            values = np.full(leaf.shape, 1.0 if name == "scale" else 0.0)
        else:
            raise ValueError(f"init_params knows kernel, bias and scale, not {name!r}")
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def prior_logit(prior_prob: float) -> float:
    """log(pi / (1 - pi)): the bias at which a sigmoid output starts at probability pi, the
    focal-loss prior of RetinaNet and FCOS (Lin et al. 2017 §4.1: pi = 0.01), so that the rare
    foreground does not start at 0.5 against a background of thousands of elements."""
    if not 0.0 < prior_prob < 1.0:
        raise ValueError(f"prior probability {prior_prob!r} must lie in (0, 1)")
    return -math.log((1.0 - prior_prob) / prior_prob)


def num_stages(patch: Sequence[int]) -> int:
    """x2 stages that undo a patch: log2 of its largest side (sides must be powers of 2)."""
    for p in patch:
        if p < 1 or p & (p - 1):
            raise ValueError(f"Decoder needs power-of-2 patch sides, got {tuple(patch)}")
    return int(math.log2(max(patch)))


def stage_strides(patch: Sequence[int], stage: int) -> tuple[int, ...]:
    """Upsampling factor per axis at stage `stage` (0 = from the token grid)."""
    return tuple(2 if stage < int(math.log2(p)) else 1 for p in patch)


def tokens_to_grid(tokens: Array, grid: Sequence[int]) -> Array:
    """(B, N, C) -> (B, *grid, C)."""
    return tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1])


def _check_rank(x: Array, window: Sequence[int], what: str) -> None:
    """x must be (B, *spatial, C) with one spatial axis per window side."""
    if x.ndim != len(window) + 2:
        raise ValueError(f"{what} {tuple(window)} needs input (batch, {len(window)} spatial "
                         f"axes, channels), got shape {tuple(x.shape)}")


class Conv(nn.Module):
    """`nn.Conv(features, kernel, padding="SAME")` at stride 1: the same parameters (kernel
    (*k, C, F), bias (F,)) and the same map, (B, *spatial, C) -> (B, *spatial, F).

    A 3D kernel (kd, kh, kw) runs as one 2D conv: the kd depth-shifted copies of the input are
    stacked on channels, (B * D, H, W, kd * C), and the kernel reshaped to (kh, kw, kd * C, F).
    XLA:CPU has a fast path for 2D convs only: its native 3D conv takes ~6x longer forward and
    backward (`python -m benchmarks.decoders`); the stacked form costs kd copies of the input.
    """

    features: int
    kernel_size: Sequence[int]
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = tuple(self.kernel_size)
        if len(k) not in (2, 3) or any(n % 2 == 0 for n in k):
            raise ValueError(f"Conv takes a 2D or 3D kernel of odd sides, got {k}")
        _check_rank(x, k, "Conv kernel")
        channels = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*k, channels, self.features))
        if len(k) == 3:
            batch, depth, *plane = x.shape[:-1]
            half = k[0] // 2
            padded = jnp.pad(x, ((0, 0), (half, half)) + ((0, 0),) * 3)
            x = jnp.concatenate([padded[:, i:i + depth] for i in range(k[0])], axis=-1)
            x = x.reshape(batch * depth, *plane, k[0] * channels)
            kernel = jnp.moveaxis(kernel, 0, 2).reshape(*k[1:], k[0] * channels, self.features)
        y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if len(k) == 3:
            y = y.reshape(batch, depth, *plane, self.features)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


class Upsample(nn.Module):
    """`nn.ConvTranspose(features, strides, strides=strides, padding="VALID", use_bias=False)`:
    the same kernel (*s, C, F) and map, (B, *spatial, C) -> (B, *(n * s), F); MONAI's
    upsample_kernel_size 2, conv_only. With kernel = stride every input element writes its own
    s-block, output[s * i + j] = x[i] @ kernel[s - 1 - j] (flax's transposed conv leaves its
    kernel unflipped), so it is one matmul and an interleave, without XLA:CPU's slow 3D
    transposed conv."""

    features: int
    strides: Sequence[int]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        s = tuple(self.strides)
        _check_rank(x, s, "Upsample strides")
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*s, x.shape[-1], self.features))
        n = len(s)
        kernel = jnp.flip(kernel, range(n)).astype(x.dtype)
        y = jnp.tensordot(x, kernel, axes=([x.ndim - 1], [n]))  # (B, *spatial, *s, F)
        # interleave: (B, n1, s1, n2, s2, ..., F) -> (B, n1 * s1, ..., F)
        order = [0] + [a for i in range(n) for a in (1 + i, 1 + n + i)] + [1 + 2 * n]
        y = y.transpose(order)
        return y.reshape(x.shape[0], *(m * f for m, f in zip(x.shape[1:-1], s)), self.features)


def unetr_skip_layers(depth: int) -> tuple[int, int, int]:
    """0-based blocks z_{L/4}, z_{L/2}, z_{3L/4} (UNETR: z3, z6, z9 of 12), at least block 0."""
    return tuple(max(round(depth * q) - 1, 0) for q in (0.25, 0.5, 0.75))


class SETRPUP(nn.Module):
    num_classes: int
    patch: Sequence[int]
    channels: int = 256  # SETR-PUP: 256 decoder channels
    norm_groups: int = 32  # GroupNorm groups (channels must be divisible)

    skip_layers = ()

    @nn.compact
    def __call__(self, x: Array, tokens: Array, layers: Sequence[Array], grid) -> Array:
        del x, layers
        y = tokens_to_grid(tokens, grid)
        ndim = len(grid)
        for s in range(num_stages(self.patch)):
            y = Conv(self.channels, (3,) * ndim, name=f"conv_{s}")(y)
            y = nn.relu(nn.GroupNorm(num_groups=self.norm_groups, name=f"norm_{s}")(y))
            up = stage_strides(self.patch, s)
            y = jax.image.resize(y, (y.shape[0], *(n * f for n, f in zip(y.shape[1:-1], up)),
                                     y.shape[-1]), method="linear")
        return Conv(self.num_classes, (1,) * ndim, name="classifier")(y)


class ResBlock(nn.Module):
    """MONAI UnetResBlock (k3, stride 1): conv-norm-lrelu-conv-norm + (1x1 conv-norm) shortcut."""

    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ndim = x.ndim - 2
        norm = lambda name: nn.GroupNorm(num_groups=None, group_size=1, name=name)  # instance
        conv = lambda k, name: Conv(self.features, (k,) * ndim, use_bias=False, name=name)
        y = nn.leaky_relu(norm("norm1")(conv(3, "conv1")(x)), LEAKY_SLOPE)
        y = norm("norm2")(conv(3, "conv2")(y))
        if x.shape[-1] != self.features:
            x = norm("norm3")(conv(1, "conv3")(x))
        return nn.leaky_relu(x + y, LEAKY_SLOPE)


class UNETR(nn.Module):
    num_classes: int
    patch: Sequence[int]
    depth: int  # ViT blocks, for the skip layers
    feature_size: int = 16  # UNETR: 16

    @property
    def skip_layers(self) -> tuple[int, ...]:
        return unetr_skip_layers(self.depth)

    @nn.compact
    def __call__(self, x: Array, tokens: Array, layers: Sequence[Array], grid) -> Array:
        stages = num_stages(self.patch)
        if stages != 4:
            raise ValueError(f"UNETR decodes 4 x2 stages (a largest patch side of 16), got patch "
                             f"{tuple(self.patch)}")
        fs = self.feature_size
        strides = [stage_strides(self.patch, s) for s in range(stages)]
        # Skip paths: input at full size; z3 -> 1/2 (3 stages), z6 -> 1/4 (2), z9 -> 1/8 (1).
        skips = [ResBlock(fs, name="encoder1")(x[..., None])]
        for i, (z, width) in enumerate(zip(layers, (2 * fs, 4 * fs, 8 * fs))):
            n_up = 3 - i
            y = Upsample(width, strides[0], name=f"encoder{i + 2}_up0")(
                tokens_to_grid(z, grid))
            for s in range(1, n_up):
                y = Upsample(width, strides[s], name=f"encoder{i + 2}_up{s}")(y)
                y = ResBlock(width, name=f"encoder{i + 2}_block{s}")(y)
            skips.append(y)
        # Decoder: tokens 1/16 -> 1/8 (+z9 path) -> 1/4 (+z6) -> 1/2 (+z3) -> 1/1 (+input).
        y = tokens_to_grid(tokens, grid)
        for s, (skip, width) in enumerate(zip(skips[::-1], (8 * fs, 4 * fs, 2 * fs, fs))):
            y = Upsample(width, strides[s], name=f"decoder{5 - s}_up")(y)
            y = ResBlock(width, name=f"decoder{5 - s}_block")(jnp.concatenate([y, skip], -1))
        return Conv(self.num_classes, (1,) * (x.ndim - 1), name="classifier")(y)
