"""Mixed-dimension vision transformer: 2D and 3D tokenizers in front of one shared backbone.

One forward pass takes a volume, k 2D images per sample, or both. The token sequence is

    [CLS, 3D tokens (depth-major over the (d, h, w) grid), 2D tokens of image 1..k (row-major)]

Every block also returns the CLS-query attention row over the patch keys, averaged over heads
(UniMedI Eq. 1 needs only that row), computed on the side from the block's own q and k so the
tokens themselves can go through a fused attention kernel (`layers.dot_product_attention`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimedi_jax.models import layers

Array = jax.Array

# Named sizes. Ti/S/B from the ViT paper (Dosovitskiy et al. 2021, Table 1; DeiT for Ti);
# "mu" is a tiny size for tests and the CPU default.
VARIANTS = {
    "mu": dict(width=64, depth=2, num_heads=2, mlp_dim=128),
    "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
}


def variant(name: str) -> dict[str, int]:
    """Backbone sizes of a named variant ("B/16" and "B" both name ViT-B)."""
    key = name.split("/")[0]
    if key not in VARIANTS:
        raise ValueError(f"Unknown ViT variant {name!r}; known: {sorted(VARIANTS)}")
    return dict(VARIANTS[key])


def resize_pos_embed(pos: Array, src_grid: Sequence[int], dst_grid: Sequence[int]) -> Array:
    """Interpolates a (1, prod(src_grid), D) position table to (1, prod(dst_grid), D).

    Returned unchanged at the native grid; linear interpolation otherwise (2D or 3D alike).
    """
    src_grid, dst_grid = tuple(src_grid), tuple(dst_grid)
    if src_grid == dst_grid:
        return pos
    width = pos.shape[-1]
    grid = pos.reshape(src_grid + (width,))
    grid = jax.image.resize(grid, dst_grid + (width,), method="linear")
    return grid.reshape(1, math.prod(dst_grid), width)


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens, 2D or 3D: x (B, *spatial) -> (B, n, width) and the grid.

    The same map and parameters as `nn.Conv(width, patch, strides=patch)` on x[..., None]
    (`kernel` (*patch, 1, width), `bias` (width,)), computed as one contraction of x split into
    (B, g1, p1, g2, p2, ...) with the kernel: on XLA:CPU that runs the 3D forward 1.6x and its
    kernel gradient 5x faster than the convolution.
    """

    width: int
    patch: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, tuple[int, ...]]:
        kernel = self.param("kernel", nn.linear.default_kernel_init, (*self.patch, 1, self.width))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.width,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        b, nd = x.shape[0], len(self.patch)
        grid = tuple(s // p for s, p in zip(x.shape[1:], self.patch))
        x = x.reshape(b, *(v for g, p in zip(grid, self.patch) for v in (g, p)))
        within_patch = (tuple(range(2, 2 * nd + 1, 2)), tuple(range(nd)))  # p1, p2, ...
        tokens = jax.lax.dot_general(x, kernel.reshape(*self.patch, self.width),
                                     (within_patch, ((), ()))) + bias  # (B, g1, g2, ..., width)
        return tokens.reshape(b, math.prod(grid), self.width), grid


class Attention(nn.Module):
    """Multi-head self-attention (fused qkv, as timm) returning the CLS attention row.

    x: (B, N, D) with the CLS token first. Returns (B, N, D) and cls_attn (B, N-1) float32:
    softmax(q_cls K_patch^T / sqrt(C)) over the patch keys, averaged over heads.
    """

    num_heads: int
    dtype: Any = jnp.float32
    implementation: str | None = None  # layers.ATTENTION_IMPLEMENTATIONS (None: by backend)

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        b, n, d = x.shape
        h = self.num_heads
        c = d // h
        dense = lambda features, name: layers.Dense(
            features, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(), name=name)
        qkv = dense(3 * d, "qkv")(x).reshape(b, n, 3, h, c)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        y = layers.dot_product_attention(q, k, v, implementation=self.implementation)
        logits = jnp.einsum("bhc,bnhc->bhn", q[:, 0].astype(jnp.float32),
                            k[:, 1:].astype(jnp.float32)) / math.sqrt(c)
        cls_attn = jax.nn.softmax(logits, axis=-1).mean(axis=1)
        return dense(d, "proj")(y.reshape(b, n, d)), cls_attn


class Block(nn.Module):
    """Pre-norm transformer block. (x, _) -> (x, cls_attn); the signature suits nn.scan."""

    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32
    attn_implementation: str | None = None
    ln_eps: float = 1e-6  # timm / big_vision ViT

    @nn.compact
    def __call__(self, x: Array, _: Any = None) -> tuple[Array, Array]:
        norm = lambda name: nn.LayerNorm(epsilon=self.ln_eps, name=name)
        y, cls_attn = Attention(self.num_heads, self.dtype, self.attn_implementation,
                                name="attn")(norm("norm1")(x))
        x = x + y
        y = norm("norm2")(x)
        init = dict(dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                    bias_init=nn.initializers.normal(1e-6))
        y = layers.Dense(self.mlp_dim, name="fc1", **init)(y)
        y = layers.gelu(y)  # exact GELU, as timm and BERT
        x = x + layers.Dense(x.shape[-1], name="fc2", **init)(y)
        return x, cls_attn


class ViT(nn.Module):
    """UniMedI vision encoder E_v with tokenizers T_2D and T_3D (DESIGN §2).

    Attributes:
      width, depth, num_heads, mlp_dim: backbone sizes.
      patch_size: 2D patch (square). patch_size_3d: (pd, ph, pw) patch over (D, H, W).
      image_size: native 2D input size; the 2D position table is stored at its grid.
      volume_size: native (D, H, W); the 3D position table is stored at its grid.
      modality_embed: add a learned per-dimension (2D vs 3D) embedding to the tokens.
      dtype: compute dtype (params stay float32).
      remat, scan: rematerialise blocks / scan over blocks (stacked params under "blocks").
      intermediate_layers: 0-based block indices whose normed token states go to out["layers"].
    """

    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    patch_size: int = 16
    patch_size_3d: Sequence[int] = (4, 16, 16)
    image_size: int = 224
    volume_size: Sequence[int] = (32, 128, 128)
    modality_embed: bool = True
    dtype: Any = jnp.float32
    attn_implementation: str | None = None
    remat: bool = False
    scan: bool = False
    intermediate_layers: Sequence[int] = ()

    @property
    def grid_2d(self) -> tuple[int, int]:
        return (self.image_size // self.patch_size,) * 2

    @property
    def grid_3d(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.volume_size, self.patch_size_3d))

    def _patchify(self, x: Array, patch: Sequence[int], native_grid: Sequence[int],
                  kind: str) -> tuple[Array, Array, tuple[int, ...]]:
        """(B, *spatial) -> raw patch embeddings (B, n, D), position table (1, n, D), grid."""
        spatial = x.shape[1:]
        if any(s % p for s, p in zip(spatial, patch)):
            raise ValueError(f"{kind} input of spatial size {tuple(spatial)} is not divisible by "
                             f"the patch size {tuple(patch)}")
        tokens, grid = PatchEmbed(self.width, tuple(patch), self.dtype,
                                  name=f"patch_embed_{kind}")(x)
        pos = self.param(f"pos_embed_{kind}", nn.initializers.normal(0.02),
                         (1, math.prod(native_grid), self.width))
        return tokens, resize_pos_embed(pos, native_grid, grid), grid

    @nn.compact
    def __call__(self, volume: Array | None = None, images: Array | None = None,
                 keep: Array | None = None, mask: Array | None = None,
                 ) -> tuple[Array, dict[str, Any]]:
        """Encodes a volume (B, D, H, W) and/or images (B, k, H, W) or (B, H, W).

        keep: (B, M) int indices into the N patch tokens: the sequence becomes [CLS, tokens[keep]].
          (B, G, M): G sequences per sample, [CLS, tokens[keep[:, g]]] each, from one patch
          embedding of the sample (B is then B * G below, sample-major).
        mask: (B, N) bool, True replaces that patch embedding by the mask token.
        Returns cls (B, width) and out with "tokens" (B, M|N, width), "cls_attn" (B, M|N) (Eq. 1:
        the mean over layers and heads), "cls_attn_layers" (depth, B, M|N) (per layer) and the
        static token counts and grids.
        """
        if volume is None and images is None:
            raise ValueError("ViT needs a volume, images, or both")
        tokens, pos, out = [], [], {"num_tokens_3d": 0, "num_tokens_2d": 0}
        modality = (self.param("modality_embed", nn.initializers.normal(0.02), (2, self.width))
                    if self.modality_embed else jnp.zeros((2, self.width)))
        if volume is not None:
            t, p, grid = self._patchify(volume, self.patch_size_3d, self.grid_3d, "3d")
            tokens.append(t)
            pos.append(p + modality[1])
            out.update(num_tokens_3d=t.shape[1], grid_3d=grid)
        if images is not None:
            if images.ndim == 3:
                images = images[:, None]
            b, k = images.shape[:2]
            t, p, grid = self._patchify(images.reshape((b * k,) + images.shape[2:]),
                                        (self.patch_size,) * 2, self.grid_2d, "2d")
            tokens.append(t.reshape(b, -1, self.width))
            pos.append(jnp.tile(p, (1, k, 1)) + modality[0])
            out.update(num_tokens_2d=k * t.shape[1], grid_2d=grid, num_images=k)
        x = jnp.concatenate(tokens, axis=1)
        pos = jnp.concatenate(pos, axis=1)
        mask_token = self.param("mask_token", nn.initializers.zeros, (1, 1, self.width))
        if mask is not None:
            x = jnp.where(mask[..., None], mask_token.astype(x.dtype), x)
        x = x + pos.astype(x.dtype)
        if keep is not None and keep.ndim == 3:  # groups: (B, G, M) -> B * G sequences
            x = jax.vmap(lambda xb, kb: xb[kb])(x, keep).reshape(-1, keep.shape[-1], x.shape[-1])
        elif keep is not None:
            x = jnp.take_along_axis(x, keep[..., None], axis=1)
        cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)).astype(x.dtype),
                             x], axis=1)

        block = nn.remat(Block, prevent_cse=not self.scan) if self.remat else Block
        kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
                      attn_implementation=self.attn_implementation)
        layers = []
        if self.scan:
            if self.intermediate_layers:
                raise ValueError("intermediate_layers needs scan=False")
            scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                              length=self.depth)
            x, cls_attn = scanned(**kwargs, name="blocks")(x, None)
        else:
            cls_attn = []
            for i in range(self.depth):
                x, a = block(**kwargs, name=f"blocks_{i}")(x)
                cls_attn.append(a)
                if i in self.intermediate_layers:
                    layers.append(x[:, 1:])
            cls_attn = jnp.stack(cls_attn)
        norm = nn.LayerNorm(epsilon=1e-6, name="norm")
        x = norm(x)
        out.update(tokens=x[:, 1:], cls_attn=cls_attn.mean(axis=0), cls_attn_layers=cls_attn,
                   layers=[norm(y) for y in layers])
        return x[:, 0], out


def stack_blocks(params: dict) -> dict:
    """ViT params with blocks_0..blocks_{L-1} -> the scan layout: "blocks" (L, ...) stacked."""
    depth = sum(k.startswith("blocks_") for k in params)
    if not depth:
        return dict(params)
    out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    out["blocks"] = jax.tree.map(lambda *xs: np.stack(xs),
                                 *[params[f"blocks_{i}"] for i in range(depth)])
    return out


def unstack_blocks(params: dict) -> dict:
    """ViT params with stacked "blocks" (leading depth axis) -> blocks_0..blocks_{L-1}."""
    if "blocks" not in params:
        return dict(params)
    out = {k: v for k, v in params.items() if k != "blocks"}
    depth = jax.tree.leaves(params["blocks"])[0].shape[0]
    for i in range(depth):
        out[f"blocks_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["blocks"])
    return out


def from_config(cfg) -> ViT:
    """Builds a ViT from a `config.model.vit` ConfigDict (variant name plus overrides)."""
    sizes = variant(cfg.variant) if cfg.get("variant") else {}
    for key in ("width", "depth", "num_heads", "mlp_dim"):
        if cfg.get(key):
            sizes[key] = cfg[key]
    return ViT(**sizes, patch_size=cfg.patch_size, patch_size_3d=tuple(cfg.patch_size_3d),
               image_size=cfg.image_size, volume_size=tuple(cfg.volume_size),
               modality_embed=cfg.modality_embed, dtype=jnp.dtype(cfg.dtype),
               attn_implementation=cfg.get("attn_implementation") or None,
               remat=cfg.remat, scan=cfg.scan)
