"""Losses of the downstream tasks, all float32, each with per-sample `weights` (B,).

A weight of 0 removes a (padding) sample; with all weights 1 every loss is its reference form.
- `masked_bce`: sigmoid cross-entropy over the known labels (0/1; other values, e.g. -1 for
  unknown, are left out), mean over known entries (multi-label and binary probing).
- `softmax_ce`: cross-entropy over classes, mean over samples (multi-class probing) or voxels.
- 2D segmentation (paper appendix 7.2, after GLoRIA/MGCA): `alpha * focal + dice` on one sigmoid
  channel; focal is their `FocalLoss(gamma=2)` (mean over pixels, no class weighting); dice is
  1 - their soft Dice coefficient with smoothing 1, over the whole batch.
- 3D segmentation (paper: Dice + CE, UNETR's BTCV recipe): MONAI `DiceCELoss(to_onehot_y=True,
  softmax=True, squared_pred=True, smooth_nr=0, smooth_dr=1e-6)`: soft Dice per sample and class
  (background included), averaged, plus the voxel-mean cross-entropy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

FOCAL_GAMMA = 2.0  # GLoRIA / MGCA MixedLoss: FocalLoss(2)
BINARY_DICE_SMOOTH = 1.0  # GLoRIA / MGCA dice_loss: smooth = 1
DICE_SMOOTH_NR = 0.0  # UNETR BTCV recipe (MONAI DiceCELoss smooth_nr)
DICE_SMOOTH_DR = 1e-6  # UNETR BTCV recipe (MONAI DiceCELoss smooth_dr)


def _weights(weights: Array | None, batch: int) -> Array:
    return jnp.ones((batch,), jnp.float32) if weights is None else weights.astype(jnp.float32)


def _weighted_mean(per_sample: Array, weights: Array) -> Array:
    return (per_sample * weights).sum() / jnp.maximum(weights.sum(), 1e-12)


def masked_bce(logits: Array, labels: Array, weights: Array | None = None) -> Array:
    """logits, labels (B, L); entries with labels not in {0, 1} are ignored."""
    logits = logits.astype(jnp.float32)
    known = ((labels == 0) | (labels == 1)).astype(jnp.float32)
    known = known * _weights(weights, logits.shape[0])[:, None]
    target = jnp.clip(labels, 0, 1).astype(jnp.float32)
    ce = jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return (ce * known).sum() / jnp.maximum(known.sum(), 1e-12)


def softmax_ce(logits: Array, labels: Array, weights: Array | None = None) -> Array:
    """logits (B, ..., C), integer labels (B, ...): mean over samples of the mean over positions."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    per_sample = nll.reshape(nll.shape[0], -1).mean(axis=1)
    return _weighted_mean(per_sample, _weights(weights, logits.shape[0]))


def focal_loss(logits: Array, targets: Array, weights: Array | None = None,
               gamma: float = FOCAL_GAMMA) -> Array:
    """Binary focal loss of logits and {0, 1} targets of one shape (B, ...), mean over elements.

    (1 - p_t)^gamma * BCE, with (1 - p_t)^gamma = exp(gamma * log sigmoid(-x (2t - 1))).
    """
    x, t = logits.astype(jnp.float32), targets.astype(jnp.float32)
    bce = jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
    loss = jnp.exp(gamma * jax.nn.log_sigmoid(-x * (2.0 * t - 1.0))) * bce
    return _weighted_mean(loss.reshape(x.shape[0], -1).mean(axis=1), _weights(weights, x.shape[0]))


def binary_dice_loss(logits: Array, targets: Array, weights: Array | None = None,
                     smooth: float = BINARY_DICE_SMOOTH) -> Array:
    """1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s) with p = sigmoid(logits), over the batch."""
    w = _weights(weights, logits.shape[0]).reshape((-1,) + (1,) * (logits.ndim - 1))
    p = jax.nn.sigmoid(logits.astype(jnp.float32)) * w
    t = targets.astype(jnp.float32) * w
    return 1.0 - (2.0 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)


def focal_dice_loss(logits: Array, targets: Array, alpha: float,
                    weights: Array | None = None) -> Array:
    """alpha * focal + dice for one sigmoid channel: logits and {0, 1} targets (B, ...)."""
    return alpha * focal_loss(logits, targets, weights) + binary_dice_loss(logits, targets, weights)


def multiclass_dice_loss(logits: Array, labels: Array, weights: Array | None = None,
                         smooth_nr: float = DICE_SMOOTH_NR,
                         smooth_dr: float = DICE_SMOOTH_DR) -> Array:
    """logits (B, ..., C), labels (B, ...): mean over samples and classes of
    1 - (2 sum(p t) + nr) / (sum(p^2) + sum(t^2) + dr), p = softmax, t = one-hot."""
    c = logits.shape[-1]
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(logits.shape[0], -1, c)
    t = jax.nn.one_hot(labels, c, dtype=jnp.float32).reshape(p.shape)
    dice = 1.0 - (2.0 * (p * t).sum(1) + smooth_nr) / ((p * p).sum(1) + (t * t).sum(1) + smooth_dr)
    return _weighted_mean(dice.mean(axis=1), _weights(weights, logits.shape[0]))


def dice_ce_loss(logits: Array, labels: Array, weights: Array | None = None) -> Array:
    """Multi-class Dice + cross-entropy (MONAI DiceCELoss with unit weights)."""
    return multiclass_dice_loss(logits, labels, weights) + softmax_ce(logits, labels, weights)
