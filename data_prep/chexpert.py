"""CheXpert v1.0 (full or "small"): frontal X-rays with the five competition labels.

Splits as in UniMedI/MGCA: the expert-labelled `valid.csv` is the test set, and 5,000 random
frontal radiographs of `train.csv` form the validation set (the rest is train). Labels as in
MGCA: blank (not mentioned) -> 0, uncertain (-1) -> 1 for atelectasis, edema and pleural
effusion and -> 0 for cardiomegaly and consolidation. No reports (`report` is empty).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from data_prep import records

COMPETITION_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
# MGCA's CHEXPERT_UNCERTAIN_MAPPINGS (from the CheXpert paper's best U-Ones/U-Zeros policy).
UNCERTAIN_AS = {"Atelectasis": 1.0, "Cardiomegaly": 0.0, "Consolidation": 0.0, "Edema": 1.0,
                "Pleural Effusion": 1.0}
# UniMedI Sec. 4.2 (after GLoRIA/MGCA): 5,000 training radiographs held out for validation.
NUM_VALIDATION = 5000
VIEW_COLUMN = "Frontal/Lateral"


def competition_labels(row: dict) -> tuple[float, ...]:
    """The five labels of a CheXpert-style row (also MIMIC-CXR's chexpert.csv) as floats."""
    labels = []
    for name in COMPETITION_LABELS:
        text = row.get(name, "").strip()
        value = float(text) if text else 0.0
        if value not in (-1.0, 0.0, 1.0):
            raise ValueError(f"label {name!r} is {text!r}, expected 1, 0, -1 or blank")
        labels.append(UNCERTAIN_AS[name] if value == -1.0 else value)
    return tuple(labels)


class Chexpert(records.RecordBuilder):
    """CheXpert frontal radiographs with the 5 competition labels (MGCA label policy)."""

    MODALITY = "xray"
    LABEL_NAMES = COMPETITION_LABELS
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    manual_dir is the CheXpert-v1.0 (or CheXpert-v1.0-small) folder as downloaded: train.csv
    and valid.csv (columns Path, Frontal/Lateral and the label columns) next to the train/ and
    valid/ image folders. Path values start with the dataset folder's own name, e.g.
    CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg.
    """

    def __init__(self, *, split_seed: int = 0, num_validation: int = NUM_VALIDATION, **kwargs):
        self._split_seed, self._num_validation = int(split_seed), int(num_validation)
        super().__init__(**kwargs)

    def options(self) -> dict:
        return {**super().options(), "split_seed": self._split_seed,
                "num_validation": self._num_validation}

    def _examples(self):
        root = self.source_dir()
        examples, bad = [], []
        for table_name, split in (("train.csv", "train"), ("valid.csv", "test")):
            table = records.read_table(root / table_name, required=("Path", VIEW_COLUMN))
            for number, row in enumerate(table, start=1):
                if row[VIEW_COLUMN] != "Frontal":
                    self.filtered["lateral view"] += 1
                    continue
                relative = Path(*Path(row["Path"]).parts[1:])  # drop the dataset folder name
                where = f"{table_name} row {number}"
                try:
                    labels = competition_labels(row)
                except ValueError as e:
                    bad.append(records.BadRow(where, str(root / relative), str(e),
                                              len(examples) + len(bad)))
                    continue
                examples.append(records.Example(
                    id=str(relative), split=split, path=str(root / relative), labels=labels,
                    where=where, row=len(examples) + len(bad)))
        held_out = records.holdout_splits((e.id for e in examples if e.split == "train"),
                                          self._split_seed, validation=self._num_validation)
        examples = [e if e.split == "test" else dataclasses.replace(e, split=held_out[e.id])
                    for e in examples]
        return examples, bad


def make_builder(data_dir, manual_dir=None, **options):
    return records.make(Chexpert, data_dir, manual_dir, **options)
