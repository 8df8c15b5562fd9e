"""DrasCLR (docs/DESIGN.md §4.9): the conditional layer, the two InfoNCE losses, the anatomy
(masks, box, locations, region tokens and sampling) against float64 numpy, and 10 train steps.

Compiled functions use XLA backend optimisation level 0 (`_jit`), as tests/test_step.py.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain_drasclr
from unimedi_jax.models import conditional
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.objective import drasclr
from unimedi_jax.ops import anatomy

FAST = {"xla_backend_optimization_level": 0}


def _jit(f, **kw):
    return jax.jit(f, compiler_options=FAST, **kw)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _randomize(params, seed):
    """Every leaf replaced by normal noise (biases too, so they enter the check)."""
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [rng.normal(size=x.shape).astype(np.float32) for x in leaves])


def _cond_dense_reference(p, x, loc):
    """Per sample: routing weights, then the explicit kernel W(loc) = sum_e r_e W_e, x @ W + b."""
    x, loc = np.float64(x), np.float64(loc)
    kernel = np.float64(p["kernel"])
    out = []
    for xi, li in zip(x, loc):
        r = _sigmoid(li @ np.float64(p["routing"]["kernel"]) + np.float64(p["routing"]["bias"]))
        w = sum(r[e] * kernel[e] for e in range(kernel.shape[0]))
        out.append(xi @ w + np.float64(p["bias"]))
    return np.stack(out)


def test_cond_dense_matches_per_location_weights():
    layer = conditional.CondDense(features=5, num_experts=3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 6)).astype(np.float32)
    loc = rng.uniform(-1, 1, size=(7, 3)).astype(np.float32)
    p = _randomize(layer.init(jax.random.key(0), x, loc)["params"], 1)
    y = layer.apply({"params": p}, x, loc)
    np.testing.assert_allclose(y, _cond_dense_reference(p, x, loc), rtol=1e-5, atol=1e-5)
    # The location matters: another location, another kernel.
    y_moved = layer.apply({"params": p}, x, loc[::-1])
    assert np.abs(np.asarray(y_moved) - np.asarray(y)).max() > 1e-2
    # Leading axes are kept: (2, 7/..., in) as 14 rows.
    y2 = layer.apply({"params": p}, np.stack([x, x]), np.stack([loc, loc]))
    np.testing.assert_allclose(y2[1], y, rtol=1e-6, atol=1e-6)


def test_conditional_head_matches_numpy():
    head = conditional.ConditionalHead(hidden_dim=6, dim=4, num_experts=2)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 8)).astype(np.float32)
    loc = rng.uniform(-1, 1, size=(5, 3)).astype(np.float32)
    p = _randomize(head.init(jax.random.key(1), x, loc)["params"], 3)
    hidden = np.maximum(_cond_dense_reference(p["fc1"], x, loc), 0.0)
    want = _cond_dense_reference(p["fc2"], hidden, loc)
    np.testing.assert_allclose(head.apply({"params": p}, x, loc), want, rtol=1e-5, atol=1e-5)


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _info_nce_reference(logits):
    """-log of the diagonal's softmax probability, row by row, mean."""
    total = 0.0
    for i, row in enumerate(logits):
        total += -(row[i] - np.log(np.sum(np.exp(row))))
    return total / len(logits)


def test_local_info_nce_matches_numpy():
    rng = np.random.default_rng(4)
    q, k = _unit(rng.normal(size=(6, 5))), _unit(rng.normal(size=(6, 5)))
    t = 0.2
    want = _info_nce_reference(np.array([[q[i] @ k[j] / t for j in range(6)] for i in range(6)]))
    got = drasclr.info_nce(jnp.float32(q), jnp.float32(k), t)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # The positive is the diagonal: keys in another order give another loss.
    assert abs(float(drasclr.info_nce(jnp.float32(q), jnp.float32(k[::-1]), t)) - want) > 1e-3


def test_neighbour_info_nce_matches_numpy():
    """The neighbour logits are the sum over a region's neighbours of their logits against each
    key (the authors' einsum over neighbours), InfoNCE with the region's own key positive."""
    rng = np.random.default_rng(5)
    n, num, c, t = 6, 2, 5, 0.2
    r, k = _unit(rng.normal(size=(n, num, c))), _unit(rng.normal(size=(n, c)))
    logits = np.zeros((n, n))
    for i, j, m in itertools.product(range(n), range(n), range(num)):
        logits[i, j] += r[i, m] @ k[j] / t
    got = drasclr.info_nce(jnp.float32(r).sum(axis=1), jnp.float32(k), t)
    np.testing.assert_allclose(got, _info_nce_reference(logits), rtol=1e-5)


# A box phantom at the test size: volume (8, 32, 32), 3D patch (2, 8, 8), token grid (4, 4, 4).
PATCH, GRID = (2, 8, 8), (4, 4, 4)
BODY = ((1, 7), (4, 28), (2, 30))  # [lo, hi) voxels along (D, H, W)
LUNGS = (((2, 6), (8, 24), (6, 14)), ((2, 6), (8, 24), (18, 26)))
THRESHOLD = anatomy.hu_to_normalized(-500.0)


def _box_phantom():
    v = np.full((8, 32, 32), -1.0, np.float32)  # air, -1000 HU
    v[tuple(slice(*a) for a in BODY)] = 0.04  # soft tissue, 40 HU
    for lung in LUNGS:
        v[tuple(slice(*a) for a in lung)] = -0.85  # aerated lung, -850 HU
    return v


def test_hu_threshold_on_the_normalised_scale():
    assert anatomy.hu_to_normalized(-500.0) == pytest.approx(-0.5)  # [-1000, 1000] -> [-1, 1]
    assert anatomy.hu_to_normalized(-3000.0) == pytest.approx(-1.0)


def test_masks_box_and_locations_on_a_box_phantom():
    v = _box_phantom()
    body, lung = (np.asarray(m[0]) for m in anatomy.masks(jnp.asarray(v[None]), THRESHOLD))
    want_lung = np.zeros(v.shape, bool)
    for box in LUNGS:
        want_lung[tuple(slice(*a) for a in box)] = True
    want_body = np.zeros(v.shape, bool)
    want_body[tuple(slice(*a) for a in BODY)] = True
    np.testing.assert_array_equal(lung, want_lung)
    np.testing.assert_array_equal(body, want_body & ~want_lung)

    for roi, box in (("lung", ((2, 6), (8, 24), (6, 26))), ("body", BODY)):
        mask = anatomy.roi_mask(jnp.asarray(v[None]), THRESHOLD, roi)
        lo, hi = anatomy.bounding_box(mask)
        np.testing.assert_array_equal(lo[0], [b[0] for b in box])
        np.testing.assert_array_equal(hi[0], [b[1] for b in box])
        starts = np.array(list(itertools.product(range(3), range(3), range(3))), np.int32)
        loc = anatomy.normalized_location(
            anatomy.region_centres(jnp.asarray(starts[None]), PATCH, (2, 2, 2)), lo, hi)[0]
        for s, got in zip(starts, np.asarray(loc)):
            for axis in range(3):
                centre = (s[axis] + 1) * PATCH[axis]  # a 2-token region: its middle boundary
                a, b = box[axis]
                assert got[axis] == pytest.approx(2 * (centre - a) / (b - a) - 1, abs=1e-6)

    # The lungs' centre is the box centre: location 0; the lung box corner region's centre
    # (start (1, 1, 0), centre voxel (4, 16, 8)) lies at (0, 0, -0.8).
    lo, hi = anatomy.bounding_box(jnp.asarray(want_lung[None]))
    np.testing.assert_allclose(anatomy.normalized_location(
        jnp.asarray([[[4.0, 16.0, 16.0], [4.0, 16.0, 8.0]]]), lo, hi)[0],
        [[0, 0, 0], [0, 0, -0.8]], atol=1e-6)


def test_empty_mask_box_is_the_whole_volume():
    lo, hi = anatomy.bounding_box(jnp.zeros((2, 4, 6, 8), bool))
    np.testing.assert_array_equal(lo, np.zeros((2, 3)))
    np.testing.assert_array_equal(hi, [[4, 6, 8]] * 2)


def test_region_fractions_match_an_explicit_count():
    rng = np.random.default_rng(6)
    mask = rng.random((2, 8, 32, 32)) < 0.3
    region = (2, 3, 2)
    got = np.asarray(anatomy.region_fractions(jnp.asarray(mask), PATCH, region))
    starts = anatomy.num_starts(GRID, region)
    assert got.shape == (2, *starts)
    for b, (i, j, k) in itertools.product(range(2), itertools.product(*map(range, starts))):
        block = mask[b, i * 2:(i + 2) * 2, j * 8:(j + 3) * 8, k * 8:(k + 2) * 8]
        assert got[b, i, j, k] == pytest.approx(block.mean(), abs=1e-6)


def test_region_tokens_match_an_enumeration():
    grid, region = (4, 3, 5), (2, 2, 3)
    index = np.arange(np.prod(grid)).reshape(grid)  # the ViT's depth-major token order
    starts = np.array(list(itertools.product(*map(range, anatomy.num_starts(grid, region)))))
    got = np.asarray(anatomy.region_tokens(jnp.asarray(starts), grid, region))
    for s, tokens in zip(starts, got):
        want = index[s[0]:s[0] + 2, s[1]:s[1] + 2, s[2]:s[2] + 3].ravel()
        np.testing.assert_array_equal(tokens, want)


def test_sampled_regions_and_neighbours():
    rng = np.random.default_rng(7)
    starts_shape = anatomy.num_starts(GRID, (2, 2, 2))  # (3, 3, 3)
    fractions = rng.random((4, *starts_shape)).astype(np.float32)
    fractions[0] = 0.0
    fractions[0, 1, 1, 1] = fractions[0, 0, 1, 1] = fractions[0, 2, 2, 2] = 0.5
    starts = anatomy.sample_regions(jax.random.key(0), jnp.asarray(fractions), 3, 0.1)
    starts = np.asarray(starts)
    # Volume 0 has exactly three ROI regions: all drawn.
    assert {tuple(s) for s in starts[0]} == {(1, 1, 1), (0, 1, 1), (2, 2, 2)}
    for b in range(4):
        assert len({tuple(s) for s in starts[b]}) == 3  # distinct
        assert all(fractions[b][tuple(s)] >= 0.1 for s in starts[b])
    ngb = np.asarray(anatomy.neighbour_regions(jax.random.key(1), jnp.asarray(starts),
                                               jnp.asarray(fractions), 1, 2, 0.1))
    assert ngb.shape == (4, 3, 2, 3)
    for b, p in itertools.product(range(4), range(3)):
        steps = ngb[b, p] - starts[b, p]
        assert np.all(np.abs(steps).sum(axis=1) == 1)  # one token along one axis
        assert np.all((ngb[b, p] >= 0) & (ngb[b, p] <= 2))  # on the grid
        assert len({tuple(s) for s in ngb[b, p]}) == 2  # distinct
    # Region (1, 1, 1) of volume 0 has one ROI neighbour, (0, 1, 1): always one of its two.
    centre = [i for i in range(3) if tuple(starts[0, i]) == (1, 1, 1)][0]
    assert (0, 1, 1) in {tuple(s) for s in ngb[0, centre]}
    # Different keys, different draws.
    other = anatomy.sample_regions(jax.random.key(5), jnp.asarray(fractions), 3, 0.1)
    assert not np.array_equal(np.asarray(other)[1:], starts[1:])


def test_min_neighbours_and_config_checks():
    assert anatomy.min_neighbours((4, 4, 4), (2, 2, 2), 1) == 3  # one per axis at a corner
    assert anatomy.min_neighbours((4, 4, 4), (3, 3, 3), 1) == 3
    assert anatomy.min_neighbours((4, 4, 4), (2, 2, 2), 2) == 0  # start 1: both off
    assert anatomy.min_neighbours((4, 4, 4), (4, 2, 2), 1) == 2  # depth has no room
    drasclr.check_config(pretrain_drasclr.get_config("test"))
    drasclr.check_config(pretrain_drasclr.get_config(""))
    for key, value in (("num_neighbours", 4), ("region", (5, 2, 2)), ("num_patches", 28),
                       ("roi", "heart")):
        c = pretrain_drasclr.get_config("test")
        c.objective.drasclr[key] = value
        with pytest.raises(ValueError, match=key):
            drasclr.check_config(c)
    c = pretrain_drasclr.get_config("test")
    c.objective.views.flip = 0.5
    with pytest.raises(ValueError, match="flip"):
        drasclr.check_config(c)
    assert pretrain_drasclr.method_config("test") == pretrain_drasclr.get_config(
        "test").objective.drasclr


def _batch(b=4, seed=0):
    """Box phantoms with shifted bodies and noise, plus an X-ray sub-batch and labels/text
    (ignored)."""
    rng = np.random.default_rng(seed)
    vols = []
    for i in range(b):
        v = np.roll(_box_phantom(), shift=(0, i - 2, 2 - i), axis=(0, 1, 2))
        vols.append(v + 0.05 * rng.normal(size=v.shape).astype(np.float32))
    text = dict(input_ids=np.ones((b, 8), np.int32), attention_mask=np.ones((b, 8), np.int32),
                labels=np.zeros((b, 5), np.float32))
    return {"ct": dict(volume=np.stack(vols), **text),
            "xray": dict(image=rng.normal(size=(b, 32, 32)).astype(np.float32), **text)}


def test_ten_steps_learn_and_every_metric_is_a_finite_scalar():
    c = pretrain_drasclr.get_config("test")
    c.total_steps = 10
    setup = drasclr.make_setup(c)
    assert setup.text_params is None
    state = _jit(setup.init)(jax.random.key(0))
    # The ViT starts as UniMedI's for the same seed.
    vision = _jit(lambda k: UniMedI.from_config(c).init_random(jax.random.split(k)[0])["vision"])(
        jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, state["params"]["vision"], vision)
    assert set(state["params"]) == {"vision", "drasclr"}
    shapes = jax.eval_shape(setup.init, jax.random.key(0))
    assert jax.tree.structure(shapes) == jax.tree.structure(state)

    batch = _batch()
    step = _jit(setup.train_step)
    base = jax.random.key(3)
    first_state = state
    losses = []
    for _ in range(10):
        state, metrics = step(state, batch, base)
        losses.append(float(metrics["loss"]))
        for key in ("loss", "loss_local", "loss_neighbour", "grad_norm", "lr", "acc_local",
                    "acc_neighbour", "roi_fraction", "ema_momentum"):
            assert metrics[key].shape == () and metrics[key].dtype == jnp.float32, key
            assert np.isfinite(metrics[key]), key
        assert bool(metrics["finite"])
    assert int(state["step"]) == 10
    # Regions in the ROI were drawn (min_roi_fraction 0.1; the box lungs fill 12% of a volume).
    assert float(metrics["roi_fraction"]) >= 0.1
    # The same step randomness (step 0: regions, neighbours, views) before and after training.
    _, before = step(first_state, batch, base)
    _, after = step({**state, "step": first_state["step"]}, batch, base)
    print("losses", losses, "fixed-draw loss", float(before["loss"]), "->", float(after["loss"]))
    assert float(after["loss"]) < float(before["loss"]) - 0.1
    assert float(after["loss_local"]) < float(before["loss_local"])
    assert float(after["loss_neighbour"]) < float(before["loss_neighbour"])
    # The teacher moved, by EMA: between its start and the student.
    t0 = first_state["teacher"]["drasclr"]["head"]["fc2"]["kernel"]
    t1, s1 = state["teacher"]["drasclr"]["head"]["fc2"]["kernel"], \
        state["params"]["drasclr"]["head"]["fc2"]["kernel"]
    assert 0 < float(jnp.abs(t1 - t0).max()) < float(jnp.abs(s1 - t0).max())

    with pytest.raises(ValueError, match="'ct'"):
        step(state, {"xray": batch["xray"]}, base)
