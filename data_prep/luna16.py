"""LUNA16: 888 chest CTs (MetaImage .mhd/.raw), labelled nodule / no nodule.

A scan is positive when annotations.csv (seriesuid,coordX,coordY,coordZ,diameter_mm) lists
a nodule in it (UniMedI Sec. 4.2: "classifying each CT volume into pulmonary nodule or
normal"). Splits by the challenge's ten subsets: subsets 0-7 train, 8 validation, 9 test
(`validation_subsets`, `test_subsets`). The MetaImage reader needs no SimpleITK.
"""

from __future__ import annotations

import re

from data_prep import records

ANNOTATIONS = "annotations.csv"
VALIDATION_SUBSETS, TEST_SUBSETS = (8,), (9,)


class Luna16(records.RecordBuilder):
    """LUNA16 chest CT scans with a nodule / no-nodule label."""

    MODALITY = "ct"
    LABEL_NAMES = ("nodule",)
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    manual_dir holds annotations.csv and the unpacked subset0 ... subset9 folders of
    <seriesuid>.mhd + <seriesuid>.raw files (a nested subsetN/subsetN/ is fine).
    """

    def __init__(self, *, validation_subsets=VALIDATION_SUBSETS, test_subsets=TEST_SUBSETS,
                 **kwargs):
        self._validation = tuple(int(s) for s in validation_subsets)
        self._test = tuple(int(s) for s in test_subsets)
        super().__init__(**kwargs)

    def options(self) -> dict:
        return {**super().options(), "validation_subsets": list(self._validation),
                "test_subsets": list(self._test)}

    def _examples(self):
        root = self.source_dir()
        table = records.read_table(root / ANNOTATIONS, required=("seriesuid", "diameter_mm"))
        with_nodule = {row["seriesuid"] for row in table}
        scans = sorted(root.glob("subset*/**/*.mhd"))
        if not scans:
            raise FileNotFoundError(f"{root}: no subset*/<seriesuid>.mhd files")
        examples, bad = [], []
        for number, path in enumerate(scans, start=1):
            where = f"scan {path.relative_to(root)}"
            subset = re.fullmatch(r"subset(\d+)", path.relative_to(root).parts[0])
            if subset is None:
                bad.append(records.BadRow(where, str(path), "not in a subsetN folder", number))
                continue
            subset = int(subset.group(1))
            split = ("validation" if subset in self._validation else
                     "test" if subset in self._test else "train")
            examples.append(records.Example(
                id=path.stem, split=split, path=str(path),
                labels=(float(path.stem in with_nodule),), where=where, row=number))
        missing = len(with_nodule - {e.id for e in examples})
        if missing:  # e.g. only some subsets downloaded
            self.filtered["annotated series whose scan is not in manual_dir"] = missing
        return examples, bad


def make_builder(data_dir, manual_dir=None, **options):
    return records.make(Luna16, data_dir, manual_dir, **options)
