"""PyTorch port of an exported UniMedI vision encoder and its projection heads.

`UniMedIVisionTorch.from_export(OUT)` reads a folder written by `python -m unimedi_jax.export`
and runs, with timm's `VisionTransformer` blocks, the three input forms of the JAX model:

- 2D: images (B, H, W) or (B, k, H, W), H and W multiples of `patch_size`;
- 3D: a volume (B, D, H, W), each side a multiple of `patch_size_3d`;
- mixed: both, as one sequence `[CLS, 3D tokens (depth-major), 2D tokens of image 1..k]`.

Position tables are stored at the native grids (`img_size // patch_size`, `volume_size //
patch_size_3d`). Other grids get the table resized exactly as `jax.image.resize(...,
"linear")` does: separable half-pixel-centre linear interpolation, with the kernel widened by
the size ratio when shrinking (antialiasing), weights renormalised. Any grid is supported.
Not supported: the training-time token dropping and mask token, other compute dtypes than
float32, and slice selection (pass the chosen slices as `images`).

This module is the only one in the package that imports torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from unimedi_jax.export import export as export_lib

# Exported tensors the forward pass does not use (the training-time mask embedding).
UNUSED_KEYS = ("mask_token",)
# torch.nn.functional.normalize default epsilon, as the JAX side.
L2_EPS = 1e-12


def resize_weights(src: int, dst: int) -> torch.Tensor:
    """(dst, src) float64 matrix of `jax.image.resize` "linear" (antialiased) along one axis.

    Output sample j sits at input coordinate (j + 0.5) * src / dst - 0.5; input i gets the
    triangle weight max(0, 1 - |x_j - i| / max(src / dst, 1)); each row is normalised to 1.
    """
    inv_scale = src / dst
    centres = (torch.arange(dst, dtype=torch.float64) + 0.5) * inv_scale - 0.5
    dist = (centres[:, None] - torch.arange(src, dtype=torch.float64)[None]).abs()
    weights = (1.0 - dist / max(inv_scale, 1.0)).clamp(min=0.0)
    return weights / weights.sum(dim=1, keepdim=True)


def resize_pos_embed(pos: torch.Tensor, src_grid: Sequence[int], dst_grid: Sequence[int]
                     ) -> torch.Tensor:
    """(1, prod(src_grid), C) position table -> (1, prod(dst_grid), C); unchanged at src_grid."""
    src_grid, dst_grid = tuple(src_grid), tuple(dst_grid)
    if src_grid == dst_grid:
        return pos
    grid = pos.reshape(*src_grid, pos.shape[-1])
    for axis, (src, dst) in enumerate(zip(src_grid, dst_grid)):
        if src != dst:
            w = resize_weights(src, dst).to(grid.dtype)
            grid = torch.movedim(torch.tensordot(w, torch.movedim(grid, axis, 0), dims=1), 0, axis)
    return grid.reshape(1, math.prod(dst_grid), pos.shape[-1])


class PatchEmbed3d(nn.Module):
    """Non-overlapping 3D patches: (B, D, H, W) -> tokens (B, d*h*w, C) depth-major, grid."""

    def __init__(self, patch_size: Sequence[int], embed_dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(1, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, volume: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        x = self.proj(volume[:, None])
        return x.flatten(2).transpose(1, 2), tuple(x.shape[2:])


def _check_divisible(x: torch.Tensor, patch: Sequence[int], kind: str) -> None:
    spatial = tuple(x.shape[-len(patch):])
    if any(s % p for s, p in zip(spatial, patch)):
        raise ValueError(f"{kind} input of spatial size {spatial} is not divisible by the patch "
                         f"size {tuple(patch)}")


class UniMedIVisionTorch(VisionTransformer):
    """timm `VisionTransformer` (2D path, timm names) plus the 3D tokenizer and the CLIP heads.

    Extra parameters: `patch_embed_3d.proj` (Conv3d), `pos_embed_3d` (1, d*h*w, C) and the
    projections `img_proj` (C -> proj_dim) and `txt_proj` (text width -> proj_dim), both
    bias-free, and `logit_scale` (log of the similarity multiplier). The export of a method
    without language has no heads (proj_dim None): the encoder alone, `embed*` unavailable.
    """

    def __init__(self, vision: dict, text_width: int | None = None, proj_dim: int | None = None,
                 text_pooling: str = "cls"):
        mlp_ratio = vision["mlp_ratio"]
        super().__init__(
            img_size=vision["img_size"], patch_size=vision["patch_size"],
            in_chans=vision["in_chans"], num_classes=0, global_pool="token",
            embed_dim=vision["embed_dim"], depth=vision["depth"], num_heads=vision["num_heads"],
            mlp_ratio=mlp_ratio, qkv_bias=True)
        width = vision["embed_dim"]
        self.patch_size_3d = tuple(vision["patch_size_3d"])
        self.grid_2d = tuple(s // vision["patch_size"] for s in (vision["img_size"],) * 2)
        self.grid_3d = tuple(s // p for s, p in zip(vision["volume_size"], self.patch_size_3d))
        self.patch_embed_3d = PatchEmbed3d(self.patch_size_3d, width)
        self.pos_embed_3d = nn.Parameter(torch.zeros(1, math.prod(self.grid_3d), width))
        self.has_heads = proj_dim is not None
        if self.has_heads:
            self.img_proj = nn.Linear(width, proj_dim, bias=False)
            self.txt_proj = nn.Linear(text_width, proj_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.zeros(()))
        if text_pooling not in ("cls", "mean"):
            raise ValueError(f"text pooling {text_pooling!r}: expected 'cls' or 'mean'")
        self.text_pooling = text_pooling

    @classmethod
    def from_export(cls, folder: str | Path) -> UniMedIVisionTorch:
        """Loads `folder`/{config.json, vision.safetensors, heads.safetensors} (eval mode)."""
        folder = Path(folder)
        config_path = folder / export_lib.CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: {folder} is not a unimedi_jax "
                                    "export (python -m unimedi_jax.export writes one)")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        text, heads = config.get("text"), config.get("heads")
        model = cls(config["vision"], text and text["hidden_size"], heads and heads["proj_dim"],
                    (text or {}).get("pooling", "cls"))  # exports before the key: [CLS]
        state = {k: v for k, v in load_file(folder / export_lib.VISION_FILE).items()
                 if k not in UNUSED_KEYS}
        if heads is not None:  # none for a method without language
            state.update(load_file(folder / export_lib.HEADS_FILE))
        model.load_state_dict(state, strict=True)
        return model.eval()

    def _tokens(self, volume: torch.Tensor | None, images: torch.Tensor | None) -> torch.Tensor:
        """Patch embeddings plus positions, [3D tokens, 2D tokens of image 1..k]: (B, N, C)."""
        if volume is None and images is None:
            raise ValueError("UniMedIVisionTorch needs a volume, images, or both")
        parts = []
        if volume is not None:
            _check_divisible(volume, self.patch_size_3d, "3d")
            tokens, grid = self.patch_embed_3d(volume)
            parts.append(tokens + resize_pos_embed(self.pos_embed_3d, self.grid_3d, grid))
        if images is not None:
            if images.ndim == 3:
                images = images[:, None]
            b, k = images.shape[:2]
            _check_divisible(images, self.patch_embed.patch_size, "2d")
            x = self.patch_embed.proj(images.reshape(b * k, 1, *images.shape[2:]))
            pos = resize_pos_embed(self.pos_embed[:, 1:], self.grid_2d, x.shape[2:])
            parts.append((x.flatten(2).transpose(1, 2) + pos).reshape(b, -1, x.shape[1]))
        return torch.cat(parts, dim=1)

    def forward_features(self, volume: torch.Tensor | None = None,
                         images: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm token states (B, 1 + N, C), CLS first (see the module docstring)."""
        x = self._tokens(volume, images)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return self.norm(self.blocks(torch.cat([cls, x], dim=1)))

    def forward(self, volume: torch.Tensor | None = None,
                images: torch.Tensor | None = None) -> torch.Tensor:
        """CLS features (B, C) after the final norm."""
        return self.forward_features(volume, images)[:, 0]

    def embed(self, volume: torch.Tensor | None = None,
              images: torch.Tensor | None = None) -> torch.Tensor:
        """Projected, L2-normalised image embeddings (B, proj_dim)."""
        if not self.has_heads:
            raise ValueError("this export holds no projection heads (a method without "
                             "language): use forward() for the CLS features")
        return F.normalize(self.img_proj(self(volume, images)), dim=-1, eps=L2_EPS)

    def pool_text(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The report feature (B, text width) of BERT's final states (B, T, text width) and the
        attention mask (B, T): the [CLS] state, or the mean over attended tokens (the export's
        `text.pooling`)."""
        if self.text_pooling == "cls":
            return hidden[:, 0]
        w = attention_mask[..., None].to(hidden.dtype)
        return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)

    def embed_text(self, text_feature: torch.Tensor) -> torch.Tensor:
        """Report features (B, text width) from `pool_text` -> projected, L2-normalised
        (B, proj_dim)."""
        return F.normalize(self.txt_proj(text_feature), dim=-1, eps=L2_EPS)

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """exp(logit_scale) * cosine similarity: (B, P) for (B, E) and (P, E)."""
        image_emb = F.normalize(image_emb, dim=-1, eps=L2_EPS)
        text_emb = F.normalize(text_emb, dim=-1, eps=L2_EPS)
        return self.logit_scale.exp() * image_emb @ text_emb.T
