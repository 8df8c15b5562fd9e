"""Slice-selection precision@k against the phantom's ground truth, with two baselines.

A volume's 3D token grid has d depth indices; index i covers the slab of slices
[i*pd, (i+1)*pd) (pd = the 3D patch depth), and holds a finding when any of those slices does
(`slice_has_finding`). For the k slabs an encoder selects (top-k of its Eq. 2 slab scores,
ties to the lower index as `jax.lax.top_k`), precision@k is the fraction that hold a finding,
averaged over the volumes with at least one finding slab (volumes without are skipped: any
choice scores 0 there). Baselines on the same volumes:
- random: k distinct slabs drawn uniformly; its exact expectation is m/d for a volume with m
  finding slabs (the k draws are exchangeable), so no sampling noise;
- prior: one fixed ranking of slab positions for every volume, by how often each position held
  a finding in the training split (ties to the lower index): what absolute depth alone gives.

`run(config, workdir)` scores the encoder of `config.init_from` (its student, or the EMA
teacher with `config.init_params="teacher"`; empty: a random encoder) on the test split, with
the prior from the training split, and writes WORKDIR/results.json.
"""

from __future__ import annotations

import numpy as np

from unimedi_jax.eval import features, tasks


def slab_truth(slice_has_finding: np.ndarray, patch_depth: int) -> np.ndarray:
    """(N, D) per-slice flags -> (N, D // pd) bool: slab i holds a finding."""
    flags = np.asarray(slice_has_finding)
    n, depth = flags.shape
    if depth % patch_depth:
        raise ValueError(f"slice_has_finding depth {depth} is not divisible by the 3D patch "
                         f"depth {patch_depth}")
    return flags.reshape(n, depth // patch_depth, patch_depth).any(axis=2)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices (N, k) of the k largest scores per row, ties to the lower index."""
    scores = np.asarray(scores, np.float64)
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k={k} is outside 1..{scores.shape[1]} (slabs per volume)")
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def prior_ranking(train_truth: np.ndarray) -> np.ndarray:
    """Slab positions (d,) by decreasing finding frequency over the training volumes."""
    return np.argsort(-np.asarray(train_truth, np.float64).mean(axis=0), kind="stable")


def selection_precision(scores: np.ndarray, truth: np.ndarray, k: int,
                        prior: np.ndarray) -> dict[str, float]:
    """precision@k of `scores` (N, d) and of the random and prior baselines against truth (N, d).

    Returns slice_precision, slice_precision_random, slice_precision_prior and
    slice_precision_volumes (how many volumes had a finding slab); NaN precisions when none.
    """
    truth = np.asarray(truth, bool)
    if scores.shape != truth.shape:
        raise ValueError(f"slab scores {scores.shape} and truth {truth.shape} differ in shape")
    rows = truth.any(axis=1)
    truth, scores = truth[rows], np.asarray(scores)[rows]
    if not rows.any():
        nan = float("nan")
        return {"slice_precision": nan, "slice_precision_random": nan,
                "slice_precision_prior": nan, "slice_precision_volumes": 0}
    chosen = np.take_along_axis(truth, top_k(scores, k), axis=1)
    return {
        "slice_precision": float(chosen.mean()),
        "slice_precision_random": float(truth.mean()),
        "slice_precision_prior": float(truth[:, np.asarray(prior)[:k]].mean()),
        "slice_precision_volumes": int(rows.sum()),
    }


def scores_and_truth(model, params: dict, source, *, crop_size, batch_size: int, name: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The encoder's slab scores (N, d) and the slab truth (N, d) of a CT source."""
    batches = features.eval_batches(source, modality="ct", crop_size=crop_size,
                                    batch_size=batch_size, fields=("slice_has_finding",),
                                    name=name)
    out = features.apply_batched(features.slab_scorer(model), params, batches, keep=("slice_has_finding",))
    return out["scores"], slab_truth(_flags(out, name), model.vit.patch_size_3d[0])


def truth_only(source, *, crop_size, batch_size: int, patch_depth: int, name: str) -> np.ndarray:
    """Slab truth (N, d) of a CT source (e.g. the training split, for the prior)."""
    batches = features.eval_batches(source, modality="ct", crop_size=crop_size,
                                    batch_size=batch_size, fields=("slice_has_finding",),
                                    name=name)
    out = features.apply_batched(None, None, batches, keep=("slice_has_finding",))
    return slab_truth(_flags(out, name), patch_depth)


def _flags(out: dict, name: str) -> np.ndarray:
    if "slice_has_finding" not in out:
        raise ValueError(f"{name}: the records have no slice_has_finding (ground-truth finding "
                         "slices; the phantom has them)")
    return out["slice_has_finding"]


def run(config, workdir: str) -> dict:
    """Slice-selection precision@k on the test split; writes WORKDIR/results.json."""
    if config.data.modality != "ct":
        raise ValueError("slice selection needs volumes: set config.data.modality='ct'")
    sources, _ = tasks.open_splits(config.data, ("train", "test"))
    loaded = tasks.load_model(config, with_text=False)
    common = dict(crop_size=config.data.crop_size, batch_size=config.batch_size)
    scores, truth = scores_and_truth(loaded.model, loaded.params, sources["test"], **common,
                                     name=tasks.split_name(config.data, "test"))
    prior = prior_ranking(truth_only(sources["train"], **common,
                                     patch_depth=loaded.model.vit.patch_size_3d[0],
                                     name=tasks.split_name(config.data, "train")))
    metrics = {f"k={k}": selection_precision(scores, truth, k, prior) for k in config.ks}
    return tasks.write_results(workdir, config, loaded, {"metrics": metrics,
                                                         "prior_ranking": prior.tolist()})
