"""MIMIC-CXR-JPG 2.0.0 with the MIMIC-CXR reports: UniMedI's 2D pre-training pairs.

As in UniMedI Sec. 4.1 and MGCA: frontal views only (ViewPosition PA or AP), the report's
FINDINGS and IMPRESSION sections, reports of fewer than three sentences dropped
(data_prep/reports.py). Splits from mimic-cxr-2.0.0-split.csv (validate -> validation).
Labels: the five CheXpert competition labels of mimic-cxr-2.0.0-chexpert.csv with the MGCA
policy of data_prep/chexpert.py (-1 for every label of a study missing from that file).
"""

from __future__ import annotations

from pathlib import Path

from data_prep import chexpert, records, reports

FRONTAL_VIEWS = ("PA", "AP")
SPLIT_NAMES = {"train": "train", "validate": "validation", "test": "test"}
_PREFIX = "mimic-cxr-2.0.0-"


def _table(root: Path, name: str, required):
    return records.read_table(records.find_file(root, f"{_PREFIX}{name}.csv.gz",
                                                f"{_PREFIX}{name}.csv"), required)


def study_folder(root: Path, subject_id: str, study_id: str) -> Path:
    """files/p1x/p1xxxxxxx/sYYYYYYYY under `root` (the published layout)."""
    return root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}"


class MimicCxr(records.RecordBuilder):
    """MIMIC-CXR-JPG frontal radiographs with cleaned FINDINGS + IMPRESSION reports."""

    MODALITY = "xray"
    LABEL_NAMES = chexpert.COMPETITION_LABELS
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    manual_dir is the MIMIC-CXR-JPG 2.0.0 folder as downloaded: mimic-cxr-2.0.0-metadata.csv.gz,
    mimic-cxr-2.0.0-split.csv.gz and mimic-cxr-2.0.0-chexpert.csv.gz (or the unzipped .csv) and
    files/p10/p10000032/s50414267/<dicom_id>.jpg. The reports (mimic-cxr-reports.zip of
    MIMIC-CXR 2.0.0, files/p10/p10000032/s50414267.txt) are unzipped into the same folder or
    into `reports_dir`.
    """

    def __init__(self, *, reports_dir=None, min_sentences: int = reports.MIN_SENTENCES, **kwargs):
        self._reports_dir = Path(reports_dir) if reports_dir else None
        self._min_sentences = int(min_sentences)
        super().__init__(**kwargs)

    def options(self) -> dict:
        return {**super().options(), "min_sentences": self._min_sentences}

    def _examples(self):
        root = self.source_dir()
        reports_root = self._reports_dir or root
        metadata = _table(root, "metadata", ("dicom_id", "subject_id", "study_id", "ViewPosition"))
        split_of = {r["dicom_id"]: r["split"]
                    for r in _table(root, "split", ("dicom_id", "study_id", "subject_id", "split"))}
        labels_of = {(r["subject_id"], r["study_id"]): r for r in _table(
            root, "chexpert", ("subject_id", "study_id", *chexpert.COMPETITION_LABELS))}
        examples, bad, report_of = [], [], {}
        for number, row in enumerate(metadata, start=1):
            if row["ViewPosition"] not in FRONTAL_VIEWS:
                self.filtered["not a frontal view (ViewPosition PA/AP)"] += 1
                continue
            subject, study, dicom = row["subject_id"], row["study_id"], row["dicom_id"]
            image = study_folder(root, subject, study) / f"{dicom}.jpg"
            if study not in report_of:
                report_file = study_folder(reports_root, subject, study).with_suffix(".txt")
                report_of[study] = (reports.clean_report(report_file.read_text(encoding="utf-8"),
                                                         min_sentences=self._min_sentences)
                                    if report_file.is_file() else None)
            cleaned, labels, reason = report_of[study], None, None
            if cleaned is not None and cleaned.text is None:
                self.filtered[f"report: {cleaned.reason}"] += 1
                continue
            if cleaned is None:
                reason = f"report {study_folder(reports_root, subject, study)}.txt not found"
            elif split_of.get(dicom) not in SPLIT_NAMES:
                reason = (f"split {split_of.get(dicom)!r} in the split file, expected train, "
                          "validate or test")
            else:
                label_row = labels_of.get((subject, study))
                try:
                    labels = (chexpert.competition_labels(label_row) if label_row else
                              (records.UNKNOWN_LABEL,) * len(self.LABEL_NAMES))
                except ValueError as e:
                    reason = f"chexpert labels: {e}"
            where = f"metadata row {number}"
            if reason:
                bad.append(records.BadRow(where, str(image), reason, number))
                continue
            examples.append(records.Example(
                id=f"p{subject}/s{study}/{dicom}", split=SPLIT_NAMES[split_of[dicom]],
                path=str(image), report=cleaned.text, labels=labels, where=where, row=number))
        return examples, bad


def make_builder(data_dir, manual_dir=None, **options):
    return records.make(MimicCxr, data_dir, manual_dir, **options)
