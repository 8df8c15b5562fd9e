"""Zero-shot classification from text prompts in the CLIP space, X-rays or volumes.

Each finding f has positive and negative prompts (`config.prompts`: {label name: (positives,
negatives)}, each a sentence or a tuple of sentences: a prompt ensemble); an image's score for f
is its cosine with the mean positive embedding minus that with the mean negative one, with the
projected, L2-normalised embeddings (a CT is its volume with the selected slices, as in
pretraining). Scored by AUROC per finding against the test split's labels, and their mean.
"""

from __future__ import annotations

import numpy as np

from unimedi_jax.data import text
from unimedi_jax.eval import features, metrics, tasks


def prompt_scores(image: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """image (N, P), positive / negative prompt embeddings (F, P) -> scores (N, F)."""
    image = np.asarray(image, np.float64)
    return image @ np.asarray(positive, np.float64).T - image @ np.asarray(negative, np.float64).T


def _phrasings(value, name: str) -> tuple[str, ...]:
    phrasings = (value,) if isinstance(value, str) else tuple(value)
    if not phrasings or not all(isinstance(p, str) and p.strip() for p in phrasings):
        raise ValueError(f"{name} must be a sentence or a non-empty tuple of sentences, got "
                         f"{value!r}")
    return phrasings


def prompt_embeddings(model, params: dict, prompts, max_length: int,
                      key: str = "prompts") -> tuple[list[str], np.ndarray, np.ndarray]:
    """(finding names, mean positive (F, P), mean negative (F, P)) prompt embeddings.

    prompts: {name: (positives, negatives)}; each side a sentence or a tuple of sentences whose
    L2-normalised CLIP embeddings are averaged (prompt ensembling). `key` names the config entry
    in errors.
    """
    names = list(prompts.keys())
    sides = []
    for name in names:
        pair = prompts[name]
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError(f"{key}.{name} must be (positives, negatives), got {pair!r}")
        sides.append([_phrasings(p, f"{key}.{name}[{i}]") for i, p in enumerate(pair)])
    flat = [p for pair in sides for side in pair for p in side]
    tokenizer = text.cached_tokenizer(model.text_checkpoint)
    embedded = features.text_embeddings(model, tokenizer, flat, params, max_length)
    means, start = [], 0
    for pair in sides:
        for side in pair:
            means.append(embedded[start:start + len(side)].mean(axis=0))
            start += len(side)
    means = np.asarray(means).reshape(len(names), 2, -1)
    return names, means[:, 0], means[:, 1]


def run(config, workdir: str) -> dict:
    """Zero-shot AUROC per finding on the test split; writes WORKDIR/results.json."""
    sources, label_names = tasks.open_splits(config.data, ("test",))
    columns = tasks.label_columns(label_names, list(config.prompts.keys()))
    loaded = tasks.load_model(config, with_text=True)
    model, max_length = loaded.model, loaded.config.model.text.max_length
    modality = config.data.modality
    batches = features.eval_batches(sources["test"], modality=modality,
                                    crop_size=config.data.crop_size, batch_size=config.batch_size,
                                    name=tasks.split_name(config.data, "test"))
    fn = features.clip_encoder(model, modality,
                               features.Selection.from_config(loaded.config.objective.selection),
                               with_text=False)
    got = features.apply_batched(fn, loaded.params, batches, keep=("labels",))
    names, positive, negative = prompt_embeddings(model, loaded.params, config.prompts,
                                                  max_length, key="config.prompts")
    scores = prompt_scores(got["image"], positive, negative)
    per_label = metrics.per_label_auroc(got["labels"][:, columns], scores)
    defined = per_label[~np.isnan(per_label)]
    return tasks.write_results(workdir, config, loaded, {
        "metrics": {"auroc_mean": float(defined.mean()) if defined.size else float("nan"),
                    "auroc_per_label": dict(zip(names, per_label.tolist()))},
        "num_examples": int(len(scores)), "modality": modality})
