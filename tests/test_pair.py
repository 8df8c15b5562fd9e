"""The DRR bridge (objective/pair.py, DESIGN §4.7): the in-step DRR, the pair losses, the step."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.special

from benchmarks import learning
from configs import pretrain
from test_losses import clip_reference
from test_step import B3, setup, text_folder, tiny_batch, tiny_config  # noqa: F401 (fixtures)
from unimedi_jax.objective import pair
from unimedi_jax.objective import step as step_lib
from unimedi_jax.train import validation

FAST = {"xla_backend_optimization_level": 0}


def _jit(f, **kw):
    return jax.jit(f, compiler_options=FAST, **kw)


def _drr_cfg(**overrides):
    cfg = ml_collections.ConfigDict(pretrain.get_config().objective.pair.drr.to_dict())
    cfg.update(overrides)
    return cfg


def _drr_reference(volume, cfg, size):
    """The DRR model input, written out in float64: HU, mu, ray sums, linear resize, window."""
    hu = np.asarray(volume, np.float64) * 1000.0
    mu = np.maximum(cfg.mu_water * (1.0 + hu / 1000.0), 0.0)
    axis = {"ap": 2, "pa": 2, "lateral": 3}[cfg.projection]
    n = mu.shape[axis]
    att = mu.sum(axis=axis) * (cfg.ray_length_mm / n)  # (B, D, W) or (B, D, H)

    def weights(n_in):  # triangle kernel, half-pixel centres, antialiased when shrinking
        scale = size / n_in
        centres = (np.arange(size) + 0.5) / scale - 0.5
        w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None] - centres[:, None])
                       * min(scale, 1.0))
        return w / w.sum(1, keepdims=True)

    rows, cols = weights(att.shape[1]), weights(att.shape[2])
    shown = np.einsum("sd,bdw,tw->bst", rows, att / cfg.window, cols)
    return (np.clip(shown, 0.0, 1.0) - 0.5) / 0.5


@pytest.mark.parametrize("projection, shape, size", [
    ("ap", (2, 8, 16, 12), 16), ("pa", (2, 8, 16, 12), 6), ("lateral", (3, 6, 10, 14), 8)])
def test_drr_inputs_match_float64_twin_and_gradient_is_finite(projection, shape, size):
    cfg = _drr_cfg(projection=projection)
    rng = np.random.default_rng(len(projection))
    volume = rng.uniform(-1.0, 0.3, shape)  # lung to soft tissue: below the white window
    volume[0, :, :, :2] = 1.0  # a dense strip whose rays saturate (clipped at white)
    twin = pair.drr_inputs(volume, cfg, size, xp=np)
    assert twin.dtype == np.float64 and twin.shape == (shape[0], size, size)
    np.testing.assert_allclose(twin, _drr_reference(volume, cfg, size), rtol=1e-12, atol=1e-12)
    f = _jit(lambda v: pair.drr_inputs(v, cfg, size))
    got = np.asarray(f(jnp.asarray(volume, jnp.float32)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, twin, rtol=0, atol=1e-5)
    assert -1.0 < twin[1:].mean() < 1.0 and twin.max() == 1.0  # both in-window and saturated
    grad = np.asarray(_jit(jax.grad(lambda v: pair.drr_inputs(v, cfg, size).sum()))(
        jnp.asarray(volume, jnp.float32)))
    assert grad.shape == shape and np.isfinite(grad).all() and np.abs(grad).max() > 0


def test_drr_views_put_a_marker_where_its_rays_run():
    """A dense column at (d, w) crossing every H lights pixel (d, w) of an AP DRR and spreads
    along W in no other pixel; the lateral view sees the same column as one bright row."""
    volume = np.full((1, 4, 6, 5), -1.0)  # air
    volume[0, 1, :, 3] = 0.0  # water along the whole AP ray at (d=1, w=3)
    cfg = _drr_cfg(ray_length_mm=240.0)
    ap = pair.drr_inputs(volume, cfg, 4, xp=np)[0]  # D = 4 rows, W = 5 -> 4 columns
    assert ap.argmax() // 4 == 1 and ap[[0, 2, 3]].max() == -1.0
    lateral = pair.drr_inputs(volume, _drr_cfg(projection="lateral", ray_length_mm=240.0), 4,
                              xp=np)[0]
    assert lateral[1].min() > -1.0 and lateral[[0, 2, 3]].max() == -1.0


def _softmax(x):
    return scipy.special.softmax(x, axis=-1)


def _unimiss_reference(s, t, center, ts, tt):
    q = _softmax((t - center) / tt)
    return float(np.mean(-np.sum(q * np.log(_softmax(s / ts)), axis=-1)))


def _infonce_reference(a, b, temperature):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = a @ b.T / temperature
    n = len(a)
    ce = lambda m: -np.log(_softmax(m)[np.arange(n), np.arange(n)]).mean()
    return float((ce(logits) + ce(logits.T)) / 2)


def test_pair_losses_match_float64_transcriptions():
    rng = np.random.default_rng(3)
    s, t, c = rng.normal(size=(5, 32)), 3 * rng.normal(size=(5, 32)), rng.normal(size=32)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    got = float(pair.unimiss_loss(f32(s), f32(t), f32(c), 0.1, 0.04))
    assert got == pytest.approx(_unimiss_reference(s, t, c, 0.1, 0.04), rel=1e-5)
    z_ct, z_drr = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    got = float(pair.infonce_loss(f32(z_ct), f32(z_drr), 0.1))
    assert got == pytest.approx(_infonce_reference(z_ct, z_drr, 0.1), rel=1e-5)
    aligned = float(pair.infonce_loss(f32(z_ct), f32(z_ct), 0.1))
    assert aligned < got  # each CT nearest its own DRR: lower loss


def _pair_step(setup, batch=None, **objective):
    """pretrain_step's outputs at the setup's initial state; objective: `section__key` values as
    tiny_config, `pair__...` entries set objective.pair."""
    config, s, state = setup
    cfg = tiny_config(config.model.text.checkpoint,
                      **{k: v for k, v in objective.items() if not k.startswith("pair__")})
    for key, value in objective.items():
        if key.startswith("pair__"):
            cfg.objective.pair[key[len("pair__"):]] = value
    f = _jit(lambda p, t, c, b, r: step_lib.pretrain_step(p, t, c, b, r, 0, model=s.model,
                                                          config=cfg))
    return cfg, f(state["params"], state["teacher"], state["centers"],
                  tiny_batch() if batch is None else batch, jax.random.key(2))


@pytest.mark.parametrize("joint", [True, False])
def test_pair_off_leaves_the_step_bit_for_bit(setup, joint):
    """pair.enabled=False (whatever its other values) traces to the program of a config without
    the block (saved before it): the same jaxpr, hence the same loss, gradients, metrics and
    centres to the bit on any input. Enabling it changes the program."""
    config, s, state = setup
    args = (state["params"], state["teacher"], state["centers"], tiny_batch(), jax.random.key(2))
    jaxpr = lambda cfg: str(jax.make_jaxpr(
        lambda *a: step_lib.pretrain_step(*a, 0, model=s.model, config=cfg))(*args))
    make = lambda: tiny_config(config.model.text.checkpoint, clip__joint=joint)
    legacy = make()
    del legacy.objective["pair"]
    del legacy.objective.clip["weight"]
    off = make()
    off.objective.pair.update(enabled=False, weight=5.0, loss="infonce", clip=True)
    on = make()
    on.objective.pair.enabled = True
    want = jaxpr(legacy)
    assert jaxpr(off) == want
    if joint:  # (one check that the comparison sees a change is enough)
        assert jaxpr(on) != want


def _embeddings(s, p, batch, drr):
    model = s.model
    image = lambda **x: model.encode_image(p, **x)[0]
    text = lambda k: model.project_text(p, model.encode_text(p, batch[k]["input_ids"],
                                                            batch[k]["attention_mask"]))
    cls_x, cls_c, cls_d = (image(images=batch["xray"]["image"][:, None]),
                           image(volume=batch["ct"]["volume"]), image(images=drr[:, None]))
    return tuple(model.project_image(p, c) for c in (cls_x, cls_c, cls_d)) + (
        text("xray"), text("ct"), cls_c, cls_d)


def test_infonce_pair_and_drr_clip_in_the_step(setup):
    """sd off, volumes alone, clip per modality: loss_pair = InfoNCE(z_ct, z_drr) and L_vl the
    mean of the X-ray, CT and DRR matrices, all against float64 transcriptions of embeddings
    computed apart."""
    config, s, state = setup
    objective = dict(sd__enabled=False, selection__mode="none", clip__joint=False,
                     pair__enabled=True, pair__loss="infonce", pair__clip=True, pair__weight=0.5)
    cfg, (loss, _, m, _) = _pair_step(setup, **objective)
    batch = tiny_batch()
    drr = pair.drr_inputs(jnp.asarray(batch["ct"]["volume"]), cfg.objective.pair.drr, 16)
    zx, zc, zd, tx, tc, _, _ = (np.asarray(z, np.float64)
                                for z in _jit(lambda p: _embeddings(s, p, batch, drr))(
                                    state["params"]))
    scale = math.exp(float(state["params"]["logit_scale"]))
    assert float(m["loss_pair"]) == pytest.approx(_infonce_reference(zc, zd, 0.1), rel=1e-4)
    assert float(m["loss_vl_drr"]) == pytest.approx(clip_reference(zd, tc, scale), rel=1e-4)
    vl = (clip_reference(zx, tx, scale) + clip_reference(zc, tc, scale)
          + clip_reference(zd, tc, scale)) / 3
    assert float(m["loss_vl"]) == pytest.approx(vl, rel=1e-4)
    assert float(loss) == pytest.approx(vl + 0.5 * float(m["loss_pair"]), rel=1e-5)
    # Without a CT sub-batch there is nothing to pair.
    xray = {"xray": batch["xray"]}
    m_x = jax.eval_shape(lambda p: step_lib.pretrain_step(
        p, state["teacher"], state["centers"], xray, jax.random.key(2), 0, model=s.model,
        config=cfg), state["params"])[2]
    assert "loss_pair" not in m_x and "loss_vl_drr" not in m_x


def test_unimiss_pair_in_the_step(setup):
    """sd on (CT distilled): loss_pair = the DINO cross-entropy of the student's head output on
    each DRR against the teacher's on its full CT input, centred by the CT centre."""
    config, s, state = setup
    rng = np.random.default_rng(0)
    centers = jax.tree.map(lambda c: jnp.asarray(rng.normal(size=c.shape), jnp.float32),
                           state["centers"])
    cfg = tiny_config(config.model.text.checkpoint, selection__mode="none")
    cfg.objective.pair.update(enabled=True, loss="unimiss")
    batch = tiny_batch()
    _, _, m, _ = _jit(lambda c: step_lib.pretrain_step(
        state["params"], state["teacher"], c, batch, jax.random.key(2), 0, model=s.model,
        config=cfg))(centers)
    drr = pair.drr_inputs(jnp.asarray(batch["ct"]["volume"]), cfg.objective.pair.drr, 16)

    def logits(p, t):
        s_cls = s.model.encode_image(p, images=drr[:, None])[0]
        t_cls = s.model.encode_image(t, volume=batch["ct"]["volume"])[0]
        return s.model.dino(p, s_cls), s.model.dino(t, t_cls)

    s_log, t_log = (np.asarray(x, np.float64)
                    for x in _jit(logits)(state["params"], state["teacher"]))
    sd = cfg.objective.sd
    want = _unimiss_reference(s_log, t_log, np.asarray(centers["ct"]["cls"], np.float64),
                              sd.student_temp, sd.teacher_temp)
    assert float(m["loss_pair"]) == pytest.approx(want, rel=1e-4)
    assert float(m["loss"]) == pytest.approx(
        float(m["loss_vl"]) + float(m["loss_icl"]) + float(m["loss_pcl"]) + want, rel=1e-5)


def _planted_batch(seed=0):
    """CTs of one smooth body, each with a dense cube at its own place (the marker that its DRR
    shows too); the reports and X-rays of tiny_batch."""
    batch = tiny_batch(seed)
    rng = np.random.default_rng(seed)
    body = np.full((8, 16, 16), -0.6) + 0.05 * rng.normal(size=(8, 16, 16))
    volumes = np.repeat(body[None], B3, axis=0)
    for i, (d, w, size) in enumerate([(1, 2, 2), (3, 7, 5)][:B3]):  # its place and size
        volumes[i, d:d + size, 4:12, w:w + size] = 0.6
    batch["ct"]["volume"] = volumes.astype(np.float32)
    return batch


@pytest.mark.parametrize("loss", ["infonce", "unimiss"])
def test_pair_loss_falls_on_planted_pairs(setup, loss):
    """Pair loss alone (L_vl weight 0, no self-distillation; "unimiss" then runs its own teacher
    pass on the CT) on CTs whose DRRs share their marker."""
    config, s, state = setup
    cfg = tiny_config(config.model.text.checkpoint, sd__enabled=False, selection__mode="none",
                      clip__weight=0.0)
    cfg.objective.pair.update(enabled=True, loss=loss)
    train_step = _jit(step_lib.make_train_step(s.model, cfg, s.optimizer))
    batch, values = _planted_batch(), []
    for _ in range(8):
        state, m = train_step(state, batch, jax.random.key(1))
        values.append(float(m["loss_pair"]))
    assert all(np.isfinite(values)) and values[-1] < 0.8 * values[0], values


def test_bad_pair_values_name_their_key(setup):
    config, s, state = setup
    for key, value in (("loss", "mse"), ("drr.projection", "oblique"), ("weight", -1.0),
                       ("clip", "yes"), ("drr.window", 0.0), ("temperature", -0.1)):
        cfg = pretrain.get_config("test")
        block = cfg.objective.pair.to_dict()
        section, _, leaf = key.rpartition(".")
        (block[section] if section else block)[leaf] = value
        cfg.objective.pair = ml_collections.ConfigDict(block)
        with pytest.raises(validation.ConfigError, match=f"objective.pair.{key}="):
            validation.validate_pretrain_config(cfg)
    cfg = pretrain.get_config("test")
    cfg.objective.clip.weight = -0.5
    with pytest.raises(validation.ConfigError, match="objective.clip.weight"):
        validation.validate_pretrain_config(cfg)
    with pytest.raises(ValueError, match="objective.pair.loss"):
        _pair_step(setup, pair__enabled=True, pair__loss="mse")


def test_learning_ladder_pair_arms():
    base = pretrain.get_config("test")
    base.objective.pair.enabled = True  # the arms decide, whatever the base says
    arms = {a: learning.arm_config(base, a, 0).objective
            for a in ("unimedi", "unimedi_pair", "pair_only")}
    assert not arms["unimedi"].pair.enabled and arms["unimedi"].clip.weight == 1.0
    assert arms["unimedi_pair"].pair.enabled and arms["unimedi_pair"].clip.weight == 1.0
    assert arms["pair_only"].pair.enabled and arms["pair_only"].clip.weight == 0.0
    for obj in arms.values():
        assert obj.sd.enabled and obj.selection.mode == "attentive"
    assert learning.resolve_arms(["vl_sd_attn", "unimedi_pair", "pair_only"]) == [
        "unimedi", "unimedi_pair", "pair_only"]
