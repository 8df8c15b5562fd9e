"""The locked text tower run once per distinct report: the cache, the step on cached features,
and the trainer with the cache against the trainer without it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from test_step import B2, B3, T, _flat, _jit, text_folder, tiny_batch, tiny_config  # noqa: F401
from unimedi_jax.data import text
from unimedi_jax.models import bert
from unimedi_jax.models.unimedi import UniMedI, teacher_params
from unimedi_jax.objective import step as step_lib
from unimedi_jax.train import report_cache, trainer

REPORTS = ["No pleural effusion.", "A 6 mm nodule in the right upper lobe. No effusion.",
           "No pleural effusion.", "Heart size is enlarged.", "A 6 mm nodule in the right "
           "upper lobe. No effusion."]


@pytest.fixture(scope="module")
def minilm():
    """The bundled MiniLM (one layer, mean-pooled, locked) and its tokenizer."""
    c = pretrain.get_config()
    c.model.text.update(num_layers=1, trainable_layers=0, max_length=24)
    model = UniMedI.from_config(c)
    return model, model.load_text_params(), text.load_tokenizer(bert.default_checkpoint())


def test_enabled_needs_a_locked_tower_and_stored_records():
    assert report_cache.enabled(pretrain.get_config())  # the default
    for change in (lambda c: c.model.text.update(trainable_layers=1),
                   lambda c: c.model.text.update(cache_locked=False),
                   lambda c: c.data.update(procedural=True)):
        c = pretrain.get_config()
        change(c)
        assert not report_cache.enabled(c)


def test_cache_encodes_each_distinct_report_once_as_the_model_does(minilm):
    model, params, tokenizer = minilm
    cache = report_cache.ReportCache.build(model, params, tokenizer, REPORTS, 24, batch_size=2)
    assert len(cache) == 3 and cache.features.shape == (3, 384)
    tokens = text.tokenize(tokenizer, REPORTS, 24)
    got = cache.lookup(tokens["input_ids"])
    # Each report alone through the model (batch of one, no padding rows beside it).
    encode = jax.jit(lambda i, m: model.encode_text({"text": params}, i, m))
    want = np.concatenate([np.asarray(encode(tokens["input_ids"][i:i + 1],
                                             tokens["attention_mask"][i:i + 1]))
                           for i in range(len(REPORTS))])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(got[0], got[2]) and not np.allclose(got[0], got[1])

    batch = {"xray": {"input_ids": tokens["input_ids"][:2]},
             "ct": {"input_ids": tokens["input_ids"][2:]}, "other": 1}
    out = cache.attach(batch)
    np.testing.assert_array_equal(out["ct"][step_lib.TEXT_FEATURES], got[2:])
    assert out["other"] == 1 and step_lib.TEXT_FEATURES not in batch["ct"]  # a new dict

    unseen = text.tokenize(tokenizer, ["Bilateral ground glass opacities."], 24)["input_ids"]
    with pytest.raises(ValueError, match="not among the 3 cached.*cache_locked=False"):
        cache.lookup(unseen, "xray batch")
    with pytest.raises(ValueError, match=r"shape \(1, 16\).*reports of 24 tokens"):
        cache.lookup(unseen[:, :16], "xray batch")
    with pytest.raises(ValueError, match="no reports"):
        report_cache.ReportCache.build(model, params, tokenizer, [], 24)


def _step(model, config, state, batch):
    f = lambda p, b: step_lib.pretrain_step(p, teacher_params(p), state["centers"], b,
                                            jax.random.key(3), jnp.int32(5), model=model,
                                            config=config)
    return _jit(f)(state["params"], batch)


def test_step_on_cached_features_equals_the_step_running_the_tower(text_folder):  # noqa: F811
    """Loss, metrics and every gradient leaf of the full step (SD, attentive selection and
    masking, per-modality CLIP) are the same with the locked tower's features given."""
    config = tiny_config(text_folder)
    config.model.text.update(trainable_layers=0, pooling="mean")
    config.objective.clip.joint = False
    s = step_lib.make_setup(config)
    state = _jit(s.init)(jax.random.key(0), s.text_params)
    model, batch = s.model, tiny_batch()
    batch["xray"]["attention_mask"][:, T // 2:] = 0
    encode = _jit(lambda p, i, m: model.encode_text(p, i, m))
    cached = {k: dict(v, **{step_lib.TEXT_FEATURES: np.asarray(encode(
        state["params"], v["input_ids"], v["attention_mask"]))}) for k, v in batch.items()}

    loss, grads, metrics, centers = _step(model, config, state, batch)
    loss_c, grads_c, metrics_c, centers_c = _step(model, config, state, cached)
    assert float(loss_c) == pytest.approx(float(loss), rel=1e-5)
    for key in ("loss_vl", "loss_icl", "loss_pcl"):
        assert float(metrics_c[key]) == pytest.approx(float(metrics[key]), rel=1e-5), key
    flat, flat_c = _flat(grads), _flat(grads_c)
    assert flat.keys() == flat_c.keys()
    for key in flat:
        np.testing.assert_allclose(np.asarray(flat_c[key]), np.asarray(flat[key]),
                                   rtol=1e-4, atol=1e-6, err_msg=key)
    assert any(np.abs(np.asarray(flat[k])).max() > 0 for k in flat if k.startswith("txt_proj"))
    assert all(np.abs(np.asarray(flat[k])).max() == 0 for k in flat if k.startswith("text/"))
    for a, b in zip(jax.tree.leaves(centers_c), jax.tree.leaves(centers)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # The step reads the features: other features, another L_vl.
    shifted = {k: dict(v, **{step_lib.TEXT_FEATURES: v[step_lib.TEXT_FEATURES][::-1].copy()})
               for k, v in cached.items()}
    assert float(_step(model, config, state, shifted)[2]["loss_vl"]) != pytest.approx(
        float(metrics["loss_vl"]), rel=1e-3)


def test_step_rejects_partial_misshapen_or_trainable_tower_features(text_folder):  # noqa: F811
    config = tiny_config(text_folder)  # trainable_layers=1
    s = step_lib.make_setup(config)
    state = _jit(s.init)(jax.random.key(0), s.text_params)
    batch = tiny_batch()
    width = s.model.text.config.hidden_size
    batch["ct"][step_lib.TEXT_FEATURES] = np.zeros((B3, width), np.float32)
    with pytest.raises(ValueError, match="in some sub-batches"):
        _step(s.model, config, state, batch)
    batch["xray"][step_lib.TEXT_FEATURES] = np.zeros((B2, width), np.float32)
    with pytest.raises(ValueError, match="trainable_layers=1"):
        _step(s.model, config, state, batch)
    config.model.text.trainable_layers = 0
    batch["xray"][step_lib.TEXT_FEATURES] = np.zeros((B2, width + 1), np.float32)
    with pytest.raises(ValueError, match=rf"has shape \({B2}, {width + 1}\), expected"):
        _step(s.model, config, state, batch)


def _losses(workdir):
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return [r["loss"] for r in rows if "loss" in r]


def test_trainer_with_the_cache_trains_as_without(tmp_path, monkeypatch):
    """The test config with a locked tower, 4 steps from stored records: the cache is used and
    the logged losses equal those of the run that runs the tower in every step."""
    attached = []
    attach = report_cache.ReportCache.attach
    monkeypatch.setattr(report_cache.ReportCache, "attach",
                        lambda self, batch: attached.append(1) or attach(self, batch))
    runs = {}
    for cache in (True, False):
        c = pretrain.get_config("test")
        c.data.data_dir = str(tmp_path / "data")
        c.model.text.update(trainable_layers=0, cache_locked=cache)
        c.data.procedural = False
        c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 4, 1, 4
        c.eval_at_end = False
        assert report_cache.enabled(c) == cache
        workdir = tmp_path / f"cache_{cache}"
        trainer.train_and_evaluate(c, str(workdir))
        runs[cache] = _losses(workdir)
    assert len(runs[True]) == 4 and len(attached) >= 4  # every step's batch (+ prefetched)
    np.testing.assert_allclose(runs[True], runs[False], rtol=1e-4)
