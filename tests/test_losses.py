"""CLIP, DINO and iBOT patch losses and the centre update against float64 numpy transcriptions
of the published code (CLIP's pseudo-code, DINO's DINOLoss, iBOT's iBOTLoss patch term)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unimedi_jax.objective import losses

RTOL = 1e-5


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _log_softmax(x):
    return np.log(_softmax(x))


def clip_reference(img, txt, scale):
    """CLIP: normalised features, logits = scale * I @ T^T, mean of both cross-entropies."""
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    logits = scale * img @ txt.T
    n = len(img)
    loss_i = -np.log(_softmax(logits)[np.arange(n), np.arange(n)]).mean()
    loss_t = -np.log(_softmax(logits.T)[np.arange(n), np.arange(n)]).mean()
    return (loss_i + loss_t) / 2


def dino_reference(student, teacher, center, student_temp, teacher_temp):
    """DINOLoss for one (teacher view, student view) pair."""
    q = _softmax((teacher - center) / teacher_temp)
    return np.sum(-q * _log_softmax(student / student_temp), axis=-1).mean()


def ibot_patch_reference(student, teacher, center, mask, student_temp, teacher_temp):
    """iBOTLoss patch term: per-token CE, masked mean per image (mask.sum clamped at 1), mean."""
    t = _softmax((teacher - center) / teacher_temp)
    loss2 = np.sum(-t * _log_softmax(student / student_temp), axis=-1)
    loss2 = np.sum(loss2 * mask, axis=-1) / np.clip(mask.sum(-1), 1.0, None)
    return loss2.mean()


def _rand(rng, *shape, scale=3.0):
    return (rng.normal(size=shape) * scale).astype(np.float32)


def _rel(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)


def test_clip_matches_reference():
    rng = np.random.default_rng(0)
    img, txt = _rand(rng, 12, 16), _rand(rng, 12, 16)
    for scale in (1 / 0.07, 3.0):
        got = losses.clip_loss(jnp.asarray(img), jnp.asarray(txt), scale)
        want = clip_reference(img.astype(np.float64), txt.astype(np.float64), scale)
        assert _rel(got, want) <= RTOL


def test_clip_hand_computed_2x2():
    eye = jnp.eye(2)
    # logits = I: each cross-entropy is log(e + 1) - 1.
    np.testing.assert_allclose(losses.clip_loss(eye, 5 * eye, 1.0), math.log(math.e + 1) - 1,
                               rtol=1e-6)
    # Asymmetric: img rows (1,0),(1,0); txt rows (1,0),(0,1); scale 1 -> logits [[1,0],[1,0]].
    img = jnp.array([[1.0, 0.0], [2.0, 0.0]])
    i2t = (math.log(math.e + 1) - 1 + math.log(math.e + 1) - 0) / 2
    t2i = (math.log(2 * math.e) - 1 + math.log(2) - 0) / 2
    np.testing.assert_allclose(losses.clip_loss(img, eye, 1.0), (i2t + t2i) / 2, rtol=1e-6)


def test_clip_over_a_sharded_batch_uses_global_negatives():
    devices = jax.devices()
    rng = np.random.default_rng(1)
    n = 4 * len(devices)
    img, txt = _rand(rng, n, 8), _rand(rng, n, 8)
    mesh = Mesh(np.asarray(devices), ("data",))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
    got = jax.jit(losses.clip_loss)(put(img), put(txt), 10.0)
    assert _rel(got, clip_reference(img.astype(np.float64), txt.astype(np.float64), 10.0)) <= RTOL


def test_dino_matches_reference():
    rng = np.random.default_rng(2)
    s, t, c = _rand(rng, 8, 64), _rand(rng, 8, 64), _rand(rng, 64, scale=0.5)
    got = losses.dino_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(c), 0.1, 0.04)
    want = dino_reference(s.astype(np.float64), t.astype(np.float64), c.astype(np.float64),
                          0.1, 0.04)
    assert _rel(got, want) <= RTOL


def test_dino_hand_computed_2x2():
    ln3 = math.log(3.0)
    s = jnp.array([[0.0, 0.0], [ln3, 0.0]])
    t = jnp.array([[ln3, 0.0], [0.0, 0.0]])
    c = jnp.array([ln3, 0.0])
    # Row 1: uniform target, uniform student -> ln 2. Row 2: target (1/4, 3/4), student (3/4, 1/4).
    row2 = -(0.25 * math.log(0.75) + 0.75 * math.log(0.25))
    np.testing.assert_allclose(losses.dino_loss(s, t, c, 1.0, 1.0), (math.log(2) + row2) / 2,
                               rtol=1e-6)


def test_patch_loss_matches_reference():
    rng = np.random.default_rng(3)
    s, t = _rand(rng, 4, 10, 32), _rand(rng, 4, 10, 32)
    c = _rand(rng, 32, scale=0.5)
    w = (rng.random((4, 10)) < 0.4).astype(np.float32)
    w[2] = 0.0  # an image with no loss positions contributes 0 (mask sum clamped at 1)
    got = losses.patch_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(c), jnp.asarray(w),
                            0.1, 0.07)
    want = ibot_patch_reference(*(x.astype(np.float64) for x in (s, t, c, w)), 0.1, 0.07)
    assert _rel(got, want) <= RTOL


def test_patch_loss_hand_computed_2x2():
    s = jnp.zeros((2, 2, 2))
    t = jnp.zeros((2, 2, 2)).at[0, 0].set(jnp.array([0.0, math.log(3.0)]))
    w = jnp.array([[1.0, 0.0], [0.0, 0.0]])
    # Only token (0, 0) counts: target (1/4, 3/4) vs a uniform student -> ln 2; image 1 -> 0.
    np.testing.assert_allclose(losses.patch_loss(s, t, jnp.zeros(2), w, 1.0, 1.0),
                               math.log(2) / 2, rtol=1e-6)


def test_teacher_side_gets_no_gradient():
    rng = np.random.default_rng(4)
    s, t, c = (jnp.asarray(_rand(rng, 3, 5, 16)) for _ in range(3))
    w = jnp.ones((3, 5))
    g_t, g_c = jax.grad(lambda t, c: losses.patch_loss(s, t, c[0, 0], w, 0.1, 0.04),
                        argnums=(0, 1))(t, c)
    assert not np.any(g_t) and not np.any(g_c)
    g_t = jax.grad(lambda t: losses.dino_loss(s[:, 0], t, c[0, 0], 0.1, 0.04))(t[:, 0])
    assert not np.any(g_t)
    g_s = jax.grad(lambda s: losses.dino_loss(s, t[:, 0], c[0, 0], 0.1, 0.04))(s[:, 0])
    assert np.abs(np.asarray(g_s)).max() > 0


def test_update_center():
    center = jnp.array([0.0, 1.0])
    teacher = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(losses.update_center(center, teacher, 0.9),
                               [0.1 * 2.0, 0.9 + 0.1 * 3.0], rtol=1e-6)
    rng = np.random.default_rng(5)
    patch = _rand(rng, 4, 6, 8)
    c = _rand(rng, 8)
    got = losses.update_center(jnp.asarray(c), jnp.asarray(patch), 0.9)
    want = c * 0.9 + patch.astype(np.float64).mean((0, 1)) * 0.1  # iBOT: mean over tokens, images
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("loss", ["clip", "dino", "patch"])
def test_bfloat16_inputs_compute_in_float32(loss):
    rng = np.random.default_rng(6)
    s, t = _rand(rng, 4, 3, 8), _rand(rng, 4, 3, 8)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    f32 = lambda x: jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)
    fn = {"clip": lambda a, b: losses.clip_loss(a[:, 0], b[:, 0], 10.0),
          "dino": lambda a, b: losses.dino_loss(a[:, 0], b[:, 0], jnp.zeros(8), 0.1, 0.04),
          "patch": lambda a, b: losses.patch_loss(a, b, jnp.zeros(8), jnp.ones((4, 3)), 0.1, 0.04)}
    got = fn[loss](bf(s), bf(t))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, fn[loss](f32(s), f32(t)), rtol=1e-6)


def soft_clip_reference(img, txt, scale, labels):
    """MedCLIP-style soft targets: a report is a positive of every image with its label set;
    cross-entropy against the row-normalised (image->text) and column-normalised (text->image)
    target matrix, float64, written loop by loop."""
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    logits = (scale * img @ txt.T).astype(np.float64)
    n = len(img)
    same = np.array([[float(np.array_equal(labels[i], labels[j])) for j in range(n)]
                     for i in range(n)])
    i2t = [-sum(same[i, j] / same[i].sum() * _log_softmax(logits[i])[j] for j in range(n))
           for i in range(n)]
    t2i = [-sum(same[i, j] / same[:, j].sum() * _log_softmax(logits[:, j])[i] for i in range(n))
           for j in range(n)]
    return (np.mean(i2t) + np.mean(t2i)) / 2


@pytest.mark.parametrize("seed", range(3))
def test_soft_clip_matches_reference(seed):
    rng = np.random.default_rng(seed)
    img, txt = _rand(rng, 12, 8), _rand(rng, 12, 8)
    labels = rng.integers(0, 2, (12, 2)).astype(np.float32)  # 4 label sets: many shared
    targets = losses.same_findings_targets(jnp.asarray(labels))
    got = losses.clip_loss_soft(jnp.asarray(img), jnp.asarray(txt), 14.3, targets)
    assert _rel(got, soft_clip_reference(img, txt, 14.3, labels)) < RTOL


def test_soft_clip_with_distinct_labels_is_clip():
    rng = np.random.default_rng(3)
    img, txt = _rand(rng, 6, 5), _rand(rng, 6, 5)
    labels = np.array([[int(b) for b in f"{i:03b}"] for i in range(6)], np.float32)
    targets = losses.same_findings_targets(jnp.asarray(labels))
    np.testing.assert_array_equal(np.asarray(targets), np.eye(6))
    got = losses.clip_loss_soft(jnp.asarray(img), jnp.asarray(txt), 10.0, targets)
    assert _rel(got, clip_reference(img, txt, 10.0)) < RTOL
