"""BCV (Beyond the Cranial Vault, MICCAI 2015 multi-atlas abdomen): CT with 13 organ masks.

Layout of the Synapse download: RawData/Training/img/img00XX.nii.gz with
RawData/Training/label/label00XX.nii.gz (30 labelled scans; RawData/Testing has no labels and
is not used). The image and its label map are read in the same axis order and resized to the
CT size, the label map by nearest neighbour into `mask` (class c = MASK_CLASSES[c]).
`labels` says which organs are present in the stored mask. Split: cases 35-40 are the test
set, as in the UNETR/Swin-UNETR BTCV split (dataset_0.json); the rest is train.
"""

from __future__ import annotations

import re

import numpy as np

from data_prep import records

ORGANS = ("spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach",
          "aorta", "inferior vena cava", "portal vein and splenic vein", "pancreas",
          "right adrenal gland", "left adrenal gland")
# UNETR's BTCV dataset_0.json: validation cases img0035 ... img0040.
TEST_CASES = (35, 36, 37, 38, 39, 40)
IMAGE_DIR, LABEL_DIR = "RawData/Training/img", "RawData/Training/label"


class Bcv(records.RecordBuilder):
    """BCV abdominal CT with 13-organ segmentation masks."""

    MODALITY = "ct"
    LABEL_NAMES = ORGANS
    HAS_MASK = True
    MASK_CLASSES = ("background", *ORGANS)
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    manual_dir holds RawData/Training/img/img00XX.nii.gz and
    RawData/Training/label/label00XX.nii.gz as in the Synapse RawData.zip.
    """

    def __init__(self, *, test_cases=TEST_CASES, **kwargs):
        self._test_cases = tuple(int(c) for c in test_cases)
        super().__init__(**kwargs)

    def options(self) -> dict:
        return {**super().options(), "test_cases": list(self._test_cases)}

    def _examples(self):
        root = self.source_dir()
        images = sorted((root / IMAGE_DIR).glob("img*.nii.gz"))
        if not images:
            raise FileNotFoundError(f"{root / IMAGE_DIR}: no img*.nii.gz files")
        examples, bad = [], []
        for number, image in enumerate(images, start=1):
            case = re.fullmatch(r"img(\d+)\.nii\.gz", image.name)
            if case is None:
                bad.append(records.BadRow(f"image {image.name}", str(image),
                                          "name is not img<number>.nii.gz", number))
                continue
            examples.append(records.Example(
                id=image.name.removesuffix(".nii.gz"),
                split="test" if int(case.group(1)) in self._test_cases else "train",
                path=str(image), mask_path=str(root / LABEL_DIR / f"label{case.group(1)}.nii.gz"),
                labels=(0.0,) * len(ORGANS), where=f"image {image.name}", row=number))
        return examples, bad

    def _generate_examples(self, examples):
        for key, record in super()._generate_examples(examples):
            present = np.bincount(record["mask"].ravel(), minlength=len(self.MASK_CLASSES))[1:]
            if present.size != len(ORGANS):
                raise ValueError(f"{self.info.full_name}: {key}: mask classes up to "
                                 f"{present.size}, BCV has {len(ORGANS)} organs")
            yield key, {**record, "labels": (present > 0).astype(np.float32)}


def make_builder(data_dir, manual_dir=None, **options):
    return records.make(Bcv, data_dir, manual_dir, **options)
