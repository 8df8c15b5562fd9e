"""Linear probing (paper §4.2, appendix 7.1): one linear layer on the frozen encoder's [CLS].

Features of every split are extracted once (centre crop, no augmentation), then for each label
fraction (`config.fractions`, deterministic nested subsets by `config.seed`) a linear layer is
trained on the training features with AdamW and early stopping on the validation loss, and the
one of the lowest validation loss is scored on the test split:
- multilabel: macro AUROC over the labels (and per label); sigmoid cross-entropy;
- binary: AUROC of the one label; sigmoid cross-entropy;
- multiclass: accuracy; softmax cross-entropy.
Works for X-rays (`data.modality = "xray"`) and volumes ("ct") alike.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np

from unimedi_jax.eval import features, losses, metrics, tasks


def classification_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                        label_type: str) -> jax.Array:
    """Sigmoid cross-entropy over known labels, or softmax cross-entropy (multiclass)."""
    if label_type == "multiclass":
        return losses.softmax_ce(logits, targets, weights)
    return losses.masked_bce(logits, targets, weights)


def classification_metrics(logits: np.ndarray, targets: np.ndarray, label_type: str,
                           label_names: Sequence[str]) -> dict:
    """Test metrics of the head's logits (N, L) against `tasks.targets` (N, L) or (N,)."""
    if label_type == "multiclass":
        return {"accuracy": metrics.accuracy(targets, logits.argmax(axis=1))}
    per_label = metrics.per_label_auroc(targets, logits)
    if label_type == "binary":
        return {"auroc": float(per_label[0])}
    return {"auroc_macro": metrics.macro_auroc(targets, logits),
            "auroc_per_label": dict(zip(label_names, per_label.tolist()))}


def feature_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> Iterator[dict]:
    """Endless shuffled batches {"features", "targets", "weights"} of in-memory arrays; each
    epoch is a new permutation, its last batch padded with weight-0 rows."""
    n = len(x)
    steps = -(-n // batch_size)
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        padded = np.concatenate([order, np.zeros(steps * batch_size - n, np.int64)])
        weights = (np.arange(steps * batch_size) < n).astype(np.float32)
        for s in range(steps):
            rows = padded[s * batch_size:(s + 1) * batch_size]
            yield {"features": x[rows], "targets": y[rows],
                   "weights": weights[s * batch_size:(s + 1) * batch_size]}


def in_memory_batches(x: np.ndarray, y: np.ndarray, batch_size: int):
    """() -> (batch, n) over arrays in order, padded as `features.eval_batches`."""

    def batches():
        for start in range(0, len(x), batch_size):
            rows = slice(start, start + batch_size)
            batch = {"features": x[rows], "targets": y[rows]}
            yield features.pad_batch(batch, batch_size), len(batch["features"])

    return batches


def extract(config, loaded: tasks.Loaded, sources: dict, columns: Sequence[int]) -> dict:
    """{split: (features (N, width), targets)} of every split, encoded once."""
    encode = features.backbone_encoder(loaded.model.vit, config.data.modality)
    out = {}
    for split in sources:
        got = features.apply_batched(encode, loaded.params["vision"],
                                     tasks.split_batches(config, sources, split), keep=("labels",))
        out[split] = (got["features"], tasks.targets(got["labels"][:, columns], config.label_type,
                                                     tasks.split_name(config.data, split)))
    return out


def train_probe(config, train: tuple, val: tuple, outputs: int, seed: int):
    """A linear layer trained on (features, targets) with early stopping: (params, history)."""
    head = nn.Dense(outputs)
    params = head.init(jax.random.key(seed), train[0][:1])["params"]

    def loss_fn(params, frozen, batch, weights):
        del frozen
        return classification_loss(head.apply({"params": params}, batch["features"]),
                                   batch["targets"], weights, config.label_type)

    params, history = tasks.fit(
        loss_fn, params, None, tasks.adamw(config.optim),
        feature_batches(*train, config.optim.batch_size, seed),
        -(-len(train[0]) // config.optim.batch_size),
        in_memory_batches(*val, config.optim.batch_size),
        max_epochs=config.optim.max_epochs, patience=config.optim.patience)
    return head, params, history


def run(config, workdir: str) -> dict:
    """Linear probe at every label fraction; writes WORKDIR/results.json."""
    sources, label_names = tasks.open_splits(config.data)
    columns = tasks.label_columns(label_names, config.data.labels)
    names = [label_names[c] for c in columns]
    loaded = tasks.load_model(config, with_text=False)
    data = extract(config, loaded, sources, columns)
    x_train, y_train = data["train"]
    results = {}
    for fraction in config.fractions:
        rows = tasks.fraction_indices(len(x_train), fraction, config.seed)
        head, params, history = train_probe(config, (x_train[rows], y_train[rows]),
                                            data["validation"], len(columns), config.seed)
        logits = np.asarray(jax.jit(head.apply)({"params": params}, data["test"][0]))
        results[f"{fraction:g}"] = {
            "num_train": int(len(rows)),
            **classification_metrics(logits, data["test"][1], config.label_type, names),
            "best_epoch": history["best_epoch"], "epochs_run": history["epochs_run"]}
    return tasks.write_results(workdir, config, loaded, {
        "metrics": results, "labels": names, "label_type": config.label_type,
        "num_examples": {s: int(len(d[0])) for s, d in data.items()}})
