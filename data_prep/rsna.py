"""RSNA Pneumonia Detection Challenge (stage 2): pneumonia label and box masks.

One example per patient: label 1 when any row of stage_2_train_labels.csv has Target 1, a
mask (class 1 = pneumonia) that is the union of the patient's boxes (x, y, width, height in
pixels of the DICOM image), resized with the image, and the boxes themselves (`boxes` float32
(N, 4), x0 y0 x1 y1 in stored pixels; N = 0 without pneumonia). Splits as UniMedI Sec. 4.2 (after
GLoRIA/MGCA): patients split at random 70% / 15% / 15% (train / validation / test); the
paper's segmentation split 16,010 / 5,337 / 5,337 is `validation=5337, test=5337`.
No reports.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from data_prep import records

LABELS_FILE = "stage_2_train_labels.csv"
IMAGE_FOLDER = "stage_2_train_images"
# UniMedI Sec. 4.2: "training, validation, and test set with 70%/15%/15% ratio".
VALIDATION, TEST = 0.15, 0.15


class Rsna(records.RecordBuilder):
    """RSNA Pneumonia stage 2: frontal radiographs, pneumonia label and box masks."""

    MODALITY = "xray"
    LABEL_NAMES = ("pneumonia",)
    HAS_MASK = True
    HAS_BOXES = True
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Per-image boxes stored next to the mask (`boxes`, x0 y0 x1 y1)."}
    MASK_CLASSES = ("background", "pneumonia")
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    manual_dir is the Kaggle rsna-pneumonia-detection-challenge folder: stage_2_train_labels.csv
    (patientId,x,y,width,height,Target) and stage_2_train_images/<patientId>.dcm.
    """

    def __init__(self, *, split_seed: int = 0, validation: float | int = VALIDATION,
                 test: float | int = TEST, **kwargs):
        self._split_seed, self._holdout = int(split_seed), {"validation": validation, "test": test}
        super().__init__(**kwargs)

    def options(self) -> dict:
        return {**super().options(), "split_seed": self._split_seed, **self._holdout}

    def _examples(self):
        root = self.source_dir()
        table = records.read_table(root / LABELS_FILE,
                                   required=("patientId", "x", "y", "width", "height", "Target"))
        boxes, first_row, problems = {}, {}, {}
        for number, row in enumerate(table, start=1):
            patient = row["patientId"]
            first_row.setdefault(patient, number)
            boxes.setdefault(patient, [])
            try:
                target = {"0": 0, "1": 1}[row["Target"].strip()]
                box = tuple(float(row[k]) for k in ("x", "y", "width", "height")) if target else ()
                if box and min(box) < 0:
                    raise ValueError
            except (KeyError, ValueError):
                problems.setdefault(patient, []).append(
                    f"row {number}: Target {row['Target']!r} with box {row['x']!r}, {row['y']!r}, "
                    f"{row['width']!r}, {row['height']!r}; expected Target 0, or 1 with a box")
                continue
            if box:
                boxes[patient].append(box)
        split_of = records.holdout_splits(boxes, self._split_seed, **self._holdout)
        image = {p: str(root / IMAGE_FOLDER / f"{p}.dcm") for p in boxes}
        where = {p: f"{LABELS_FILE} row {first_row[p]}" for p in boxes}
        bad = [records.BadRow(where[p], image[p], "; ".join(reasons), first_row[p])
               for p, reasons in problems.items()]
        examples = [records.Example(
            id=p, split=split_of[p], path=image[p], labels=(float(bool(patient_boxes)),),
            boxes=tuple(patient_boxes), where=where[p], row=first_row[p])
            for p, patient_boxes in boxes.items() if p not in problems]
        return examples, bad


def make_builder(data_dir, manual_dir=None, **options):
    return records.make(Rsna, data_dir, manual_dir, **options)
