"""Evaluation metrics in float64 numpy: AUROC, accuracy, Dice, recall@k.

Conventions:
- AUROC is the Mann-Whitney statistic with mid-ranks for tied scores (equal to scikit-learn's
  `roc_auc_score`). Multi-label macro AUROC averages over the labels that have both classes
  among the known entries; a label with one class (or none) is skipped and reported as NaN.
  Entries whose label is neither 0 nor 1 (e.g. -1, unknown; docs/CONTRACTS.md) are left out.
- Dice follows MONAI's `DiceMetric(include_background=False, ignore_empty=True)`: per sample
  and class, 2|P∩T| / (|P| + |T|); NaN where both are empty; classes are averaged over the
  samples where they are defined, and the mean is over foreground classes with a value.
- recall@k counts a query as a hit when a relevant candidate is among its k most similar ones.
  Tied similarities are ordered at random, and the exact expectation over that order is used,
  so a constant encoder scores chance, not 0 or 1.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import special, stats


def binary_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of scores (N,) for binary labels (N,) in {0, 1}; NaN when only one class is present."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"binary_auroc needs labels and scores of one shape (N,), got "
                         f"{labels.shape} and {scores.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"binary_auroc needs labels in {{0, 1}}, got {np.unique(labels)}")
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)  # mid-ranks for ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def per_label_auroc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC per label of (N, L) arrays over the entries whose label is 0 or 1; NaN if undefined."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.shape != scores.shape or labels.ndim != 2:
        raise ValueError(f"per_label_auroc needs labels and scores of one shape (N, L), got "
                         f"{labels.shape} and {scores.shape}")
    out = []
    for j in range(labels.shape[1]):
        known = np.isin(labels[:, j], (0, 1))
        out.append(binary_auroc(labels[known, j], scores[known, j]))
    return np.array(out, np.float64)


def macro_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean of `per_label_auroc` over the labels where it is defined; NaN when none is."""
    per_label = per_label_auroc(labels, scores)
    defined = per_label[~np.isnan(per_label)]
    return float(defined.mean()) if defined.size else float("nan")


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Fraction of equal entries of two (N,) integer arrays."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.shape != predictions.shape or labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"accuracy needs two non-empty (N,) arrays, got {labels.shape} and "
                         f"{predictions.shape}")
    return float((labels == predictions).mean())


def dice_per_sample(predictions: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice (N, num_classes) of integer label maps (N, ...); NaN where a class is in neither map."""
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    if predictions.shape != targets.shape or predictions.ndim < 2:
        raise ValueError(f"dice needs label maps of one shape (N, ...), got {predictions.shape} "
                         f"and {targets.shape}")
    for name, x in (("predictions", predictions), ("targets", targets)):
        if x.size and (x.min() < 0 or x.max() >= num_classes):
            raise ValueError(f"dice: {name} hold classes outside [0, {num_classes})")
    n = predictions.shape[0]
    pred = predictions.reshape(n, -1).astype(np.int64)
    true = targets.reshape(n, -1).astype(np.int64)
    offsets = np.arange(n)[:, None] * num_classes
    count = lambda x: np.bincount((x + offsets).ravel(), minlength=n * num_classes).reshape(
        n, num_classes)
    intersection = np.bincount((true + offsets)[pred == true], minlength=n * num_classes)
    intersection = intersection.reshape(n, num_classes).astype(np.float64)
    total = (count(pred) + count(true)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2 * intersection / total, np.nan)


def dice_summary(predictions: np.ndarray, targets: np.ndarray, num_classes: int) -> dict:
    """Dice of integer label maps (N, ...) per foreground class (1..C-1) and their mean.

    "dice": mean over samples where the class is in either map (`dice_per_sample`), so a sample
    without the class that predicts any of it scores 0 and one that predicts none is left out.
    Where that Dice is lost: "dice_present", over the samples whose target holds the class
    alone; "clean_absent", the fraction of samples without the class in the target that
    predict none of it. Each as "<key>_per_class" and its mean over classes; NaN where
    undefined. "dice_empty_as_one": the mean over every sample, one with the class in neither
    map scoring 1 (MGCA's RSNA segmentation, whose setting the paper's Table 4 follows).
    """
    per_sample = dice_per_sample(predictions, targets, num_classes)[:, 1:]
    n = per_sample.shape[0]
    holds = lambda x: np.stack([(np.asarray(x).reshape(n, -1) == c).any(1)
                                for c in range(1, num_classes)], axis=1)  # (N, C-1)
    present, predicted = holds(targets), holds(predictions)

    def mean_over(values, where):  # (N, C-1) -> (C-1,) mean over the rows `where` holds
        count = where.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, np.where(where, values, 0.0).sum(0) / count, np.nan)

    def with_mean(key, per_class):
        valid = per_class[~np.isnan(per_class)]
        return {key: float(valid.mean()) if valid.size else float("nan"),
                key + "_per_class": per_class.tolist()}

    defined = ~np.isnan(per_sample)
    return {**with_mean("dice", mean_over(np.nan_to_num(per_sample), defined)),
            **with_mean("dice_present", mean_over(np.nan_to_num(per_sample), present)),
            **with_mean("clean_absent", mean_over((~predicted).astype(np.float64), ~present)),
            **with_mean("dice_empty_as_one", np.where(defined, per_sample, 1.0).mean(0))}


def recall_at_k(similarity: np.ndarray, relevant: np.ndarray,
                ks: Sequence[int]) -> dict[int, float]:
    """Expected recall@k under random tie order: {k: mean over queries of P(hit in top k)}.

    similarity: (Q, C) query-candidate scores; relevant: (Q, C) bool, at least one True per row.
    For a query whose best relevant score b is reached by g candidates, r of them relevant, with
    s candidates scoring above b, a random order of the g tied ones puts no relevant one in the
    first m = k - s places with probability C(g - r, m) / C(g, m).
    """
    similarity = np.asarray(similarity, np.float64)
    relevant = np.asarray(relevant, bool)
    if similarity.shape != relevant.shape or similarity.ndim != 2:
        raise ValueError(f"recall_at_k needs similarity and relevant of one shape (Q, C), got "
                         f"{similarity.shape} and {relevant.shape}")
    if not relevant.any(axis=1).all():
        raise ValueError(f"recall_at_k: queries {np.flatnonzero(~relevant.any(1))[:10].tolist()} "
                         "have no relevant candidate")
    best = np.where(relevant, similarity, -np.inf).max(axis=1, keepdims=True)
    above = (similarity > best).sum(axis=1)
    tied = similarity == best
    g = tied.sum(axis=1)
    r = (tied & relevant).sum(axis=1)
    out = {}
    for k in ks:
        m = np.clip(k - above, 0, g)
        # log C(g - r, m) - log C(g, m), -inf where m > g - r (no way to miss).
        miss = np.where(m <= g - r,
                        np.exp(special.gammaln(g - r + 1) - special.gammaln(g - r - m + 1)
                               - special.gammaln(g + 1) + special.gammaln(g - m + 1)), 0.0)
        out[int(k)] = float(np.mean(1.0 - miss))
    return out


def group_ids(labels: np.ndarray) -> np.ndarray:
    """Integer id (N,) of each row's label set of an (N, L) array: equal rows get equal ids."""
    labels = np.asarray(labels)
    return np.unique(labels.reshape(len(labels), -1), axis=0, return_inverse=True)[1].reshape(-1)


def most_common_recall(query_groups: np.ndarray, candidate_groups: np.ndarray,
                       ks: Sequence[int]) -> dict[int, float]:
    """recall@k of the best query-independent ranking: one candidate of each group, most
    frequent group first (ties by smaller id). At k = 1 it always retrieves a report of the most
    common label set. A hit is a retrieved candidate of the query's group."""
    groups, counts = np.unique(np.asarray(candidate_groups), return_counts=True)
    order = groups[np.argsort(-counts, kind="stable")]
    return {int(k): float(np.isin(query_groups, order[:k]).mean()) for k in ks}


def mean_pairwise_cosine(x: np.ndarray) -> float:
    """Mean cosine similarity over the N (N - 1) ordered pairs i != j of the rows of x (N, P).

    1 when every embedding points the same way (collapse), about 0 for spread-out embeddings.
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"mean_pairwise_cosine needs (N >= 2, P) embeddings, got {x.shape}")
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    total = unit.sum(axis=0)
    n = len(unit)
    # sum_{i != j} <u_i, u_j> = ||sum_i u_i||^2 - sum_i ||u_i||^2
    return float((total @ total - np.sum(unit * unit)) / (n * (n - 1)))


def effective_rank(x: np.ndarray) -> float:
    """exp(entropy of the normalised singular values) of x (N, P) (RankMe, Garrido et al. 2023).

    Between 1 (all rows on one line) and min(N, P) (a flat spectrum).
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or min(x.shape) < 1:
        raise ValueError(f"effective_rank needs a non-empty (N, P) matrix, got {x.shape}")
    s = np.linalg.svd(x, compute_uv=False)
    if s.sum() <= 0:
        return 1.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))
