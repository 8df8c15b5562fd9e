"""COVIDx (version 6, three classes): normal / pneumonia / COVID-19 chest X-rays.

The list files have one image per line, `patient_id filename class data_source`, with the
images in train/ and test/. As UniMedI Sec. 4.2: the original test list is the test set and
10% of the training list is held out for validation (here by patient, so that no patient is
in both). Labels are one-hot over LABEL_NAMES (accuracy = argmax). No reports.
"""

from __future__ import annotations

import dataclasses

from data_prep import records

LABEL_NAMES = ("normal", "pneumonia", "COVID-19")
# UniMedI Sec. 4.2: "manually split 10% of original training set for validation".
VALIDATION = 0.1


class Covidx(records.RecordBuilder):
    """COVIDx v6 chest X-rays, one-hot labels normal / pneumonia / COVID-19."""

    MODALITY = "xray"
    LABEL_NAMES = LABEL_NAMES
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    manual_dir holds the COVIDx image folders train/ and test/ and the list files: train.txt
    and test.txt, or the versioned names of the COVID-Net repository (train_COVIDx6.txt,
    test_COVIDx6.txt, ...; exactly one of each). Lines: patient_id filename class source,
    class one of normal, pneumonia, COVID-19.
    """

    def __init__(self, *, split_seed: int = 0, validation: float | int = VALIDATION, **kwargs):
        self._split_seed, self._validation = int(split_seed), validation
        super().__init__(**kwargs)

    def options(self) -> dict:
        return {**super().options(), "split_seed": self._split_seed,
                "validation": self._validation}

    def _list_file(self, root, split):
        candidates = [root / f"{split}.txt"] if (root / f"{split}.txt").is_file() else sorted(
            root.glob(f"{split}_COVIDx*.txt"))
        if len(candidates) != 1:
            raise FileNotFoundError(f"{root}: expected {split}.txt or one {split}_COVIDx*.txt, "
                                    f"found {[c.name for c in candidates]}")
        return candidates[0]

    def _examples(self):
        root = self.source_dir()
        examples, bad, patient_of = [], [], {}
        for split in ("train", "test"):
            list_file = self._list_file(root, split)
            for number, line in enumerate(list_file.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                fields = line.split()
                where, order = f"{list_file.name} line {number}", len(examples) + len(bad)
                # File names may hold spaces: the first field is the patient, the last two
                # the class and the source.
                if len(fields) < 4 or fields[-2] not in LABEL_NAMES:
                    bad.append(records.BadRow(where, line.strip(), "expected 'patient_id filename "
                                              f"class source' with class in {LABEL_NAMES}", order))
                    continue
                name = " ".join(fields[1:-2])
                one_hot = tuple(float(fields[-2] == c) for c in LABEL_NAMES)
                examples.append(records.Example(
                    id=f"{split}/{name}", split=split, path=str(root / split / name),
                    labels=one_hot, where=where, row=order))
                patient_of[examples[-1].id] = fields[0]
        held_out = records.holdout_splits(
            (patient_of[e.id] for e in examples if e.split == "train"), self._split_seed,
            validation=self._validation)
        examples = [e if e.split == "test" else
                    dataclasses.replace(e, split=held_out[patient_of[e.id]])
                    for e in examples]
        return examples, bad


def make_builder(data_dir, manual_dir=None, **options):
    return records.make(Covidx, data_dir, manual_dir, **options)
