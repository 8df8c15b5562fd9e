"""The UniMedI model container, heads and the full pretraining step on a tiny model.

Compiled functions use XLA backend optimisation level 0 (`_jit`): the same computation,
compiled several times faster, which keeps this file within the test time budget.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import traverse_util

from configs import pretrain
from test_losses import clip_reference
from unimedi_jax.models import bert, heads
from unimedi_jax.models.unimedi import UniMedI, teacher_params
from unimedi_jax.objective import schedules
from unimedi_jax.objective import step as step_lib

B2, B3, T = 3, 2, 8  # X-rays, CT volumes, report tokens
TEXT = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=16)
FAST = {"xla_backend_optimization_level": 0}


def _jit(f, **kw):
    return jax.jit(f, compiler_options=FAST, **kw)


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_bert")
    ids = jnp.zeros((1, 4), jnp.int32)
    params = _jit(bert.BertModel(TEXT).init)(jax.random.key(7), ids, ids)["params"]
    bert.save_pretrained(params, TEXT, folder)
    return str(folder)


def tiny_config(text_folder, **objective):
    c = pretrain.get_config()
    c.model.vit.update(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8,
                       patch_size_3d=(2, 8, 8), image_size=16, volume_size=(8, 16, 16))
    c.model.text.update(checkpoint=text_folder, num_layers=0, trainable_layers=1, max_length=T)
    c.model.proj_dim = 16
    c.model.dino.update(hidden_dim=32, bottleneck_dim=16, out_dim=64)
    c.objective.selection.k = 2
    # One joint CLIP matrix over the 3 + 2 samples (the per-modality matrices of the default
    # hold 3 and 2, too few for a loss signal on one fixed batch); `clip__joint=False` is
    # checked in test_without_self_distillation_only_clip_remains.
    c.objective.clip.joint = True
    c.objective.sd.modalities = ("xray", "ct")  # the paper's: both distilled
    for path, value in objective.items():
        section, key = path.split("__")
        c.objective[section][key] = value
    c.total_steps, c.optim.warmup_steps = 20, 2
    c.on_nonfinite = "skip"
    return c


def tiny_batch(seed=0):
    rng = np.random.default_rng(seed)
    text = lambda b: dict(input_ids=rng.integers(0, TEXT.vocab_size, (b, T)).astype(np.int32),
                          attention_mask=np.ones((b, T), np.int32))
    return {"xray": dict(image=rng.normal(size=(B2, 16, 16)).astype(np.float32), **text(B2)),
            "ct": dict(volume=rng.normal(size=(B3, 8, 16, 16)).astype(np.float32), **text(B3))}


@pytest.fixture(scope="module")
def setup(text_folder):
    config = tiny_config(text_folder)
    s = step_lib.make_setup(config)
    state = _jit(s.init)(jax.random.key(0), s.text_params)
    return config, s, state


@pytest.fixture(scope="module")
def run(setup):
    """Ten steps of the jitted train step on one fixed batch."""
    config, s, state0 = setup
    train_step = _jit(s.train_step)
    batch, rng = tiny_batch(), jax.random.key(1)
    states, metrics = [state0], []
    for _ in range(10):
        state, m = train_step(states[-1], batch, rng)
        states.append(state)
        metrics.append(jax.device_get(m))
    return train_step, states, metrics


# ---------------- heads and model container ----------------

def _gelu(x):
    return 0.5 * x * (1 + scipy.special.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_matches_numpy(norm_last_layer):
    head = heads.DINOHead(out_dim=40, hidden_dim=24, bottleneck_dim=8,
                          norm_last_layer=norm_last_layer)
    x = jax.random.normal(jax.random.key(0), (5, 3, 12))
    p = head.init(jax.random.key(1), x)["params"]
    assert ("scale" in p["last_layer"]) == (not norm_last_layer)
    if not norm_last_layer:  # a gain away from 1, so the test sees it
        p["last_layer"]["scale"] = jnp.linspace(0.5, 2.0, 40)
    q = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    h = np.asarray(x, np.float64)
    for i in range(2):
        h = _gelu(h @ q[f"mlp_{i}"]["kernel"] + q[f"mlp_{i}"]["bias"])
    z = h @ q["mlp_2"]["kernel"] + q["mlp_2"]["bias"]
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    v = q["last_layer"]["kernel"]
    w = v / np.linalg.norm(v, axis=0, keepdims=True) * q["last_layer"].get("scale", 1.0)
    np.testing.assert_allclose(head.apply({"params": p}, x), z @ w, rtol=1e-5, atol=1e-6)
    assert p["last_layer"]["kernel"].shape == (8, 40)


def test_projection_is_linear_without_bias():
    proj = heads.Projection(6)
    x = jax.random.normal(jax.random.key(0), (4, 10))
    p = proj.init(jax.random.key(1), x)["params"]
    assert set(_flat(p)) == {"proj/kernel"}
    np.testing.assert_allclose(proj.apply({"params": p}, x), x @ p["proj"]["kernel"], rtol=1e-6)


def test_model_params_and_teacher_view(setup, text_folder):
    config, s, state = setup
    params = state["params"]
    assert set(params) == {"vision", "text", "img_proj", "txt_proj", "dino_head", "logit_scale"}
    np.testing.assert_allclose(params["logit_scale"], math.log(1 / 0.07), rtol=1e-6)
    _, ckpt = bert.from_pretrained(text_folder)
    for a, b in zip(jax.tree.leaves(params["text"]), jax.tree.leaves(ckpt)):
        np.testing.assert_array_equal(a, b)
    assert set(teacher_params(params)) == {"vision", "dino_head"}
    assert set(state["teacher"]) == {"vision", "dino_head"}
    for a, b in zip(jax.tree.leaves(state["teacher"]), jax.tree.leaves(teacher_params(params))):
        np.testing.assert_array_equal(a, b)
    assert {k: v.shape for k, v in _flat(state["centers"]).items()} == {
        f"{m}/{c}": (64,) for m in ("xray", "ct") for c in ("cls", "patch")}
    assert int(state["step"]) == 0
    bad = tiny_config(text_folder)
    bad.model.text.num_layers = 3
    with pytest.raises(ValueError, match="model.text.num_layers"):
        UniMedI.from_config(bad)


# ---------------- the step ----------------

def test_gradients_cover_the_student_only(setup):
    config, s, state = setup
    shapes = jax.eval_shape(
        lambda p, t, c, b, r: step_lib.pretrain_step(p, t, c, b, r, 0, model=s.model,
                                                     config=config),
        state["params"], state["teacher"], state["centers"], tiny_batch(), jax.random.key(0))
    _, grads, metrics, centers = shapes
    assert jax.tree.structure(grads) == jax.tree.structure(state["params"])
    assert set(grads) == set(state["params"])  # no teacher entry: it is not differentiated
    assert metrics["slice_indices"].shape == (B3, 2)
    assert {"loss", "loss_vl", "loss_icl", "loss_pcl", "logit_scale", "teacher_patch_temp",
            "attn_entropy_xray", "attn_entropy_ct"} <= set(metrics)


def test_compiles_once_and_ten_steps_lower_the_loss(run):
    train_step, states, metrics = run
    assert train_step._cache_size() == 1  # ten calls, one compilation
    losses_ = [float(m["loss"]) for m in metrics]
    assert all(np.isfinite(losses_)) and all(bool(m["finite"]) for m in metrics)
    assert losses_[-1] < 0.8 * losses_[0], losses_
    assert [int(s["step"]) for s in states] == list(range(11))


def test_update_moves_student_ema_teacher_and_centres(setup, run):
    config, s, state0 = setup
    _, states, metrics = run
    p0, p10 = _flat(state0["params"]), _flat(states[-1]["params"])
    # Frozen text parts (embeddings, layer_0 of 2 with trainable_layers=1) stay put, and so
    # does the mask token, unused in the `drop` style (no gradient, no weight decay).
    for path in p0:
        moved = not np.array_equal(p0[path], p10[path])
        frozen = path.startswith(("text/embeddings", "text/layer_0")) or path == "vision/mask_token"
        assert moved != frozen, path
    m = float(schedules.ema_momentum(0, config.total_steps, 0.996, 1.0))
    assert float(metrics[0]["ema_momentum"]) == pytest.approx(m)
    want = jax.tree.map(lambda t, p: m * t + (1 - m) * p, state0["teacher"],
                        teacher_params(states[1]["params"]))
    for a, b in zip(jax.tree.leaves(states[1]["teacher"]), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert np.abs(np.asarray(states[1]["centers"]["ct"]["patch"])).max() > 0
    # Shared centres (the default): every modality's centre follows the whole batch.
    for a, b in zip(jax.tree.leaves(states[1]["centers"]["xray"]),
                    jax.tree.leaves(states[1]["centers"]["ct"])):
        np.testing.assert_array_equal(a, b)


def test_nonfinite_step_is_skipped(setup, run):
    train_step, states, _ = run
    batch = tiny_batch()
    batch["ct"]["volume"][0, 0, 0, 0] = np.nan
    new, m = train_step(states[-1], batch, jax.random.key(1))
    assert not bool(m["finite"]) and int(new["step"]) == int(states[-1]["step"]) + 1
    for key in ("params", "teacher", "opt_state", "centers"):
        for a, b in zip(jax.tree.leaves(new[key]), jax.tree.leaves(states[-1][key])):
            np.testing.assert_array_equal(a, b)
    assert train_step._cache_size() == 1
    # The next update applies (and logs) the rate of the 10 updates applied so far, not of the
    # step counter (11 after the skipped one).
    config = setup[0]
    _, m2 = train_step(new, tiny_batch(), jax.random.key(1))
    schedule = schedules.learning_rate(config.optim, config.total_steps)
    assert float(m2["lr"]) == pytest.approx(float(schedule(10)), rel=1e-6)
    assert float(schedule(10)) != pytest.approx(float(schedule(11)), rel=1e-3)


# ---------------- ablation switches ----------------

def _teacher_attention(model, teacher, **inputs):
    return _jit(lambda t: model.encode_image(t, **inputs)[1]["cls_attn"])(teacher)


@pytest.mark.parametrize("mode", ["attentive", "random", "none"])
def test_selection_modes(setup, mode):
    config, s, state = setup
    sel = tiny_config(config.model.text.checkpoint, selection__mode=mode).objective.selection
    ct = tiny_batch()["ct"]
    f = _jit(lambda t, r: step_lib._vision_inputs(s.model, t, ct, "ct", sel, r))
    (inputs, idx), (_, idx2) = f(state["teacher"], jax.random.key(0)), \
        f(state["teacher"], jax.random.key(5))
    if mode == "none":
        assert set(inputs) == {"volume"} and idx is None
        return
    assert inputs["images"].shape == (B3, 2, 16, 16)
    attn = np.asarray(_teacher_attention(s.model, state["teacher"], volume=ct["volume"]))
    slab_scores = attn.reshape(B3, 4, -1).mean(-1)  # grid (4, 2, 2)
    attentive = np.argsort(-slab_scores, axis=1)[:, :2]
    if mode == "attentive":
        np.testing.assert_array_equal(idx, attentive)
        np.testing.assert_array_equal(idx, idx2)  # deterministic
    else:
        assert not np.array_equal(idx, idx2)  # the key decides
        draws = [np.asarray(f(state["teacher"], jax.random.key(i))[1]) for i in range(6)]
        assert any(not np.array_equal(d, attentive) for d in draws)
    np.testing.assert_array_equal(
        inputs["images"][1, 0], ct["volume"][1, int(idx[1, 0]) * 2 + 1])  # centre slice


@pytest.mark.parametrize("mode, style", [("attentive", "drop"), ("random", "drop"),
                                         ("attentive", "mask_token")])
def test_masking_modes_and_styles(setup, mode, style):
    config, s, state = setup
    mask_cfg = tiny_config(config.model.text.checkpoint, masking__mode=mode,
                           masking__style=style).objective.masking
    images = tiny_batch()["xray"]["image"][:, None]
    f = _jit(lambda t, r: step_lib._distill_targets(s.model, t, {"images": images}, mask_cfg, r))
    out = f(state["teacher"], jax.random.key(3))
    attn = np.asarray(_teacher_attention(s.model, state["teacher"], images=images))
    top = np.sort(np.argsort(-attn, axis=1)[:, :2], axis=1)  # 4 tokens per X-ray, keep 2
    logits = _jit(lambda t: s.model.dino(t, s.model.encode_image(t, images=images)[1]["tokens"]))(
        state["teacher"])
    if style == "drop":
        keep = np.asarray(out["student_inputs"]["keep"])
        assert keep.shape == (B2, 2) and "mask" not in out["student_inputs"]
        np.testing.assert_allclose(out["patch_target"],
                                   np.take_along_axis(np.asarray(logits), keep[..., None], 1),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out["patch_weights"], 1.0)
        if mode == "attentive":
            np.testing.assert_array_equal(keep, top)
        else:
            assert not np.array_equal(keep, top)
    else:
        mask = np.asarray(out["student_inputs"]["mask"])
        assert mask.shape == (B2, 4) and "keep" not in out["student_inputs"]
        np.testing.assert_array_equal(mask, [~np.isin(np.arange(4), t) for t in top])
        np.testing.assert_array_equal(out["patch_weights"], mask.astype(np.float32))
        np.testing.assert_allclose(out["patch_target"], logits, rtol=1e-5, atol=1e-6)


def _step_metrics(setup, **objective):
    config, s, state = setup
    cfg = tiny_config(config.model.text.checkpoint, **objective)
    f = _jit(lambda p, t, c, b, r: step_lib.pretrain_step(p, t, c, b, r, 0, model=s.model,
                                                          config=cfg))
    step_rng = jax.random.fold_in(jax.random.key(1), 0)  # what the first train step used
    return f(state["params"], state["teacher"], state["centers"], tiny_batch(), step_rng)


def test_centres_per_modality_follow_their_own_teacher_outputs(setup):
    config, s, state = setup
    _, _, _, shared = _step_metrics(setup)
    _, _, _, own = _step_metrics(setup, sd__center_per_modality=True)
    # The X-ray teacher output, computed here: the teacher's DINO head on its full-image tokens.
    model, batch, teacher = s.model, tiny_batch(), state["teacher"]
    cls, out = model.encode_image(teacher, images=jnp.asarray(batch["xray"]["image"])[:, None])
    logits = np.asarray(model.dino(teacher, jnp.concatenate([cls[:, None], out["tokens"]], 1)),
                        np.float64)
    m = config.objective.sd.center_momentum  # the centres start at zero
    np.testing.assert_allclose(own["xray"]["cls"], (1 - m) * logits[:, 0].mean(0),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(own["xray"]["patch"], (1 - m) * logits[:, 1:].mean((0, 1)),
                               rtol=1e-5, atol=1e-7)
    # The shared centre is the sample-weighted mean of the two modalities' own.
    for key in ("cls", "patch"):
        np.testing.assert_allclose(
            shared["xray"][key], (B2 * own["xray"][key] + B3 * own["ct"][key]) / (B2 + B3),
            rtol=1e-5, atol=1e-7)
        assert np.abs(np.asarray(own["xray"][key]) - np.asarray(own["ct"][key])).max() > 1e-4


def test_each_modality_is_distilled_against_its_own_centre(setup):
    """loss_icl of the pair = sample-weighted mean of the losses of each modality alone, each
    against its own centre (distinct here)."""
    config, s, state = setup
    cfg = tiny_config(config.model.text.checkpoint, sd__center_per_modality=True)
    f = _jit(lambda c, b: step_lib.pretrain_step(state["params"], state["teacher"], c, b,
                                                 jax.random.key(3), 0, model=s.model, config=cfg))
    rng = np.random.default_rng(0)
    centers = jax.tree.map(lambda c: jnp.asarray(rng.normal(size=c.shape), jnp.float32),
                           state["centers"])
    batch = tiny_batch()
    both = f(centers, batch)[2]
    alone = {k: f(centers, {k: batch[k]})[2] for k in ("xray", "ct")}
    for key in ("loss_icl", "loss_pcl"):
        want = (B2 * float(alone["xray"][key]) + B3 * float(alone["ct"][key])) / (B2 + B3)
        assert float(both[key]) == pytest.approx(want, rel=1e-5), key
    swapped = {"xray": centers["ct"], "ct": centers["xray"]}
    assert float(f(swapped, batch)[2]["loss_icl"]) != pytest.approx(float(both["loss_icl"]),
                                                                     rel=1e-3)


def test_self_distillation_of_one_modality(setup):
    """sd.modalities=("ct",): the CT part is distilled as in the pair, the X-rays enter the
    student whole (their CLIP loss is the one without self-distillation) and get no DINO loss."""
    config, s, state = setup

    def step(batch, **objective):
        cfg = tiny_config(config.model.text.checkpoint, **objective)
        return step_lib.pretrain_step(state["params"], state["teacher"], state["centers"], batch,
                                      jax.random.key(3), 0, model=s.model, config=cfg)

    batch = tiny_batch()
    ct_only = _jit(lambda b: step(b, sd__modalities=("ct",)))
    pair = ct_only(batch)
    ct_alone = _jit(lambda b: step(b))({"ct": batch["ct"]})
    for key in ("loss_icl", "loss_pcl"):
        assert float(pair[2][key]) == pytest.approx(float(ct_alone[2][key]), rel=1e-5), key
    for a, b in zip(jax.tree.leaves(pair[3]), jax.tree.leaves(ct_alone[3])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    xray = {"xray": batch["xray"]}
    xray_alone = ct_only(xray)[2]
    assert "loss_icl" not in xray_alone and "attn_entropy_xray" not in pair[2]
    whole = _jit(lambda b: step(b, sd__enabled=False))(xray)[2]
    assert float(xray_alone["loss_vl"]) == pytest.approx(float(whole["loss_vl"]), rel=1e-6)
    with pytest.raises(ValueError, match="objective.sd.modalities"):
        step(batch, sd__modalities=("xray", "mri"))


def test_mask_token_style_changes_the_loss(setup, run):
    _, _, metrics = run
    loss, _, m, _ = _step_metrics(setup, masking__style="mask_token")
    assert np.isfinite(float(loss))
    assert abs(float(m["loss_pcl"]) - float(metrics[0]["loss_pcl"])) > 1e-3
    assert abs(float(m["loss_vl"]) - float(metrics[0]["loss_vl"])) > 1e-5


def test_without_self_distillation_only_clip_remains(setup, run):
    config, s, state = setup
    loss, grads, m, centers = _step_metrics(setup, sd__enabled=False, selection__mode="none")
    assert "loss_icl" not in m and "loss_pcl" not in m and "attn_entropy_ct" not in m
    assert float(loss) == float(m["loss_vl"])
    assert not np.any(np.asarray(_flat(grads)["dino_head/mlp_0/kernel"]))
    for a, b in zip(jax.tree.leaves(centers), jax.tree.leaves(state["centers"])):
        np.testing.assert_array_equal(a, b)
    # Unmasked student, volume alone: the CLIP loss from separately computed embeddings.
    batch, p, model = tiny_batch(), state["params"], s.model

    def embeddings(p):
        image = lambda **x: model.project_image(p, model.encode_image(p, **x)[0])
        zx = image(images=batch["xray"]["image"][:, None])
        zc = image(volume=batch["ct"]["volume"])
        text = lambda k: model.project_text(p, model.encode_text(
            p, batch[k]["input_ids"], batch[k]["attention_mask"]))
        return zx, zc, text("xray"), text("ct")

    zx, zc, tx, tc = (np.asarray(z, np.float64) for z in _jit(embeddings)(p))
    scale = math.exp(float(p["logit_scale"]))
    want = clip_reference(np.concatenate([zx, zc]), np.concatenate([tx, tc]), scale)
    assert float(m["loss_vl"]) == pytest.approx(want, rel=1e-4)
    _, _, m_sep, _ = _step_metrics(setup, sd__enabled=False, selection__mode="none",
                                   clip__joint=False)
    want_x, want_c = clip_reference(zx, tx, scale), clip_reference(zc, tc, scale)
    assert float(m_sep["loss_vl"]) == pytest.approx((want_x + want_c) / 2, rel=1e-4)
    assert float(m_sep["loss_vl_xray"]) == pytest.approx(want_x, rel=1e-4)
    assert float(m_sep["loss_vl_ct"]) == pytest.approx(want_c, rel=1e-4)
    assert "loss_vl_ct" not in m  # one joint matrix has no per-modality term


def test_findings_targets_and_mean_pooling(setup):
    """clip.targets="findings" with model.text.pooling="mean": the step's L_vl equals the float64
    soft-target reference on embeddings computed apart, with report features mean-pooled by hand
    from the text encoder's last hidden states."""
    from test_losses import soft_clip_reference
    config, s, state = setup
    config = tiny_config(config.model.text.checkpoint, sd__enabled=False, selection__mode="none",
                         clip__targets="findings")
    config.model.text.pooling = "mean"
    model = UniMedI.from_config(config)
    batch = tiny_batch()
    batch["xray"]["attention_mask"][:, T // 2:] = 0  # padding must not enter the mean
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0], [1, 1]], np.float32)
    batch["xray"]["labels"], batch["ct"]["labels"] = labels[:B2], labels[B2:]
    p = state["params"]
    loss, _, m, _ = _jit(lambda p, b: step_lib.pretrain_step(
        p, teacher_params(p), state["centers"], b, jax.random.key(0), jnp.int32(0),
        model=model, config=config))(p, batch)

    def embeddings(p):
        image = lambda **x: model.project_image(p, model.encode_image(p, **x)[0])
        hidden = lambda k: model.text.apply({"params": p["text"]}, batch[k]["input_ids"],
                                            batch[k]["attention_mask"])["last_hidden_state"]
        return (image(images=batch["xray"]["image"][:, None]), image(volume=batch["ct"]["volume"]),
                hidden("xray"), hidden("ct"))

    zx, zc, hx, hc = (np.asarray(z, np.float64) for z in _jit(embeddings)(p))
    pooled = []
    for h, k in ((hx, "xray"), (hc, "ct")):
        mask = batch[k]["attention_mask"].astype(np.float64)
        pooled.append(np.stack([h[i][mask[i] > 0].mean(0) for i in range(len(h))]))
    kernel = np.asarray(_flat(p["txt_proj"])["proj/kernel"], np.float64)
    txt = np.concatenate(pooled) @ kernel
    want = soft_clip_reference(np.concatenate([zx, zc]), txt, math.exp(float(p["logit_scale"])),
                               labels)
    assert float(m["loss_vl"]) == pytest.approx(want, rel=1e-4)
    assert float(loss) == float(m["loss_vl"])
