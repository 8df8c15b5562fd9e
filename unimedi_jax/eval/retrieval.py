"""Image-report retrieval in the CLIP space (R@1/5/10, both directions).

Queries and candidates are the test split's images and their reports, scored by cosine
similarity of the projected, L2-normalised embeddings (`features.clip_embeddings`; a CT is
its volume with the selected slices, as in pretraining). Two notions of a hit:
- exact: the retrieved item is the query's own pair;
- findings: the retrieved item's label set equals the query's (the phantom's reports are
  generated from its findings, so equal label sets mean reports that say the same).
Baselines: chance for exact pairs (k / N), and for findings the best query-independent
ranking, which at k = 1 always retrieves a report of the most common label set
(`metrics.most_common_recall`). Ties are scored by their exact expectation (`recall_at_k`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from unimedi_jax.eval import features, metrics, tasks

DIRECTIONS = {"i2t": False, "t2i": True}  # name -> transpose the image-text similarity


def retrieval_metrics(image: np.ndarray, text: np.ndarray, labels: np.ndarray,
                      ks: Sequence[int]) -> dict[str, float]:
    """R@k of image (N, P) <-> text (N, P) embeddings, row i of each a pair with labels[i].

    Keys: {i2t,t2i}_r{k} (exact pair), {i2t,t2i}_findings_r{k}, findings_baseline_r{k}
    (the same in both directions: queries and candidates share the label sets), chance_r{k}.
    """
    similarity = np.asarray(image, np.float64) @ np.asarray(text, np.float64).T
    n = len(similarity)
    groups = metrics.group_ids(labels)
    exact = np.eye(n, dtype=bool)
    same = groups[:, None] == groups[None, :]
    out = {}
    for name, transpose in DIRECTIONS.items():
        sim = similarity.T if transpose else similarity
        for key, relevant in (("", exact), ("_findings", same)):
            for k, v in metrics.recall_at_k(sim, relevant, ks).items():
                out[f"{name}{key}_r{k}"] = v
    for k, v in metrics.most_common_recall(groups, groups, ks).items():
        out[f"findings_baseline_r{k}"] = v
    for k in ks:
        out[f"chance_r{k}"] = min(k / n, 1.0)
    return out


def embed(model, params: dict, source, *, modality: str, selection_cfg, crop_size,
          batch_size: int, max_length: int, name: str, mesh=None) -> dict[str, np.ndarray]:
    """{"image", "text" (N, P), "labels" (N, L), and for CT "slab_scores", "slice_has_finding"};
    with a `mesh`, on it (`features.apply_batched`)."""
    batches = features.eval_batches(
        source, modality=modality, crop_size=crop_size, batch_size=batch_size,
        fields=("labels", "slice_has_finding"), tokenizer_folder=model.text_checkpoint,
        max_length=max_length, name=name)
    fn = features.clip_encoder(model, modality, features.Selection.from_config(selection_cfg))
    return features.apply_batched(fn, params, batches, keep=("labels", "slice_has_finding"),
                                  mesh=mesh)


def run(config, workdir: str) -> dict:
    """Retrieval on the test split; writes WORKDIR/results.json."""
    sources, _ = tasks.open_splits(config.data, ("test",))
    loaded = tasks.load_model(config, with_text=True)
    got = embed(loaded.model, loaded.params, sources["test"], modality=config.data.modality,
                selection_cfg=loaded.config.objective.selection,
                crop_size=config.data.crop_size, batch_size=config.batch_size,
                max_length=loaded.config.model.text.max_length,
                name=tasks.split_name(config.data, "test"))
    result = retrieval_metrics(got["image"], got["text"], got["labels"], config.ks)
    return tasks.write_results(workdir, config, loaded, {
        "metrics": result, "num_examples": int(len(got["image"])),
        "modality": config.data.modality})
