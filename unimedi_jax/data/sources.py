"""Opening data: (dataset, modality, options) -> random-access record sources, one per split.

    opened = open_dataset("phantom", "ct", data_dir=DIR, stored_size=(32, 64, 64))
    opened.splits                   ("test", "train", "validation")
    opened.label_names              ("nodule", ..., "cardiomegaly"): columns of `labels`
    opened.split("validation")[i]   {"volume": int16 (D, H, W), "labels": float32 (L,), ...}
    open_split("phantom", "ct", "validation", data_dir=DIR, ...)   the same source

Records follow docs/CONTRACTS.md: `volume` int16 (D, H, W) for "ct", `image` uint8 (S, S) for
"xray", with `labels`, `report`, `id` and per dataset `mask`, `slice_has_finding`.

A prepared dataset is `data_prep.build.build_dataset(dataset, data_dir, manual_dir, **options)`
(built on first use) read as `builder.as_data_source(split)`. With `procedural=True` the
phantom's records are generated on demand instead (`ProceduralPhantomSource`): split s of
options o is the stream `phantom.split_seed(o.seed, s)`, whose first records are the ones a
build of the same options stores.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

from data_prep import build
from unimedi_jax.data import phantom, transforms

UNLIMITED = 2**31 - 1  # records of a procedural training stream


class ProceduralPhantomSource:
    """Random-access source of generated phantom records: record i is
    `phantom.generate_<modality>(seed, i, opts)`, made on demand (unlimited training pairs).

    `seed` is the stream seed, normally `phantom.split_seed(opts.seed, split)`, the stream a
    built phantom split of the same options holds (so a "train" stream never meets "test").
    """

    def __init__(self, modality: str, seed: int, opts: phantom.PhantomOptions | None = None,
                 length: int = UNLIMITED):
        transforms.modality(modality)
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        self.modality, self.seed, self.length = modality, int(seed), int(length)
        self.opts = phantom.PhantomOptions() if opts is None else opts

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"{self!r}: index {index} out of range")
        return phantom.generate(self.modality, self.seed, index, self.opts)

    def __repr__(self) -> str:
        return f"ProceduralPhantomSource({self.modality!r}, seed={self.seed}, length={self.length})"


class Dataset:
    """The splits of one dataset and modality: names, label names, and a source per split."""

    def __init__(self, where: str, splits: Sequence[str], label_names: Sequence[str],
                 read: Callable[[str], Any]):
        self.where = where  # e.g. "phantom (ct) in ~/data", for messages
        self.splits = tuple(splits)
        self.label_names = tuple(label_names)
        self._read = read

    def sources(self, splits: Sequence[str]) -> dict[str, Any]:
        """{split: random-access records}; a ValueError names the splits missing and present."""
        missing = [s for s in splits if s not in self.splits]
        if missing:
            raise ValueError(f"{self.where} has no split(s) {missing}; it has "
                             f"{sorted(self.splits)}")
        return {s: self._read(s) for s in splits}

    def split(self, split: str):
        """Records of one split (`len`, `[i]` -> record dict)."""
        return self.sources([split])[split]

    def __repr__(self) -> str:
        return f"Dataset({self.where}, splits={list(self.splits)})"


def _size_option(dataset: str, modality: str, stored_size) -> dict:
    """The builder option of the stored size: the phantom's (`volume_size` (D, H, W),
    `image_size` S), or data_prep's shared one (`ct_size`, `xray_size`)."""
    if modality == "ct":
        key = "volume_size" if dataset == "phantom" else "ct_size"
        return {key: tuple(int(s) for s in stored_size)}
    return {"image_size" if dataset == "phantom" else "xray_size": int(stored_size)}


def open_dataset(dataset: str, modality: str, *, data_dir, stored_size=None,
                 options: Mapping[str, Any] | None = None, manual_dir=None,
                 procedural: bool = False, length: int | None = None) -> Dataset:
    """The splits of data_prep dataset `dataset` (a `data_prep.build.DATASETS` name) for
    `modality` ("ct" | "xray").

    Args:
      data_dir: TFDS data_dir the dataset is prepared in on first use ("~" expanded).
      stored_size: CT (D, H, W) or X-ray side S as stored (the builder's size option, over
        `options`); None leaves the size to `options` or the builder's default.
      options: builder options; None values keep the builder's default. The phantom takes
        `PhantomOptions` fields and `num_<split>`, the manifest `manifest=PATH`; both are given
        `modality`.
      manual_dir: raw files of a real dataset ("~" expanded).
      procedural: generate the phantom's records instead of reading a build (no files).
      length: records of each procedural split; None: the split sizes a build of the same
        options has (`num_<split>`, else `phantom.DEFAULT_EXAMPLES`; splits of 0 are absent).
    """
    transforms.modality(modality)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if stored_size is not None:
        options.update(_size_option(dataset, modality, stored_size))
    if dataset in ("phantom", "manifest"):
        options["modality"] = modality
    if procedural:
        return _procedural(dataset, modality, options, length)
    data_dir = os.path.expanduser(data_dir)
    builder = build.build_dataset(dataset, data_dir,
                                  os.path.expanduser(manual_dir) if manual_dir else None,
                                  **options)
    where = f"{dataset} ({modality}) in {data_dir}"
    if isinstance(builder, (list, tuple)):
        raise ValueError(f"{where} has several parts; name one with the builder options")
    return Dataset(where, tuple(builder.info.splits), builder.info.metadata["label_names"],
                   builder.as_data_source)


def _procedural(dataset: str, modality: str, options: dict, length: int | None) -> Dataset:
    if dataset != "phantom":
        raise ValueError(f"{dataset!r} has no procedural records: procedural=True needs the "
                         "phantom")
    options.pop("modality")
    counts = phantom.split_sizes(
        modality, {s: options.pop(f"num_{s}", None) for s in phantom.SPLIT_INDEX})
    opts = phantom.options_from(options)
    if length is not None:
        counts = dict.fromkeys(counts, length)

    def read(split: str) -> ProceduralPhantomSource:
        return ProceduralPhantomSource(modality, phantom.split_seed(opts.seed, split), opts,
                                       counts[split])

    return Dataset(f"procedural phantom ({modality})", [s for s, n in counts.items() if n > 0],
                   phantom.LABEL_NAMES, read)


def open_split(dataset: str, modality: str, split: str, **kwargs):
    """Records of `split`: `open_dataset(dataset, modality, **kwargs).split(split)`."""
    return open_dataset(dataset, modality, **kwargs).split(split)
