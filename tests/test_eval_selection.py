"""Slice-selection scoring, retrieval metrics, and the pretraining evaluation on planted cases."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from test_losses import clip_reference  # noqa: E402  (tests/ is on the path)
from unimedi_jax.data import text
from unimedi_jax.eval import features, metrics, pretrain_eval, retrieval, selection_eval
from unimedi_jax.models import bert

# ---------------------------------------------------------------- selection scoring


def test_slab_truth_and_top_k():
    flags = np.zeros((2, 8), np.uint8)
    flags[0, 3] = flags[1, 6:] = 1
    np.testing.assert_array_equal(selection_eval.slab_truth(flags, 2),
                                  [[0, 1, 0, 0], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="divisible"):
        selection_eval.slab_truth(flags, 3)
    scores = np.array([[0.1, 0.5, 0.5, 0.2]])  # tie: lower index first, as jax.lax.top_k
    np.testing.assert_array_equal(selection_eval.top_k(scores, 2), [[1, 2]])
    np.testing.assert_array_equal(jax.lax.top_k(jnp.asarray(scores), 2)[1], [[1, 2]])


def test_selection_precision_planted_random_and_prior():
    rng = np.random.default_rng(0)
    truth = rng.random((40, 6)) < 0.35
    truth[:5] = False  # volumes without findings are skipped
    k = 2
    planted = truth + 0.01 * rng.random(truth.shape)  # finding slabs score highest
    prior = np.array([4, 1, 0, 2, 3, 5])
    got = selection_eval.selection_precision(planted, truth, k, prior)
    rows = truth.any(1)
    m = truth[rows].sum(1)
    assert got["slice_precision_volumes"] == rows.sum()
    assert got["slice_precision"] == pytest.approx(np.mean(np.minimum(m, k) / k))
    # Random: the average over every k-subset of slabs, enumerated.
    subsets = list(itertools.combinations(range(6), k))
    random = np.mean([[t[list(s)].mean() for s in subsets] for t in truth[rows]])
    assert got["slice_precision_random"] == pytest.approx(random)
    assert got["slice_precision_prior"] == pytest.approx(truth[rows][:, [4, 1]].mean())
    everything = selection_eval.selection_precision(planted, np.ones_like(truth), k, prior)
    assert everything["slice_precision"] == 1.0
    none = selection_eval.selection_precision(planted, np.zeros_like(truth), k, prior)
    assert none["slice_precision_volumes"] == 0 and np.isnan(none["slice_precision"])


def test_prior_ranking_by_hand():
    train = np.array([[1, 0, 1, 0], [0, 0, 1, 1], [1, 0, 1, 0]], bool)
    # Frequencies 2/3, 0, 1, 1/3 -> positions 2, 0, 3, 1.
    np.testing.assert_array_equal(selection_eval.prior_ranking(train), [2, 0, 3, 1])


# ---------------------------------------------------------------- retrieval metrics


def test_retrieval_metrics_planted():
    labels = np.array([[1, 0], [0, 0], [0, 0], [1, 1], [0, 0]], np.float32)
    emb = np.eye(5)
    out = retrieval.retrieval_metrics(emb, emb, labels, (1, 2))
    assert out["i2t_r1"] == out["t2i_r1"] == 1.0
    assert out["i2t_findings_r1"] == 1.0
    assert out["findings_baseline_r1"] == pytest.approx(3 / 5)
    assert out["findings_baseline_r2"] == pytest.approx(4 / 5)
    assert out["chance_r2"] == pytest.approx(2 / 5)
    # Reports shifted by one: no exact pair at rank 1; findings hits where the labels agree.
    shifted = np.roll(emb, 1, axis=0)
    out = retrieval.retrieval_metrics(emb, shifted, labels, (1,))
    assert out["i2t_r1"] == 0.0
    i2t_hits = [np.array_equal(labels[i], labels[(i - 1) % 5]) for i in range(5)]
    t2i_hits = [np.array_equal(labels[i], labels[(i + 1) % 5]) for i in range(5)]
    assert out["i2t_findings_r1"] == pytest.approx(np.mean(i2t_hits))
    assert out["t2i_findings_r1"] == pytest.approx(np.mean(t2i_hits))


# ---------------------------------------------------------------- pretraining evaluation

DEPTH, SIDE, PATCH_DEPTH = 8, 32, 2
SCALE = 5.0  # the planted run's CLIP logit multiplier
FINDING_HU, NORMAL_HU = 500, -500


def _records(n, seed, with_flags=True):
    """CT records whose finding slices are bright; every finding volume has >= 2 finding slabs."""
    rng = np.random.default_rng(seed)
    words = ["nodule", "effusion", "clear lungs", "consolidation", "normal heart"]
    out = []
    for i in range(n):
        flags = np.zeros(DEPTH, np.uint8)
        if i % 4:
            slabs = rng.choice(DEPTH // PATCH_DEPTH, size=rng.integers(2, 4), replace=False)
            for s in slabs:
                flags[s * PATCH_DEPTH + rng.integers(0, PATCH_DEPTH)] = 1
        volume = np.full((DEPTH, SIDE, SIDE), NORMAL_HU, np.int16)
        volume[flags.astype(bool)] = FINDING_HU
        volume += rng.integers(0, 50, volume.shape).astype(np.int16)
        labels = (rng.random(2) < 0.5).astype(np.float32)
        record = {"id": str(i), "volume": volume, "labels": labels,
                  "report": " ".join(rng.choice(words, 3)) + f" case {i % 7}."}
        if with_flags:
            record["slice_has_finding"] = flags
        out.append(record)
    return out


class FakeModel:
    """Stands in for UniMedI: slab attention = slab brightness; embeddings simple functions of
    the input (pixels) and of the tokens, recomputed in numpy by the test."""

    class vit:
        patch_size_3d = (PATCH_DEPTH, 16, 16)

    text_checkpoint = bert.default_checkpoint()

    def encode_image(self, params, volume=None, images=None):
        if images is None:  # slab scoring: per-token mean intensity, depth-major
            b = volume.shape[0]
            tokens = volume.reshape(b, DEPTH // PATCH_DEPTH, PATCH_DEPTH, 2, 16, 2, 16)
            return None, {"cls_attn": tokens.mean((2, 4, 6)).reshape(b, -1),
                          "grid_3d": (DEPTH // PATCH_DEPTH, 2, 2)}
        # Embedding pass: volume chunk means plus the mean of the selected slices.
        return jnp.concatenate([volume.reshape(volume.shape[0], 4, -1).mean(-1),
                                images.mean((1, 2, 3))[:, None]], axis=1), {}

    def project_image(self, params, x):
        return x * params["scale"]

    def encode_text(self, params, ids, mask):
        return ids[:, 1:6].astype(jnp.float32)

    def project_text(self, params, x):
        return x * params["scale"]


def _expected(records, train, config, k):
    """The evaluation's numbers, computed here in numpy from the same records."""
    tokenizer = text.cached_tokenizer(FakeModel.text_checkpoint)
    vols = np.stack([r["volume"] for r in records]).astype(np.float64)
    vols = (np.clip(vols, -1000, 1000)) / 1000.0  # preprocess.normalize_ct
    flags = np.stack([r["slice_has_finding"] for r in records])
    slab_mean = vols.reshape(len(vols), DEPTH // PATCH_DEPTH, -1).mean(-1)
    chosen = np.argsort(-slab_mean, axis=1, kind="stable")[:, :k]
    centre = chosen * PATCH_DEPTH + PATCH_DEPTH // 2
    slices = np.take_along_axis(vols, centre[:, :, None, None], axis=1)
    image = np.concatenate([vols.reshape(len(vols), 4, -1).mean(-1),
                            slices.mean((1, 2, 3))[:, None]], axis=1)
    ids = text.tokenize(tokenizer, [r["report"] for r in records],
                        config.model.text.max_length)["input_ids"][:, 1:6].astype(np.float64)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    ids /= np.linalg.norm(ids, axis=1, keepdims=True)
    sim = image @ ids.T
    labels = np.stack([r["labels"] for r in records])
    same = (labels[:, None] == labels[None]).all(-1)
    truth = flags.reshape(len(flags), -1, PATCH_DEPTH).any(-1)
    train_truth = np.stack([r["slice_has_finding"] for r in train]).reshape(
        len(train), -1, PATCH_DEPTH).any(-1)
    prior = np.argsort(-train_truth.mean(0), kind="stable")[:k]
    rows = truth.any(1)
    groups = metrics.group_ids(labels)
    top_group = np.bincount(groups).argmax()
    batch = config.data.batch_size_ct
    return {
        "clip_loss_ct": np.mean([clip_reference(image[i:i + batch], ids[i:i + batch], SCALE)
                                 for i in range(0, len(image) - batch + 1, batch)]),
        "retrieval_r1_ct": metrics.recall_at_k(sim, np.eye(len(sim), dtype=bool), (1,))[1],
        "retrieval_r1_findings_ct": metrics.recall_at_k(sim, same, (1,))[1],
        "retrieval_r1_findings_baseline_ct": np.mean(groups == top_group),
        "retrieval_r1_chance_ct": 1 / len(sim),
        "slice_precision": np.take_along_axis(truth, chosen, 1)[rows].mean(),
        "slice_precision_random": truth[rows].mean(),
        "slice_precision_prior": truth[rows][:, prior].mean(),
    }


def test_evaluate_planted(monkeypatch):
    config = pretrain.get_config()
    config.data.ct.crop_size = (DEPTH, SIDE, SIDE)
    config.objective.selection.k = 2
    config.eval.update(max_examples=13, batch_size=4)  # 13 = 3 full batches + 1 padded
    config.eval.prompts = {}  # two planted labels, no finding names: no zero-shot
    config.data.batch_size_ct = 4  # the validation CLIP loss over 3 batches of 4
    val, train = _records(20, 0), _records(12, 1)
    monkeypatch.setattr(pretrain_eval.UniMedI, "from_config", lambda c: FakeModel())
    params = {"scale": jnp.float32(2.0), "logit_scale": jnp.float32(np.log(SCALE))}
    got = pretrain_eval.evaluate(params, config, val, None, train)
    expected = _expected(val[:13], train, config, 2)
    assert got["slice_precision"] == 1.0  # attention planted on the finding slabs
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert got["retrieval_r1"] == got["retrieval_r1_ct"]
    assert "retrieval_r1_xray" not in got


def test_evaluate_real_model_tiny():
    """The real model end to end on both modalities: every metric present and in range."""
    from unimedi_jax.data import phantom, sources
    from unimedi_jax.models.unimedi import UniMedI

    config = pretrain.get_config()
    config.model.vit.update(width=32, depth=1, num_heads=2, mlp_dim=64, image_size=32,
                            volume_size=(16, 32, 32))
    config.model.text.num_layers = 1
    config.model.proj_dim = 16
    config.model.dino.update(hidden_dim=32, bottleneck_dim=16, out_dim=64)
    config.data.xray.crop_size, config.data.ct.crop_size = 32, (16, 32, 32)
    config.objective.selection.k = 2
    config.eval.update(max_examples=10, batch_size=4)
    opts = phantom.PhantomOptions(volume_size=(16, 32, 32), image_size=40)
    source = lambda m, s: sources.ProceduralPhantomSource(m, phantom.split_seed(0, s), opts, 12)
    model = UniMedI.from_config(config)
    params = model.init(jax.random.key(0))
    got = pretrain_eval.evaluate(params, config, source("ct", "validation"),
                                 source("xray", "validation"), source("ct", "train"))
    for m in ("ct", "xray"):
        assert got[f"retrieval_r1_chance_{m}"] == pytest.approx(0.1)
    mean = (got["retrieval_r1_ct"] + got["retrieval_r1_xray"]) / 2
    assert got["retrieval_r1"] == pytest.approx(mean)
    for key in ("retrieval_r1", "retrieval_r1_findings", "retrieval_r1_findings_baseline",
                "slice_precision", "slice_precision_random", "slice_precision_prior"):
        assert 0.0 <= got[key] <= 1.0, key
    assert 0.0 <= got["zero_shot_mean_auroc"] <= 1.0

    # A later evaluation (other weights, as during training) reuses every compiled evaluator.
    other = {**params, "vision": jax.jit(model.init_random)(jax.random.key(1))["vision"]}
    again = pretrain_eval.evaluate(other, config, source("ct", "validation"),
                                   source("xray", "validation"), source("ct", "train"))
    assert again["image_embedding_mean_cosine"] != got["image_embedding_mean_cosine"]
    sel = features.Selection.from_config(config.objective.selection)
    for m in ("ct", "xray"):
        assert features.clip_encoder(model, m, sel)._cache_size() == 1, m
    assert features._text_encoder(model)._cache_size() == 1

    # A method without language: the collapse of the backbone [CLS] alone.
    config.method = "joint"
    vision = {"vision": params["vision"]}
    got = pretrain_eval.evaluate(vision, config, source("ct", "validation"),
                                 source("xray", "validation"), source("ct", "train"))
    cls = {"ct": model.encode_image(vision, volume=np.stack(
               [r["volume"] for r in _center(source("ct", "validation"), "ct", config)]))[0],
           "xray": model.encode_image(vision, images=np.stack(
               [r["image"] for r in _center(source("xray", "validation"), "xray", config)]
           )[:, None])[0]}
    for m in ("ct", "xray"):
        x = np.asarray(cls[m], np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        n = len(x)
        expected = ((x @ x.T).sum() - n) / (n * (n - 1))
        assert got[f"cls_mean_cosine_{m}"] == pytest.approx(expected, abs=1e-5), m
    assert set(got) == {f"cls_{k}{m}" for k in ("mean_cosine", "effective_rank")
                        for m in ("", "_ct", "_xray")}


def _center(source, modality: str, config) -> list[dict]:
    """The first config.eval.max_examples records of source through the evaluation view."""
    from unimedi_jax.data import transforms

    crop = transforms.CenterCrop(modality, config.data[modality].crop_size)
    return [crop.map(dict(source[i])) for i in range(config.eval.max_examples)]


def test_eval_batches_pad_and_check_records():
    records = _records(5, 2)
    batches = list(features.eval_batches(records, modality="ct", crop_size=(DEPTH, SIDE, SIDE),
                                         batch_size=4, fields=("labels", "slice_has_finding")))
    assert [n for _, n in batches] == [4, 1]
    last = batches[-1][0]
    assert last["volume"].shape == (4, DEPTH, SIDE, SIDE)
    np.testing.assert_array_equal(last["labels"][1:], np.repeat(last["labels"][:1], 3, 0))
    bad = _records(3, 3)
    bad[2]["labels"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="record 2: field 'labels'"):
        list(features.eval_batches(bad, modality="ct", crop_size=(DEPTH, SIDE, SIDE),
                                   batch_size=2, name="bad"))
    with pytest.raises(ValueError, match="slice_has_finding"):
        selection_eval.truth_only(_records(3, 4, with_flags=False), crop_size=(DEPTH, SIDE, SIDE),
                                  batch_size=2, patch_depth=PATCH_DEPTH, name="x")


def test_apply_batched_on_a_mesh_splits_each_batch_over_its_batch_axes():
    """With the training mesh, every batch reaches fn split over (data, fsdp), the params stay
    where they lie, and the outputs come back in order without the padding."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from unimedi_jax.models.layers import BATCH_AXES
    from unimedi_jax.train import sharding

    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
    params = jax.device_put(np.float32(2.0), NamedSharding(mesh, P()))
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    seen = []

    def fn(p, batch):
        seen.append(batch["x"].sharding)
        return {"y": batch["x"] * p}

    batches = [(features.pad_batch({"x": x[i:i + 8]}, 8), min(8, 10 - i)) for i in (0, 8)]
    got = features.apply_batched(fn, params, batches, keep=("x",), mesh=mesh)
    np.testing.assert_array_equal(got["y"], 2 * x)
    np.testing.assert_array_equal(got["x"], x)
    assert all(s.spec == P(BATCH_AXES) and s.mesh == mesh for s in seen), seen
    with pytest.raises(ValueError, match=r"\[6\] rows does not split over the 8 devices"):
        features.apply_batched(fn, params, [({"x": x[:6]}, 6)], mesh=mesh)
