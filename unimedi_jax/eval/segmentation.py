"""Semantic segmentation on the encoder (paper §4.3 Tables 4 and 6, appendix 7.2).

- 2D (RSNA in the paper): a SETR-PUP decoder on the frozen encoder, one sigmoid channel,
  loss alpha * focal + dice (alpha = 10).
- 3D (BCV in the paper): a UNETR decoder, the whole model trained, softmax over the classes,
  loss Dice + cross-entropy.
Both are `config.decoder` / `config.loss` / `config.train_encoder` choices over one training
path, for X-rays and volumes alike. Targets come from the records' `mask` (class c = label
c - 1, docs/CONTRACTS.md): `data.seg_classes` picks label names (() = all) that become classes
1..C in that order, everything else background; `data.seg_binary` merges them into one
foreground class (required by the focal + dice loss). Training batches are augmented
(`pipeline.make_dataset(train=True, with_mask=True)`: geometry applies to the mask, nearest
neighbour); early stopping on the validation loss; the test split is scored by Dice
(`metrics.dice_summary`: per foreground class and their mean, and where it is lost: the
Dice of the samples that hold a class, the share of those without it predicted clean).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from unimedi_jax.eval import decoders, features, losses, metrics, tasks

DECODERS = ("setr_pup", "unetr")
LOSSES = ("focal_dice", "dice_ce")
MASK_VALUES = 256  # uint8 mask values


def class_table(label_names, seg_classes, binary: bool) -> tuple[np.ndarray, list[str]]:
    """Lookup (256,) int32 from stored mask value to target class, and the class names
    (background first)."""
    columns = tasks.label_columns(label_names, seg_classes)
    table = np.zeros(MASK_VALUES, np.int32)
    for i, c in enumerate(columns):
        table[c + 1] = 1 if binary else i + 1
    names = ["background"] + (["foreground"] if binary else [label_names[c] for c in columns])
    return table, names


def make_decoder(config, vit, num_classes: int):
    """The decoder of config.decoder for this encoder."""
    patch = vit.patch_size_3d if config.data.modality == "ct" else (vit.patch_size,) * 2
    if config.decoder == "setr_pup":
        return decoders.SETRPUP(num_classes, tuple(patch), channels=config.setr.channels,
                                norm_groups=config.setr.norm_groups)
    if config.decoder == "unetr":
        return decoders.UNETR(num_classes, tuple(patch), depth=vit.depth,
                              feature_size=config.unetr.feature_size)
    raise ValueError(f"config.decoder={config.decoder!r}; choose one of {DECODERS}")


def make_model(config, vit, decoder, table: np.ndarray):
    """loss(trainable, frozen, batch, weights) and predict(params, batch) -> {"pred", "target"}.

    params = {"vision", "decoder"}, split into trainable / frozen by config.train_encoder.
    The decoder's logits have one channel for focal_dice (foreground), else one per class.
    """
    modality = config.data.modality
    collected = sorted(set(decoder.skip_layers))  # the ViT returns each block once, in order
    vit = vit.clone(intermediate_layers=tuple(collected))
    table = jnp.asarray(table)
    if config.loss not in LOSSES:
        raise ValueError(f"config.loss={config.loss!r}; choose one of {LOSSES}")

    def logits(params, batch):
        x = jnp.asarray(batch[features.input_key(modality)])
        _, out = vit.apply({"params": params["vision"]}, **features.vit_inputs(batch, modality))
        grid = out["grid_3d"] if modality == "ct" else out["grid_2d"]
        layers = [out["layers"][collected.index(i)] for i in decoder.skip_layers]
        return decoder.apply({"params": params["decoder"]}, x, out["tokens"], layers, grid)

    def loss(trainable, frozen, batch, weights):
        y = logits({**frozen, **trainable}, batch)
        target = table[batch["mask"]]
        if config.loss == "focal_dice":
            return losses.focal_dice_loss(y[..., 0], target, config.focal_alpha, weights)
        return losses.dice_ce_loss(y, target, weights)

    def predict(params, batch):
        y = logits(params, batch)
        pred = (y[..., 0] > 0).astype(jnp.int32) if config.loss == "focal_dice" else y.argmax(-1)
        return {"pred": pred.astype(jnp.uint8), "target": table[batch["mask"]].astype(jnp.uint8)}

    return loss, predict


def run(config, workdir: str) -> dict:
    """Trains the decoder (and the encoder with train_encoder) at every label fraction and
    scores Dice on the test split; writes WORKDIR/results.json."""
    if config.loss == "focal_dice" and not config.data.seg_binary:
        raise ValueError("config.loss='focal_dice' is binary: set config.data.seg_binary=True")
    prior = _prior(config)  # checked before any data or model is loaded
    sources, label_names = tasks.open_splits(config.data)
    table, class_names = class_table(label_names, config.data.seg_classes, config.data.seg_binary)
    modality = config.data.modality
    loaded = tasks.load_model(config, with_text=False)
    vit = loaded.model.vit
    decoder = make_decoder(config, vit, 1 if config.loss == "focal_dice" else len(class_names))
    loss, predict = make_model(config, vit, decoder, table)
    predict = jax.jit(predict)
    eval_batches = lambda split: tasks.split_batches(config, sources, split, fields=("mask",))

    sample = next(iter(eval_batches("validation")))[0]
    results = {}
    for fraction in config.fractions:
        rows = tasks.fraction_indices(len(sources["train"]), fraction, config.seed)
        params = {"vision": loaded.params["vision"],
                  "decoder": init_decoder(vit, decoder, sample, modality, config.seed, prior)}
        keys = ("vision", "decoder") if config.train_encoder else ("decoder",)
        trainable = {k: params[k] for k in keys}
        frozen = {k: v for k, v in params.items() if k not in keys}
        dice = lambda t, split: dice_of(predict, {**frozen, **t}, eval_batches(split),
                                        class_names)
        trainable, history = tasks.fit(
            loss, trainable, frozen, tasks.adamw(config.optim),
            tasks.train_batches(config, sources["train"], rows, with_mask=True),
            tasks.steps_per_epoch(len(rows), config.optim), lambda: eval_batches("validation"),
            max_epochs=config.optim.max_epochs, patience=config.optim.patience,
            monitor=lambda t: {"val_" + k: v for k, v in dice(t, "validation").items()})
        results[f"{fraction:g}"] = {
            "num_train": int(len(rows)), **dice(trainable, "test"),
            "best_epoch": history["best_epoch"], "epochs_run": history["epochs_run"],
            "history": history["history"]}
    return tasks.write_results(workdir, config, loaded, {
        "metrics": results, "classes": class_names, "decoder": config.decoder})


def dice_of(predict, params, batches, class_names) -> dict:
    """`metrics.dice_summary` of `predict` over `batches`, each per-class list as
    {class name: value}."""
    out = features.apply_batched(predict, params, batches)
    summary = metrics.dice_summary(out["pred"], out["target"], len(class_names))
    return {k: dict(zip(class_names[1:], v)) if k.endswith("_per_class") else v
            for k, v in summary.items()}


def _prior(config) -> float | None:
    """config.prior_prob for the sigmoid (focal_dice) decoder; None for softmax or 0."""
    prior = config.get("prior_prob", 0.0)  # configs saved before the key: no prior
    if not (prior == 0.0 or 0.0 < prior < 1.0):
        raise ValueError(f"config.prior_prob={prior!r}: a foreground probability in (0, 1), "
                         "or 0 for a classifier bias of 0")
    return prior if prior and config.loss == "focal_dice" else None


def init_decoder(vit, decoder, batch, modality: str, seed: int,
                 prior_prob: float | None = None) -> dict:
    """Decoder params for the input shape of `batch` (tokens of the encoder's width); with
    `prior_prob`, the classifier bias at that foreground prior (`decoders.prior_logit`)."""
    x = jnp.asarray(batch[features.input_key(modality)])
    grid = tuple(s // p for s, p in zip(x.shape[1:], decoder.patch))
    tokens = jnp.zeros((x.shape[0], math.prod(grid), vit.width))
    params = decoders.init_params(decoder, seed, x, tokens, [tokens] * len(decoder.skip_layers),
                                  grid)
    if prior_prob is not None:
        bias = params["classifier"]["bias"]
        params["classifier"]["bias"] = jnp.full_like(bias, decoders.prior_logit(prior_prob))
    return params
