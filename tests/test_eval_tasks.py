"""Downstream tasks end to end on tiny procedural phantoms, and the shared task plumbing."""

import importlib
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import planted_squares
from unimedi_jax import main
from unimedi_jax.data import preprocess, text
from unimedi_jax.eval import features, metrics, retrieval, tasks
from unimedi_jax.models.unimedi import UniMedI, teacher_params
from unimedi_jax.objective import selection
from unimedi_jax.train import checkpoint, validation

VOLUME = (16, 32, 32)
IMAGE = 32


def run_task(config, workdir):
    """The task as `python -m unimedi_jax.main` runs it."""
    return main.run(config, str(workdir))


def tiny(name: str, modality: str | None = None, init_from=None) -> ml_collections.ConfigDict:
    """configs/NAME.py shrunk: a 2-block width-32 ViT, 1 text layer, 16x32x32 phantoms; the
    encoder of the `pretrained` workdir when given (a random init compiles for seconds)."""
    config = importlib.import_module(f"configs.{name}").get_config()
    config.model.vit.update(width=32, depth=2, num_heads=2, mlp_dim=64, image_size=IMAGE,
                            volume_size=VOLUME)
    config.model.text.num_layers = 1
    config.model.proj_dim = 16
    config.model.dino.update(hidden_dim=32, bottleneck_dim=16, out_dim=64)
    config.batch_size = 8
    data = config.data.to_dict()
    modality = modality or data["modality"]
    data.update(modality=modality, crop_size=IMAGE if modality == "xray" else VOLUME,
                procedural=True, max_examples={},
                build_options=dict(num_train=24, num_validation=8, num_test=16,
                                   volume_size=VOLUME, image_size=IMAGE + 8))
    config.data = ml_collections.ConfigDict(data)
    if "optim" in config:
        config.optim.update(max_epochs=2, patience=1, batch_size=8)
    if init_from is not None:
        config.init_from = str(init_from[0])
    return config


def read_results(workdir):
    with open(workdir / tasks.RESULTS_FILE) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pretraining workdir (config.json + one checkpoint) of a tiny model, and its params."""
    workdir = tmp_path_factory.mktemp("pretrain")
    config = tiny("retrieval")  # carries the pretraining's model and objective sections
    params = UniMedI.from_config(config).init(jax.random.key(123))
    checkpoint.save_config(config, str(workdir))
    ckpt = checkpoint.Checkpointer(str(workdir), asynchronous=False)
    ckpt.save(7, {"params": params, "teacher": teacher_params(params)})
    ckpt.close()
    return workdir, params


def test_linear_probe_2d(tmp_path):
    config = tiny("linear_probe_2d")
    out = run_task(config, tmp_path)
    assert out == read_results(tmp_path)
    assert out["init"] == "random" and out["task"] == "linear_probe"
    assert set(out["metrics"]) == {"0.01", "0.1", "1"}
    assert [out["metrics"][f]["num_train"] for f in ("0.01", "0.1", "1")] == [1, 3, 24]
    for m in out["metrics"].values():
        assert set(m["auroc_per_label"]) == {"nodule", "consolidation", "ground_glass",
                                             "effusion", "cardiomegaly"}
        defined = [v for v in m["auroc_per_label"].values() if v is not None]
        assert m["auroc_macro"] == pytest.approx(np.mean(defined))


def test_linear_probe_3d_binary(tmp_path, pretrained):
    config = tiny("linear_probe_3d", init_from=pretrained)
    config.label_type = "binary"
    config.data.labels = ("cardiomegaly",)
    config.fractions = (1.0,)
    out = run_task(config, tmp_path)
    assert 0.0 <= out["metrics"]["1"]["auroc"] <= 1.0 and out["labels"] == ["cardiomegaly"]


def test_finetune_3d(tmp_path, pretrained):
    out = run_task(tiny("finetune_3d", init_from=pretrained), tmp_path)
    m = out["metrics"]["1"]
    assert m["num_train"] == 24 and 1 <= m["epochs_run"] <= 2 and 0 <= m["auroc_macro"] <= 1


@pytest.mark.parametrize("name,per_class", [("seg_2d", False), ("seg_3d", False),
                                            ("seg_3d", True)])
def test_segmentation(tmp_path, pretrained, name, per_class):
    config = tiny(name, init_from=pretrained)
    if per_class:  # one class per finding, Dice + CE (BCV: per organ)
        config.data.seg_binary = False
        config.loss = "dice_ce"
    config.fractions = (1.0,)
    config.optim.steps_per_epoch = 0
    if name == "seg_3d":
        config.unetr.feature_size = 4
        config.optim.update(batch_size=2, max_epochs=1)
        config.data.max_examples = dict(train=4, validation=2, test=4)
    out = run_task(config, tmp_path)
    m = out["metrics"]["1"]
    classes = (["nodule", "consolidation", "ground_glass", "effusion", "cardiomegaly"]
               if per_class else ["foreground"])  # defaults: the findings as one foreground
    assert list(m["dice_per_class"]) == classes
    defined = [v for v in m["dice_per_class"].values() if v is not None]
    assert m["dice"] == pytest.approx(np.mean(defined)) and 0 <= m["dice"] <= 1
    assert list(m["history"][0]["val_dice_per_class"]) == classes  # Dice over training
    for key in ("dice_present", "clean_absent", "dice_empty_as_one"):  # where it is lost
        assert list(m[key + "_per_class"]) == classes
        assert list(m["history"][0][f"val_{key}_per_class"]) == classes


def test_detection(tmp_path, pretrained):
    config = tiny("detection_2d", init_from=pretrained)
    config.fractions = (0.1,)
    config.optim.update(max_epochs=1, steps_per_epoch=2)
    config.fcos.num_convs = 1
    out = run_task(config, tmp_path)
    assert out["classes"] == ["nodule", "consolidation", "ground_glass", "effusion",
                              "cardiomegaly"] and out["test_boxes"] > 0
    m = out["metrics"]["0.1"]
    assert m["num_train"] == 3 and m["epochs_run"] == 1 and 0 <= m["map"] <= m["map50"] <= 1
    assert (tmp_path / out["figure"]).stat().st_size > 0


def test_slice_selection(tmp_path, pretrained):
    config = tiny("slice_selection", init_from=pretrained)
    config.ks = (1, 2)
    out = run_task(config, tmp_path)
    for k in ("k=1", "k=2"):
        m = out["metrics"][k]
        assert m["slice_precision_volumes"] > 0
        for key in ("slice_precision", "slice_precision_random", "slice_precision_prior"):
            assert 0 <= m[key] <= 1
    assert sorted(out["prior_ranking"]) == [0, 1, 2, 3]


@pytest.mark.parametrize("modality", ["xray", "ct"])
def test_zero_shot(tmp_path, pretrained, modality):
    out = run_task(tiny("zero_shot", modality, pretrained), tmp_path)
    per_label = out["metrics"]["auroc_per_label"]
    assert set(per_label) == {"nodule", "consolidation", "ground_glass", "effusion",
                              "cardiomegaly"}
    defined = [v for v in per_label.values() if v is not None]
    assert out["metrics"]["auroc_mean"] == pytest.approx(np.mean(defined))


def test_retrieval_from_pretrained_matches_direct_computation(tmp_path, pretrained):
    """The task loads the checkpoint's student params: its metrics equal those computed here
    from the saved params."""
    workdir, params = pretrained
    config = tiny("retrieval", "ct", pretrained)
    out = run_task(config, tmp_path)
    assert (out["init"], out["init_step"], out["init_params"]) == ("pretrained", 7, "params")
    # The same embeddings from the model's own calls on the stored records (float64 below).
    model, sel = UniMedI.from_config(config), config.objective.selection
    source = tasks.open_splits(config.data, ("test",))[0]["test"]
    records = [source[i] for i in range(len(source))]
    volume = jnp.asarray(np.stack([preprocess.preprocess_ct(r["volume"], VOLUME)
                                   for r in records]), jnp.float32)
    _, attn = model.encode_image(params, volume=volume)
    slices, _ = selection.select_slices(volume, selection.volume_slab_scores(attn, 0), sel.k,
                                        sel.slice_mode, model.vit.patch_size_3d[0])
    cls, _ = model.encode_image(params, volume=volume, images=slices)
    tokens = text.tokenize(text.cached_tokenizer(model.text_checkpoint),
                           [text.as_text(r["report"]) for r in records],
                           config.model.text.max_length)
    txt = model.encode_text(params, tokens["input_ids"], tokens["attention_mask"])
    unit = lambda x: np.asarray(x, np.float64) / np.linalg.norm(np.asarray(x, np.float64),
                                                                 axis=1, keepdims=True)
    sim = unit(model.project_image(params, cls)) @ unit(model.project_text(params, txt)).T
    labels = np.stack([np.asarray(r["labels"]) for r in records])
    same = (labels[:, None] == labels[None]).all(-1)
    assert out["num_examples"] == len(records)
    # R@1 of each query: its best relevant candidate is the top one. The task's float32 batches
    # may order candidates within float32 noise of each other either way (a random encoder's
    # embeddings are close; identical reports tie): bounds with such near-ties lost / won.
    for name, s_ in (("i2t", sim), ("t2i", sim.T)):
        for key, relevant in (("", np.eye(len(s_), dtype=bool)), ("_findings", same)):
            best = np.where(relevant, s_, -np.inf).max(1)
            top = s_.max(1)
            lost, won = np.mean(best >= top), np.mean(best >= top - 1e-5)
            got = out["metrics"][f"{name}{key}_r1"]
            assert lost - 1e-9 <= got <= won + 1e-9, (name + key, lost, got, won)


def test_linear_probe_from_teacher(tmp_path, pretrained):
    config = tiny("linear_probe_2d", init_from=pretrained)
    config.init_params = "teacher"
    config.fractions = (1.0,)
    out = run_task(config, tmp_path)
    assert (out["init"], out["init_params"]) == ("pretrained", "teacher")
    config = tiny("retrieval", init_from=pretrained)
    config.init_params = "teacher"
    with pytest.raises(ValueError, match="no text encoder"):
        run_task(config, tmp_path)


# ---------------------------------------------------------------- plumbing


def test_fraction_indices_deterministic_and_nested():
    small = tasks.fraction_indices(1000, 0.01, seed=3)
    large = tasks.fraction_indices(1000, 0.1, seed=3)
    assert len(small) == 10 and len(large) == 100 and set(small) <= set(large)
    np.testing.assert_array_equal(small, tasks.fraction_indices(1000, 0.01, seed=3))
    assert not np.array_equal(small, tasks.fraction_indices(1000, 0.01, seed=4))
    assert len(tasks.fraction_indices(7, 0.01, seed=0)) == 1
    assert len(tasks.fraction_indices(7, 1.0, seed=0)) == 7
    with pytest.raises(ValueError, match="fraction"):
        tasks.fraction_indices(7, 0.0, seed=0)


def test_targets_and_label_columns():
    labels = np.array([[0, 1, 0], [1, 0, 0]], np.float32)
    np.testing.assert_array_equal(tasks.targets(labels, "multiclass", "x"), [1, 0])
    np.testing.assert_array_equal(tasks.targets(labels, "multilabel", "x"), labels)
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        tasks.targets(np.array([[0, 1, 0], [1, 1, 0]], np.float32), "multiclass", "x")
    with pytest.raises(ValueError, match="one label"):
        tasks.targets(labels, "binary", "x")
    assert tasks.label_columns(("a", "b", "c"), ("c", "a")) == [2, 0]
    assert tasks.label_columns(("a", "b"), ()) == [0, 1]
    with pytest.raises(ValueError, match="config.data.labels"):
        tasks.label_columns(("a", "b"), ("z",))


def test_early_stopping_keeps_the_best_state():
    val = [5.0, 3.0, 4.0, 2.5, 2.6, 2.7, 2.8, 1.0]
    best, history = tasks.early_stopping(lambda s, e: (s + 1, 0.0), lambda s: val[s - 1], 0,
                                         max_epochs=8, patience=3)
    assert best == 4 and history["best_epoch"] == 3 and history["epochs_run"] == 7
    best, history = tasks.early_stopping(lambda s, e: (s + 1, 0.0), lambda s: val[s - 1], 0,
                                         max_epochs=8, patience=10,
                                         monitor=lambda s: {"twice": 2 * s})
    assert best == 8 and history["epochs_run"] == 8
    assert [h["twice"] for h in history["history"]] == list(range(2, 18, 2))


def test_steps_per_epoch():
    optim = ml_collections.ConfigDict(dict(batch_size=16, steps_per_epoch=0))
    assert tasks.steps_per_epoch(33, optim) == 3  # one pass
    optim.steps_per_epoch = 20  # a fixed budget for every label fraction
    assert tasks.steps_per_epoch(4, optim) == tasks.steps_per_epoch(2000, optim) == 20
    optim.steps_per_epoch = -1
    with pytest.raises(ValueError, match="steps_per_epoch"):
        tasks.steps_per_epoch(4, optim)


def test_subset_and_padding():
    source = [{"i": np.array(i)} for i in range(5)]
    sub = features.Subset(source, [4, 1])
    assert len(sub) == 2 and int(sub[0]["i"]) == 4 and int(features.head(source, 3)[2]["i"]) == 2
    assert len(features.head(source, 0)) == 5
    with pytest.raises(IndexError):
        features.Subset(source, [5])
    padded = features.pad_batch({"x": np.arange(3)}, 5)
    np.testing.assert_array_equal(padded["x"], [0, 1, 2, 2, 2])


def test_train_batches_follow_config_augment():
    """config.data.augment reaches a task's training batches: a certain flip mirrors the image
    and its mask; an unknown field is rejected by the task's config check, before any loading,
    and by the batches themselves."""
    config = tiny("seg_2d")
    config.data.augment = dict(flip_prob=1.0, crop_jitter=0)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (IMAGE, IMAGE), np.uint8)
    mask = rng.integers(0, 3, (IMAGE, IMAGE), np.uint8)
    source = [{"image": image, "mask": mask, "labels": np.zeros(5, np.float32)}]
    config.optim.batch_size = 1
    batch = next(tasks.train_batches(config, source, [0], with_mask=True))
    np.testing.assert_array_equal(batch["image"][0], np.flip(preprocess.normalize_xray(image), -1))
    np.testing.assert_array_equal(batch["mask"][0], np.flip(mask, -1))
    config.data.augment = dict(flip=1.0)
    with pytest.raises(ValueError, match="config.data.augment: unknown"):
        tasks.train_batches(config, source, [0], with_mask=True)
    config.init_from = "/nowhere"  # would fail to load, were the config check not first
    with pytest.raises(validation.ConfigError, match=r"config.data.augment: unknown .*\['flip'\]"):
        main.run(config, "/nowhere")


def test_results_nan_is_null(tmp_path):
    config = ml_collections.ConfigDict({"task": "t"})
    loaded = tasks.Loaded(None, {}, config, {"init": "random"})
    out = tasks.write_results(str(tmp_path), config, loaded, {"metrics": {"a": math.nan,
                                                                         "b": np.float32(0.5)}})
    assert out["metrics"] == {"a": None, "b": 0.5} and read_results(tmp_path) == out


# ---------------------------------------------------------------- learning on planted data


def test_linear_probe_learns_planted_features():
    """Features that carry the labels: the trained probe ranks / classifies the test set right."""
    from unimedi_jax.eval import linear_probe

    rng = np.random.default_rng(0)
    config = ml_collections.ConfigDict({"label_type": "multilabel", "optim": dict(
        lr=5e-2, weight_decay=1e-6, batch_size=32, max_epochs=30, patience=5)})
    labels = (rng.random((300, 3)) < 0.4).astype(np.float32)
    x = np.concatenate([2 * labels - 1, rng.normal(size=(300, 5))], 1).astype(np.float32)
    x += 0.5 * rng.normal(size=x.shape).astype(np.float32)
    split = lambda a: (a[:200], a[200:250], a[250:])
    (xt, xv, xs), (yt, yv, ys) = split(x), split(labels)
    head, params, history = linear_probe.train_probe(config, (xt, yt), (xv, yv), 3, seed=0)
    logits = np.asarray(head.apply({"params": params}, xs))
    got = linear_probe.classification_metrics(logits, ys, "multilabel", ["a", "b", "c"])
    assert got["auroc_macro"] > 0.95 and history["best_epoch"] >= 0
    config.label_type = "multiclass"
    classes = labels.argmax(1).astype(np.int32)
    x = (3 * np.eye(3)[classes] + 0.5 * rng.normal(size=(300, 3))).astype(np.float32)
    (xt, xv, xs), (yt, yv, ys) = split(x), split(classes)
    head, params, _ = linear_probe.train_probe(config, (xt, yt), (xv, yv), 3, seed=0)
    logits = np.asarray(head.apply({"params": params}, xs))
    assert linear_probe.classification_metrics(logits, ys, "multiclass", [])["accuracy"] > 0.9


def test_segmentation_learns_planted_mask():
    """Bright squares on noise, mask = the squares: a 2D UNETR on a frozen random encoder
    learns them (the path run() trains: make_model, fit, predict)."""
    from unimedi_jax.eval import decoders, segmentation
    from unimedi_jax.models import vit as vit_lib

    rng = np.random.default_rng(0)

    def batch(n):  # stored class 4 = label 3 ("effusion")
        return planted_squares(rng, n, IMAGE, (6, 12), 4)

    config = ml_collections.ConfigDict({"data": {"modality": "xray"}, "loss": "focal_dice",
                                        "focal_alpha": 10.0})
    vit = vit_lib.ViT(width=16, depth=1, num_heads=2, mlp_dim=32, image_size=IMAGE)
    decoder = decoders.UNETR(1, (16, 16), depth=1, feature_size=4)
    table, names = segmentation.class_table(("a", "b", "c", "effusion"), ("effusion",), True)
    assert names == ["background", "foreground"] and table[4] == 1 and table[1] == 0
    loss, predict = segmentation.make_model(config, vit, decoder, table)
    sample = batch(8)
    params = {"vision": jax.jit(vit.init)(jax.random.key(0), images=sample["image"])["params"],
              "decoder": segmentation.init_decoder(vit, decoder, sample, "xray", 0)}
    train = iter(lambda: batch(8), None)
    val = [(batch(8), 8)]
    trained, _ = tasks.fit(loss, {"decoder": params["decoder"]}, {"vision": params["vision"]},
                           tasks.adamw(ml_collections.ConfigDict(dict(lr=1e-2, weight_decay=0))),
                           train, 15, lambda: val, max_epochs=2, patience=2)
    test = batch(16)
    out = jax.jit(predict)({"vision": params["vision"], **trained}, test)
    np.testing.assert_array_equal(out["target"], table[test["mask"]])
    dice = metrics.dice_summary(np.asarray(out["pred"]), np.asarray(out["target"]), 2)["dice"]
    assert dice > 0.8, dice


def test_segmentation_prior_sets_only_the_classifier_bias():
    """init_decoder with a prior: the classifier bias starts at logit(pi), so the predicted
    foreground probability is pi wherever the rest of the decoder outputs 0; every other
    parameter is the prior-free draw."""
    from unimedi_jax.eval import decoders, segmentation
    from unimedi_jax.models import vit as vit_lib

    sample = planted_squares(np.random.default_rng(0), 2, IMAGE, (6, 12), 4)
    vit = vit_lib.ViT(width=16, depth=1, num_heads=2, mlp_dim=32, image_size=IMAGE)
    decoder = decoders.UNETR(1, (16, 16), depth=1, feature_size=4)
    plain = segmentation.init_decoder(vit, decoder, sample, "xray", 0)
    prior = segmentation.init_decoder(vit, decoder, sample, "xray", 0, prior_prob=0.01)
    bias = np.asarray(prior["classifier"]["bias"])
    np.testing.assert_allclose(1.0 / (1.0 + np.exp(-bias.astype(np.float64))), 0.01, rtol=1e-6)
    np.testing.assert_array_equal(plain["classifier"]["bias"], 0.0)
    prior["classifier"]["bias"] = plain["classifier"]["bias"]
    jax.tree.map(np.testing.assert_array_equal, prior, plain)
    config = ml_collections.ConfigDict({"loss": "focal_dice", "prior_prob": 0.01})
    assert segmentation._prior(config) == 0.01
    config.loss = "dice_ce"  # softmax classes: no sigmoid prior
    assert segmentation._prior(config) is None
    for bad in (1.0, -0.01, 2.0):
        config.prior_prob = bad
        with pytest.raises(ValueError, match="config.prior_prob"):
            segmentation._prior(config)


def test_built_phantom_runs_a_task(tmp_path, pretrained):
    """The non-procedural path: build_dataset writes the phantom to data_dir; the task reads it."""
    config = tiny("slice_selection", init_from=pretrained)
    config.data.procedural = False
    config.data.data_dir = str(tmp_path / "data")
    config.data.build_options.update(num_train=6, num_validation=2, num_test=5)
    config.ks = (1,)
    sources, names = tasks.open_splits(config.data, ("train", "test"))
    assert [len(sources[s]) for s in ("train", "test")] == [6, 5] and names[0] == "nodule"
    assert (tmp_path / "data" / "phantom").is_dir()
    out = run_task(config, tmp_path / "run")
    assert out["metrics"]["k=1"]["slice_precision_volumes"] <= 5


class _FakeBuilder:
    """A prepared dataset with only the given splits (10 train records, 3 test records)."""

    def __init__(self, splits):
        self.info = ml_collections.ConfigDict({"splits": {s: 0 for s in splits},
                                               "metadata": {"label_names": ["a"]}})

    def as_data_source(self, split):
        return [{"split": split, "i": i} for i in range(10 if split == "train" else 3)]


def test_validation_carved_from_train_when_missing(monkeypatch):
    from data_prep import build

    splits = ["train", "test"]
    monkeypatch.setattr(build, "build_dataset", lambda *a, **k: _FakeBuilder(splits))
    data = ml_collections.ConfigDict(dict(name="bcv", modality="ct", data_dir="/x",
                                          build_options={}, validation_from_train=0.2,
                                          max_examples={}))
    sources, names = tasks.open_splits(data)
    train = [r["i"] for r in sources["train"]]
    val = [r["i"] for r in sources["validation"]]
    assert names == ("a",) and len(val) == 2 and len(train) == 8
    assert sorted(train + val) == list(range(10))
    assert all(r["split"] == "train" for r in sources["validation"])
    assert len(sources["test"]) == 3
    splits.remove("test")
    with pytest.raises(ValueError, match=r"no split\(s\) \['test'\]"):
        tasks.open_splits(data)


def test_init_from_not_a_workdir(tmp_path):
    config = tiny("slice_selection", init_from=(tmp_path / "nowhere",))
    with pytest.raises(FileNotFoundError, match="not a unimedi_jax workdir"):
        tasks.load_model(config, with_text=False)
    assert not (tmp_path / "nowhere").exists()
