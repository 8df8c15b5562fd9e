"""The pretraining optimiser (paper §4.1, MGCA): AdamW with a weight-decay mask, gradient
clipping (per parameter, as DINO, or global norm), and frozen parameters (text layers outside `model.text.trainable_layers`, and the
logit scale when `objective.clip.learnable` is off)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from unimedi_jax.models import bert, layout
from unimedi_jax.objective import schedules

PyTree = Any

# Leaves that take no weight decay besides every leaf of rank <= 1 (biases, norm scales, the
# logit scale, the DINO gain): position tables, CLS/mask tokens, the modality embedding (ViT),
# and embedding tables ("embedding", BERT). As DeiT/timm and Hugging Face BERT fine-tuning.
NO_DECAY_NAMES = frozenset(
    {"pos_embed_2d", "pos_embed_3d", "cls_token", "mask_token", "modality_embed", "embedding"})


def _key(entry) -> str:
    return str(getattr(entry, "key", entry))


def _layer_ndim(path, x) -> int:
    """The rank of one layer's parameter: a leaf under a stack of scanned layers
    (`layout.is_stacked`) less its leading layer axis."""
    return x.ndim - any(layout.is_stacked(_key(k)) for k in path[:-1])


def decay_mask(params: PyTree) -> PyTree:
    """True at the leaves that take weight decay (same structure as params; a stacked leaf as
    each of its layers)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: _layer_ndim(path, x) > 1 and _key(path[-1]) not in NO_DECAY_NAMES, params)


def trainable_mask(params: PyTree, config) -> PyTree:
    """True at the leaves the optimiser updates.

    Text encoder (`params["text"]`): `model.text.trainable_layers` = n >= 0 trains its last n
    layers (embeddings frozen); -1 trains all of it. The logit scale trains when
    `objective.clip.learnable`. Every other leaf trains (all of them for a params dict without
    "text", a method without language). Scanned text layers (`layers_{a}_{b}`) train as their
    layers do; a stack holding frozen and trained layers is a ValueError (`UniMedI.from_config`
    splits the stacks where training starts).
    """
    mask = {k: jax.tree.map(lambda _: True, v) for k, v in params.items()}
    if "logit_scale" in params:
        mask["logit_scale"] = bool(config.objective.clip.learnable)
    if "text" not in params:  # a method without language (docs/DESIGN.md §4.8-4.9)
        return mask
    n = config.model.text.trainable_layers
    ranges = bert.layer_ranges(params["text"])
    num_layers = sum(stop - start for start, stop in ranges.values())
    if not -1 <= n <= num_layers:
        raise ValueError(f"model.text.trainable_layers={n} must be -1 (all) or in "
                         f"0..{num_layers} (text layers)")
    first_trained = num_layers - n

    def text_trains(key: str) -> bool:
        if n == -1:
            return True
        if key not in ranges:
            return False
        start, stop = ranges[key]
        if start < first_trained < stop:
            raise ValueError(
                f"model.text.trainable_layers={n} trains text layers {first_trained}.."
                f"{num_layers - 1}, but the scanned stack {key!r} (config.model.text.scan) holds "
                f"layers {start}..{stop - 1}, frozen and trained ones: build the text encoder "
                "with `UniMedI.from_config` of this config, which splits the stacks there")
        return start >= first_trained

    mask["text"] = {k: jax.tree.map(lambda _: text_trains(k), v) for k, v in params["text"].items()}
    return mask


def frozen_paths(params: PyTree, config) -> list[tuple[str, ...]]:
    """Key paths of the params subtrees the optimiser never updates (`trainable_mask` False at
    every leaf), e.g. ("text", "embeddings"): what checkpoints need not copy."""
    paths = []

    def walk(mask, path):
        if not isinstance(mask, dict):
            return
        for key, sub in mask.items():
            leaves = jax.tree.leaves(sub)
            if leaves and not any(leaves):
                paths.append((*path, key))
            else:
                walk(sub, (*path, key))

    walk(trainable_mask(params, config), ())
    return paths


def clip_per_parameter(max_norm: float) -> optax.GradientTransformation:
    """Scales each leaf's gradient to norm <= max_norm on its own (DINO's `clip_gradients`);
    a leaf of stacked layers (`layout.is_stacked`) layer by layer, as unscanned.

    Unlike a global-norm clip, a large gradient in one leaf (the DINO head's early on) does not
    shrink the gradients of all the others.
    """
    def scale(path, g):
        if g.ndim > _layer_ndim(path, g):  # one norm per layer
            norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim)), keepdims=True))
        else:
            norm = optax.tree.norm(g)
        return g * jnp.minimum(1.0, max_norm / (norm + 1e-6)).astype(g.dtype)

    return optax.stateless(
        lambda updates, params=None: jax.tree_util.tree_map_with_path(scale, updates))


def adamw_chain(config) -> optax.GradientTransformation:
    """Clipping (optim.grad_clip_norm, off when 0; optim.grad_clip_mode "per_parameter" as DINO
    or "global") then AdamW with `schedules.learning_rate` over config.total_steps and no decay
    where `decay_mask` says, for every leaf it is given."""
    o = config.optim
    clip = {"per_parameter": clip_per_parameter, "global": optax.clip_by_global_norm}
    if o.grad_clip_mode not in clip:
        raise ValueError(f"optim.grad_clip_mode={o.grad_clip_mode!r}; choose one of {sorted(clip)}")
    chain = [clip[o.grad_clip_mode](o.grad_clip_norm)] if o.grad_clip_norm > 0 else []
    chain.append(optax.adamw(schedules.learning_rate(o, config.total_steps), b1=o.b1, b2=o.b2,
                             weight_decay=o.weight_decay, mask=decay_mask))
    return optax.chain(*chain)


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW (config.optim) on the trainable leaves, zero updates on the frozen ones.

    Clipping (optim.grad_clip_norm, off when 0; optim.grad_clip_mode "per_parameter" as DINO or
    "global") runs over the trainable gradients; the learning rate follows
    `schedules.learning_rate` over config.total_steps.
    """
    labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen",
                                         trainable_mask(params, config))
    return optax.multi_transform({"train": adamw_chain(config), "frozen": optax.set_to_zero()},
                                 labels)


def applied_updates(opt_state) -> jax.Array:
    """How many updates the optimiser has applied (its step count, which drives its learning
    rate schedule; a skipped non-finite step does not advance it): int32 scalar."""
    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    if not counts:
        raise ValueError("optimiser state holds no step count")
    return counts[0][1]
