"""Scanned layers (`model.vit.scan`, `model.text.scan`): the same model in the stacked layout,
the conversion between layouts (models/layout.py), the optimiser's masks and clipping on
stacked leaves, and `load_pretrained` of a scanned run."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import pretrain
from unimedi_jax.models import bert, layout
from unimedi_jax.models import vit as vit_lib
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.objective import optim
from unimedi_jax.train import checkpoint

TEXT = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                       intermediate_size=24, max_position_embeddings=16)
VIT = dict(width=16, depth=3, num_heads=2, mlp_dim=32, patch_size=8, patch_size_3d=(4, 8, 8),
           image_size=16, volume_size=(8, 16, 16))
RTOL = 1e-5


def _run_config(trainable_layers: int, scan: bool = False) -> ml_collections.ConfigDict:
    """The parts of a run config the layout and the optimiser's masks read."""
    return ml_collections.ConfigDict({
        "model": {"vit": {"scan": scan}, "text": {"scan": scan,
                                                  "trainable_layers": trainable_layers}},
        "objective": {"clip": {"learnable": True}}})


def _perturbed(params, seed):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [np.asarray(x + 0.1 * jax.random.normal(k, x.shape))
                                     for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def text():
    rng = np.random.default_rng(0)
    mask = (np.arange(7)[None] < np.array([7, 4, 1])[:, None]).astype(np.int32)
    ids = rng.integers(1, TEXT.vocab_size, (3, 7)) * mask
    params = bert.BertModel(TEXT).init(jax.random.key(0), ids, mask)["params"]
    return _perturbed(params, 1), ids, mask


@pytest.fixture(scope="module")
def vision():
    model = vit_lib.ViT(**VIT)
    vol = jax.random.normal(jax.random.key(1), (2, 8, 16, 16))
    img = jax.random.normal(jax.random.key(2), (2, 2, 16, 16))
    params = model.init(jax.random.key(0), volume=vol, images=img)["params"]
    return model, _perturbed(params, 3), vol, img


def _equal_trees(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_text_scan_split_separates_frozen_and_trained_layers():
    assert [layout.text_scan_split(6, n) for n in (-1, 0, 1, 2, 3, 5, 6)] == [0, 0, 0, 4, 3, 1, 0]
    assert bert.scan_ranges(6, 4) == [(0, 4), (4, 5)]
    assert bert.scan_ranges(6) == [(0, 5)] and bert.scan_ranges(1) == []
    with pytest.raises(ValueError, match="scan_split=3"):
        dataclasses.replace(TEXT, scan=True, scan_split=3)  # layer 3 is the unscanned last one


@pytest.mark.parametrize("trainable_layers", [-1, 2])  # one stack; two stacks, 0-1 and 2
@pytest.mark.parametrize("remat", [False, True])
def test_scanned_bert_matches_unscanned(text, trainable_layers, remat):
    params, ids, mask = text
    config, converted = layout.convert(_run_config(trainable_layers), {"text": params}, scan=True)
    scanned = dataclasses.replace(TEXT, remat=remat, scan=True,
                                  scan_split=layout.text_scan_split(4, trainable_layers))
    want = {-1: ["embeddings", "layer_3", "layers_0_3"],
            2: ["embeddings", "layer_3", "layers_0_2", "layers_2_3"]}[trainable_layers]
    assert sorted(converted["text"]) == want and config.model.text.scan
    shapes = jax.eval_shape(bert.BertModel(scanned).init, jax.random.key(0), ids, mask)["params"]
    assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(np.shape, converted["text"])

    def run(cfg, p, cls_only):
        out = bert.BertModel(cfg).apply({"params": p}, ids, mask, cls_only=cls_only)
        return out["cls"] if cls_only else out["last_hidden_state"]

    for cls_only in (False, True):
        ref = run(TEXT, params, cls_only)
        np.testing.assert_allclose(run(scanned, converted["text"], cls_only), ref, rtol=RTOL,
                                   atol=RTOL)
    # Gradients too, mapped back to one entry per layer.
    loss = lambda cfg, p: jnp.sum(run(cfg, p, True) ** 2)
    ref = jax.grad(lambda p: loss(TEXT, p))(params)
    got = jax.grad(lambda p: loss(scanned, p))(converted["text"])
    got = layout.convert(config, {"text": jax.tree.map(np.asarray, got)}, scan=False)[1]["text"]
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=RTOL * scale), got, ref)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_vit_matches_unscanned(vision, remat):
    model, params, vol, img = vision
    _, converted = layout.convert(_run_config(0), {"vision": params}, scan=True)
    assert "blocks" in converted["vision"] and "blocks_0" not in converted["vision"]
    ref, ref_out = model.apply({"params": params}, volume=vol, images=img)
    got, out = model.clone(scan=True, remat=remat).apply({"params": converted["vision"]},
                                                         volume=vol, images=img)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(out["cls_attn_layers"], ref_out["cls_attn_layers"], rtol=RTOL,
                               atol=RTOL)


def test_convert_round_trips_exactly(text, vision):
    params = {"vision": vision[1], "text": text[0], "logit_scale": np.float32(2.0),
              "dino_head": {"w": np.ones((2, 3), np.float32)}}
    for n in (-1, 0, 1, 2, 4):
        config = _run_config(n)
        scan_config, scanned = layout.convert(config, params, scan=True)
        assert scan_config.model.vit.scan and scan_config.model.text.scan
        assert not config.model.vit.scan  # the input config is left as it was
        back_config, back = layout.convert(scan_config, scanned, scan=False)
        _equal_trees(back, params)
        assert not back_config.model.vit.scan and not back_config.model.text.scan
        _equal_trees(layout.convert(back_config, back, scan=True)[1], scanned)
    # The teacher view (no text) and a config without model.text convert too.
    teacher = {"vision": vision[1], "dino_head": params["dino_head"]}
    bare = ml_collections.ConfigDict({"model": {"vit": {"scan": False}}})
    _equal_trees(layout.convert(*layout.convert(bare, teacher, True), False)[1], teacher)


def test_hf_weights_load_stacked(tmp_path):
    folder = bert.default_checkpoint()
    _, plain = bert.from_pretrained(folder, num_layers=4)
    model, stacked = bert.from_pretrained(folder, num_layers=4, scan=True, scan_split=2)
    assert model.config.scan and sorted(stacked) == ["embeddings", "layer_3", "layers_0_2",
                                                     "layers_2_3"]
    _equal_trees(bert.unstack_layers(stacked), plain)
    _equal_trees(bert.to_hf_state_dict(stacked, model.config),
                 bert.to_hf_state_dict(plain, TEXT))
    # Through the model config, as training loads it: the stacks split where training starts.
    config = pretrain.get_config("test")
    config.model.text.update(num_layers=4, trainable_layers=2, scan=True)
    unimedi = UniMedI.from_config(config)
    assert (unimedi.text.config.scan, unimedi.text.config.scan_split) == (True, 2)
    _equal_trees(unimedi.load_text_params(), stacked)


@pytest.mark.parametrize("trainable_layers", [-1, 0, 1, 2, 3, 4])
def test_masks_and_clipping_under_scan_match_unscanned(text, vision, trainable_layers):
    """trainable_mask, frozen_paths, decay_mask and per-parameter clipping act on a stacked
    leaf as on each of its layers unscanned."""
    params = {"vision": vision[1], "text": text[0], "logit_scale": np.float32(2.0)}
    config = _run_config(trainable_layers)
    scan_config, scanned = layout.convert(config, params, scan=True)
    as_arrays = lambda mask, p: jax.tree.map(lambda m, x: np.full(np.shape(x), m), mask, p)
    unscan = lambda tree: layout.convert(scan_config, tree, scan=False)[1]
    for fn in (lambda p, c: optim.trainable_mask(p, c), lambda p, c: optim.decay_mask(p)):
        _equal_trees(unscan(as_arrays(fn(scanned, scan_config), scanned)),
                     as_arrays(fn(params, config), params))

    def frozen_layers(paths, p):
        ranges = bert.layer_ranges(p["text"])
        if ("text",) in paths:  # the whole tower
            return list(range(TEXT.num_hidden_layers))
        return sorted(i for path in paths if path[0] == "text" and path[1] in ranges
                      for i in range(*ranges[path[1]]))

    frozen = optim.frozen_paths(params, config)
    scanned_frozen = optim.frozen_paths(scanned, scan_config)
    assert frozen_layers(scanned_frozen, scanned) == frozen_layers(frozen, params)
    assert [p for p in scanned_frozen if p[:2] == ("text", "embeddings")] == [
        p for p in frozen if p[:2] == ("text", "embeddings")]

    grads = _perturbed(params, 5)
    grads = jax.tree.map(lambda g: np.asarray(g * 20.0), grads)  # many norms above the bound
    clip = jax.jit(lambda g: optim.clip_per_parameter(3.0).update(g, None)[0])
    ref = clip(grads)
    got = clip(layout.convert(config, grads, True)[1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 unscan(jax.tree.map(np.asarray, got)), ref)


def test_a_stack_of_frozen_and_trained_layers_is_a_config_error(text):
    _, scanned = layout.convert(_run_config(-1), {"text": text[0]}, scan=True)  # one stack 0-2
    with pytest.raises(ValueError, match=r"trainable_layers=2.*config\.model\.text\.scan"):
        optim.trainable_mask(scanned, _run_config(2, scan=True))


def test_load_pretrained_of_a_scanned_run_is_unscanned(tmp_path, text, vision):
    params = {"vision": vision[1], "text": text[0], "logit_scale": np.float32(2.0)}
    run_config = pretrain.get_config("test")
    run_config.model.text.trainable_layers = 2
    scan_config, scanned = layout.convert(run_config, params, scan=True)
    teacher = {"vision": scanned["vision"], "dino_head": {"w": np.ones((2, 3), np.float32)}}
    checkpoint.save_config(scan_config, str(tmp_path))
    frozen = optim.frozen_paths(scanned, scan_config)
    assert ("text", "layers_0_2") in frozen
    ckpt = checkpoint.Checkpointer(str(tmp_path), asynchronous=False,
                                   frozen=[("params", *p) for p in frozen])
    state = {"params": scanned, "teacher": teacher, "step": np.int32(7)}
    ckpt.save_frozen(state)
    ckpt.save(7, state)
    # The trainer's own checkpoints keep the scanned layout.
    _equal_trees(ckpt.restore_host(7)["params"], scanned)
    ckpt.close()
    config, loaded = checkpoint.load_pretrained(str(tmp_path))
    assert not config.model.vit.scan and not config.model.text.scan
    assert config.model.text.trainable_layers == 2
    _equal_trees(loaded, params)
    _, loaded_teacher = checkpoint.load_pretrained(str(tmp_path), which="teacher")
    _equal_trees(loaded_teacher, {"vision": params["vision"], "dino_head": teacher["dino_head"]})


def test_scanned_bert_activations_split_by_sample_under_a_mesh(text):
    """Inside the scan too the hidden states keep the batch sharding (models/bert.py)."""
    from unimedi_jax.train import sharding as shd

    params, ids, mask = text
    ids, mask = np.concatenate([ids] * 3)[:8], np.concatenate([mask] * 3)[:8]
    stacked = bert.stack_layers(params, bert.scan_ranges(4))
    apply = jax.jit(bert.BertModel(dataclasses.replace(TEXT, scan=True)).apply)
    plain = bert.BertModel(TEXT).apply({"params": params}, ids, mask)["last_hidden_state"]
    with jax.set_mesh(shd.make_mesh([("data", 1), ("fsdp", 4)])):
        split = apply({"params": stacked}, ids, mask)["last_hidden_state"]
    assert split.sharding.shard_shape(split.shape) == (2, *split.shape[1:])  # 8 samples / 4
    np.testing.assert_allclose(split, plain, rtol=RTOL, atol=RTOL)
