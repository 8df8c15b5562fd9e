"""The Joint method (unimedi_jax/objective/joint.py, models/slice_attention.py; docs/DESIGN.md
§4.8): losses and the deformable slice attention against float64 numpy, and a short run.

Compiled functions use XLA backend optimisation level 0 (as tests/test_step.py).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from configs import pretrain_joint
from unimedi_jax.models import slice_attention
from unimedi_jax.objective import joint

FAST = {"xla_backend_optimization_level": 0}


def _jit(f, **kw):
    return jax.jit(f, compiler_options=FAST, **kw)


# ---------------------------------------------------------------- float64 references

def sinkhorn_reference(scores, epsilon=0.05, iterations=3):
    """SwAV's distributed_sinkhorn on one process, float64."""
    q = np.exp(np.asarray(scores, np.float64) / epsilon).T  # (K, B)
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    q *= b
    return q.T


def swav_reference(s_a, s_b, temperature=0.1, epsilon=0.05, iterations=3):
    s_a, s_b = np.asarray(s_a, np.float64), np.asarray(s_b, np.float64)
    q_a, q_b = sinkhorn_reference(s_a, epsilon, iterations), sinkhorn_reference(s_b, epsilon,
                                                                               iterations)
    ce = lambda q, s: -np.mean(np.sum(q * scipy.special.log_softmax(s / temperature, axis=1),
                                      axis=1))
    return 0.5 * (ce(q_a, s_b) + ce(q_b, s_a)), q_a, q_b


def cosines(rng, n, k):
    z = rng.normal(size=(n, 8))
    w = rng.normal(size=(k, 8))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    return (z @ w.T).astype(np.float32)


# ---------------------------------------------------------------- losses

def test_sinkhorn_matches_swav():
    rng = np.random.default_rng(0)
    scores = cosines(rng, 24, 6)
    q = np.asarray(joint.sinkhorn(jnp.asarray(scores), 0.05, 3))
    ref = sinkhorn_reference(scores)
    np.testing.assert_allclose(q, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)  # one assignment per sample
    # Prototype marginals move towards B / K = 4 (equipartition) with more iterations.
    q10 = np.asarray(joint.sinkhorn(jnp.asarray(scores), 0.05, 10))
    np.testing.assert_allclose(q10, sinkhorn_reference(scores, iterations=10), rtol=1e-4,
                               atol=1e-6)
    assert np.abs(q10.sum(axis=0) - 4).max() < np.abs(q.sum(axis=0) - 4).max()


def test_swav_loss_and_its_gradient():
    rng = np.random.default_rng(1)
    s_a, s_b = cosines(rng, 10, 5), cosines(rng, 10, 5)
    loss, (q_a, q_b) = joint.swav_loss(jnp.asarray(s_a), jnp.asarray(s_b), 0.1, 0.05, 3)
    ref, r_a, r_b = swav_reference(s_a, s_b)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    np.testing.assert_allclose(q_a, r_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q_b, r_b, rtol=1e-5, atol=1e-6)
    # The codes carry no gradient: d/ds_a = 0.5 / B (softmax(s_a / t) - q_b) / t.
    g = jax.grad(lambda a: joint.swav_loss(a, jnp.asarray(s_b), 0.1, 0.05, 3)[0])(
        jnp.asarray(s_a))
    p_a = scipy.special.softmax(s_a.astype(np.float64) / 0.1, axis=1)
    np.testing.assert_allclose(g, 0.5 / 10 * (p_a - r_b) / 0.1, rtol=1e-4, atol=1e-6)


def test_masked_prediction_loss():
    rng = np.random.default_rng(2)
    pred, target = rng.normal(size=(2, 2, 5, 6)).astype(np.float32)
    mask = np.array([[True, False, True, False, False], [False, False, False, True, False]])
    got = joint.masked_prediction_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
    p, t = pred.astype(np.float64), target.astype(np.float64)
    cos = np.sum(p * t, -1) / np.linalg.norm(p, axis=-1) / np.linalg.norm(t, axis=-1)
    np.testing.assert_allclose(float(got), np.mean(1 - cos[mask]), rtol=1e-5)
    # The targets are stopped.
    g = jax.grad(lambda t: joint.masked_prediction_loss(jnp.asarray(pred), t,
                                                        jnp.asarray(mask)))(jnp.asarray(target))
    assert not np.any(g)
    assert float(joint.masked_prediction_loss(jnp.asarray(pred), jnp.asarray(target),
                                              jnp.zeros_like(mask))) == 0.0


def test_usage_entropy():
    one_hot = jnp.asarray(np.tile(np.eye(4)[:1] * 10, (6, 1)), jnp.float32)
    assert float(joint.usage_entropy(one_hot, 0.1)) < 1e-3
    spread = jnp.asarray(np.tile(np.eye(4) * 10, (2, 1)), jnp.float32)
    np.testing.assert_allclose(float(joint.usage_entropy(spread, 0.1)), 1.0, atol=1e-3)


def test_slice_indices_and_random_mask():
    idx = np.asarray(joint.slice_indices(jax.random.key(0), 64, 32, 8))
    assert idx.shape == (64, 8) and idx.min() >= 0 and idx.max() <= 31
    np.testing.assert_array_equal(np.diff(idx, axis=1), 4)
    assert len(np.unique(idx[:, 0])) > 1  # random offsets
    mask = np.asarray(joint.random_mask(jax.random.key(1), 50, 8, 0.25))
    np.testing.assert_array_equal(mask.sum(axis=1), 2)
    assert mask.any(axis=0).all()  # every position gets masked somewhere
    assert not np.asarray(joint.random_mask(jax.random.key(1), 4, 8, 0.0)).any()
    with pytest.raises(ValueError):
        joint.slice_indices(jax.random.key(0), 2, 4, 8)


# ---------------------------------------------------------------- deformable slice attention

def attention_reference(p, x, heads, points):
    """Per sample, query, head and point: offset, clamp, linear interpolation, weights."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)
    b, n, c = x.shape
    ch = c // heads
    value = x @ p["value"]["kernel"] + p["value"]["bias"]
    offsets = x @ p["offsets"]["kernel"] + p["offsets"]["bias"]
    logits = x @ p["weights"]["kernel"] + p["weights"]["bias"]
    y = np.zeros((b, n, c))
    for s in range(b):
        for q in range(n):
            for h in range(heads):
                w = logits[s, q, h * points:(h + 1) * points]
                w = np.exp(w - w.max())
                w /= w.sum()
                for k in range(points):
                    loc = min(max(q + offsets[s, q, h * points + k], 0.0), n - 1.0)
                    lo = int(math.floor(loc))
                    hi = min(lo + 1, n - 1)
                    frac = loc - lo
                    v = (1 - frac) * value[s, lo] + frac * value[s, hi]
                    y[s, q, h * ch:(h + 1) * ch] += w[k] * v[h * ch:(h + 1) * ch]
    return y @ p["out"]["kernel"] + p["out"]["bias"]


def test_deformable_slice_attention_matches_a_loop():
    heads, points, n, c = 2, 3, 6, 8
    layer = slice_attention.DeformableSliceAttention(heads, points)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, n, c)), jnp.float32)
    params = layer.init(jax.random.key(0), x)["params"]
    # Random params everywhere (the zero-initialised offset and weight kernels too), offsets
    # large enough that some sampling points fall outside and are clamped.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [jax.random.normal(k, a.shape) * 0.7
                                       for k, a in zip(keys, leaves)])
    params["offsets"]["kernel"] = params["offsets"]["kernel"] * 2.0
    got = layer.apply({"params": params}, x)
    ref = attention_reference(params, x, heads, points)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    loc = np.arange(n)[None, :, None] + np.asarray(
        x @ params["offsets"]["kernel"] + params["offsets"]["bias"])
    assert (loc < 0).any() and (loc > n - 1).any()  # the clamps are exercised


def test_initial_offsets_follow_the_1d_grid():
    layer = slice_attention.DeformableSliceAttention(4, 2)
    params = layer.init(jax.random.key(0), jnp.zeros((1, 5, 8)))["params"]
    np.testing.assert_array_equal(params["offsets"]["bias"].reshape(4, 2),
                                  [[1, 2], [-1, -2], [1, 2], [-1, -2]])
    assert not np.any(params["offsets"]["kernel"]) and not np.any(params["weights"]["kernel"])


def test_slice_transformer_mask_embedding_and_mean_pool():
    model = slice_attention.SliceTransformer(depth=2, num_heads=2, num_points=2, mlp_dim=16)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, 8)), jnp.float32)
    mask = jnp.asarray([[False, True, False, False, True], [True, False, False, False, False]])
    params = model.init(jax.random.key(0), x, mask)["params"]
    tokens, hol = model.apply({"params": params}, x, mask)
    np.testing.assert_allclose(hol, np.asarray(tokens).mean(axis=1), rtol=1e-6, atol=1e-6)
    by_hand = jnp.where(mask[..., None], params["mask_embed"], x)
    np.testing.assert_allclose(tokens, model.apply({"params": params}, by_hand)[0], atol=1e-6)
    assert not np.allclose(tokens, model.apply({"params": params}, x)[0], atol=1e-3)


# ---------------------------------------------------------------- the method

@pytest.fixture(scope="module")
def run():
    config = pretrain_joint.get_config("test")
    config.on_nonfinite = "skip"
    setup = joint.make_setup(config)
    rng = np.random.default_rng(0)
    s, vol = config.model.vit.image_size, tuple(config.model.vit.volume_size)
    batch = {"xray": {"image": rng.normal(size=(8, s, s)).astype(np.float32)},
             "ct": {"volume": rng.uniform(-1, 1, size=(8, *vol)).astype(np.float32)}}
    state = _jit(setup.init)(jax.random.key(0))
    # The loss at one fixed draw of views, slices and masks (each step draws its own, and at
    # 8 + 8 samples the batch statistics of the heads make a step's loss noisy).
    heads = joint.JointHeads.from_config(config)
    fixed = _jit(lambda p: joint.joint_loss(p, batch, jax.random.key(7), model=setup.model,
                                            heads=heads, config=config)[0])
    before = float(fixed(state["params"]))
    step = _jit(setup.train_step)
    history = []
    for _ in range(10):
        state, metrics = step(state, batch, jax.random.key(1))
        history.append(jax.device_get(metrics))
    history.append({"fixed_before": before, "fixed_after": float(fixed(state["params"]))})
    return config, setup, batch, state, history


def test_config_sections():
    c = pretrain_joint.get_config()
    assert c.method == "joint" and c.objective.views.crop_depth is False
    assert pretrain_joint.method_config("test").to_dict() == \
        pretrain_joint.get_config("test").objective.joint.to_dict()
    with pytest.raises(ValueError):
        pretrain_joint.method_config("big")


def test_ten_steps_the_loss_falls(run):
    _, _, _, state, history = run
    *history, fixed = history
    assert fixed["fixed_after"] < fixed["fixed_before"] - 0.5, fixed
    assert int(state["step"]) == 10
    for m in history:
        for key in ("loss", "loss_2d", "loss_3d", "loss_volume", "loss_mask", "proto_usage_2d",
                    "proto_usage_3d", "grad_norm", "lr"):
            assert np.shape(m[key]) == () and m[key].dtype == np.float32, key
        assert all(np.shape(v) == () and np.isfinite(float(v)) for v in m.values())
    last = history[-1]
    total = sum(float(last[f"loss_{k}"]) for k in ("2d", "3d", "volume", "mask"))
    np.testing.assert_allclose(float(last["loss"]), total, rtol=1e-5)  # unit weights


def test_state_layout_and_prototype_freeze(run):
    config, setup, _, state, _ = run
    assert set(state) == {"step", "params", "opt_state"}
    assert set(state["params"]) == {"vision", "joint"}
    assert set(state["params"]["joint"]) == {"proj_2d", "protos_2d", "proj_3d", "protos_3d",
                                             "slices", "mask_head"}
    # The ViT init equals UniMedI's for the same seed.
    init = _jit(setup.init)(jax.random.key(0))
    r_model, _ = jax.random.split(jax.random.key(0))
    vision = _jit(setup.model.init_random)(r_model)["vision"]
    jax.tree.map(np.testing.assert_array_equal, init["params"]["vision"], vision)
    # Prototype gradients are zero while step < freeze_prototypes_steps.
    grads = {"vision": {"a": jnp.ones(2)}, "joint": {"protos_2d": {"kernel": jnp.ones(3)},
                                                     "proj_2d": {"k": jnp.ones(3)}}}
    frozen = joint.freeze_prototypes(grads, jnp.asarray(1), 2)
    assert not np.any(frozen["joint"]["protos_2d"]["kernel"])
    assert np.all(frozen["joint"]["proj_2d"]["k"] == 1) and np.all(frozen["vision"]["a"] == 1)
    assert np.all(joint.freeze_prototypes(grads, jnp.asarray(2), 2)["joint"]["protos_2d"]
                  ["kernel"] == 1)


def test_eval_shape_and_one_modality_batches(run):
    _, setup, batch, state, _ = run
    shapes = jax.eval_shape(setup.init, jax.random.key(0))
    assert jax.tree.structure(shapes) == jax.tree.structure(state)
    for sub in ({"xray": batch["xray"]}, {"ct": batch["ct"]}, batch):
        new, metrics = jax.eval_shape(setup.train_step, state, sub, jax.random.key(0))
        assert jax.tree.structure(new) == jax.tree.structure(state)
        assert all(m.shape == () for m in metrics.values())
    with pytest.raises(ValueError):
        jax.eval_shape(setup.train_step, state, {}, jax.random.key(0))
    # Labels and reports are not read: extra keys change nothing.
    extra = {k: dict(v, labels=np.zeros((8, 5), np.float32)) for k, v in batch.items()}
    jax.eval_shape(setup.train_step, state, extra, jax.random.key(0))


def test_batch_stats_norm_against_float64():
    """SwAV's BatchNorm in the heads, always with the batch's own statistics (biased
    variance, eps 1e-5 as torch's BatchNorm1d in training), against float64 numpy."""
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, (24, 7)).astype(np.float32)
    scale, bias = rng.normal(size=7), rng.normal(size=7)
    norm = joint.BatchStatsNorm()
    got = norm.apply({"params": {"scale": scale.astype(np.float32),
                                 "bias": bias.astype(np.float32)}}, x)
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5) * scale + bias
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="head_norm='group'"):
        joint.ProjectionMLP(8, 4, norm="group").init(jax.random.key(0), x)
