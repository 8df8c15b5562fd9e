"""EMA update, schedules against closed forms, and the optimiser's decay and freezing masks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import pretrain
from unimedi_jax.models import bert, heads
from unimedi_jax.models import vit as vit_lib
from unimedi_jax.objective import optim, schedules
from unimedi_jax.objective.ema import ema_update

# XLA backend optimisation level 0: the same computations, compiled faster (test time budget).
FAST = {"xla_backend_optimization_level": 0}
TEXT = bert.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=24, max_position_embeddings=16)


def _init(rng):
    """A full UniMedI parameter dict of tiny modules (DINO gain learnable: all leaf kinds)."""
    vit = vit_lib.ViT(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=8,
                      patch_size_3d=(2, 8, 8), image_size=16, volume_size=(4, 16, 16))
    r = jax.random.split(rng, 5)
    ids = jnp.zeros((1, 4), jnp.int32)
    return {
        "vision": vit.init(r[0], volume=jnp.zeros((1, 4, 16, 16)),
                           images=jnp.zeros((1, 1, 16, 16)))["params"],
        "text": bert.BertModel(TEXT).init(r[1], ids, ids)["params"],
        "img_proj": heads.Projection(8).init(r[2], jnp.zeros((1, 16)))["params"],
        "txt_proj": heads.Projection(8).init(r[3], jnp.zeros((1, 16)))["params"],
        "dino_head": heads.DINOHead(12, 8, 4, norm_last_layer=False).init(
            r[4], jnp.zeros((1, 16)))["params"],
        "logit_scale": jnp.asarray(math.log(1 / 0.07)),
    }


@pytest.fixture(scope="module")
def params():
    return jax.jit(_init, compiler_options=FAST)(jax.random.key(0))


def _config(**optim):
    c = pretrain.get_config()
    c.total_steps = 100
    c.optim.update(warmup_steps=10, **optim)
    return c


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


# ---------------- EMA ----------------

def test_ema_endpoints_and_mix(params):
    teacher = {"vision": params["vision"], "dino_head": params["dino_head"]}
    student = jax.jit(lambda p: jax.tree.map(lambda x: x + 1.0, p))(params)
    ema = jax.jit(ema_update)
    same = ema(teacher, student, 1.0)
    assert set(same) == {"vision", "dino_head"}
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(teacher)):
        np.testing.assert_array_equal(a, b)
    copied = ema(teacher, student, 0.0)
    for a, b in zip(jax.tree.leaves(copied), jax.tree.leaves({k: student[k] for k in teacher})):
        np.testing.assert_array_equal(a, b)
    mixed = ema(teacher, student, 0.75)
    for a, b in zip(jax.tree.leaves(mixed), jax.tree.leaves(teacher)):
        np.testing.assert_allclose(a, np.asarray(b) + 0.25, rtol=1e-6, atol=1e-6)
    with pytest.raises(KeyError, match="dino_head"):
        ema_update(teacher, {"vision": params["vision"]}, 0.5)


# ---------------- schedules ----------------

def test_teacher_temp_warmup():
    f = lambda s: float(schedules.teacher_temp(s, 0.04, 0.07, 30))
    assert f(0) == pytest.approx(0.04)
    assert f(15) == pytest.approx(0.055)
    assert f(30) == pytest.approx(0.07) and f(1000) == pytest.approx(0.07)


def test_ema_momentum_is_dino_cosine():
    total, base, final = 50, 0.996, 1.0
    # DINO utils.cosine_scheduler(base, final, epochs, niter_per_ep) without warm-up.
    iters = np.arange(total)
    dino = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    got = jax.vmap(lambda s: schedules.ema_momentum(s, total, base, final))(jnp.asarray(iters))
    np.testing.assert_allclose(got, dino, rtol=1e-7)
    assert float(schedules.ema_momentum(total, total, base, final)) == pytest.approx(final)


def test_learning_rate_closed_form():
    cfg = _config(lr=2e-4, warmup_init_lr=1e-8, end_lr=1e-6)
    sched = schedules.learning_rate(cfg.optim, cfg.total_steps)
    w, t = 10, 100
    for s in (0, 3, 10, 40, 77, 100):
        if s < w:
            want = 1e-8 + (2e-4 - 1e-8) * s / w
        else:
            want = 1e-6 + (2e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (s - w) / (t - w)))
        # optax computes in float32 as end + (start - end) * frac: error ~ 1e-7 of the peak.
        assert float(sched(s)) == pytest.approx(want, rel=1e-5, abs=1e-6 * 2e-4)
    with pytest.raises(ValueError, match="warmup_steps"):
        schedules.learning_rate(_config().optim, 5)


# ---------------- optimiser ----------------

def test_weight_decay_mask_is_exactly_the_kernels(params):
    # Intended: decay every weight matrix (Dense/conv "kernel", incl. the DINO last layer) and
    # nothing else: no biases, norms, embeddings, position tables, CLS/mask tokens, modality
    # embedding, DINO gain, logit scale.
    flat_mask = _flat(optim.decay_mask(params))
    names = {k.split("/")[-1] for k in flat_mask}
    assert {"pos_embed_2d", "pos_embed_3d", "cls_token", "mask_token", "modality_embed",
            "embedding", "scale", "bias", "kernel", "logit_scale"} <= names
    for path, decay in flat_mask.items():
        assert decay == (path.split("/")[-1] == "kernel"), path


@pytest.mark.parametrize("n, trained", [(1, {"layer_2"}), (2, {"layer_1", "layer_2"}),
                                        (0, set()),
                                        (-1, {"layer_0", "layer_1", "layer_2", "embeddings"})])
def test_trainable_text_layers(params, n, trained):
    c = _config()
    c.model.text.trainable_layers = n
    mask = optim.trainable_mask(params, c)
    for key, sub in mask["text"].items():
        assert set(jax.tree.leaves(sub)) == {key in trained}, key
    for key in ("vision", "img_proj", "txt_proj", "dino_head"):
        assert all(jax.tree.leaves(mask[key]))
    assert mask["logit_scale"] is True


def test_trainable_mask_errors_and_fixed_temperature(params):
    c = _config()
    c.model.text.trainable_layers = 4
    with pytest.raises(ValueError, match="trainable_layers"):
        optim.trainable_mask(params, c)
    c = _config()
    c.objective.clip.learnable = False
    assert optim.trainable_mask(params, c)["logit_scale"] is False


def test_optimizer_decays_and_freezes_the_intended_leaves(params):
    # lr 0.1 from step 0; zero gradients make Adam's step 0, leaving only the decoupled decay
    # p <- p - lr * wd * p on the decayed, trainable leaves.
    c = _config(lr=0.1, warmup_init_lr=0.1, weight_decay=0.05)
    tx = optim.make_optimizer(c)
    update = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0], compiler_options=FAST)
    updates = update(jax.tree.map(jnp.zeros_like, params), params)
    decay = _flat(optim.decay_mask(params))
    train = _flat(optim.trainable_mask(params, c))
    for path, u in _flat(updates).items():
        p = _flat(params)[path]
        want = -0.1 * 0.05 * np.asarray(p) if decay[path] and train[path] else np.zeros_like(p)
        np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-12, err_msg=path)
    # With gradients, frozen leaves still get exactly zero updates and trainable ones move.
    updates = update(jax.tree.map(jnp.ones_like, params), params)
    for path, u in _flat(updates).items():
        assert bool(np.any(np.asarray(u) != 0)) == train[path], path


def test_per_parameter_clip_matches_dino_formula():
    """DINO's clip_gradients: each leaf scaled by min(1, clip / (||g|| + 1e-6)) on its own."""
    from unimedi_jax.objective.optim import clip_per_parameter
    rng = np.random.default_rng(0)
    grads = {"big": rng.normal(size=(4, 5)) * 10, "small": rng.normal(size=(3,)) * 0.01}
    got, _ = clip_per_parameter(3.0).update(
        jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads), None)
    for key, g in grads.items():
        coef = 3.0 / (np.linalg.norm(g) + 1e-6)
        np.testing.assert_allclose(got[key], g * min(coef, 1.0), rtol=1e-5)
    assert np.linalg.norm(got["big"]) == pytest.approx(3.0, rel=1e-5)
