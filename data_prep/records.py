"""The shared ArrayRecord builder of the data_prep converters of real data.

Every converter is a `RecordBuilder`: it lists its examples (`Example`: id, split, file,
report, labels, optional mask source), checks them all before writing anything, and writes
the records of docs/CONTRACTS.md (`id`, `report`, `labels`, `image` uint8 (S, S) or `volume`
int16 (D, H, W), optional `mask`) as ArrayRecord. Label names are in
`info.metadata["label_names"]`, the options that shape the data in `info.metadata["options"]`
and rows skipped with `skip_bad_rows` in `info.metadata["skipped"]`. A prepared dataset reads
back without this code: `tfds.builder_from_directory(DIR).as_data_source(split)`.

A failed build leaves no dataset behind: TFDS writes into a temporary folder that is renamed
only when every split is written, and bad rows are found before writing starts (existence of
every file, or with READ_ALL_FIRST a full read of every file). Files that turn out unreadable
while writing abort the build, or with `skip_bad_rows` are left out and listed.

Options (keyword arguments of each module's `make_builder`, or these absl flags): `ct_size`,
`xray_size`, `hu_window`, `skip_bad_rows`, `num_workers`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import functools
import gzip
import inspect
import json
import multiprocessing
from pathlib import Path
from collections.abc import Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import flags, logging

from data_prep import readers

# UniMedI Sec. 4.1: 3D volumes are 128x128x32, stored as (D, H, W).
DEFAULT_CT_SIZE = (32, 128, 128)
# UniMedI appendix (as MGCA): the larger side resized to 256 and zero-padded to 256x256.
DEFAULT_XRAY_SIZE = 256
SPLITS = ("train", "validation", "test")
MODALITIES = ("ct", "xray")
# Stored `labels` value for a label that is not known for an example (docs/CONTRACTS.md).
UNKNOWN_LABEL = -1.0


def define_flag(define, name, default, help_text, **kwargs):
    """Defines an absl flag unless another module already did (then its value is shared)."""
    if name not in flags.FLAGS:
        define(name, default, help=help_text, **kwargs)


define_flag(flags.DEFINE_bool, "skip_bad_rows", False,
            "Leave out (and list) bad rows instead of failing the build.")
define_flag(flags.DEFINE_list, "ct_size", None, "Stored CT size D,H,W (default 32,128,128).")
define_flag(flags.DEFINE_integer, "xray_size", None, "Stored X-ray side (default 256).")
define_flag(flags.DEFINE_list, "hu_window", None, "CT HU clip range LO,HI (default -1024,2048).")
define_flag(flags.DEFINE_integer, "num_workers", None,
            "Processes that read and resize files (default 1: in the main process).")
define_flag(flags.DEFINE_integer, "split_seed", None,
            "Seed of the random validation/test hold-outs of the paper's datasets (default 0).")


def option(name: str, value, default=None):
    """`value` if given, else the parsed absl flag `--name` if set, else `default`."""
    if value is not None:
        return value
    if flags.FLAGS.is_parsed() and name in flags.FLAGS and flags.FLAGS[name].value is not None:
        return flags.FLAGS[name].value
    return default


@dataclasses.dataclass(frozen=True)
class Example:
    """One example to write. `where` locates it in the source for messages and must be unique
    per example (bad rows are matched to examples by it)."""

    id: str
    split: str
    path: str
    report: str = ""
    labels: tuple[float, ...] = ()
    mask_path: str | None = None  # label map aligned with `path` (same reader, same geometry)
    boxes: tuple[tuple[float, float, float, float], ...] = ()  # (x, y, w, h) pixels -> mask 1
    where: str = ""
    row: int = 0  # position in the source listing, to report bad rows in order


@dataclasses.dataclass(frozen=True)
class BadRow:
    where: str
    path: str
    reason: str
    row: int = 0

    def __str__(self):
        return f"{self.where}: {self.path}: {self.reason}"


class BadRowsError(ValueError):
    """Raised before anything is written when rows are bad; lists every one."""

    def __init__(self, dataset: str, bad: Sequence[BadRow]):
        self.bad = list(bad)
        lines = "\n  ".join(map(str, self.bad))
        super().__init__(f"{dataset}: {len(self.bad)} bad row(s); fix them or pass "
                         f"skip_bad_rows=True (--skip_bad_rows) to leave them out:\n  {lines}")


@dataclasses.dataclass(frozen=True)
class RecordSpec:
    """What one record holds: modality, stored size, label count, HU window, mask or not."""

    modality: str
    size: tuple[int, ...]
    num_labels: int
    hu_window: tuple[float, float] = readers.DEFAULT_HU_WINDOW
    mask: bool = False
    boxes: bool = False  # X-rays: `boxes` float32 (N, 4) (x0, y0, x1, y1) stored pixels

    def features(self) -> tfds.features.FeaturesDict:
        pixels = ("volume", np.int16) if self.modality == "ct" else ("image", np.uint8)
        features = {
            "id": tfds.features.Text(),
            "report": tfds.features.Text(),
            "labels": tfds.features.Tensor(shape=(self.num_labels,), dtype=np.float32),
            # Raw bytes: the default encoding widens every voxel to an int64 varint (~10x slower).
            pixels[0]: tfds.features.Tensor(shape=self.size, dtype=pixels[1],
                                            encoding=tfds.features.Encoding.BYTES),
        }
        if self.mask:  # mostly zeros: compressed
            features["mask"] = tfds.features.Tensor(shape=self.size, dtype=np.uint8,
                                                    encoding=tfds.features.Encoding.ZLIB)
        if self.boxes:
            features["boxes"] = tfds.features.Tensor(shape=(None, 4), dtype=np.float32)
        return tfds.features.FeaturesDict(features)


def boxes_to_mask(boxes, shape) -> np.ndarray:
    """uint8 mask of `shape` (H, W): 1 inside any (x, y, w, h) box (pixel units), else 0."""
    mask = np.zeros(shape, np.uint8)
    for x, y, w, h in boxes:
        top, left = max(0, int(round(y))), max(0, int(round(x)))
        mask[top:max(top, int(round(y + h))), left:max(left, int(round(x + w)))] = 1
    return mask


def stored_boxes(boxes, shape, size: int) -> np.ndarray:
    """(x, y, w, h) boxes in pixels of an image of `shape` (H, W) -> float32 (N, 4)
    (x0, y0, x1, y1) in pixels of its stored form (`readers.pad_resize_xray` to `size`)."""
    h, w = shape
    scale = size / max(h, w)
    rows, cols = (size, max(1, int(w * scale))) if h >= w else (max(1, int(h * scale)), size)
    top, left = (size - rows) // 2, (size - cols) // 2
    out = np.asarray(boxes, np.float64).reshape(-1, 4)
    sx, sy = cols / w, rows / h
    xyxy = np.stack([out[:, 0] * sx + left, out[:, 1] * sy + top,
                     (out[:, 0] + out[:, 2]) * sx + left, (out[:, 1] + out[:, 3]) * sy + top], -1)
    return np.clip(xyxy, 0, size).astype(np.float32)


def encode(example: Example, spec: RecordSpec) -> dict:
    """Reads, resizes and packs one example into a record of `spec`'s features."""
    if spec.modality == "ct":
        volume, layout = readers.stored_ct(example.path, spec.size, window=spec.hu_window)
        record = {"volume": volume}
        if spec.mask:
            label_map, _ = readers.read_volume(example.mask_path)
            if label_map.shape != layout.shape or label_map.min() < 0 or label_map.max() > 255:
                raise ValueError(f"{example.mask_path}: label map of shape {label_map.shape} and "
                                 f"range {label_map.min()}..{label_map.max()} does not fit "
                                 f"{example.path} of shape {layout.shape} with classes 0..255")
            record["mask"] = readers.resample_volume(label_map, spec.size, window=None,
                                                     order=0).astype(np.uint8)
    else:
        image, shape = readers.stored_xray(example.path, spec.size[0])
        record = {"image": image}
        if spec.mask:
            record["mask"] = readers.pad_resize_xray(boxes_to_mask(example.boxes, shape),
                                                     spec.size[0], order=0)
        if spec.boxes:
            record["boxes"] = stored_boxes(example.boxes, shape, spec.size[0])
    labels = np.asarray(example.labels, np.float32).reshape(-1)
    if labels.shape != (spec.num_labels,):
        raise ValueError(f"{example.where}: {labels.size} labels, expected {spec.num_labels}")
    record.update(id=example.id, report=example.report, labels=labels)
    return record


def _encode_or_error(example: Example, spec: RecordSpec):
    """(record, None) or (None, reason) for a file that cannot be read."""
    try:
        return encode(example, spec), None
    except (ValueError, FileNotFoundError) as e:
        return None, str(e).removeprefix(f"{example.path}: ")


def _map(fn, items: Sequence, num_workers: int) -> Iterable:
    """fn over items in order, in `num_workers` spawned processes when more than one."""
    if num_workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        yield from pool.map(fn, items, chunksize=max(1, min(64, len(items) // (4 * num_workers))))


def find_bad_rows(examples: Sequence[Example], spec: RecordSpec, *, read_files: bool,
                  num_workers: int = 1) -> list[BadRow]:
    """Unknown splits, duplicate ids and missing files; with `read_files`, every file is also
    read and converted, so unreadable files, wrong dimensionality and NaN voxels show up."""
    bad, first_of = [], {}
    for example in examples:
        reason = None
        if example.split not in SPLITS:
            reason = f"unknown split {example.split!r}; expected one of {', '.join(SPLITS)}"
        elif example.id in first_of:
            reason = f"duplicate id {example.id!r} (also {first_of[example.id]})"
        elif not Path(example.path).exists():
            reason = "file not found"
        elif example.mask_path and not Path(example.mask_path).exists():
            reason = f"label file {example.mask_path} not found"
        first_of.setdefault(example.id, example.where)
        if reason:
            bad.append(BadRow(example.where, example.path, reason, example.row))
    if read_files:
        known = {b.where for b in bad}
        todo = [e for e in examples if e.where not in known]
        check = functools.partial(_encode_or_error, spec=spec)
        for example, (_, error) in zip(todo, _map(check, todo, num_workers)):
            if error:
                bad.append(BadRow(example.where, example.path, error, example.row))
    return bad


class RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the data_prep builders of real data (see the module docstring).

    Subclasses set MODALITY (or name their configs "ct"/"xray"), LABEL_NAMES, HAS_MASK (with
    MASK_CLASSES, class c's name at index c) and implement `_examples()`, which may count
    examples left out by design (e.g. lateral views) in `self.filtered`. READ_ALL_FIRST makes
    the check before writing read every file (else only existence is checked first).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MODALITY: str | None = None
    LABEL_NAMES: tuple[str, ...] = ()
    HAS_MASK = False
    HAS_BOXES = False  # X-rays: also store each example's boxes (RecordSpec.boxes)
    MASK_CLASSES: tuple[str, ...] = ()
    READ_ALL_FIRST = False

    def __init_subclass__(cls, **kwargs):
        # Kept out of the TFDS catalogue: TFDS ships its own "chexpert", and prepared data is
        # found by folder (tfds.builder_from_directory), not by name.
        super().__init_subclass__(skip_registration=True, **kwargs)

    def __init__(self, *, manual_dir=None, ct_size=DEFAULT_CT_SIZE, xray_size=DEFAULT_XRAY_SIZE,
                 hu_window=readers.DEFAULT_HU_WINDOW, skip_bad_rows=False, num_workers=1,
                 **kwargs):
        self._manual_dir = Path(manual_dir) if manual_dir else None
        self._ct_size = tuple(int(v) for v in ct_size)
        self._xray_size = int(xray_size)
        self._hu_window = tuple(float(v) for v in hu_window)
        self._skip_bad_rows = bool(skip_bad_rows)
        self._num_workers = int(num_workers)
        if len(self._ct_size) != 3 or min(self._ct_size) < 1:
            raise ValueError(f"ct_size must be three positive ints (D, H, W), got {ct_size}")
        if self._xray_size < 1:
            raise ValueError(f"xray_size must be positive, got {xray_size}")
        if len(self._hu_window) != 2 or not self._hu_window[0] < self._hu_window[1]:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {hu_window}")
        self.filtered = collections.Counter()
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        self._check_existing_options()

    # ------------------------------------------------------------------ what is written

    @property
    def modality(self) -> str:
        return self.MODALITY or self.builder_config.name

    def label_names(self) -> tuple[str, ...]:
        return tuple(self.LABEL_NAMES)

    @property
    def spec(self) -> RecordSpec:
        size = self._ct_size if self.modality == "ct" else (self._xray_size,) * 2
        return RecordSpec(self.modality, size, len(self.label_names()), self._hu_window,
                          self.HAS_MASK, self.HAS_BOXES and self.modality == "xray")

    def options(self) -> dict:
        """The choices that shape the stored data (compared when a dataset is reused)."""
        spec = self.spec
        chosen = {"size": list(spec.size)}
        if spec.modality == "ct":
            chosen["hu_window"] = list(spec.hu_window)
        return chosen

    def _info(self) -> tfds.core.DatasetInfo:
        # "skipped" and "filtered" are set while generating: left out here so that a reloaded
        # builder shows the stored lists (TFDS lets metadata given here override stored keys).
        metadata = tfds.core.MetadataDict(label_names=list(self.label_names()),
                                          options=self.options())
        if self.HAS_MASK:
            metadata["mask_classes"] = list(self.MASK_CLASSES)
        return tfds.core.DatasetInfo(builder=self, description=(self.__doc__ or "").strip(),
                                     features=self.spec.features(), metadata=metadata)

    def _check_existing_options(self):
        """Refuses to reuse a prepared dataset that was built with other options."""
        stored_file = Path(self.data_dir) / "metadata.json"
        if not (self.is_prepared() and stored_file.exists()):
            return
        stored = json.loads(stored_file.read_text()).get("options")
        wanted = json.loads(json.dumps(self.options()))
        if stored != wanted:
            raise ValueError(f"{self.data_dir} was built with options {stored}, not {wanted}; "
                             "use another data_dir or delete that folder")

    # ------------------------------------------------------------------ generation

    def _examples(self) -> tuple[list[Example], list[BadRow]]:
        """All examples of the source, and the rows already found bad while listing them."""
        raise NotImplementedError

    def source_dir(self) -> Path:
        """The folder with the raw data (`manual_dir`); a clear error if missing."""
        folder = self._manual_dir
        if folder is None or not folder.is_dir():
            raise FileNotFoundError(f"{self.name}: manual_dir {folder} is not a folder. "
                                    f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS or ''}".strip())
        return folder

    def _split_generators(self, dl_manager):
        del dl_manager  # sources are local: `manual_dir` is given to the constructor
        examples, bad = self._examples()
        self.info.metadata["filtered"] = dict(self.filtered)
        for reason, count in sorted(self.filtered.items()):
            logging.info("%s: left out %d: %s", self.info.full_name, count, reason)
        bad += find_bad_rows(examples, self.spec, read_files=self.READ_ALL_FIRST,
                             num_workers=self._num_workers)
        bad.sort(key=lambda b: b.row)
        if bad and not self._skip_bad_rows:
            raise BadRowsError(self.info.full_name, bad)
        self._record_skipped(bad)
        skipped = {b.where for b in bad}
        by_split = {s: [e for e in examples if e.split == s and e.where not in skipped]
                    for s in SPLITS}
        counts = ", ".join(f"{s} {len(v)}" for s, v in by_split.items() if v)
        logging.info("%s: writing %s; %d bad row(s) skipped", self.info.full_name, counts, len(bad))
        if not any(by_split.values()):
            raise ValueError(f"{self.info.full_name}: no examples left to write")
        return {s: self._generate_examples(v) for s, v in by_split.items() if v}

    def _record_skipped(self, bad: Sequence[BadRow]):
        for row in bad:
            logging.warning("%s: skipped %s", self.info.full_name, row)
        self.info.metadata["skipped"] = (list(self.info.metadata.get("skipped", []))
                                         + [dataclasses.asdict(b) for b in bad])

    def _generate_examples(self, examples: Sequence[Example]):
        convert = functools.partial(_encode_or_error, spec=self.spec)
        for example, (record, error) in zip(examples, _map(convert, examples, self._num_workers)):
            if error is None:
                yield example.id, record
            elif self._skip_bad_rows:
                self._record_skipped([BadRow(example.where, example.path, error, example.row)])
            else:
                raise ValueError(f"{self.info.full_name}: {example.where}: {error}")


# ----------------------------------------------------------------------------- source helpers


def find_file(folder: Path, *names: str) -> Path:
    """The first of `names` that exists in `folder`; FileNotFoundError listing them all."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: none of {', '.join(names)} found")


def read_table(path: Path, required: Sequence[str] = ()) -> list[dict[str, str]]:
    """Rows of a CSV or TSV file (optionally .gz) as dicts; checks the `required` columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    delimiter = "\t" if ".tsv" in path.suffixes else ","
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: columns {missing} missing (found {reader.fieldnames})")
        return list(reader)


def holdout_splits(groups: Iterable[str], seed: int, **sizes: float) -> dict[str, str]:
    """Assigns each distinct group (e.g. a patient) to a split at random.

    `sizes` maps split names to a fraction (float < 1) or a count (int) of the groups; the
    groups left over go to "train". Deterministic for a given seed and set of groups.
    """
    keys = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(keys))
    assignment, start = {}, 0
    for split, size in sizes.items():
        if not isinstance(size, int) and not 0 <= size < 1:
            raise ValueError(f"hold-out size {split}={size}: give a fraction in [0, 1) or a count")
        count = size if isinstance(size, int) else int(round(size * len(keys)))
        if count < 0 or start + count > len(keys):
            raise ValueError(f"hold-out sizes {sizes} exceed the {len(keys)} groups")
        assignment.update((keys[i], split) for i in order[start:start + count])
        start += count
    assignment.update((keys[i], "train") for i in order[start:])
    return assignment


# ----------------------------------------------------------------------------- options


def builder_options(data_dir, manual_dir, *, ct_size=None, xray_size=None, hu_window=None,
                    skip_bad_rows=None, num_workers=None) -> dict:
    """RecordBuilder keyword arguments from explicit values, parsed flags or the defaults
    (sequences may also be given as "a,b,c" strings)."""
    def sequence(value):
        return value.split(",") if isinstance(value, str) else value

    return dict(
        data_dir=data_dir, manual_dir=manual_dir,
        ct_size=sequence(option("ct_size", ct_size, DEFAULT_CT_SIZE)),
        xray_size=option("xray_size", xray_size, DEFAULT_XRAY_SIZE),
        hu_window=sequence(option("hu_window", hu_window, readers.DEFAULT_HU_WINDOW)),
        skip_bad_rows=option("skip_bad_rows", skip_bad_rows, False),
        num_workers=option("num_workers", num_workers, 1))


def make(builder_cls, data_dir, manual_dir=None, *, split_seed=None, **options):
    """`builder_cls` with the shared options (explicit, flags or defaults) and, for builders
    with random hold-outs, `split_seed`; other keyword arguments go to the builder."""
    shared = {k: options.pop(k) for k in ("ct_size", "xray_size", "hu_window", "skip_bad_rows",
                                          "num_workers") if k in options}
    if "split_seed" in inspect.signature(builder_cls.__init__).parameters:
        options["split_seed"] = option("split_seed", split_seed, 0)
    return builder_cls(**builder_options(data_dir, manual_dir, **shared), **options)
