"""Clean-CC-CCII: chest CT scans (folders of slice images) labelled NCP / CP / Normal.

Layout: `<class>/<patient_id>/<scan_id>/<slice>.png|.jpg` for class NCP (novel coronavirus
pneumonia), CP (common pneumonia) and Normal. Each scan folder is one example, read as a
stack of 8-bit slice images (data_prep/readers.py: slices in file-number order, grey values
mapped onto the lung window) and resized to the CT size (32x128x128, UniMedI appendix). Labels
are one-hot over LABEL_NAMES. The dataset has no official split: patients are held out at
random, `validation` and `test` of them (fractions or counts), the rest is train.
"""

from __future__ import annotations

from data_prep import readers, records

LABEL_NAMES = ("NCP", "CP", "Normal")
# No published split: hold out 10% of patients for validation and 20% for test.
VALIDATION, TEST = 0.1, 0.2


class CcCcii(records.RecordBuilder):
    """Clean-CC-CCII CT scans with one-hot NCP / CP / Normal labels."""

    MODALITY = "ct"
    LABEL_NAMES = LABEL_NAMES
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    manual_dir holds the class folders NCP/, CP/ and Normal/, each with
    <patient_id>/<scan_id>/ folders of slice images (PNG or JPG, numbered in slice order).
    """

    def __init__(self, *, split_seed: int = 0, validation: float | int = VALIDATION,
                 test: float | int = TEST, **kwargs):
        self._split_seed, self._holdout = int(split_seed), {"validation": validation, "test": test}
        super().__init__(**kwargs)

    def options(self) -> dict:
        return {**super().options(), "split_seed": self._split_seed, **self._holdout}

    def _examples(self):
        root = self.source_dir()
        missing = [c for c in LABEL_NAMES if not (root / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"{root}: class folder(s) {missing} not found")
        scans = sorted(p for c in LABEL_NAMES for p in (root / c).glob("*/*") if p.is_dir())
        patient = {scan: "/".join(scan.relative_to(root).parts[:2]) for scan in scans}
        split_of = records.holdout_splits(patient.values(), self._split_seed, **self._holdout)
        examples, bad = [], []
        for number, scan in enumerate(scans, start=1):
            label = scan.relative_to(root).parts[0]
            where = f"scan {scan.relative_to(root)}"
            if not any(readers.suffix_of(f) in readers.IMAGE_SUFFIXES for f in scan.iterdir()):
                bad.append(records.BadRow(where, str(scan), "no slice images", number))
                continue
            examples.append(records.Example(
                id=str(scan.relative_to(root)), split=split_of[patient[scan]], path=str(scan),
                labels=tuple(float(label == c) for c in LABEL_NAMES), where=where, row=number))
        return examples, bad


def make_builder(data_dir, manual_dir=None, **options):
    return records.make(CcCcii, data_dir, manual_dir, **options)
