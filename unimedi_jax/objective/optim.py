"""The pretraining optimiser (paper §4.1, MGCA): AdamW with a weight-decay mask, global-norm
clipping, and frozen parameters (text layers outside `model.text.trainable_layers`, and the
logit scale when `objective.clip.learnable` is off)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from unimedi_jax.objective import schedules

PyTree = Any

# Leaves that take no weight decay besides every leaf of rank <= 1 (biases, norm scales, the
# logit scale, the DINO gain): position tables, CLS/mask tokens, the modality embedding (ViT),
# and embedding tables ("embedding", BERT). As DeiT/timm and Hugging Face BERT fine-tuning.
NO_DECAY_NAMES = frozenset(
    {"pos_embed_2d", "pos_embed_3d", "cls_token", "mask_token", "modality_embed", "embedding"})
TEXT_LAYER_PREFIX = "layer_"  # bert.BertModel names its layers layer_0 .. layer_{L-1}


def _name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def decay_mask(params: PyTree) -> PyTree:
    """True at the leaves that take weight decay (same structure as params)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim > 1 and _name(path) not in NO_DECAY_NAMES, params)


def trainable_mask(params: PyTree, config) -> PyTree:
    """True at the leaves the optimiser updates.

    Text encoder (`params["text"]`): `model.text.trainable_layers` = n >= 0 trains its last n
    layers (embeddings frozen); -1 trains all of it. The logit scale trains when
    `objective.clip.learnable`. Every other leaf trains.
    """
    n = config.model.text.trainable_layers
    text_layers = sorted(int(k[len(TEXT_LAYER_PREFIX):]) for k in params["text"]
                         if k.startswith(TEXT_LAYER_PREFIX))
    if not -1 <= n <= len(text_layers):
        raise ValueError(f"model.text.trainable_layers={n} must be -1 (all) or in "
                         f"0..{len(text_layers)} (text layers)")
    first_trained = len(text_layers) - n

    def text_trains(key: str) -> bool:
        if n == -1:
            return True
        return key.startswith(TEXT_LAYER_PREFIX) and int(key[len(TEXT_LAYER_PREFIX):]) >= first_trained

    mask = {k: jax.tree.map(lambda _: True, v) for k, v in params.items()}
    mask["text"] = {k: jax.tree.map(lambda _: text_trains(k), v) for k, v in params["text"].items()}
    mask["logit_scale"] = bool(config.objective.clip.learnable)
    return mask


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW (config.optim) on the trainable leaves, zero updates on the frozen ones.

    Global-norm clipping (optim.grad_clip_norm, off when 0) runs over the trainable gradients;
    the learning rate follows `schedules.learning_rate` over config.total_steps.
    """
    o = config.optim
    chain = [optax.clip_by_global_norm(o.grad_clip_norm)] if o.grad_clip_norm > 0 else []
    chain.append(optax.adamw(schedules.learning_rate(o, config.total_steps), b1=o.b1, b2=o.b2,
                             weight_decay=o.weight_decay, mask=decay_mask))
    labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen",
                                         trainable_mask(params, config))
    return optax.multi_transform({"train": optax.chain(*chain), "frozen": optax.set_to_zero()},
                                 labels)
