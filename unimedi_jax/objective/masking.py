"""Token masking for the student (paper §3.4, DESIGN §4.3).

The student sees a masked copy of the teacher's input. Masking runs per modality block: the
token sequence `[3D tokens (n3), 2D tokens of image 1..k (n2 each)]` is split into the 3D block
and one block per image, and each block keeps its `num_keep(n, ratio)` best-scored tokens.
Scores are the teacher's CLS attention (`attentive`: tokens with the highest attention stay,
as in A-CLIP) or uniform noise (`random`). The kept indices come out sorted ascending, so the
student sequence keeps the original token order.

Two styles consume the result: `drop` passes `keep` (B, M) to the ViT (shorter sequence);
`mask_token` passes `mask` (B, N), True where a token is replaced by the mask embedding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from unimedi_jax.objective.selection import random_scores

Array = jax.Array

MODES = ("attentive", "random")
STYLES = ("drop", "mask_token")


class Layout(NamedTuple):
    """Token blocks of a sequence: n3 3D tokens, then k images of n2 tokens each."""

    n3: int
    k: int
    n2: int

    @property
    def num_tokens(self) -> int:
        return self.n3 + self.k * self.n2

    @classmethod
    def from_vit(cls, out: dict) -> Layout:
        """The layout of a ViT output dict (its static token counts)."""
        k = out.get("num_images", 0)
        return cls(out["num_tokens_3d"], k, out["num_tokens_2d"] // k if k else 0)


def num_keep(n: int, keep_ratio: float) -> int:
    """Tokens kept of a block of n: round(n * keep_ratio), at least 1 (a static int)."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"objective.masking.keep_ratio={keep_ratio} must lie in (0, 1]")
    return min(n, max(1, int(n * keep_ratio + 0.5)))


def _top_in_blocks(scores: Array, keep: int, offset: int) -> Array:
    """scores (B, g, n) of g consecutive blocks that start at sequence position `offset` ->
    each block's `keep` best positions, ascending, as sequence indices (B, g*keep)."""
    b, g, n = scores.shape
    _, idx = jax.lax.top_k(scores, keep)
    idx = jnp.sort(idx, axis=-1) + offset + n * jnp.arange(g)[:, None]
    return idx.reshape(b, g * keep)


def keep_indices(scores: Array, layout: Layout, keep_ratio: float) -> Array:
    """scores (B, N) -> kept token indices (B, M) int32, sorted ascending.

    M = num_keep(n3) + k * num_keep(n2) (a block of size 0 contributes nothing).
    """
    if scores.shape[1] != layout.num_tokens:
        raise ValueError(f"scores have {scores.shape[1]} tokens, layout {layout} has "
                         f"{layout.num_tokens}")
    b = scores.shape[0]
    parts = []
    if layout.n3:
        n3_keep = num_keep(layout.n3, keep_ratio)
        parts.append(_top_in_blocks(scores[:, None, :layout.n3], n3_keep, 0))
    if layout.k:
        blocks = scores[:, layout.n3:].reshape(b, layout.k, layout.n2)
        parts.append(_top_in_blocks(blocks, num_keep(layout.n2, keep_ratio), layout.n3))
    return jnp.concatenate(parts, axis=1).astype(jnp.int32)


def mask_from_keep(keep: Array, num_tokens: int) -> Array:
    """keep (B, M) -> mask (B, N) bool, True at the tokens not kept (the masked ones)."""
    b = keep.shape[0]
    return jnp.ones((b, num_tokens), bool).at[jnp.arange(b)[:, None], keep].set(False)


def token_scores(mode: str, cls_attn: Array, rng: Array) -> Array:
    """Masking scores (B, N): the teacher attention (`attentive`) or uniform noise (`random`)."""
    if mode == "attentive":
        return cls_attn
    if mode == "random":
        return random_scores(rng, cls_attn.shape)
    raise ValueError(f"objective.masking.mode={mode!r}; expected one of {MODES}")
