"""BIMCV-COVID19+ chest CTs with their radiology reports: UniMedI's 3D pre-training pairs.

Layout (BIDS/MIDS, as unpacked from the covid19_posi archives): CT series are
`covid19_posi/sub-*/ses-*/mod-rx/*_ct.nii.gz` (e.g. sub-S03047_ses-E07985_run-1_bp-chest_ct),
and the reports are the `Report` column of `covid19_posi/derivatives/labels/labels_covid_posi.tsv`
(one row per session, `ReportID` = the ses-* id; the text is stored as the repr of a Python
list of strings, e.g. "['Opacidades bilaterales.', 'Sin derrame.']"; iteration 3 ships the
same table as Labels_covid_123.tsv, chosen with `labels_file`). Every CT series of a session
is an example with the session's report; reports of fewer than three sentences are dropped (UniMedI
Sec. 4.1; the reports have no section headers, so the whole text counts). All examples are
in the train split (pre-training data); there are no labels.
"""

from __future__ import annotations

import ast

from data_prep import records, reports

LABELS_FILE = "derivatives/labels/labels_covid_posi.tsv"
CT_PATTERN = "sub-*/ses-*/mod-rx/*_ct.nii.gz"


def report_text(stored: str) -> str:
    """The report of a `Report` cell: its list of strings joined, or the cell as it is."""
    try:
        parts = ast.literal_eval(stored.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return stored
    if isinstance(parts, (list, tuple)) and all(isinstance(p, str) for p in parts):
        return "\n".join(parts)
    return stored


class Bimcv(records.RecordBuilder):
    """BIMCV-COVID19+ chest CT series paired with their session's report."""

    MODALITY = "ct"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    manual_dir is the unpacked covid19_posi folder (or its parent): sub-*/ses-*/mod-rx/*_ct.nii.gz
    and derivatives/labels/labels_covid_posi.tsv (tab-separated, columns ReportID and Report).
    """

    def __init__(self, *, labels_file: str = LABELS_FILE,
                 min_sentences: int = reports.MIN_SENTENCES, **kwargs):
        self._labels_file, self._min_sentences = labels_file, int(min_sentences)
        super().__init__(**kwargs)

    def options(self) -> dict:
        return {**super().options(), "min_sentences": self._min_sentences}

    def _examples(self):
        root = self.source_dir()
        if (root / "covid19_posi").is_dir():
            root = root / "covid19_posi"
        table = records.read_table(root / self._labels_file, required=("ReportID", "Report"))
        report_of = {row["ReportID"].strip(): row["Report"] for row in table}
        examples, bad = [], []
        for number, path in enumerate(sorted(root.glob(CT_PATTERN)), start=1):
            session = path.parts[-3]
            where = f"series {path.relative_to(root)}"
            if session not in report_of:
                bad.append(records.BadRow(where, str(path), f"no report for {session} in "
                                          f"{self._labels_file}", number))
                continue
            cleaned = reports.clean_report(report_text(report_of[session]), sections=False,
                                           min_sentences=self._min_sentences)
            if cleaned.text is None:
                self.filtered[f"report: {cleaned.reason}"] += 1
                continue
            examples.append(records.Example(
                id=str(path.relative_to(root)), split="train", path=str(path),
                report=cleaned.text, where=where, row=number))
        if not examples and not bad:
            raise FileNotFoundError(f"{root}: no CT series matching {CT_PATTERN}")
        return examples, bad


def make_builder(data_dir, manual_dir=None, **options):
    return records.make(Bimcv, data_dir, manual_dir, **options)
