"""The "manifest" builder: users' own CT volumes or X-rays with reports and labels.

Manifest CSV (`--manifest=PATH.csv`, default `MANUAL_DIR/manifest.csv`), one row per example:
- `path`: image file or DICOM-series folder, relative to the CSV's folder (or absolute);
- `report`: report text (must not be empty; whitespace runs are collapsed);
- `split` (optional): train, validation or test; empty means train;
- `modality` (optional): ct or xray; otherwise inferred from the file type: folders and
  NIfTI/NRRD/MetaImage files are CT, PNG/JPG/BMP/TIFF and single DICOM files are X-rays;
- `boxes` (optional, X-rays): the example's boxes as `x y w h` in pixels of the image file,
  several separated by `;`, empty for none; with this column the X-ray records also hold a mask
  (class 1 inside any box) and the boxes (`boxes` float32 (N, 4), x0 y0 x1 y1 stored pixels);
- every other column is a label (a number; empty = -1, unknown).

CT rows and X-ray rows become two configs, `manifest/ct` and `manifest/xray`
(`--manifest_modality` picks one; by default every modality present is built). Before
writing, every row of a config's modality (and every row whose modality cannot be told) is
read and checked: missing or unreadable file, wrong dimensionality, NaN voxels, empty report,
unknown split or modality, non-numeric label, repeated path. By default the build then fails
with one error listing every bad row with its number, path and reason; with
`skip_bad_rows=True` those rows are left out and listed in the log and in
`info.metadata["skipped"]`. Records follow data_prep/records.py.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
from pathlib import Path

import tensorflow_datasets as tfds
from absl import flags

from data_prep import readers, records, reports
from data_prep.records import MODALITIES, SPLITS, BadRow, Example, option

RESERVED_COLUMNS = ("path", "report", "split", "modality", "boxes")

records.define_flag(flags.DEFINE_string, "manifest", None, "Manifest CSV for the manifest builder.")
records.define_flag(flags.DEFINE_enum, "manifest_modality", None, "Which manifest rows to build.",
                    enum_values=list(MODALITIES))


@dataclasses.dataclass
class ManifestTable:
    """A parsed manifest: (modality, example) pairs, label names, and (modality, bad row)
    pairs for rows already found bad (modality None where it cannot be told)."""

    rows: list[tuple[str, Example]]
    label_names: tuple[str, ...]
    bad: list[tuple[str | None, BadRow]]
    has_boxes: bool = False  # the CSV has a `boxes` column


def read_manifest(csv_path: str | Path) -> ManifestTable:
    """Parses and checks the manifest's text (the builder then checks the files)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: manifest CSV not found")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [c.strip() for c in next(reader, [])]
        missing = [c for c in ("path", "report") if c not in header]
        if missing:
            raise ValueError(f"{csv_path}: header {header} lacks column(s) {missing}")
        if len(set(header)) != len(header) or "" in header:
            raise ValueError(f"{csv_path}: header {header} has empty or repeated column names")
        label_names = tuple(c for c in header if c not in RESERVED_COLUMNS)
        table, first_of = ManifestTable([], label_names, [], "boxes" in header), {}
        for number, fields in enumerate(reader, start=1):
            if not any(v.strip() for v in fields):
                continue
            where = f"row {number} (line {reader.line_num})"
            row = dict(zip(header, fields))
            path_text = row.get("path", "").strip()
            path = csv_path.parent / path_text
            given = row.get("modality", "").strip().lower()
            modality = (given if given in MODALITIES
                        else readers.infer_modality(path) if path_text else None)
            problems = _row_problems(row, fields, header, label_names)
            boxes, box_problem = parse_boxes(row.get("boxes", ""))
            if box_problem:
                problems.append(box_problem)
            elif boxes and modality == "ct":
                problems.append("boxes are for X-rays; this row is a CT")
            if path_text in first_of:
                problems.append(f"same path as {first_of[path_text]}")
            elif path_text and not path.exists():
                problems.append("file not found")
            elif path_text and modality is None:
                problems.append("cannot tell CT from X-ray by the file type; add a modality column")
            first_of.setdefault(path_text, where)
            if problems:
                table.bad.append((modality, BadRow(where, str(path), "; ".join(problems), number)))
                continue
            labels = tuple(float(row[n]) if row[n].strip() else records.UNKNOWN_LABEL
                           for n in label_names)
            table.rows.append((modality, Example(
                id=path_text, split=row.get("split", "").strip() or "train", path=str(path),
                report=reports.normalize_whitespace(row["report"]), labels=labels, where=where,
                row=number, boxes=boxes)))
    return table


def parse_boxes(text: str) -> tuple[tuple, str]:
    """("x y w h; x y w h" or empty) -> (boxes, "") or ((), what is wrong)."""
    boxes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            box = tuple(float(v) for v in part.replace(",", " ").split())
        except ValueError:
            box = ()
        if len(box) != 4 or not all(math.isfinite(v) for v in box) or min(box) < 0 \
                or box[2] <= 0 or box[3] <= 0:
            return (), (f"boxes {text!r}: each box is 'x y w h' (pixels, x, y >= 0, w, h > 0), "
                        "boxes separated by ';'")
        boxes.append(box)
    return tuple(boxes), ""


def _row_problems(row: dict, fields: list, header: list, label_names) -> list[str]:
    """What is wrong with a manifest row's text (empty list if nothing)."""
    if len(fields) != len(header):
        return [f"{len(fields)} fields, the header has {len(header)}"]
    problems = []
    if not row["path"].strip():
        problems.append("empty path")
    if not row["report"].strip():
        problems.append("empty report")
    split = row.get("split", "").strip()
    if split and split not in SPLITS:
        problems.append(f"unknown split {split!r}; expected one of {', '.join(SPLITS)} or empty")
    modality = row.get("modality", "").strip().lower()
    if modality and modality not in MODALITIES:
        problems.append(f"unknown modality {modality!r}; expected ct, xray or empty")
    for name in label_names:
        value = row[name].strip()
        try:
            finite = not value or math.isfinite(float(value))
        except ValueError:
            finite = False
        if not finite:
            problems.append(f"label {name!r} is {value!r}, not a finite number")
    return problems


class Manifest(records.RecordBuilder):
    """Users' own CT volumes or X-rays with reports and labels, listed in a CSV manifest."""

    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="ct", description="CT rows of the manifest."),
        tfds.core.BuilderConfig(name="xray", description="X-ray rows of the manifest."),
    ]
    READ_ALL_FIRST = True

    MASK_CLASSES = ("background", "box")

    def __init__(self, *, manifest, **kwargs):
        self._manifest_path = Path(manifest)
        self._table = read_manifest(self._manifest_path)
        # A `boxes` column gives the X-ray records a box mask and the boxes.
        self.HAS_MASK = self.HAS_BOXES = self._table.has_boxes and kwargs.get("config") == "xray"
        super().__init__(**kwargs)

    def label_names(self) -> tuple[str, ...]:
        return self._table.label_names

    def options(self) -> dict:
        digest = hashlib.sha256(self._manifest_path.read_bytes()).hexdigest()
        return {**super().options(), "manifest_sha256": digest}

    def _examples(self):
        rows = [e for modality, e in self._table.rows if modality == self.modality]
        bad = [b for modality, b in self._table.bad if modality in (None, self.modality)]
        return rows, bad


def make_builder(data_dir, manual_dir=None, *, manifest=None, modality=None, **options):
    """The manifest builder for `modality` ("ct" or "xray"); by default one builder per
    modality present in the CSV (a list when there are both)."""
    manifest = option("manifest", manifest)
    if manifest is None:
        if manual_dir is None:
            raise ValueError("the manifest builder needs --manifest=PATH.csv or a manual_dir "
                             "holding manifest.csv")
        manifest = Path(manual_dir) / "manifest.csv"
    modality = option("manifest_modality", modality)
    if modality is None:
        table = read_manifest(manifest)
        if not table.rows:  # nothing to build: report every row now
            bad = [b for _, b in table.bad]
            raise records.BadRowsError(str(manifest), bad) if bad else ValueError(
                f"{manifest}: no rows")
        present = sorted({m for m, _ in table.rows})
    shared = records.builder_options(data_dir, manual_dir, **options)
    made = [Manifest(manifest=manifest, config=m, **shared) for m in ([modality] if modality
                                                                      else present)]
    return made[0] if len(made) == 1 else made
