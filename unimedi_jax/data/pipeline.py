"""Grain input pipelines: stored records -> fixed-shape model-input batches (docs/CONTRACTS.md).

`make_dataset` turns any random-access record source (`sources.open_split(...)`, or any object
with `__len__` and `__getitem__` returning record dicts) into batches per process:

    MapDataset.source(source)
      .map_with_index(CheckRecords)      every record checked against record 0's fields
      .seed(seed).shuffle()              training only: one global permutation per epoch
      .random_map(RandomAugment)         training; CenterCrop (.map) for evaluation
      .map(Tokenize)                     report -> input_ids, attention_mask
      [process_index : n : process_count]   this process's shard (n: a multiple of the count)
      .repeat(num_epochs) .batch(B, drop_remainder=True)
      .to_iter_dataset(ReadOptions) [.mp_prefetch(worker_count)]

Sharding comes after shuffling and augmenting, so every process uses the same permutation and
gets a disjoint stride of it each epoch, and an example's augmentation depends only on the seed
and its position in the global order (not on the number of processes). Shards have equal length
so all processes run the same number of steps.

`MixedIterator` steps a 2D and a 3D iterator together; `make_mixed` builds it from `config.data`.
Iterator states are plain JSON dicts (`get_state` / `set_state`) for the trainer's checkpoint.
`make_mixed` and `PretrainData` open the splits of `config.data` with `sources.open_split`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np
from absl import flags

from unimedi_jax.data import preprocess, sources, text, transforms

TEXT_FIELD = "report"


# ---------------------------------------------------------------- record checks


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """An array field: dtype and rank, and the exact shape once known."""

    dtype: np.dtype
    ndim: int
    shape: tuple[int, ...] | None = None

    def describe(self) -> str:
        shape = f"{list(self.shape)}" if self.shape is not None else f" of rank {self.ndim}"
        return f"{np.dtype(self.dtype)}{shape}"

    def matches(self, value: np.ndarray) -> bool:
        return (value.dtype == self.dtype and value.ndim == self.ndim
                and (self.shape is None or value.shape == self.shape))


class CheckRecords(grain.transforms.MapWithIndex):
    """Keeps the fields a pipeline uses; raises ValueError on a missing/mistyped/misshapen one.

    `arrays` maps field -> FieldSpec; `texts` lists text fields (str or bytes). Messages name the
    dataset (`name`, e.g. "phantom/train"), the record index in the source, and the field.
    """

    def __init__(self, name: str, arrays: Mapping[str, FieldSpec], texts: Sequence[str] = ()):
        self.name = name
        self.arrays = dict(arrays)
        self.texts = tuple(texts)

    def map_with_index(self, index: int, record: Mapping[str, Any]) -> dict:
        where = f"{self.name}: record {index}"
        if not isinstance(record, Mapping):
            raise ValueError(f"{where} is a {type(record).__name__}, expected a dict of fields")
        missing = [f for f in (*self.arrays, *self.texts) if f not in record]
        if missing:
            raise ValueError(f"{where} lacks field(s) {missing}; it has {sorted(record)}")
        for field, spec in self.arrays.items():
            value = record[field]
            if not isinstance(value, np.ndarray):
                raise ValueError(f"{where}: field {field!r} is a {type(value).__name__}, "
                                 f"expected a {spec.describe()} array")
            if not spec.matches(value):
                raise ValueError(f"{where}: field {field!r} is {value.dtype}{list(value.shape)}, "
                                 f"expected {spec.describe()}")
        for field in self.texts:
            if not isinstance(record[field], (str, bytes)):
                raise ValueError(f"{where}: field {field!r} is a {type(record[field]).__name__}, "
                                 "expected text")
        return {f: record[f] for f in (*self.arrays, *self.texts)}


def record_checker(
    first: Mapping[str, Any], modality: str, *, name: str, with_text: bool, with_mask: bool
) -> CheckRecords:
    """The checker of a source whose record 0 is `first`.

    Record 0 must have the contract's dtypes and ranks; its shapes then bind every record:
    image/volume and labels as in record 0, `mask` as the image, `slice_has_finding` (kept for
    CT when record 0 has it) as (D,).
    """
    m = transforms.modality(modality)
    arrays = {m.key: FieldSpec(np.dtype(m.dtype), m.ndim),
              "labels": FieldSpec(np.dtype(np.float32), 1)}
    if with_mask:
        arrays["mask"] = FieldSpec(np.dtype(np.uint8), m.ndim)
    if m.ndim == 3 and "slice_has_finding" in first:
        arrays["slice_has_finding"] = FieldSpec(np.dtype(np.uint8), 1)
    texts = (TEXT_FIELD,) if with_text else ()
    CheckRecords(name, arrays, texts).map_with_index(0, first)
    image_shape = first[m.key].shape
    shapes = {m.key: image_shape, "labels": first["labels"].shape, "mask": image_shape,
              "slice_has_finding": image_shape[:1]}
    checker = CheckRecords(
        name, {f: dataclasses.replace(s, shape=shapes[f]) for f, s in arrays.items()}, texts)
    checker.map_with_index(0, first)
    return checker


# ---------------------------------------------------------------- one modality


def shard(ds: grain.MapDataset, index: int, count: int, name: str) -> grain.MapDataset:
    """Records index, index + count, ... of the first count * (len // count): equal shards."""
    if not 0 <= index < count:
        raise ValueError(f"{name}: process index {index} is not in [0, {count})")
    per_shard = len(ds) // count
    if per_shard == 0:
        raise ValueError(f"{name}: {len(ds)} records cannot be split over {count} processes")
    return ds[index:per_shard * count:count]


def _process(index: int | None, count: int | None) -> tuple[int, int]:
    """(index, count) as given, or this process's from JAX when either is None."""
    if index is None or count is None:
        return jax.process_index(), jax.process_count()
    return index, count


def _parse_absl_flags() -> None:
    # Grain's multiprocess prefetch reads an absl flag, which raises outside an absl app (tests,
    # notebooks) until flags are parsed (google/grain#1355); defaults are what it would read.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(
    source,
    *,
    modality: str,
    batch_size: int,
    train: bool,
    crop_size: int | Sequence[int],
    tokenizer_folder: str | None,
    seed: int = 0,
    max_length: int = text.MAX_LENGTH,
    num_epochs: int | None = None,
    augment: transforms.AugmentOptions | None = None,
    with_mask: bool = False,
    name: str = "dataset",
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    read_threads: int = 2,
    prefetch: int = 2,
) -> grain.IterDataset:
    """Batches of one modality for this process, as docs/CONTRACTS.md "Model inputs".

    Args:
      source: random-access records (`__len__`, `__getitem__` -> dict), e.g.
        `builder.as_data_source(split)`.
      modality: "xray" (records with `image` uint8 (S, S)) or "ct" (`volume` int16 (D, H, W)).
      batch_size: examples per batch for this process; the last partial batch is dropped.
      train: shuffle and `RandomAugment`; otherwise source order and `CenterCrop`.
      crop_size: model input size, an int or (H, W) / (D, H, W); at most the stored size.
      tokenizer_folder: checkpoint folder of the tokenizer; None leaves the report out (no
        `input_ids` / `attention_mask`, e.g. for label-only evaluation).
      seed: shuffling and augmentation seed (the same on every process).
      max_length: report tokens (padded and truncated to it).
      num_epochs: passes over this process's shard; None repeats forever.
      augment: training augmentation; None uses `transforms.DEFAULT_AUGMENT[modality]`.
      with_mask: also yield `mask` uint8, cropped like the image.
      name: dataset and split for error messages, e.g. "phantom/train".
      process_index, process_count: this process's shard; default `jax.process_index()` and
        `jax.process_count()`.
      worker_count: Grain worker processes (0: threads of this process only).
      read_threads, prefetch: threads and batches of `grain.ReadOptions` (per worker).

    Returns:
      A `grain.IterDataset` of dicts: `image` float32 (B, H, W) or `volume` float32
      (B, D, H, W), `labels` float32 (B, L), `input_ids` / `attention_mask` int32 (B, T), and
      `slice_has_finding` uint8 (B, D) for volumes whose records carry it, `mask` uint8 on request.
    """
    m = transforms.modality(modality)
    if batch_size <= 0:
        raise ValueError(f"{name}: batch_size must be positive, got {batch_size}")
    if len(source) == 0:
        raise ValueError(f"{name}: the split is empty")
    checker = record_checker(source[0], modality, name=name,
                             with_text=tokenizer_folder is not None, with_mask=with_mask)
    stored = checker.arrays[m.key].shape
    crop = preprocess.as_shape(crop_size, m.ndim)
    if any(c > s for s, c in zip(stored, crop)):
        raise ValueError(f"{name}: crop_size {crop} exceeds the stored {m.key} shape {stored}")
    process_index, process_count = _process(process_index, process_count)

    ds = grain.MapDataset.source(source).map_with_index(checker).seed(seed)
    if train:
        ds = ds.shuffle().random_map(transforms.RandomAugment(modality, crop, augment))
    else:
        ds = ds.map(transforms.CenterCrop(modality, crop))
    if tokenizer_folder is not None:
        ds = ds.map(text.Tokenize(tokenizer_folder, max_length))
    ds = shard(ds, process_index, process_count, name)
    if num_epochs is not None and len(ds) * num_epochs < batch_size:
        raise ValueError(f"{name}: {num_epochs} epoch(s) of a {len(ds)}-record shard do not fill "
                         f"one batch of {batch_size}")
    ds = ds.repeat(num_epochs).batch(batch_size, drop_remainder=True)
    out = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
    if worker_count > 0:
        _parse_absl_flags()
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return out


# ---------------------------------------------------------------- 2D + 3D together


class MixedIterator:
    """Steps several batch iterators together: `next()` -> {"xray": batch, "ct": batch}.

    `get_state()` is a JSON-serialisable dict of the parts' Grain states (the trainer saves it
    with orbax `args.JsonSave` and restores with `args.JsonRestore`); `set_state()` on freshly
    built iterators resumes at exactly the next batch.
    """

    def __init__(self, **iterators: Iterator):
        if not iterators:
            raise ValueError("MixedIterator needs at least one iterator")
        self.iterators = iterators

    def __iter__(self) -> MixedIterator:
        return self

    def __next__(self) -> dict[str, dict[str, np.ndarray]]:
        return {key: next(it) for key, it in self.iterators.items()}

    def get_state(self) -> dict[str, Any]:
        # The JSON round trip turns tuples and numpy scalars into plain JSON types (and fails
        # here, not at save time, if a state ever holds something JSON cannot).
        return json.loads(json.dumps({key: it.get_state() for key, it in self.iterators.items()},
                                     default=_json_scalar))

    def set_state(self, state: Mapping[str, Any]) -> None:
        if set(state) != set(self.iterators):
            raise ValueError(f"Iterator state has parts {sorted(state)}, expected "
                             f"{sorted(self.iterators)}")
        for key, it in self.iterators.items():
            it.set_state(state[key])

    def close(self) -> None:
        for it in self.iterators.values():
            if hasattr(it, "close"):
                it.close()


def _json_scalar(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Iterator state holds a {type(value).__name__}, which JSON cannot store")


def make_mixed(data, *, tokenizer_folder: str, process_index: int | None = None,
               process_count: int | None = None) -> MixedIterator:
    """The training iterator of both modalities from `config.data`, infinite, shuffled, augmented.

    Keys of `data` (an ml_collections.ConfigDict or any mapping with attribute access):
      data_dir: TFDS data_dir of prepared datasets ("~" expanded).
      procedural: train on `sources.ProceduralPhantomSource` streams (unlimited phantom pairs)
        instead of prepared splits; the stream is the one the phantom's `split` would hold.
      phantom: optional `PhantomOptions` fields beyond the stored sizes (e.g. seed), for the
        procedural streams and prepared phantom datasets alike.
      seed: shuffling and augmentation seed, the same on every process.
      max_length: report tokens (DESIGN: 112).
      worker_count: Grain worker processes per modality (0: reader threads only).
      batch_size_xray, batch_size_ct: global batch sizes, divided evenly over the processes;
        0 leaves that modality out.
      xray, ct: per modality
        dataset: data_prep dataset name ("phantom", "mimic_cxr", "bimcv", ...).
        split: split to train on.
        stored_size: stored X-ray side S / CT (D, H, W) (the dataset's size option).
        crop_size: model input size, at most stored_size.
        augment: optional `transforms.AugmentOptions` fields (default `DEFAULT_AUGMENT`).
        options: optional further builder options (e.g. manifest=PATH).
    """
    process_index, process_count = _process(process_index, process_count)
    iterators = {}
    for modality in ("xray", "ct"):
        spec, global_batch = data[modality], int(data[f"batch_size_{modality}"])
        if global_batch == 0:
            continue
        if global_batch % process_count:
            raise ValueError(f"config.data.batch_size_{modality}={global_batch} is not divisible "
                             f"by the process count {process_count}")
        name = f"{spec.dataset}/{spec.split} ({modality})"
        if data.procedural:
            if spec.dataset != "phantom":
                raise ValueError(f"config.data.procedural needs config.data.{modality}.dataset="
                                 f"'phantom', not {spec.dataset!r}")
            name = f"procedural {name}"
        source = _config_split(data, modality, spec.split, procedural=data.procedural)
        iterators[modality] = iter(make_dataset(
            source, modality=modality, batch_size=global_batch // process_count, train=True,
            crop_size=spec.crop_size, tokenizer_folder=tokenizer_folder, seed=data.seed,
            max_length=data.max_length, num_epochs=None, name=name,
            augment=transforms.augment_options(spec.get("augment"),
                                               f"config.data.{modality}.augment"),
            process_index=process_index, process_count=process_count,
            worker_count=data.worker_count))
    return MixedIterator(**iterators)


# ---------------------------------------------------------------- pretraining data


def _config_split(data, modality: str, split: str, *, procedural: bool = False):
    """Records of `split` of `config.data[modality]` (`sources.open_split`): its dataset at its
    stored_size, with its options over `config.data.phantom` (for the phantom); procedural: the
    unlimited stream of the phantom split."""
    spec = data[modality]
    extra = dict(data.get("phantom") or {}) if spec.dataset == "phantom" else {}
    return sources.open_split(
        spec.dataset, modality, split, data_dir=data.data_dir, stored_size=spec.stored_size,
        options={**extra, **dict(spec.get("options") or {})}, procedural=procedural,
        length=sources.UNLIMITED if procedural else None)


@dataclasses.dataclass
class PretrainData:
    """Everything a pretraining run reads: the training iterator and the evaluation sources.

    val_ct / val_xray: `config.eval.split` of each modality's dataset; train_ct: the stored
    training volumes (their finding positions give the fixed slab-position baseline).
    """

    config: Any
    tokenizer_folder: str

    def train_iterator(self) -> MixedIterator:
        return make_mixed(self.config.data, tokenizer_folder=self.tokenizer_folder)

    def source(self, modality: str, split: str):
        return _config_split(self.config.data, modality, split)

    @functools.cached_property
    def val_ct(self):
        return self.source("ct", self.config.eval.split) if self.config.data.batch_size_ct else None

    @functools.cached_property
    def val_xray(self):
        return (self.source("xray", self.config.eval.split)
                if self.config.data.batch_size_xray else None)

    @functools.cached_property
    def train_ct(self):
        return self.source("ct", "train") if self.config.data.batch_size_ct else None


def make_pretrain_data(config, tokenizer_folder: str) -> PretrainData:
    """Prepares the datasets the config names (process 0 builds, the others wait);
    `tokenizer_folder` is the text checkpoint's (`UniMedI.text_checkpoint`)."""
    data = PretrainData(config, tokenizer_folder)
    if jax.process_index() == 0:
        for modality in ("ct", "xray"):
            if config.data[f"batch_size_{modality}"]:
                data.source(modality, config.eval.split)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("unimedi_jax: datasets prepared")
    return data
