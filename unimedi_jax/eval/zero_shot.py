"""Zero-shot classification from text prompts in the CLIP space, X-rays or volumes.

Each finding f has a positive and a negative prompt (`config.prompts`: {label name:
(positive, negative)}); an image's score for f is cos(image, positive) - cos(image, negative),
with the projected, L2-normalised embeddings (a CT is its volume with the selected slices, as in
pretraining). Scored by AUROC per finding against the test split's labels, and their mean.
"""

from __future__ import annotations

import jax
import numpy as np

from unimedi_jax.data import text
from unimedi_jax.eval import features, metrics, tasks


def prompt_scores(image: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """image (N, P), positive / negative prompt embeddings (F, P) -> scores (N, F)."""
    image = np.asarray(image, np.float64)
    return image @ np.asarray(positive, np.float64).T - image @ np.asarray(negative, np.float64).T


def run(config, workdir: str) -> dict:
    """Zero-shot AUROC per finding on the test split; writes WORKDIR/results.json."""
    sources, label_names = tasks.open_splits(config.data, ("test",))
    names = list(config.prompts.keys())
    columns = tasks.label_columns(label_names, names)
    for name in names:
        if len(config.prompts[name]) != 2:
            raise ValueError(f"config.prompts.{name} must be (positive, negative), got "
                             f"{config.prompts[name]!r}")
    loaded = tasks.load_model(config, with_text=True)
    model, max_length = loaded.model, loaded.config.model.text.max_length
    modality = config.data.modality
    batches = features.eval_batches(sources["test"], modality=modality,
                                    crop_size=config.data.crop_size, batch_size=config.batch_size,
                                    name=tasks.split_name(config.data, "test"))
    fn = jax.jit(features.clip_embeddings(model, modality, loaded.config.objective.selection,
                                          with_text=False))
    got = features.apply_batched(fn, loaded.params, batches, keep=("labels",))
    tokenizer = text.cached_tokenizer(model.text_checkpoint)
    prompts = [config.prompts[n][i] for i in (0, 1) for n in names]
    embedded = features.text_embeddings(model, tokenizer, prompts, loaded.params, max_length)
    scores = prompt_scores(got["image"], embedded[:len(names)], embedded[len(names):])
    per_label = metrics.per_label_auroc(got["labels"][:, columns], scores)
    defined = per_label[~np.isnan(per_label)]
    return tasks.write_results(workdir, config, loaded, {
        "metrics": {"auroc_mean": float(defined.mean()) if defined.size else float("nan"),
                    "auroc_per_label": dict(zip(names, per_label.tolist()))},
        "num_examples": int(len(scores)), "modality": modality})
