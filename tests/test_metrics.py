"""Evaluation metrics against scikit-learn and brute-force numpy references."""

import itertools

import numpy as np
import pytest
from sklearn import metrics as skm

from test_losses import clip_reference  # noqa: E402  (tests/ is on the path)
from unimedi_jax.eval import metrics, pretrain_eval


@pytest.mark.parametrize("seed", range(5))
def test_binary_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = rng.integers(0, 8, 200).astype(np.float32)  # few distinct values: many ties
    np.testing.assert_allclose(metrics.binary_auroc(labels, scores),
                               skm.roc_auc_score(labels, scores), rtol=0, atol=1e-12)


def test_binary_auroc_one_class_is_nan_and_bad_labels_raise():
    assert np.isnan(metrics.binary_auroc(np.ones(5), np.arange(5.0)))
    with pytest.raises(ValueError, match="labels in"):
        metrics.binary_auroc(np.array([0, 2, 1]), np.arange(3.0))


def test_macro_auroc_skips_single_class_and_unknown_entries():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (120, 4)).astype(np.float32)
    labels[:, 2] = 1  # one class only: skipped
    labels[rng.random((120, 4)) < 0.2] = -1  # unknown entries: left out per label
    labels[:3, 2] = -1
    scores = rng.normal(size=(120, 4))
    per_label = metrics.per_label_auroc(labels, scores)
    expected = []
    for j in range(4):
        known = labels[:, j] >= 0
        if len(np.unique(labels[known, j])) < 2:
            expected.append(np.nan)
        else:
            expected.append(skm.roc_auc_score(labels[known, j], scores[known, j]))
    np.testing.assert_allclose(per_label, expected, rtol=0, atol=1e-12)
    assert np.isnan(per_label[2])
    np.testing.assert_allclose(metrics.macro_auroc(labels, scores), np.nanmean(expected),
                               rtol=0, atol=1e-12)
    assert np.isnan(metrics.macro_auroc(np.ones((4, 2)), np.zeros((4, 2))))


def test_accuracy_matches_sklearn():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    assert metrics.accuracy(y, p) == pytest.approx(skm.accuracy_score(y, p), abs=1e-12)
    with pytest.raises(ValueError):
        metrics.accuracy(y, p[:-1])


def _dice_reference(pred, true, num_classes):
    out = np.full((len(pred), num_classes), np.nan)
    for i in range(len(pred)):
        for c in range(num_classes):
            p, t = pred[i] == c, true[i] == c
            if p.sum() + t.sum():
                out[i, c] = 2.0 * (p & t).sum() / (p.sum() + t.sum())
    return out


@pytest.mark.parametrize("num_classes", [2, 4])
def test_dice_matches_numpy_reference(num_classes):
    rng = np.random.default_rng(num_classes)
    true = rng.integers(0, num_classes, (6, 5, 7, 3))
    pred = np.where(rng.random(true.shape) < 0.6, true, rng.integers(0, num_classes, true.shape))
    true[0] = 0
    pred[0] = 0  # sample 0: every foreground class empty in both -> NaN
    if num_classes > 2:
        true[1][true[1] == 3] = 0
        pred[1][pred[1] == 3] = 1  # class 3 absent from sample 1 in both maps
    ref = _dice_reference(pred, true, num_classes)
    np.testing.assert_allclose(metrics.dice_per_sample(pred, true, num_classes), ref,
                               rtol=0, atol=1e-12)
    summary = metrics.dice_summary(pred, true, num_classes)
    per_class = np.nanmean(ref[:, 1:], axis=0)
    np.testing.assert_allclose(summary["dice_per_class"], per_class, rtol=0, atol=1e-12)
    np.testing.assert_allclose(summary["dice"], per_class.mean(), rtol=0, atol=1e-12)
    # where the Dice is lost, by loops over samples and classes
    present_ref, clean_ref = [], []
    for c in range(1, num_classes):
        has = [bool((t == c).any()) for t in true]
        present_ref.append(np.mean([ref[i, c] for i in range(len(true)) if has[i]]))
        absent = [not (p == c).any() for i, p in enumerate(pred) if not has[i]]
        clean_ref.append(np.mean(absent) if absent else np.nan)
    np.testing.assert_allclose(summary["dice_present_per_class"], present_ref, rtol=0,
                               atol=1e-12)
    np.testing.assert_allclose(summary["dice_present"], np.mean(present_ref), rtol=0, atol=1e-12)
    np.testing.assert_allclose(summary["clean_absent_per_class"], clean_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(summary["clean_absent"], np.nanmean(clean_ref), rtol=0,
                               atol=1e-12)
    empty_as_one = np.where(np.isnan(ref[:, 1:]), 1.0, ref[:, 1:]).mean(0)
    np.testing.assert_allclose(summary["dice_empty_as_one_per_class"], empty_as_one, rtol=0,
                               atol=1e-12)


def test_dice_summary_splits_present_and_absent_samples():
    """Three X-rays: a finding partly found; none and a false-positive pixel; none, clean."""
    true = np.zeros((3, 4, 4), int)
    true[0, :2, :2] = 1
    pred = np.zeros_like(true)
    pred[0, :2, :1] = 1  # 2 of 4 pixels: Dice 2*2/(2+4) = 2/3
    pred[1, 3, 3] = 1    # absent, one pixel predicted: Dice 0, not clean
    summary = metrics.dice_summary(pred, true, 2)  # sample 2: absent, clean, Dice undefined
    assert summary["dice"] == pytest.approx(1 / 3)
    assert summary["dice_present"] == pytest.approx(2 / 3)
    assert summary["clean_absent"] == pytest.approx(1 / 2)
    assert summary["dice_empty_as_one"] == pytest.approx((2 / 3 + 0 + 1) / 3)


def test_dice_rejects_out_of_range_classes():
    with pytest.raises(ValueError, match="outside"):
        metrics.dice_per_sample(np.full((1, 2, 2), 3), np.zeros((1, 2, 2), int), 3)


def _recall_brute_force(sim, relevant, k):
    """Average over every order of tied candidates (exhaustive; tiny inputs)."""
    hits = []
    for s, rel in zip(sim, relevant):
        total, count = 0.0, 0
        for perm in itertools.permutations(range(len(s))):
            # Rank by score, ties broken by the position in perm.
            order = sorted(range(len(s)), key=lambda j: (-s[j], perm.index(j)))
            total += rel[order[:k]].any()
            count += 1
        hits.append(total / count)
    return float(np.mean(hits))


def test_recall_at_k_exact_tie_expectation():
    rng = np.random.default_rng(3)
    sim = rng.integers(0, 3, (6, 6)).astype(np.float64)  # heavy ties
    relevant = rng.random((6, 6)) < 0.3
    relevant[np.arange(6), rng.integers(0, 6, 6)] = True
    got = metrics.recall_at_k(sim, relevant, (1, 2, 3, 6))
    for k in (1, 2, 3, 6):
        assert got[k] == pytest.approx(_recall_brute_force(sim, relevant, k), abs=1e-12)


def test_recall_at_k_without_ties_and_constant_scores():
    rng = np.random.default_rng(4)
    sim = rng.normal(size=(30, 40))
    relevant = np.zeros((30, 40), bool)
    relevant[np.arange(30), np.arange(30)] = True
    ranks = (sim > sim[np.arange(30), np.arange(30)][:, None]).sum(1)
    got = metrics.recall_at_k(sim, relevant, (1, 5, 10))
    for k in (1, 5, 10):
        assert got[k] == pytest.approx(np.mean(ranks < k), abs=1e-12)
    constant = metrics.recall_at_k(np.zeros((30, 40)), relevant, (1, 5, 10))
    for k in (1, 5, 10):  # chance: k / C
        assert constant[k] == pytest.approx(k / 40, abs=1e-12)
    with pytest.raises(ValueError, match="no relevant"):
        metrics.recall_at_k(sim, np.zeros_like(relevant), (1,))


def test_group_ids_and_most_common_recall():
    labels = np.array([[1, 0], [0, 0], [0, 0], [1, 1], [0, 0], [1, 0]], np.float32)
    groups = metrics.group_ids(labels)
    assert groups[1] == groups[2] == groups[4] and groups[0] == groups[5]
    assert len(set(groups.tolist())) == 3
    got = metrics.most_common_recall(groups, groups, (1, 2, 3))
    # Groups by frequency: [0,0] (3), [1,0] (2), [1,1] (1).
    assert got == {1: pytest.approx(3 / 6), 2: pytest.approx(5 / 6), 3: pytest.approx(1.0)}


@pytest.mark.parametrize("seed", range(3))
def test_mean_pairwise_cosine_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(17, 6)) + rng.normal(size=6) * seed  # a shared direction for seed > 0
    cos = [x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j])
           for i, j in itertools.permutations(range(len(x)), 2)]
    np.testing.assert_allclose(metrics.mean_pairwise_cosine(x), np.mean(cos), rtol=1e-12)


def test_mean_pairwise_cosine_extremes():
    direction = np.random.default_rng(0).normal(size=8)
    np.testing.assert_allclose(metrics.mean_pairwise_cosine(np.outer(np.arange(1, 6), direction)),
                               1.0, rtol=1e-12)
    np.testing.assert_allclose(metrics.mean_pairwise_cosine(np.vstack([direction, -direction])),
                               -1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.mean_pairwise_cosine(direction[None])


@pytest.mark.parametrize("seed", range(3))
def test_effective_rank_matches_definition(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(30, 5)) * np.array([5.0, 2.0, 1.0, 0.5, 0.1])
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum()
    np.testing.assert_allclose(metrics.effective_rank(x), np.exp(-(p * np.log(p)).sum()),
                               rtol=1e-12)


def test_effective_rank_extremes():
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(metrics.effective_rank(np.outer(rng.normal(size=9),
                                                               rng.normal(size=4))), 1.0,
                               rtol=1e-9)
    np.testing.assert_allclose(metrics.effective_rank(np.eye(6)), 6.0, rtol=1e-12)


def test_embedding_collapse_is_measured_within_each_modality():
    """Two modalities, each collapsed onto its own direction: pooled they look spread out
    (mean cosine about 0), but the summary (the mean of the per-modality values) says 1."""
    rng = np.random.default_rng(0)
    ct = np.tile(np.array([1.0, 0.0, 0.0]), (20, 1)) + 1e-9 * rng.normal(size=(20, 3))
    xray = np.tile(np.array([-1.0, 0.0, 0.0]), (20, 1)) + 1e-9 * rng.normal(size=(20, 3))
    assert metrics.mean_pairwise_cosine(np.concatenate([ct, xray])) < 0.0
    out = pretrain_eval.embedding_metrics({"ct": ct, "xray": xray})
    np.testing.assert_allclose([out["image_embedding_mean_cosine"],
                                out["image_embedding_mean_cosine_ct"]], 1.0, atol=1e-9)
    np.testing.assert_allclose(out["image_embedding_effective_rank"],
                               np.mean([metrics.effective_rank(ct), metrics.effective_rank(xray)]))


def test_validation_clip_loss_is_the_mean_over_training_sized_batches():
    rng = np.random.default_rng(1)
    image, text = rng.normal(size=(11, 6)), rng.normal(size=(11, 6))
    got = pretrain_eval.clip_loss_batched(image.astype(np.float32), text.astype(np.float32),
                                          7.0, 4)
    want = np.mean([clip_reference(image[i:i + 4], text[i:i + 4], 7.0) for i in (0, 4)])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.isnan(pretrain_eval.clip_loss_batched(image, text, 7.0, 12))
