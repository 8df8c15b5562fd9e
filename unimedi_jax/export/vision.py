"""Vision encoder parameters under timm `VisionTransformer` names (plus the 3D tokenizer).

The 2D path maps one to one onto `timm.models.vision_transformer.VisionTransformer(in_chans=1,
global_pool="token", class_token=True)`: the learned 2D modality embedding is folded into the 2D
position table, whose CLS entry is zero. The 3D tokenizer is written beside it under
`patch_embed_3d.proj.{weight,bias}` and `pos_embed_3d` (3D modality embedding folded in).
"""

from __future__ import annotations

import numpy as np

from unimedi_jax.models import vit


def _linear(p: dict, name: str) -> dict[str, np.ndarray]:
    return {f"{name}.weight": np.asarray(p["kernel"]).T, f"{name}.bias": np.asarray(p["bias"])}


def _norm(p: dict, name: str) -> dict[str, np.ndarray]:
    return {f"{name}.weight": np.asarray(p["scale"]), f"{name}.bias": np.asarray(p["bias"])}


def _conv(p: dict, name: str) -> dict[str, np.ndarray]:
    # flax (*spatial, in, out) -> torch (out, in, *spatial)
    k = np.asarray(p["kernel"])
    return {f"{name}.weight": np.moveaxis(k, (-1, -2), (0, 1)),
            f"{name}.bias": np.asarray(p["bias"])}


def timm_state_dict(params: dict, depth: int) -> dict[str, np.ndarray]:
    """ViT params (see models/vit.py) -> {timm name: float32 array}, 2D path and 3D tokenizer."""
    p = vit.unstack_blocks(params)
    width = np.asarray(p["cls_token"]).shape[-1]
    modality = np.asarray(p["modality_embed"]) if "modality_embed" in p else np.zeros((2, width))
    pos_2d = np.asarray(p["pos_embed_2d"]) + modality[0]
    sd = {
        "cls_token": np.asarray(p["cls_token"]),
        "pos_embed": np.concatenate([np.zeros((1, 1, width)), pos_2d], axis=1),
        "pos_embed_3d": np.asarray(p["pos_embed_3d"]) + modality[1],
        "mask_token": np.asarray(p["mask_token"]),
        **_conv(p["patch_embed_2d"], "patch_embed.proj"),
        **_conv(p["patch_embed_3d"], "patch_embed_3d.proj"),
        **_norm(p["norm"], "norm"),
    }
    for i in range(depth):
        b, name = p[f"blocks_{i}"], f"blocks.{i}"
        for part in (_norm(b["norm1"], f"{name}.norm1"), _norm(b["norm2"], f"{name}.norm2"),
                     _linear(b["attn"]["qkv"], f"{name}.attn.qkv"),
                     _linear(b["attn"]["proj"], f"{name}.attn.proj"),
                     _linear(b["fc1"], f"{name}.mlp.fc1"), _linear(b["fc2"], f"{name}.mlp.fc2")):
            sd.update(part)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


TIMM_3D_KEYS = ("patch_embed_3d.proj.weight", "patch_embed_3d.proj.bias", "pos_embed_3d",
                "mask_token")
