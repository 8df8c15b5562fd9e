"""Full fine-tuning for classification (paper §4.2 Table 3, appendix 7.1: CC-CCII, LUNA16).

The whole encoder and a linear head on its [CLS] train together with AdamW on augmented
training batches (`pipeline.make_dataset(train=True)`), with early stopping on the validation
loss; the weights of the lowest validation loss are scored on the test split with the
metrics of `linear_probe` (macro AUROC / AUROC / accuracy by `config.label_type`). Written for
volumes (the paper's use), it serves X-rays alike (`data.modality`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimedi_jax.eval import features, linear_probe, tasks


def make_loss(vit, head: nn.Module, modality: str, columns, label_type: str):
    """loss(trainable {"vision", "head"}, frozen, batch, weights) and logits(params, batch)."""
    columns = np.asarray(columns)

    def logits(params, batch):
        cls, _ = vit.apply({"params": params["vision"]}, **features.vit_inputs(batch, modality))
        return head.apply({"params": params["head"]}, cls).astype(jnp.float32)

    def batch_targets(labels):
        labels = labels[:, columns]
        return jnp.argmax(labels, axis=1) if label_type == "multiclass" else labels

    def loss(params, frozen, batch, weights):
        del frozen
        return linear_probe.classification_loss(logits(params, batch),
                                                batch_targets(batch["labels"]), weights,
                                                label_type)

    return loss, logits


def run(config, workdir: str) -> dict:
    """Fine-tunes at every label fraction; writes WORKDIR/results.json."""
    sources, label_names = tasks.open_splits(config.data)
    columns = tasks.label_columns(label_names, config.data.labels)
    names = [label_names[c] for c in columns]
    loaded = tasks.load_model(config, with_text=False)
    vit = loaded.model.vit
    head = nn.Dense(len(columns))
    loss, logits = make_loss(vit, head, config.data.modality, columns, config.label_type)
    predict = jax.jit(lambda params, batch: {"logits": logits(params, batch)})
    # The test targets first: labels that do not fit config.label_type fail before training.
    test_labels = features.apply_batched(None, None, tasks.split_batches(config, sources, "test"),
                                         keep=("labels",))
    test_targets = tasks.targets(test_labels["labels"][:, columns], config.label_type,
                                 tasks.split_name(config.data, "test"))

    results = {}
    for fraction in config.fractions:
        rows = tasks.fraction_indices(len(sources["train"]), fraction, config.seed)
        params = {"vision": loaded.params["vision"],
                  "head": head.init(jax.random.key(config.seed),
                                    jnp.zeros((1, vit.width)))["params"]}
        params, history = tasks.fit(
            loss, params, None, tasks.adamw(config.optim),
            tasks.train_batches(config, sources["train"], rows),
            -(-len(rows) // config.optim.batch_size),
            lambda: tasks.split_batches(config, sources, "validation"),
            max_epochs=config.optim.max_epochs, patience=config.optim.patience)
        test = features.apply_batched(predict, params,
                                      tasks.split_batches(config, sources, "test"))["logits"]
        results[f"{fraction:g}"] = {
            "num_train": int(len(rows)),
            **linear_probe.classification_metrics(test, test_targets, config.label_type, names),
            "best_epoch": history["best_epoch"], "epochs_run": history["epochs_run"]}
    return tasks.write_results(workdir, config, loaded, {
        "metrics": results, "labels": names, "label_type": config.label_type})
