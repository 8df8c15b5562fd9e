"""UniMedI losses (DESIGN §4.4-4.5): CLIP InfoNCE, DINO CLS and iBOT patch self-distillation.

All losses are plain global-array code: under `jax.jit` with the batch sharded over a mesh the
reductions (the similarity matrix, the batch means, the centre means) span the global batch, so
CLIP negatives and DINO centres come from all devices without explicit collectives.
Every loss computes in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unimedi_jax.models.layers import l2_normalize

Array = jax.Array


def clip_loss(img_emb: Array, txt_emb: Array, logit_scale: Array | float) -> Array:
    """Symmetric InfoNCE (CLIP): img_emb, txt_emb (B, D), row i of each is a positive pair.

    logits = logit_scale * cos(img_i, txt_j) (logit_scale is the multiplier, e.g. 1/0.07);
    the loss is the mean of the image->text and text->image cross-entropies. Plain global-array
    code: jitted over a batch sharded on the mesh, the negatives are the whole global batch.
    """
    img, txt = l2_normalize(img_emb), l2_normalize(txt_emb)
    logits = logit_scale * img @ txt.T
    # The diagonal as row-wise dot products: elementwise over a sharded batch, where
    # `jnp.diagonal`'s gradient (a scatter) partitions into collectives inside a conditional.
    diag = logit_scale * jnp.sum(img * txt, axis=-1)
    i2t = jax.nn.logsumexp(logits, axis=1) - diag
    t2i = jax.nn.logsumexp(logits, axis=0) - diag
    return 0.5 * (i2t.mean() + t2i.mean())


def clip_loss_soft(img_emb: Array, txt_emb: Array, logit_scale: Array | float,
                   targets: Array) -> Array:
    """CLIP InfoNCE with soft targets (MedCLIP): targets (B, B), row i the distribution over
    reports that image i matches (e.g. every report with image i's label set, normalised);
    image->text uses its rows, text->image its columns (each column normalised). With the
    identity as targets this is `clip_loss`."""
    img, txt = l2_normalize(img_emb), l2_normalize(txt_emb)
    logits = logit_scale * img @ txt.T
    targets = jax.lax.stop_gradient(targets.astype(jnp.float32))
    rows = targets / jnp.maximum(targets.sum(axis=1, keepdims=True), 1e-12)
    cols = targets / jnp.maximum(targets.sum(axis=0, keepdims=True), 1e-12)
    i2t = -jnp.sum(rows * jax.nn.log_softmax(logits, axis=1), axis=1)
    t2i = -jnp.sum(cols * jax.nn.log_softmax(logits, axis=0), axis=0)
    return 0.5 * (i2t.mean() + t2i.mean())


def same_findings_targets(labels: Array) -> Array:
    """(B, B) float32: 1 where samples i and j have the same label set (labels (B, L) in {0, 1};
    unknown entries, anything else, must agree too), the diagonal always 1."""
    same = jnp.all(labels[:, None, :] == labels[None, :, :], axis=-1)
    return (same | jnp.eye(labels.shape[0], dtype=bool)).astype(jnp.float32)


def _distill_ce(student_logits: Array, teacher_logits: Array, center: Array,
                student_temp: float, teacher_temp: float) -> Array:
    """Per-row -sum_k softmax((t - c)/tt) * log_softmax(s/ts) (..., K) -> (...); teacher stopped."""
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32) - center)
    target = jax.nn.softmax(t / teacher_temp, axis=-1)
    log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    return -jnp.sum(target * log_p, axis=-1)


def dino_loss(student_logits: Array, teacher_logits: Array, center: Array,
              student_temp: float, teacher_temp: float) -> Array:
    """DINO cross-entropy on (B, K) head outputs, mean over the batch; center (K,)."""
    return _distill_ce(student_logits, teacher_logits, center, student_temp, teacher_temp).mean()


def patch_loss(student_logits: Array, teacher_logits: Array, center: Array, weights: Array,
               student_temp: float, teacher_temp: float) -> Array:
    """iBOT patch loss: logits (B, N, K), weights (B, N) -> scalar.

    Per sample sum_i w_i CE_i / max(sum_i w_i, 1), then the batch mean (iBOTLoss).
    """
    ce = _distill_ce(student_logits, teacher_logits, center, student_temp, teacher_temp)
    weights = weights.astype(jnp.float32)
    per_sample = (ce * weights).sum(axis=-1) / jnp.maximum(weights.sum(axis=-1), 1.0)
    return per_sample.mean()


def update_center(center: Array, teacher_logits: Array, momentum: float) -> Array:
    """EMA of the raw teacher outputs: center (K,), teacher_logits (..., K) averaged over all
    leading axes (batch, and tokens for the patch centre); stop-gradient."""
    batch_mean = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    batch_mean = batch_mean.reshape(-1, batch_mean.shape[-1]).mean(axis=0)
    return center * momentum + batch_mean * (1.0 - momentum)
