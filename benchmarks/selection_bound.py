"""What slice-selection precision an encoder can reach when it can see only some findings.

    python -m benchmarks.selection_bound --data_dir=D [--config=configs/pretrain.py]
        [--learnable=effusion] [--split=validation]

Slice-selection precision@k (`eval/selection_eval.py`, k = objective.selection.k) counts the
chosen slabs that hold any depth-local finding (nodule, consolidation, ground glass, effusion),
over the CT volumes with at least one. For the first `eval.max_examples` volumes of the split,
cropped as the evaluation crops them, this prints:
  random        k slabs drawn uniformly (the evaluation's `slice_precision_random`);
  prior         the fixed slab-position ranking of the training split (`_prior`);
  knows_random  an encoder that finds exactly the slabs of the `learnable` findings and sees
                nothing of the others: those slabs first, the rest uniformly (expectation);
  knows_prior   the same, the rest in the prior's order (knowledge plus absolute depth);
  oracle        every finding slab first: min(k, m) / k for a volume with m finding slabs.
The learnable findings default to effusion, the one depth-local finding the supervised bound
learns at the default size (docs/RESULTS.md §2: nodule, consolidation and ground glass stay near
0.5 AUROC with labels). The last line is a JSON object with every number.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from unimedi_jax.data import phantom, pipeline
from unimedi_jax.eval import features, selection_eval


def _define_flags() -> None:
    """The command line's flags, defined when run as a script only (the tests import this)."""
    config_flags.DEFINE_config_file("config", "configs/pretrain.py", "Pretraining config.")
    flags.DEFINE_string("data_dir", None, "Folder holding the built phantom.")
    flags.DEFINE_string("split", "validation", "Split whose volumes are scored.")
    flags.DEFINE_list("learnable", ["effusion"],
                      f"Depth-local findings the encoder sees, of "
                      f"{[phantom.LABEL_NAMES[f] for f in phantom.LOCAL_FINDINGS]}.")


def bounds(truth: np.ndarray, known: np.ndarray, k: int, prior: np.ndarray) -> dict[str, float]:
    """precision@k references over the volumes with a finding slab.

    truth (N, d) bool: slab holds a finding; known (N, d) bool: slab holds a finding the encoder
    sees (a subset of truth); prior (d,): slab positions, best first.
    """
    truth, known = np.asarray(truth, bool), np.asarray(known, bool)
    if truth.shape != known.shape or (known & ~truth).any():
        raise ValueError("known must be a subset of truth, of the same shape")
    rows = truth.any(axis=1)
    truth, known = truth[rows], known[rows]
    d = truth.shape[1]
    m, seen = truth.sum(axis=1), known.sum(axis=1)
    # knows_random: the `seen` slabs, then k - seen of the d - seen others, each holding a finding
    # with probability (m - seen) / (d - seen).
    rest = np.maximum(k - seen, 0) * (m - seen) / np.maximum(d - seen, 1)
    rank = np.empty(d, np.int64)
    rank[np.asarray(prior)] = np.arange(d)
    order = np.lexsort((np.broadcast_to(rank, truth.shape), ~known), axis=1)[:, :k]
    return {
        "random": float(truth.mean()),
        "prior": float(truth[:, np.asarray(prior)[:k]].mean()),
        "knows_random": float(np.mean((np.minimum(seen, k) + rest) / k)),
        "knows_prior": float(np.take_along_axis(truth, order, axis=1).mean()),
        "oracle": float(np.mean(np.minimum(m, k) / k)),
        "volumes": int(rows.sum()),
    }


def slab_flags(mask: np.ndarray, classes: Sequence[int], patch_depth: int) -> np.ndarray:
    """mask (N, D, H, W) class map -> (N, D // pd) bool: the slab holds one of `classes`."""
    per_slice = np.isin(mask, list(classes)).reshape(*mask.shape[:2], -1).any(axis=2)
    return selection_eval.slab_truth(per_slice, patch_depth)


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.data_dir:
        raise app.UsageError("--data_dir is required (a folder where the phantom is built)")
    local = {phantom.LABEL_NAMES[i]: i for i in phantom.LOCAL_FINDINGS}
    unknown = sorted(set(f.learnable) - set(local))
    if unknown:
        raise app.UsageError(f"--learnable: unknown depth-local finding(s) {unknown}; "
                             f"known: {sorted(local)}")
    config = f.config
    config.data.data_dir = f.data_dir
    data = pipeline.PretrainData(config, tokenizer_folder="")
    common = dict(crop_size=config.data.ct.crop_size, batch_size=config.eval.batch_size)
    patch_depth = config.model.vit.patch_size_3d[0]
    got = features.apply_batched(None, None, features.eval_batches(
        features.head(data.source("ct", f.split), config.eval.max_examples),
        modality="ct", fields=("slice_has_finding", "mask"), name=f"ct {f.split} split",
        **common),
        keep=("slice_has_finding", "mask"))
    truth = selection_eval.slab_truth(got["slice_has_finding"], patch_depth)
    # Mask class of finding i is i + 1 (docs/CONTRACTS.md).
    known = slab_flags(got["mask"], [local[name] + 1 for name in f.learnable], patch_depth)
    prior = selection_eval.prior_ranking(selection_eval.truth_only(
        features.head(data.source("ct", "train"), config.eval.max_examples),
        patch_depth=patch_depth, name="ct training split", **common))
    results = bounds(truth, known, config.objective.selection.k, prior)
    print("  ".join(f"{key} {value:.3f}" for key, value in results.items()))
    print(json.dumps(dict(results, split=f.split, k=config.objective.selection.k,
                          learnable=f.learnable)))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
