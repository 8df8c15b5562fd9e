"""Inference API: shapes, normalisation, parity with direct model calls, slice selection, errors.

The helpers `tiny_run`, `random_params` and `save_workdir` also serve tests/test_export.py.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from unimedi_jax import inference
from unimedi_jax.data import text as text_lib
from unimedi_jax.models import bert
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.train import checkpoint

# Tiny ViT: 2D grid 4x4, 3D grid (4, 4, 4) with patch depth 2.
VIT = dict(variant="", width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8,
           patch_size_3d=(2, 8, 8), image_size=32, volume_size=(8, 32, 32))
# Tiny BERT; the vocabulary is that of the bundled MiniLM tokenizer it is saved with.
TEXT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)
MAX_LENGTH = 16
PROJ_DIM = 16
SLICES = 2  # objective.selection.k of the tiny run


def random_params(shapes, seed: int, scale: float = 0.05):
    """Params of the given shapes: LayerNorm scales 1 + N(0, scale^2), all else N(0, scale^2).

    Every leaf (biases, position tables, CLS and mask tokens included) is non-trivial, so a
    wrong name mapping or a dropped term shows in the outputs.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        base = 1.0 if getattr(path[-1], "key", None) == "scale" else 0.0
        return (base + scale * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def tiny_run(folder, seed: int = 0):
    """(config, params) of a tiny random UniMedI whose random BERT is saved under `folder`."""
    text_cfg = bert.BertConfig(**TEXT)
    ids = jnp.zeros((1, 4), jnp.int32)
    text = random_params(jax.eval_shape(bert.BertModel(text_cfg).init, jax.random.key(0), ids,
                                        ids)["params"], seed)
    bert.save_pretrained(text, text_cfg, folder, tokenizer_folder=bert.default_checkpoint())
    config = pretrain.get_config()
    config.model.vit.update(VIT)
    config.model.text.update(checkpoint=str(folder), num_layers=0, max_length=MAX_LENGTH)
    config.model.proj_dim = PROJ_DIM
    config.model.dino.update(hidden_dim=32, bottleneck_dim=16, out_dim=64)
    config.objective.selection.k = SLICES
    model = UniMedI.from_config(config)
    params = random_params(jax.eval_shape(model.init_random, jax.random.key(0)), seed + 1)
    params["text"] = text
    params["logit_scale"] = np.asarray(np.log(20.0), np.float32)  # below the clamp at 100
    return config, params


def save_workdir(config, params, workdir, step: int) -> None:
    """Writes a pretraining workdir (config.json and an orbax checkpoint of `params`)."""
    ckpt = checkpoint.Checkpointer(workdir, asynchronous=False)
    ckpt.save(step, {"params": params})
    ckpt.close()
    checkpoint.save_config(config, workdir)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def enc(run):
    return inference.Encoder.from_params(*run)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(3, 32, 32)).astype(np.float32),
            rng.normal(size=(2, 8, 32, 32)).astype(np.float32))


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_shapes_and_unit_norm(enc, inputs):
    images, volumes = inputs
    assert enc.encode_xray(images).shape == (3, 32)
    assert enc.encode_ct(volumes).shape == (2, 32)
    for emb, n in ((enc.embed_xray(images), 3), (enc.embed_ct(volumes), 2),
                   (enc.encode_report(["a", "b c", "d e f"]), 3)):
        assert emb.shape == (n, PROJ_DIM) and emb.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    assert enc.encode_report("one report").shape == (PROJ_DIM,)


def test_matches_direct_model_calls(run, enc, inputs):
    config, params = run
    images, volumes = inputs
    model = UniMedI.from_config(config)
    vit_apply = jax.jit(model.vit.apply)
    cls, _ = vit_apply({"params": params["vision"]}, images=images)
    np.testing.assert_allclose(enc.encode_xray(images), cls, atol=1e-5)
    ref = _unit(np.asarray(cls, np.float64) @ params["img_proj"]["proj"]["kernel"])
    np.testing.assert_allclose(enc.embed_xray(images), ref, atol=1e-5)
    cls, _ = vit_apply({"params": params["vision"]}, volume=volumes)
    np.testing.assert_allclose(enc.encode_ct(volumes, slices=0), cls, atol=1e-5)

    texts = ["No acute findings.", "Small left pleural effusion with basal atelectasis."]
    tok = text_lib.load_tokenizer(config.model.text.checkpoint)(
        texts, max_length=MAX_LENGTH, padding="max_length", truncation=True, return_tensors="np")
    hidden = jax.jit(model.text.apply)({"params": params["text"]}, tok["input_ids"],
                              tok["attention_mask"])["last_hidden_state"]
    hidden = np.asarray(hidden, np.float64)
    if config.model.text.pooling == "mean":  # the mean over the attended tokens
        mask = tok["attention_mask"][..., None].astype(np.float64)
        feature = (hidden * mask).sum(1) / mask.sum(1)
    else:
        feature = hidden[:, 0]
    ref = _unit(feature @ params["txt_proj"]["proj"]["kernel"])
    got = enc.encode_report(texts)
    np.testing.assert_allclose(got, ref, atol=1e-5)

    img = enc.embed_xray(images)
    sim = enc.similarity(img, got)
    np.testing.assert_allclose(sim, 20.0 * _unit(img) @ _unit(got).T, rtol=1e-5, atol=1e-5)
    probs = enc.zero_shot(images, texts)
    e = np.exp(sim - sim.max(-1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_ct_default_joins_attentive_slices(run, enc, inputs):
    """The default CT form is [volume, its top-k slices by CLS attention], as in training."""
    config, params = run
    _, volumes = inputs
    vit_apply = jax.jit(UniMedI.from_config(config).vit.apply)
    _, out = vit_apply({"params": params["vision"]}, volume=volumes)
    scores = np.asarray(out["cls_attn"], np.float64).reshape(2, 4, 16).mean(-1)
    top = np.argsort(-scores, axis=1)[:, :SLICES]
    slices = volumes[np.arange(2)[:, None], top * 2 + 1]  # centre slice of each 2-slice slab
    ref, _ = vit_apply({"params": params["vision"]}, volume=volumes, images=slices)
    np.testing.assert_allclose(enc.encode_ct(volumes), ref, atol=1e-5)
    assert np.abs(enc.encode_ct(volumes) - enc.encode_ct(volumes, slices=0)).max() > 1e-3
    indices, got_scores = enc.select_slices(volumes, SLICES)
    np.testing.assert_array_equal(indices, top)
    np.testing.assert_allclose(got_scores, scores, rtol=1e-5, atol=1e-7)


def test_chunked_batches_match_one_batch(run, enc, inputs):
    images, volumes = inputs
    small = inference.Encoder.from_params(*run, batch_size=2)
    np.testing.assert_allclose(small.encode_xray(images), enc.encode_xray(images), atol=1e-6)
    texts = ["a", "b", "c", "d", "e"]
    np.testing.assert_allclose(small.encode_report(texts), enc.encode_report(texts), atol=1e-6)


def _planted_params(params, alpha: float = 3.0):
    """Vision params whose CLS attends only to tokens of bright voxels.

    Each 3D token is its patch's mean intensity times a balanced +-1 vector e (no position or
    modality term), the CLS token is e, q = k = alpha * LayerNorm(x), and the attention output
    and MLP add nothing, so every layer's CLS logits are alpha^2 e.LN(x_j) / sqrt(C): large for
    bright tokens, zero for dark (all-zero) ones.
    """
    p = jax.tree.map(np.array, params["vision"])
    width = p["cls_token"].shape[-1]
    e = np.tile([1.0, -1.0], width // 2).astype(np.float32)
    kernel = p["patch_embed_3d"]["kernel"]
    kernel[...] = e / np.prod(kernel.shape[:3])
    p["patch_embed_3d"]["bias"][...] = 0
    p["pos_embed_3d"][...] = 0
    p["modality_embed"][...] = 0
    p["cls_token"][...] = e
    for i in range(VIT["depth"]):
        b = p[f"blocks_{i}"]
        b["norm1"]["scale"][...], b["norm1"]["bias"][...] = 1, 0
        qkv = np.zeros_like(b["attn"]["qkv"]["kernel"])
        qkv[:, :width] = qkv[:, width:2 * width] = alpha * np.eye(width)
        b["attn"]["qkv"]["kernel"], b["attn"]["qkv"]["bias"][...] = qkv, 0
        b["attn"]["proj"]["kernel"][...], b["attn"]["proj"]["bias"][...] = 0, 0
        b["fc2"]["kernel"][...], b["fc2"]["bias"][...] = 0, 0
    return dict(params, vision=p)


def test_select_slices_finds_planted_slabs(run):
    config, params = run
    enc = inference.Encoder.from_params(config, _planted_params(params))
    vol = np.zeros((2, 8, 32, 32), np.float32)
    vol[0, 2:4] = 1.0             # slab 1: all 16 tokens bright
    vol[0, 6:8, :16] = 1.0        # slab 3: half its tokens bright
    vol[1, 4:6] = 2.0             # slab 2: all bright
    vol[1, 0:2, :8, :8] = 0.5     # slab 0: one token bright
    indices, scores = enc.select_slices(vol, 2)
    np.testing.assert_array_equal(indices, [[1, 3], [2, 0]])
    assert scores.shape == (2, 4)
    # All attention sits on the bright tokens, spread evenly: slab score = share / 16 tokens.
    np.testing.assert_allclose(scores[0], [0, 2 / 3 / 16, 0, 1 / 3 / 16], atol=1e-6)
    np.testing.assert_allclose(scores[1], [1 / 17 / 16, 0, 16 / 17 / 16, 0], atol=1e-6)
    one_idx, one_scores = enc.select_slices(vol[1], 1)
    np.testing.assert_array_equal(one_idx, [2])
    np.testing.assert_allclose(one_scores, scores[1], atol=1e-7)


def test_bad_inputs_are_clear_errors(enc, inputs):
    images, volumes = inputs
    with pytest.raises(ValueError, match=r"encode_xray expects images \(B, H, W\)"):
        enc.encode_xray(volumes)
    with pytest.raises(ValueError, match=r"encode_ct expects volumes"):
        enc.encode_ct(images)
    with pytest.raises(ValueError, match=r"k=5 is outside 0\.\.4"):
        enc.select_slices(volumes, 5)
    with pytest.raises(ValueError, match=r"zero_shot expects"):
        enc.zero_shot(images[0], ["a"])


def test_bad_workdir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        inference.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        inference.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(FileNotFoundError, match=r"holds no checkpoint"):
        inference.load(tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # nothing created in the user's folder


def test_load_from_workdir_and_step_folder(run, enc, inputs, tmp_path):
    config, params = run
    save_workdir(config, params, tmp_path, step=7)
    images, _ = inputs
    want = enc.encode_xray(images)
    for path in (tmp_path, tmp_path / "checkpoints" / "7"):
        np.testing.assert_allclose(inference.load(path).encode_xray(images), want, atol=1e-6)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 3; it has \[7\]"):
        inference.load(tmp_path, step=3)
