"""What findings-level R@1 an encoder can reach when it knows only some findings.

    python -m benchmarks.retrieval_bound --data_dir=D [--split=validation] [--max_examples=200]
        [--learnable=cardiomegaly,effusion]

Findings-level image-to-report R@1 (`eval/retrieval.py`) counts a hit when the retrieved report
has the query's whole label set. For each phantom modality this prints, over the split's
reports as candidates:
  baseline        always the most common label set (the `findings_baseline` of the evaluation);
  knows_uniform   an encoder that knows the `learnable` findings exactly and nothing else: every
                  report agreeing on them is equally near, so it retrieves one of them at random
                  (expected R@1; nearest-neighbour retrieval in an embedding space behaves so);
  knows_mode      the same knowledge, retrieving the most common label set among the reports
                  that agree on it (no similarity search does this by itself).
The learnable findings default to those the supervised bound learns at the default size
(docs/RESULTS.md §2). The last line is a JSON object with every number.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
from absl import app, flags

from data_prep import phantom as phantom_builder
from unimedi_jax.data import phantom
from unimedi_jax.eval import metrics

def _define_flags() -> None:
    """The command line's flags, defined when run as a script only (the tests import this)."""
    flags.DEFINE_string("data_dir", None, "Folder holding the built phantom.")
    flags.DEFINE_string("split", "validation", "Split whose reports are retrieved.")
    flags.DEFINE_integer("max_examples", 200, "The split's first N of each modality "
                         "(configs/pretrain.py eval.max_examples).")
    flags.DEFINE_list("learnable", ["cardiomegaly", "effusion"],
                      f"Findings the encoder knows, of {list(phantom.LABEL_NAMES)}.")


def bounds(labels: np.ndarray, known: Sequence[int]) -> dict[str, float]:
    """R@1 references of labels (N, L) {0, 1}, for an encoder knowing the columns `known`."""
    full = metrics.group_ids(labels)
    part = metrics.group_ids(labels[:, list(known)]) if len(known) else np.zeros_like(full)
    n = len(full)
    # Query i: c = reports with its whole label set, m = reports agreeing on the known columns.
    same_full = np.bincount(full)[full]
    same_part = np.bincount(part)[part]
    mode_hit = np.zeros(n, bool)
    for g in np.unique(part):
        members = part == g
        sets, counts = np.unique(full[members], return_counts=True)
        mode_hit |= members & (full == sets[np.argmax(counts)])
    return {"baseline": metrics.most_common_recall(full, full, [1])[1],
            "knows_uniform": float(np.mean(same_full / same_part)),
            "knows_mode": float(mode_hit.mean())}


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.data_dir:
        raise app.UsageError("--data_dir is required (a folder where the phantom is built)")
    names = list(phantom.LABEL_NAMES)
    unknown = sorted(set(f.learnable) - set(names))
    if unknown:
        raise app.UsageError(f"--learnable: unknown finding(s) {unknown}; known: {names}")
    known = [names.index(name) for name in f.learnable]
    results = {}
    for builder in phantom_builder.make_builder(f.data_dir):
        source = builder.as_data_source(f.split)
        n = min(len(source), f.max_examples)
        labels = np.stack([source[i]["labels"] for i in range(n)]).astype(np.int64)
        modality = builder.builder_config.modality
        results[modality] = bounds(labels, known)
        print(f"{modality:5s} " + "  ".join(f"{k} {v:.3f}" for k, v in results[modality].items()))
    results["mean"] = {k: float(np.mean([r[k] for r in results.values()]))
                       for k in next(iter(results.values()))}
    print("mean  " + "  ".join(f"{k} {v:.3f}" for k, v in results["mean"].items()))
    print(json.dumps(dict(results, split=f.split, learnable=f.learnable)))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
