"""What every downstream task shares: its data splits, the encoder to evaluate, label handling,
label-fraction subsets, early stopping, and the results file.

Data (`config.data`): `name` is a data_prep dataset of `modality`, opened with
`sources.open_dataset(name, modality, data_dir=..., manual_dir=..., options=build_options,
procedural=...)`: built into `data_dir` on first use, or for the phantom with `procedural=True`
the same records generated on the fly (`build_options` give the split sizes `num_<split>` and
the `PhantomOptions`). A dataset without a validation split gets one carved from its training
split (`data.validation_from_train`); `data.max_examples` caps each split.

Encoder (`config.init_from`): a pretraining workdir (its "params" = the student, or the EMA
"teacher" with `config.init_params`), or the name of a bundled checkpoint (its student,
`models.bundle`), with the model built from that run's config; empty
means a randomly initialised encoder of `config.model` (the baseline), text weights from the
text checkpoint as pretraining starts. results.json says which (`init`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from unimedi_jax import files
from unimedi_jax.data import pipeline, sources, transforms
from unimedi_jax.eval import features
from unimedi_jax.models import bundle
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.objective import methods
from unimedi_jax.train import checkpoint

RESULTS_FILE = "results.json"
LABEL_TYPES = ("multilabel", "binary", "multiclass")
SPLITS = ("train", "validation", "test")


# ---------------------------------------------------------------- data


def split_name(data_cfg, split: str) -> str:
    """"name/split" for messages."""
    return f"{data_cfg.name}/{split}"


def open_splits(data_cfg, splits: Sequence[str] = SPLITS) -> tuple[dict, tuple[str, ...]]:
    """({split: random-access record source}, label names) of `config.data`."""
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; known: {SPLITS}")
    opened = sources.open_dataset(
        data_cfg.name, data_cfg.modality, data_dir=data_cfg.data_dir,
        manual_dir=data_cfg.get("manual_dir"), options=data_cfg.build_options,
        procedural=bool(data_cfg.get("procedural")))
    carve = ("validation" in splits and "validation" not in opened.splits
             and "train" in opened.splits)
    found = opened.sources([s for s in splits if not (carve and s == "validation")])
    if carve:
        found.update(_carve_validation(opened.split("train"), data_cfg.validation_from_train))
    return _limit({s: found[s] for s in splits}, data_cfg), opened.label_names


def _carve_validation(train, fraction: float) -> dict:
    """{"train", "validation"}: a fixed random `fraction` of a training split (seed 0, at least
    one record) held out, for datasets published without a validation split (BCV)."""
    if not 0.0 < fraction < 1.0 or len(train) < 2:
        raise ValueError(f"config.data.validation_from_train={fraction} must lie in (0, 1), and "
                         f"the training split ({len(train)} records) must have 2 or more")
    held = fraction_indices(len(train), fraction, seed=0)
    logging.info("No validation split: holding out %d of %d training records", len(held),
                 len(train))
    return {"train": features.Subset(train, np.setdiff1d(np.arange(len(train)), held)),
            "validation": features.Subset(train, held)}


def _limit(sources: dict, data_cfg) -> dict:
    """The first `data.max_examples[split]` records of each split (0 or absent: all)."""
    limits = data_cfg.get("max_examples") or {}
    return {s: features.head(src, limits.get(s, 0)) for s, src in sources.items()}


def split_batches(config, sources: dict, split: str, fields=("labels",)):
    """`features.eval_batches` of one split with the config's crop and batch size."""
    return features.eval_batches(sources[split], modality=config.data.modality,
                                 crop_size=config.data.crop_size, batch_size=config.batch_size,
                                 fields=fields, name=split_name(config.data, split))


def train_batches(config, source, rows, with_mask: bool = False) -> Iterator[dict]:
    """Endless shuffled, augmented batches of `config.optim.batch_size` records source[rows]
    (`pipeline.make_dataset(train=True)`, seeded by config.seed, in this process), augmented by
    `config.data.augment` (None: the modality's `transforms.DEFAULT_AUGMENT`)."""
    augment = transforms.augment_options(config.data.get("augment"), "config.data.augment")
    return iter(pipeline.make_dataset(
        features.Subset(source, rows), modality=config.data.modality,
        batch_size=config.optim.batch_size, train=True, crop_size=config.data.crop_size,
        augment=augment,
        tokenizer_folder=None, seed=config.seed, with_mask=with_mask,
        name=split_name(config.data, "train"), process_index=0, process_count=1))


def label_columns(label_names: Sequence[str], wanted: Sequence[str]) -> list[int]:
    """Column indices of `wanted` label names (all columns when empty)."""
    if not wanted:
        return list(range(len(label_names)))
    unknown = [w for w in wanted if w not in label_names]
    if unknown:
        raise ValueError(f"config.data.labels: {unknown} are not labels of this dataset; it has "
                         f"{list(label_names)}")
    return [list(label_names).index(w) for w in wanted]


def targets(labels: np.ndarray, label_type: str, name: str) -> np.ndarray:
    """Stored labels (N, L) -> training targets: (N, L) float with -1 unknown (multilabel,
    binary: L == 1), or (N,) int class ids (multiclass: one 1 per row)."""
    if label_type not in LABEL_TYPES:
        raise ValueError(f"config.label_type={label_type!r}; choose one of {LABEL_TYPES}")
    labels = np.asarray(labels, np.float32)
    if label_type == "binary" and labels.shape[1] != 1:
        raise ValueError(f"config.label_type='binary' needs one label (config.data.labels), got "
                         f"{labels.shape[1]}")
    if label_type != "multiclass":
        return labels
    bad = np.flatnonzero(~((labels == 1).sum(1) == 1) | ~np.isin(labels, (0, 1)).all(1))
    if bad.size:
        raise ValueError(f"{name}: label_type='multiclass' needs exactly one positive label per "
                         f"example; rows {bad[:10].tolist()} have {labels[bad[0]].tolist()}...")
    return labels.argmax(axis=1).astype(np.int32)


def fraction_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a deterministic `fraction` of n examples: the first ceil(fraction * n)
    (at least 1) of a permutation drawn from `seed`, so smaller fractions nest in larger ones."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction {fraction} must lie in (0, 1]")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:max(1, math.ceil(fraction * n))])


# ---------------------------------------------------------------- encoder


@dataclasses.dataclass
class Loaded:
    """The model to evaluate: module definitions, params, the config that built them, and
    where they came from (`info`, written to results.json)."""

    model: UniMedI
    params: dict
    config: ml_collections.ConfigDict
    info: dict


def load_model(config, with_text: bool) -> Loaded:
    """The encoder of `config.init_from`, or a random one of `config.model` when it is empty.

    with_text: also the text encoder and projections (retrieval, zero-shot); otherwise params
    hold "vision" (and the heads when pretrained).
    """
    which = config.init_params
    if config.init_from and bundle.is_name(config.init_from):
        if which != "params":
            raise ValueError(f"config.init_params={which!r}: the bundled checkpoint "
                             f"{config.init_from!r} holds the student only; use 'params'")
        loaded = bundle.read(config.init_from)
        model_cfg, params = loaded.config, loaded.params
        info = {"init": "pretrained", "init_from": config.init_from,
                "init_step": loaded.meta["step"], "init_params": which}
        model = UniMedI.from_config(model_cfg)
    elif config.init_from:
        checkpoint.load_config(config.init_from)  # a clear error when it is not a workdir
        ckpt = checkpoint.Checkpointer(config.init_from, max_to_keep=None, asynchronous=False)
        step = ckpt.latest_step()
        ckpt.close()
        if step is None:
            raise FileNotFoundError(f"config.init_from={config.init_from!r} holds no checkpoint")
        model_cfg, params = checkpoint.load_pretrained(config.init_from, step, which=which)
        if with_text and not methods.has_text(model_cfg):
            raise ValueError(f"config.init_from={config.init_from!r} was pretrained with "
                             f"config.method={methods.name(model_cfg)!r}, which has no language: "
                             "tasks that encode reports (zero-shot, retrieval) need a UniMedI run")
        if with_text and "text" not in params:
            raise ValueError(f"config.init_params={which!r} holds no text encoder; use 'params' "
                             "(the student) for tasks that encode reports")
        info = {"init": "pretrained", "init_from": os.path.abspath(os.path.expanduser(
            config.init_from)), "init_step": step, "init_params": which}
        model = UniMedI.from_config(model_cfg)
        params = jax.tree.map(np.asarray, params)
    else:
        model_cfg = config
        model = UniMedI.from_config(config)
        rng = jax.random.key(config.seed)
        params = model.init(rng) if with_text else {"vision": jax.jit(model.init_random)(rng)[
            "vision"]}
        info = {"init": "random", "init_from": "", "init_step": None, "init_params": None}
    logging.info("Encoder: %s", info)
    return Loaded(model, params, model_cfg, info)


# ---------------------------------------------------------------- training


def adamw(optim_cfg) -> optax.GradientTransformation:
    """AdamW of `config.optim` (lr, weight_decay)."""
    return optax.adamw(optim_cfg.lr, weight_decay=optim_cfg.weight_decay)


def steps_per_epoch(num_train: int, optim_cfg) -> int:
    """Steps of one epoch: optim.steps_per_epoch when set (> 0), a fixed budget that every label
    fraction trains for (a small one repeats its records, a large one sees a part per epoch);
    else one pass over num_train records at optim.batch_size."""
    fixed = int(optim_cfg.get("steps_per_epoch", 0))
    if fixed < 0:
        raise ValueError(f"config.optim.steps_per_epoch={fixed} must be >= 0")
    return fixed or -(-num_train // optim_cfg.batch_size)


def early_stopping(train_epoch: Callable[[Any, int], tuple[Any, float]],
                   val_loss: Callable[[Any], float], state: Any, *, max_epochs: int,
                   patience: int, monitor: Callable[[Any], dict] | None = None
                   ) -> tuple[Any, dict]:
    """Trains epoch by epoch until the validation loss has not improved for `patience` epochs
    (paper appendix 7.1), returning the state of the lowest validation loss and a history.

    train_epoch(state, epoch) -> (state, mean train loss); val_loss(state) -> float;
    monitor(state) -> further validation numbers logged per epoch in the history.
    """
    if max_epochs <= 0 or patience <= 0:
        raise ValueError(f"max_epochs={max_epochs} and patience={patience} must be positive")
    best, best_loss, best_epoch, wait = state, math.inf, -1, 0
    history = []
    for epoch in range(max_epochs):
        state, train_loss = train_epoch(state, epoch)
        loss = float(val_loss(state))
        extra = monitor(state) if monitor is not None else {}
        history.append({"epoch": epoch, "train_loss": float(train_loss), "val_loss": loss,
                        **extra})
        logging.info("epoch %d: train loss %.4f, validation loss %.4f %s", epoch, train_loss,
                     loss, extra or "")
        if loss < best_loss:
            best, best_loss, best_epoch, wait = state, loss, epoch, 0
        else:
            wait += 1
            if wait >= patience:
                break
    return best, {"best_epoch": best_epoch, "best_val_loss": best_loss,
                  "epochs_run": len(history), "history": history}


LossFn = Callable[[Any, Any, dict, jax.Array], jax.Array]


def fit(loss_fn: LossFn, trainable: Any, frozen: Any, optimizer: optax.GradientTransformation,
        train_batches: Iterator[dict], steps_per_epoch: int,
        val_batches: Callable[[], Iterable[tuple[dict, int]]], *, max_epochs: int,
        patience: int, monitor: Callable[[Any], dict] | None = None) -> tuple[Any, dict]:
    """Minimises `loss_fn(trainable, frozen, batch, weights)` over `trainable` with early stopping.

    train_batches: endless iterator of fixed-shape batches (an optional "weights" (B,) entry
      marks padding with 0); an epoch is `steps_per_epoch` of them.
    val_batches: () -> iterable of (batch, n) as `features.eval_batches`; rows >= n are padding.
    monitor: trainable params -> validation numbers for the history (`early_stopping`).
    Returns the trainable params of the lowest validation loss, and the history.
    """

    def split_weights(batch):
        batch = dict(batch)
        weights = batch.pop("weights", None)
        size = len(next(iter(batch.values())))
        return batch, np.ones(size, np.float32) if weights is None else weights

    @jax.jit
    def train_step(params, opt_state, frozen, batch, weights):
        loss, grads = jax.value_and_grad(loss_fn)(params, frozen, batch, weights)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    eval_loss = jax.jit(loss_fn)

    def train_epoch(state, epoch):
        params, opt_state = state
        total = 0.0
        for _ in range(steps_per_epoch):
            batch, weights = split_weights(next(train_batches))
            params, opt_state, loss = train_step(params, opt_state, frozen, batch, weights)
            total += float(loss)
        return (params, opt_state), total / steps_per_epoch

    def val_loss(state):
        total, count = 0.0, 0
        for batch, n in val_batches():
            weights = (np.arange(len(next(iter(batch.values())))) < n).astype(np.float32)
            total += float(eval_loss(state[0], frozen, batch, weights)) * n
            count += n
        return total / count

    (params, _), history = early_stopping(
        train_epoch, val_loss, (trainable, optimizer.init(trainable)), max_epochs=max_epochs,
        patience=patience, monitor=None if monitor is None else lambda state: monitor(state[0]))
    return params, history


# ---------------------------------------------------------------- results


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, np.generic)):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None  # NaN: undefined (e.g. AUROC of a label with one class)
    return x


def write_results(workdir: str, config, loaded: Loaded, results: dict) -> dict:
    """Writes WORKDIR/results.json (atomically): task, encoder origin, results, the config."""
    out = _jsonable({"task": config.task, **loaded.info, **results,
                     "config": json.loads(config.to_json_best_effort())})
    workdir = os.path.expanduser(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RESULTS_FILE)
    files.write_text(path, json.dumps(out, indent=2))
    logging.info("Wrote %s", path)
    return out
